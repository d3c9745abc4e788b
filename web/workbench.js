// SAE Unbox workbench: a sidebar tab of ComfyUI's frontend for the paper's interactive use, inside the graph.
//
// After a run with probes (Top Features or Feature Heatmap nodes), the panel shows the run's image and, per
// probed block, the ranked features. Clicking a feature overlays its heatmap, computed on the server from the
// codes it kept for that run (/sae_unbox/workbench/heat), with its statistics, label and top dataset images.
// Paint a region and Apply: the panel adds (or updates) an SAE Steer Features node between the probed MODEL
// and the sampler, with an SAE Painted Mask node holding the painting (placed in free space of the canvas),
// queues the graph, and shows the input and the steered output side by side. The chosen block and feature
// are kept across runs and page reloads (in the browser's localStorage). Feature icon and
// Find features queue small prompts built from the graph. Everything the panel does is a node or a widget value
// of the graph (the graph stays the source of truth) or a label in the file beside the SAE.
//
// Plain ES module, no build step; uses only app.js and api.js of the frontend (both versions the pack supports:
// comfyui-frontend-package 1.27.x and 1.35.x).
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";

const TAB = "sae-unbox-workbench";
const STEER = "UnboxSteerFeatures";
const PAINTED = "UnboxPaintedMask";
const PASS_THROUGH = new Set(["UnboxProbeBlock", STEER, "UnboxReconstructBlock", "UnboxDumpActivations"]);
// Colours as nodes/render.py draws heatmaps: anchors of matplotlib's inferno at 0, 1/4, 1/2, 3/4, 1.
const INFERNO = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
// What the paper found each SDXL block does (its section 4); mid.0's features it found harder to name.
export const ROLES = { "down.2.1": "composition", "up.0.0": "local details", "up.0.1": "colour and style" };
const SAVED = "sae_unbox.workbench.selection";
const GAP = 40; // canvas units kept free around a node the panel places

export function colorize(v) {
  const x = Math.min(Math.max(v, 0), 1) * (INFERNO.length - 1);
  const lo = Math.min(Math.floor(x), INFERNO.length - 2);
  const f = x - lo;
  return INFERNO[lo].map((c, i) => Math.round(c * (1 - f) + INFERNO[lo + 1][i] * f));
}

function savedChoice() {
  try {
    const v = JSON.parse(localStorage.getItem(SAVED) || "{}");
    return { block: typeof v.block === "string" ? v.block : null, feature: Number.isInteger(v.feature) ? v.feature : null };
  } catch {
    return { block: null, feature: null };
  }
}

const state = {
  runs: [], run: null, block: null, image: 0, feature: null,
  want: savedChoice(), // the block and feature the user chose: kept across runs and reloads while they exist
  labels: {}, // sae name -> {labels: {feature: label}, categories: {feature: category}}
  mode: "view", pending: {}, // prompt id -> "icon" | "find"
  compare: null, // {before: data URL, run: the run shown when Apply was pressed}
};

function choose(block, feature) {
  state.want = { block, feature };
  try { localStorage.setItem(SAVED, JSON.stringify(state.want)); } catch { /* private mode: not kept */ }
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (k === "style") e.style.cssText = v;
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

const STYLE = `
.sae-wb { padding: 0 8px 8px; display: flex; flex-direction: column; gap: 6px; font-size: 13px; height: 100%;
  overflow-y: auto; box-sizing: border-box; }
.sae-wb > *, .sae-wb .top > * { flex-shrink: 0; }
.sae-wb .top { position: sticky; top: 0; z-index: 2; display: flex; flex-direction: column; gap: 6px; padding-top: 8px;
  padding-bottom: 6px; background: var(--comfy-menu-bg, #353535); border-bottom: 1px solid var(--border-color, #444); }
.sae-wb select, .sae-wb input, .sae-wb textarea, .sae-wb button { font: inherit; color: inherit;
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); border-radius: 4px; padding: 2px 6px; }
.sae-wb select { max-width: 100%; }
.sae-wb .row { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.sae-wb .stage { position: relative; width: 100%; max-width: 36vh; margin: 0 auto; background: #000; }
.sae-wb .stage img, .sae-wb .stage canvas { position: absolute; inset: 0; width: 100%; height: 100%; }
.sae-wb .stage img { position: relative; display: block; height: auto; }
.sae-wb .overlay { image-rendering: pixelated; pointer-events: none; }
.sae-wb .paint { opacity: .45; mix-blend-mode: screen; pointer-events: none; }
.sae-wb .paint.on { pointer-events: auto; cursor: crosshair; }
.sae-wb .ranking { display: flex; flex-direction: column; gap: 2px; max-height: 14em; overflow: auto; }
.sae-wb .ranking button { text-align: left; }
.sae-wb .ranking button.sel { border-color: #ffcc33; }
.sae-wb .dim { opacity: .7; font-size: 12px; }
.sae-wb .msg { line-height: 16px; overflow-y: auto; overflow-wrap: anywhere; }
.sae-wb .msg-2 { height: 32px; }
.sae-wb .msg-3 { height: 48px; }
.sae-wb .thumbs { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; }
.sae-wb .thumbs img, .sae-wb .icon img, .sae-wb .released img { width: 100%; display: block; }
.sae-wb .compare { display: grid; grid-template-columns: 1fr 1fr; gap: 4px; }
.sae-wb .compare img { width: 100%; display: block; }
.sae-wb .cat { opacity: .7; font-style: italic; }
.sae-wb h4 { margin: 6px 0 2px; font-size: 13px; }
`;

// ---- the panel's elements (built once: the sidebar may render it again into a new or a reused container) ----

const $ = {};
const field = (name, node) => ($[name] = node);
const root = el("div", { class: "sae-wb", "data-testid": "sae-workbench" },
  el("style", {}, STYLE),
  field("top", el("div", { class: "top", "data-testid": "sae-top" },
    el("div", { class: "row" },
      el("label", {}, "run ", field("runSelect", el("select", { "data-testid": "sae-run", title: "The runs the server kept, newest first: when each ran and which blocks it probed",
        on: { change: () => selectRun($.runSelect.value) } }))),
      el("label", {}, "block ", field("blockSelect", el("select", { "data-testid": "sae-block", title: "The probed block; the paper found down.2.1 sets composition, up.0.0 local details, up.0.1 colour and style",
        on: { change: () => {
          choose($.blockSelect.value, state.want.block === $.blockSelect.value ? state.want.feature : null);
          selectBlock($.blockSelect.value);
        } } }))),
      el("button", { "data-testid": "sae-refresh", title: "Reload the runs the server kept", on: { click: () => refreshRuns() } }, "↻")),
    field("stage", el("div", { class: "stage", "data-testid": "sae-stage" },
      field("image", el("img", { "data-testid": "sae-image", alt: "" })),
      field("overlay", el("canvas", { class: "overlay", "data-testid": "sae-overlay", width: 1, height: 1 })),
      field("paint", el("canvas", { class: "paint", "data-testid": "sae-paint", width: 1, height: 1 })))),
    el("div", { class: "row" },
      el("label", {}, "feature ", field("featureId", el("input", { type: "number", min: 0, style: "width:6em", "data-testid": "sae-feature-id" }))),
      el("button", { "data-testid": "sae-show", on: { click: () => selectFeature(Number($.featureId.value), true) } }, "show"),
      el("label", { title: "Opacity of the heatmap over the image" }, "heatmap ", field("alpha", el("input", { type: "range", min: 0, max: 1, step: 0.05, value: 0.6,
        "data-testid": "sae-alpha", on: { input: () => { $.overlay.style.opacity = $.alpha.value; } } })))),
    // The status and the feature's line have fixed heights: a message of another length must not move the
    // lists under the pointer (a click pressed on one button and released on the next is lost).
    field("detail", el("div", { "data-testid": "sae-detail", class: "dim msg msg-3" })),
    el("div", { class: "row" },
      field("paintMode", el("button", { "data-testid": "sae-paint-mode", title: "Paint on the image where the feature should act", on: { click: () => setMode(state.mode === "paint" ? "view" : "paint") } }, "brush")),
      el("label", {}, "size ", field("brush", el("input", { type: "number", min: 1, max: 512, value: 48, style: "width:4.5em", "data-testid": "sae-brush" }))),
      el("label", {}, field("erase", el("input", { type: "checkbox", "data-testid": "sae-erase" })), " erase"),
      el("button", { "data-testid": "sae-clear", on: { click: () => clearPaint() } }, "clear")),
    el("div", { class: "row" },
      el("label", { title: "How much of the feature: strength × its mean activation × its direction" }, "strength ",
        field("strength", el("input", { type: "number", step: 0.5, value: 4, style: "width:4.5em", "data-testid": "sae-strength" }))),
      el("label", { title: "Which part of the denoising the feature is painted in, as fractions: 0 is the first step, 1 the end" }, "during ",
        field("start", el("input", { type: "number", min: 0, max: 1, step: 0.05, value: 0, style: "width:4em", "data-testid": "sae-start" })),
        " to ", field("end", el("input", { type: "number", min: 0, max: 1, step: 0.05, value: 1, style: "width:4em", "data-testid": "sae-end" })),
        " of denoising"),
      el("button", { "data-testid": "sae-apply", title: "Paint the feature into the graph and run it", on: { click: () => applyPaint() } }, "Apply"),
      el("button", { "data-testid": "sae-icon", title: "The paper's feature icon: empty prompt, the block's update replaced by k × mean × the feature", on: { click: () => featureIcon() } }, "feature icon")),
    field("status", el("div", { class: "dim msg msg-2", "data-testid": "sae-status" }, "Run a graph with SAE Top Features to see its features here.")))),
  field("compare", el("div", { class: "compare", "data-testid": "sae-compare" })),
  field("icon", el("div", { class: "icon", "data-testid": "sae-icon-result" })),
  el("h4", {}, "Top features ", el("span", { class: "dim" }, "(by mean activation over the image)")),
  field("ranking", el("div", { class: "ranking", "data-testid": "sae-ranking" })),
  el("h4", {}, "Top images of the feature"),
  field("topImages", el("div", { class: "thumbs", "data-testid": "sae-top-images" })),
  field("released", el("div", { class: "released", "data-testid": "sae-released" })),
  field("topNote", el("div", { class: "dim", "data-testid": "sae-top-note" })),
  el("div", { class: "row" },
    field("labelInput", el("input", { placeholder: "label this feature", maxlength: 200, style: "flex:1", "data-testid": "sae-label-input" })),
    el("button", { "data-testid": "sae-label-save", on: { click: () => saveLabel() } }, "save label")),
  el("h4", {}, "Find features by a concept"),
  el("div", { class: "dim" }, "Ranks the features that fire more for the concept than for the neutral prompts (several separated by ;), with this graph's model."),
  el("div", { class: "row" },
    el("label", { style: "flex:1" }, "concept ", field("concept", el("input", { value: "a red car", style: "width:100%", "data-testid": "sae-concept" }))),
    el("label", { style: "flex:1" }, "neutral ", field("neutral", el("input", { value: "a car", style: "width:100%", title: "neutral prompts, separated by ;", "data-testid": "sae-neutral" }))),
    el("button", { "data-testid": "sae-find", on: { click: () => findFeatures() } }, "find")),
  field("found", el("div", { class: "ranking", "data-testid": "sae-found" })),
  el("h4", {}, "Labels"),
  el("div", { class: "row" },
    field("labelSearch", el("input", { type: "search", placeholder: "search the labels", style: "flex:1", "data-testid": "sae-label-search", on: { input: () => showLabelSearch() } })),
    el("label", { title: "Import a published label set (JSON, JSON Lines or CSV) for this SAE" }, "import ",
      field("labelFile", el("input", { type: "file", accept: ".json,.jsonl,.csv,.txt", "data-testid": "sae-label-import", on: { change: () => importLabels() } }))),
    field("paperLabels", el("button", { "data-testid": "sae-paper-labels", style: "display:none",
      title: "Download (verified) and import the published labels of the paper's SAE of this block", on: { click: () => importPaperLabels() } }, "import the paper's labels"))),
  field("labelHits", el("div", { class: "ranking", "data-testid": "sae-label-hits" })),
);

function setStatus(text) {
  $.status.textContent = text;
  $.status.title = text; // the whole message, where it is longer than the two lines shown
}

// ---- runs, blocks, features ----

async function getJSON(path, init) {
  const r = await api.fetchApi(path, init);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${path}: HTTP ${r.status}`);
  return body;
}

function currentRun() { return state.runs.find((r) => r.run === state.run) || null; }
function currentBlock() { return currentRun()?.blocks.find((b) => b.block === state.block) || null; }

export function blockTitle(b) {
  return `${b.block}${ROLES[b.block] ? ` — ${ROLES[b.block]}` : ""}  (${b.sae})`;
}

function runTitle(r) {
  const when = new Date(r.created * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return `${when} · ${r.blocks.map((b) => b.block).join(", ")}`;
}

export async function refreshRuns(prefer) {
  state.runs = await getJSON("/sae_unbox/workbench/runs");
  $.runSelect.replaceChildren(...state.runs.map((r) => el("option", { value: r.run }, runTitle(r))));
  const keep = prefer || (state.runs.some((r) => r.run === state.run) ? state.run : state.runs[0]?.run);
  if (keep) await selectRun(keep);
  else setStatus("No run with probes yet: run a graph with SAE Top Features.");
}

async function selectRun(id) {
  state.run = id;
  $.runSelect.value = id;
  const run = currentRun();
  if (!run) return;
  const titles = run.blocks.map(blockTitle);
  if ($.blockSelect.dataset.key !== JSON.stringify(titles)) { // rebuilt only when the run's blocks change
    $.blockSelect.dataset.key = JSON.stringify(titles);
    $.blockSelect.replaceChildren(...run.blocks.map((b, i) => el("option", { value: b.block }, titles[i])));
    if (run.blocks.some((b) => b.block === state.block)) $.blockSelect.value = state.block;
  }
  state.image = 0;
  const src = api.apiURL(`/sae_unbox/workbench/image?run=${encodeURIComponent(id)}&index=0`);
  if ($.image.dataset.src !== src || !$.image.complete) { // a refresh of the run shown keeps its image
    $.image.dataset.src = src;
    await new Promise((resolve) => {
      $.image.onload = resolve;
      $.image.onerror = resolve;
      $.image.src = src;
    });
  }
  if (state.run !== id) return; // another run was chosen meanwhile
  sizePaint();
  showComparison(run);
  const has = (name) => run.blocks.some((b) => b.block === name);
  const block = has(state.want.block) ? state.want.block : has(state.block) ? state.block : run.blocks[0]?.block;
  await selectBlock(block, { refresh: true });
}

async function loadLabels(sae) {
  try {
    const r = await getJSON(`/sae_unbox/labels?sae=${encodeURIComponent(sae)}`);
    state.labels[sae] = { labels: r.labels || {}, categories: r.categories || {} };
  } catch {
    state.labels[sae] = { labels: {}, categories: {} };
  }
  return state.labels[sae];
}

function labelOf(sae, feature) {
  const set = state.labels[sae] || { labels: {}, categories: {} };
  return { label: set.labels[feature] || "", category: set.categories[feature] || "" };
}

function labelText(sae, feature) {
  const { label, category } = labelOf(sae, feature);
  return label ? `${label}${category ? ` [${category}]` : ""}` : "";
}

// `refresh`: called for a refresh of the runs; a feature already shown for this run and block is then left as it
// is (its heatmap, top images and the painting in progress).
async function selectBlock(name, { refresh = false } = {}) {
  state.block = name;
  $.blockSelect.value = name;
  const run = state.run;
  if (!currentBlock()) return;
  await loadLabels(currentBlock().sae);
  if (state.block !== name || state.run !== run) return; // another block or run was chosen meanwhile
  const b = currentBlock(); // the newest description of it: the runs may have been refreshed meanwhile
  if (!b) return;
  const rows = b.ranking.map((f) => {
    const text = labelText(b.sae, f.feature);
    return [f.feature, `#${f.feature} · mean ${f.mean_activation.toPrecision(3)}${text ? " · " + text : ""}`];
  });
  // A refresh that changes nothing here (the run's later nodes reporting) keeps the buttons: rebuilt under the
  // pointer, a click pressed on the old button and released on the new one would be lost.
  const key = JSON.stringify([name, rows]);
  if ($.ranking.dataset.key !== key) {
    $.ranking.dataset.key = key;
    $.ranking.replaceChildren(...rows.map(([feature, text]) => el("button", { "data-testid": `sae-feature-${feature}`,
      title: "mean activation over the image", on: { click: () => selectFeature(feature, true) } }, text)));
    for (const btn of $.ranking.children) btn.classList.toggle("sel", btn.dataset.testid === `sae-feature-${state.feature}`);
  }
  $.ranking.dataset.block = name;
  $.paperLabels.style.display = b.label_set ? "" : "none";
  showLabelSearch();
  const wanted = state.want.block === name && Number.isInteger(state.want.feature) && state.want.feature < b.n_features;
  const keep = wanted ? state.want.feature : b.ranking[0]?.feature;
  if (refresh && keep === state.feature && $.overlay.dataset.shown === shownKey(keep)) return; // status kept too
  setStatus(`${b.block}: ${b.grid[0]}×${b.grid[1]} positions, SAE ${b.sae}`);
  if (keep !== undefined && keep !== null) await selectFeature(keep);
}

const shownKey = (feature) => JSON.stringify([state.run, state.block, feature]);

export async function selectFeature(feature, chosen = false) {
  const b = currentBlock();
  if (!b) return;
  if (!Number.isInteger(feature) || feature < 0 || feature >= b.n_features) { // refused: nothing changes
    setStatus(`feature ${$.featureId.value} is out of range: SAE ${b.sae} has features 0..${b.n_features - 1}`);
    $.featureId.value = state.feature ?? "";
    return;
  }
  const run = state.run;
  if (chosen) choose(b.block, feature);
  if (state.feature !== feature) $.icon.replaceChildren(); // the icon shown was another feature's
  state.feature = feature;
  $.featureId.value = feature;
  for (const btn of $.ranking.children) btn.classList.toggle("sel", btn.dataset.testid === `sae-feature-${feature}`);
  showStoredPainting(b, feature);
  let heat;
  try {
    heat = await getJSON(`/sae_unbox/workbench/heat?run=${encodeURIComponent(state.run)}&block=${encodeURIComponent(b.block)}&feature=${feature}&index=${state.image}`);
  } catch (e) {
    setStatus(String(e.message || e));
    return;
  }
  // superseded by a newer choice (a refresh of the same run is not one: the run's codes do not change)
  if (state.feature !== feature || state.run !== run || state.block !== b.block) return;
  drawHeat(heat);
  $.overlay.dataset.shown = shownKey(feature);
  const { label } = labelOf(b.sae, feature);
  $.labelInput.value = label;
  const text = labelText(b.sae, feature);
  const stats = Object.entries(heat.stats).map(([k, v]) => `${k} ${Number(v).toPrecision(3)}`).join(", ");
  $.detail.textContent = `#${feature} on ${b.block}${text ? ` — ${text}` : ""}: max here ${heat.max.toPrecision(3)}` +
    (stats ? `; over the SAE's data: ${stats}` : "");
  $.detail.title = $.detail.textContent;
  setStatus(`#${feature} on ${b.block}`);
  showTopImages(b, feature);
}

function drawHeat(heat) {
  const [h, w] = heat.grid;
  const c = $.overlay;
  c.width = w;
  c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) { // where the feature is off, the image shows through (as the paper's demo)
    const [r, g, b] = colorize(heat.max > 0 ? heat.values[i] / heat.max : 0);
    img.data.set([r, g, b, heat.values[i] > 0 ? 255 : 0], i * 4);
  }
  ctx.putImageData(img, 0, 0);
  c.style.opacity = $.alpha.value;
  c.dataset.feature = heat.feature;
}

// A feature's top images: from the SAE's own features index where it has one, else the paper's published
// images where the SAE is one of its releases; the panel asks only for what the run says exists.
let topImagesCall = 0;
async function showTopImages(b, feature) {
  $.topImages.replaceChildren();
  $.released.replaceChildren();
  $.topNote.textContent = "";
  // a later call (another feature, or the same one again after a run) supersedes this one
  const call = ++topImagesCall;
  const run = state.run;
  const stale = () => call !== topImagesCall || state.feature !== feature || state.run !== run || state.block !== b.block;
  try {
    if (b.index) {
      const page = await getJSON(`/sae_unbox/features?sae=${encodeURIComponent(b.sae)}&q=${encodeURIComponent("#" + feature)}&limit=1`);
      if (stale()) return;
      for (const e of (page.features[0]?.top || []).slice(0, 6)) {
        if (!e.file) continue;
        $.topImages.append(el("img", { title: `${e.prompt || ""} (${Number(e.value).toPrecision(3)})`,
          src: api.apiURL(`/sae_unbox/image?sae=${encodeURIComponent(b.sae)}&file=${encodeURIComponent(e.file)}`) }));
      }
      $.topNote.textContent = "from this SAE's features index";
    } else if (b.released) {
      $.topNote.textContent = "fetching the paper's top images…";
      const r = await getJSON(`/sae_unbox/released/top?sae=${encodeURIComponent(b.sae)}&feature=${feature}`);
      if (stale()) return;
      if (!r.released) {
        $.topNote.textContent = "No top images: this SAE has no features index and is not one of the paper's releases.";
      } else if (r.image) {
        $.released.replaceChildren(el("img", { "data-testid": "sae-released-image", title: r.source, src: api.apiURL(r.image) }));
        $.topNote.textContent = `the paper's top images of #${feature}, from ${r.source.replace(/\/resolve\/main\/.*/, "")}`;
      } else {
        $.topNote.textContent = r.message;
      }
    } else {
      $.topNote.textContent = "No top images: this SAE has no features index (SAE Train writes one) and is not one of the paper's releases.";
    }
  } catch (e) {
    if (!stale()) $.topNote.textContent = String(e.message || e);
  }
}

// ---- labels ----

async function saveLabel() {
  const b = currentBlock();
  if (!b || state.feature === null) return;
  const feature = state.feature;
  try {
    await getJSON("/sae_unbox/labels", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sae: b.sae, feature, label: $.labelInput.value }) });
    await selectBlock(state.block);
    setStatus($.labelInput.value.trim() ? `label of #${feature} saved` : `label of #${feature} removed`);
  } catch (e) {
    setStatus(String(e.message || e));
  }
}

function showLabelSearch() {
  const b = currentBlock();
  const q = $.labelSearch.value.trim().toLowerCase();
  const labels = (b && state.labels[b.sae]?.labels) || {};
  const hits = q ? Object.entries(labels).filter(([, t]) => t.toLowerCase().includes(q)).slice(0, 50)
    .map(([f]) => [f, `#${f} · ${labelText(b.sae, f)}`]) : [];
  const key = JSON.stringify([b?.sae, q, hits]);
  if ($.labelHits.dataset.key === key) return; // unchanged: the buttons stay (see selectBlock)
  $.labelHits.dataset.key = key;
  $.labelHits.replaceChildren(...hits.map(([f, text]) => el("button", { "data-testid": `sae-label-hit-${f}`,
    on: { click: () => selectFeature(Number(f), true) } }, text)));
  if (q && !hits.length) $.labelHits.append(el("div", { class: "dim", "data-testid": "sae-label-none" }, `no label of ${b?.sae ?? "this SAE"} matches “${q}”`));
}

async function importLabels() {
  const b = currentBlock();
  const file = $.labelFile.files[0];
  if (!b || !file) return;
  try {
    const r = await getJSON("/sae_unbox/labels/import", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sae: b.sae, text: await file.text() }) });
    await selectBlock(state.block);
    setStatus(`imported ${r.imported} labels (${r.labels} in all)`);
  } catch (e) {
    setStatus(String(e.message || e));
  }
  $.labelFile.value = "";
}

export async function importPaperLabels() {
  const b = currentBlock();
  if (!b) return;
  setStatus(`downloading the paper's labels of ${b.block}…`);
  try {
    const r = await getJSON("/sae_unbox/released/labels", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sae: b.sae }) });
    await selectBlock(state.block);
    setStatus(`imported ${r.imported} labels of the paper's ${b.block} SAE (${r.labels} in all), from ${r.source}`);
  } catch (e) {
    setStatus(String(e.message || e));
  }
}

// ---- painting ----

function sizePaint() {
  const w = $.image.naturalWidth || 1, h = $.image.naturalHeight || 1;
  if ($.paint.width !== w || $.paint.height !== h) {
    $.paint.width = w;
    $.paint.height = h;
    clearPaint();
  }
}

function clearPaint() {
  const ctx = $.paint.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, $.paint.width, $.paint.height);
}

export function hasPaint() {
  const { data } = $.paint.getContext("2d").getImageData(0, 0, $.paint.width, $.paint.height);
  for (let i = 0; i < data.length; i += 4) if (data[i] > 0) return true;
  return false;
}

function setMode(mode) {
  state.mode = mode;
  $.paint.classList.toggle("on", mode === "paint");
  $.paintMode.textContent = mode === "paint" ? "brush (on)" : "brush";
}

// Each pointer event paints the segment from the previous one (pointer events are sparse on a fast drag).
let last = null;
function stroke(ev) {
  const r = $.paint.getBoundingClientRect();
  const x = (ev.clientX - r.left) * ($.paint.width / r.width), y = (ev.clientY - r.top) * ($.paint.height / r.height);
  const ctx = $.paint.getContext("2d");
  ctx.strokeStyle = ctx.fillStyle = $.erase.checked ? "#000" : "#fff";
  ctx.lineWidth = Number($.brush.value);
  ctx.lineCap = "round";
  ctx.beginPath();
  if (last) {
    ctx.moveTo(last[0], last[1]);
    ctx.lineTo(x, y);
    ctx.stroke();
  } else {
    ctx.arc(x, y, ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fill();
  }
  last = [x, y];
}

$.paint.addEventListener("pointerdown", (ev) => {
  if (state.mode !== "paint") return;
  $.paint.setPointerCapture(ev.pointerId);
  last = null;
  stroke(ev);
});
$.paint.addEventListener("pointermove", (ev) => { if (state.mode === "paint" && ev.buttons) stroke(ev); });
$.paint.addEventListener("pointerup", () => { last = null; });

// ---- the graph: where the probed block is sampled, and where new nodes go ----

const widget = (node, name) => node?.widgets?.find((w) => w.name === name);
const inputNode = (node, name) => { const slot = node.findInputSlot(name); return slot >= 0 ? node.getInputNode(slot) : null; };

function setWidget(node, name, value) {
  const w = widget(node, name);
  if (w) { w.value = value; w.callback?.(value); }
}

// The steer node the panel made for a feature of a block, and the painting its mask node keeps.
function steerOf(b, feature) {
  return app.graph.nodes.find((n) => n.type === STEER && n.properties?.sae_workbench?.block === b.block &&
    n.properties.sae_workbench.feature === feature && n.properties.sae_workbench.sae === b.sae) || null;
}

function storedPNG(steer) {
  const painted = steer ? inputNode(steer, "mask") : null;
  const png = painted?.type === PAINTED ? widget(painted, "mask")?.value : null;
  return typeof png === "string" && png.startsWith("data:image/png;base64,") ? png : null;
}

// Selecting a feature that has a painted steer node shows its painting on the brush canvas (after a reload
// too); a feature without one leaves the canvas as the user left it.
function showStoredPainting(b, feature) {
  const png = storedPNG(steerOf(b, feature));
  if (!png) return;
  const img = new Image();
  img.onload = () => {
    if (state.feature !== feature) return;
    clearPaint();
    $.paint.getContext("2d").drawImage(img, 0, 0, $.paint.width, $.paint.height);
    $.paint.dataset.shown = `${b.block}#${feature}`;
  };
  img.src = png;
}

function bounds(node) { // [x, y, w, h] with the title bar
  const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
  return [node.pos[0], node.pos[1] - title, node.size[0], node.size[1] + title];
}

const overlaps = (a, b) => a[0] < b[0] + b[2] + GAP && b[0] < a[0] + a[2] + GAP && a[1] < b[1] + b[3] + GAP && b[1] < a[1] + a[3] + GAP;

// The first free place for a w×h box at (x, y) or below it, then further left: never on another node.
export function freeSpot(w, h, x, y) {
  const others = app.graph.nodes.map(bounds);
  const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
  for (let dx = 0; dx <= 20; dx++) {
    for (let dy = 0; dy <= 200; dy++) {
      const box = [x - dx * (w + GAP), y - title + dy * 40, w, h + title];
      if (!others.some((o) => overlaps(box, o))) return [box[0], box[1] + title];
    }
  }
  const lowest = Math.max(...others.map((o) => o[1] + o[3]));
  return [x, lowest + GAP + title]; // a graph this crowded: below all of it
}

// The Probe Block node of `block` with `sae`, its Load SAE node, and the sampler its MODEL reaches.
function locate(block, sae) {
  for (const probe of app.graph.nodes.filter((n) => n.type === "UnboxProbeBlock")) {
    const saeNode = inputNode(probe, "sae");
    const chosen = widget(probe, "block")?.value || "";
    if (widget(saeNode, "sae_name")?.value !== sae || !(chosen === block || chosen.startsWith("auto"))) continue;
    let node = probe, sampler = null;
    for (let hops = 0; hops < 64 && !sampler; hops++) {
      const next = node.getOutputNodes(0) || [];
      const consumer = next.find((n) => !PASS_THROUGH.has(n.type)) || null;
      if (consumer) sampler = consumer;
      else if (next.length) node = next[0];
      else break;
    }
    if (sampler) return { probe, saeNode, sampler };
  }
  return null;
}

// After Apply, the run that follows is shown beside the image the user painted on.
function showComparison(run) {
  const c = state.compare;
  if (!c || c.run === run.run) return;
  state.compare = null;
  $.compare.replaceChildren(
    el("figure", { style: "margin:0" }, el("img", { src: c.before, "data-testid": "sae-compare-before" }),
      el("figcaption", { class: "dim" }, "input")),
    el("figure", { style: "margin:0" }, el("img", { "data-testid": "sae-compare-after",
      src: api.apiURL(`/sae_unbox/workbench/image?run=${encodeURIComponent(run.run)}&index=0`) }),
    el("figcaption", { class: "dim" }, `steered: ${c.what}`)));
}

function snapshot() {
  const c = document.createElement("canvas");
  c.width = $.image.naturalWidth || 1;
  c.height = $.image.naturalHeight || 1;
  c.getContext("2d").drawImage($.image, 0, 0);
  return c.toDataURL("image/png");
}

function newPainted(x, y) {
  const painted = LiteGraph.createNode(PAINTED);
  hidePNG(painted);
  painted.size = [Math.max(painted.size[0], 240), 300];
  painted.pos = [x, y];
  return painted;
}

export async function applyPaint() {
  const b = currentBlock();
  if (!b || state.feature === null) return setStatus("choose a feature first");
  if (!hasPaint()) return setStatus("Nothing is painted: brush the region the feature should change, then Apply (the graph is unchanged).");
  const where = locate(b.block, b.sae);
  if (!where) return setStatus(`no Probe Block of ${b.block} with SAE ${b.sae} that reaches a sampler in this graph`);
  const { saeNode, sampler } = where;
  let steer = steerOf(b, state.feature);
  if (!steer) { // a steer node and its painted mask side by side, in free space left of the sampler
    steer = LiteGraph.createNode(STEER);
    const painted = newPainted(0, 0);
    const width = painted.size[0] + GAP + steer.size[0], height = Math.max(painted.size[1], steer.size[1]);
    const [x, y] = freeSpot(width, height, sampler.pos[0] - width - 2 * GAP, sampler.pos[1]);
    painted.pos = [x, y];
    steer.pos = [x + painted.size[0] + GAP, y];
    app.graph.add(painted);
    app.graph.add(steer);
    const upstream = sampler.getInputLink(sampler.findInputSlot("model"));
    app.graph.getNodeById(upstream.origin_id).connect(upstream.origin_slot, steer, "model");
    steer.connect(0, sampler, "model");
    saeNode.connect(0, steer, "sae");
    painted.connect(0, steer, "mask");
    steer.properties = { ...(steer.properties || {}), sae_workbench: { block: b.block, feature: state.feature, sae: b.sae } };
  }
  let painted = inputNode(steer, "mask");
  if (!painted || painted.type !== PAINTED) { // the user rewired the mask: a painted mask of its own
    painted = newPainted(0, 0);
    painted.pos = freeSpot(painted.size[0], painted.size[1], steer.pos[0] - painted.size[0] - GAP, steer.pos[1]);
    app.graph.add(painted);
    painted.connect(0, steer, "mask");
  }
  setWidget(painted, "width", $.paint.width);
  setWidget(painted, "height", $.paint.height);
  setWidget(painted, "mask", $.paint.toDataURL("image/png"));
  showPaintingOnNode(painted);
  setWidget(steer, "features", String(state.feature));
  setWidget(steer, "strength", Number($.strength.value));
  setWidget(steer, "mode", "add");
  setWidget(steer, "block", b.block);
  setWidget(steer, "units", "mean activation");
  setWidget(steer, "start_percent", Number($.start.value));
  setWidget(steer, "end_percent", Number($.end.value));
  app.graph.setDirtyCanvas(true, true);
  choose(b.block, state.feature);
  state.compare = { before: snapshot(), run: state.run, what: `#${state.feature} × ${$.strength.value} on ${b.block}` };
  setStatus(`#${state.feature} painted on ${b.block}; queued`);
  await app.queuePrompt(0, 1);
}

// ---- prompts built from the graph: feature icon, concept search ----

function keepAncestors(prompt, ids) {
  const keep = new Set(), todo = [...ids];
  while (todo.length) {
    const id = todo.pop();
    if (keep.has(id) || !prompt[id]) continue;
    keep.add(id);
    for (const v of Object.values(prompt[id].inputs)) if (Array.isArray(v) && v.length === 2) todo.push(String(v[0]));
  }
  for (const id of Object.keys(prompt)) if (!keep.has(id)) delete prompt[id];
  return prompt;
}

async function graphParts() {
  const b = currentBlock();
  if (!b) throw new Error("no run selected");
  const where = locate(b.block, b.sae);
  if (!where) throw new Error(`no Probe Block of ${b.block} with SAE ${b.sae} that reaches a sampler in this graph`);
  const { output, workflow } = await app.graphToPrompt();
  const S = String(where.sampler.id);
  const decode = Object.keys(output).find((id) => output[id].class_type === "VAEDecode" &&
    JSON.stringify(output[id].inputs.samples) === JSON.stringify([S, 0]));
  if (!output[S]?.inputs?.positive || !decode) throw new Error("the probed sampler has no positive prompt or no VAE Decode");
  return { b, output, workflow, S, P: String(output[S].inputs.positive[0]), D: decode, sae: [String(where.saeNode.id), 0],
           model: output[String(where.probe.id)].inputs.model, probed: [String(where.probe.id), 0] };
}

async function queue(kind, output, workflow, keep) {
  const r = await api.queuePrompt(0, { output: keepAncestors(output, keep), workflow });
  state.pending[r.prompt_id] = kind;
  return r.prompt_id;
}

export async function featureIcon() {
  try {
    const { b, output, workflow, S, P, D, sae, probed } = await graphParts();
    for (const key of ["text", "t5xxl", "clip_l"]) if (typeof output[P].inputs[key] === "string") output[P].inputs[key] = "";
    // The paper's icon: the probed MODEL without the panel's steers, only this block's update replaced (on SDXL
    // base, with CFG, the uncond rows' update set to zero, as its replace_with_feature_base; at cfg 1 there are
    // no uncond rows).
    output.sae_icon_steer = { class_type: STEER, inputs: { model: probed, sae, features: String(state.feature),
      strength: b.k || 10, mode: "replace", block: b.block, units: "mean activation", start_percent: 0, end_percent: 1,
      apply_to: "cond, uncond zeroed" } };
    output[S].inputs.model = ["sae_icon_steer", 0];
    output.sae_icon_preview = { class_type: "PreviewImage", inputs: { images: [D, 0] } };
    state.iconFor = state.feature;
    $.icon.replaceChildren();
    await queue("icon", output, workflow, ["sae_icon_preview"]);
    setStatus(`feature icon of #${state.feature} queued`);
  } catch (e) {
    setStatus(String(e.message || e));
  }
}

export async function findFeatures() {
  try {
    const { b, output, workflow, S, P, D, sae, model } = await graphParts();
    const latentId = String(output[S].inputs.latent_image?.[0] ?? "");
    const size = output[latentId]?.inputs || {};
    output.sae_find = { class_type: "UnboxFindFeatures", inputs: { model, clip: output[P].inputs.clip,
      vae: output[D].inputs.vae, sae, concept: $.concept.value, neutral: $.neutral.value.split(";").join("\n"),
      block: b.block, seeds: 2, steps: output[S].inputs.steps ?? 1, cfg: output[S].inputs.cfg ?? 1.0,
      sampler_name: output[S].inputs.sampler_name ?? "euler", scheduler: output[S].inputs.scheduler ?? "normal",
      width: Number.isInteger(size.width) ? size.width : 512, height: Number.isInteger(size.height) ? size.height : 512, top_n: 9 } };
    await queue("find", output, workflow, ["sae_find"]);
    setStatus(`searching the features of "${$.concept.value}"`);
  } catch (e) {
    setStatus(String(e.message || e));
  }
}

function showFound(output) {
  const result = JSON.parse(output.text[0]);
  $.found.replaceChildren(...result.features.map((f) => el("button", { "data-testid": `sae-found-${f.feature}`,
    title: "how much more the feature fires for the concept than for the neutral prompts (mean activation)",
    on: { click: () => selectFeature(f.feature, true) } },
    `#${f.feature} · ${f.score >= 0 ? "+" : ""}${f.score.toPrecision(3)} over neutral${f.label ? " · " + f.label : ""}`)));
  if (!result.features.length) $.found.append(el("div", { class: "dim" }, "no feature fires more for the concept"));
  setStatus(`features of "${result.concept}" on ${result.block}`);
}

function showIcon(output) {
  const img = output.images?.[0];
  if (!img || state.iconFor !== state.feature) return; // the user has moved on to another feature
  $.icon.replaceChildren(el("img", { "data-testid": "sae-icon-image", src: api.apiURL(
    `/view?filename=${encodeURIComponent(img.filename)}&subfolder=${encodeURIComponent(img.subfolder || "")}&type=${img.type}`) }));
  setStatus(`feature icon of #${state.feature}`);
}

// ---- events ----

api.addEventListener("executed", async ({ detail }) => {
  const kind = state.pending[detail?.prompt_id];
  const done = (show) => { delete state.pending[detail.prompt_id]; return show(detail.output); };
  if (kind === "icon" && detail.node === "sae_icon_preview") return done(showIcon);
  if (kind === "find" && detail.node === "sae_find") return done(showFound);
  if (kind) return;
  const shown = detail?.output?.sae_workbench;
  if (shown?.length) refreshSoon(shown[0].run);
});

// The nodes of one run report one after the other: one refresh for them all.
let refreshTimer = null;
function refreshSoon(run) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => refreshRuns(run).catch((e) => setStatus(String(e.message || e))), 200);
}

// The painted PNG is kept in a widget of SAE Painted Mask; its base64 text is no use on the canvas, the
// painting itself is: it is the node's preview image.
function hidePNG(node) {
  const w = widget(node, "mask");
  if (w) { w.hidden = true; w.options = { ...(w.options || {}), hidden: true }; w.computeSize = () => [0, -4]; }
}

export function showPaintingOnNode(node) {
  const png = widget(node, "mask")?.value;
  if (typeof png !== "string" || !png.startsWith("data:image/png;base64,")) return;
  if (node.imgs?.[0]?.src === png) return;
  const img = new Image();
  img.onload = () => node.setDirtyCanvas?.(true, true);
  img.src = png;
  node.imgs = [img];
  node.imageIndex = 0;
}

// The panel scrolls by itself, down to the window's bottom, so that its top part (image, feature, Apply) stays
// in view while the lists under it are scrolled.
function fitHeight() {
  requestAnimationFrame(() => {
    const top = root.getBoundingClientRect().top;
    if (root.isConnected) root.style.height = `${Math.max(200, window.innerHeight - Math.max(top, 0))}px`;
  });
}
window.addEventListener("resize", fitHeight);
// What is scrolled into view (a found feature, a label hit) lands below the top part, not under it.
new ResizeObserver(() => { root.style.scrollPaddingTop = `${$.top.offsetHeight + 8}px`; }).observe($.top);

app.registerExtension({
  name: "sae_unbox.workbench",
  nodeCreated(node) {
    if (node.comfyClass !== PAINTED) return;
    hidePNG(node);
    const configure = node.onConfigure; // a workflow opened: its widget values are set after nodeCreated
    node.onConfigure = function () {
      const r = configure?.apply(this, arguments);
      showPaintingOnNode(this);
      return r;
    };
  },
  async setup() {
    app.extensionManager.registerSidebarTab({
      id: TAB,
      icon: "pi pi-eye",
      title: "SAE",
      tooltip: "SAE Unbox workbench",
      type: "custom",
      render(container) {
        container.replaceChildren(root);
        fitHeight();
        refreshRuns().catch((e) => setStatus(String(e.message || e)));
      },
    });
  },
});
