// SAE Unbox workbench: a sidebar tab of ComfyUI's frontend for the paper's interactive use, inside the graph.
//
// After a run with probes (Top Features or Feature Heatmap nodes), the panel shows the run's image and, per
// probed block, the ranked features. Clicking a feature overlays its heatmap, computed on the server from the
// codes it kept for that run (/sae_unbox/workbench/heat), with its statistics, label and top dataset images.
// Paint a region and Apply: the panel adds (or updates) an SAE Steer Features node between the probed MODEL
// and the sampler, with an SAE Painted Mask node holding the painting, and queues the graph. Feature icon and
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

export function colorize(v) {
  const x = Math.min(Math.max(v, 0), 1) * (INFERNO.length - 1);
  const lo = Math.min(Math.floor(x), INFERNO.length - 2);
  const f = x - lo;
  return INFERNO[lo].map((c, i) => Math.round(c * (1 - f) + INFERNO[lo + 1][i] * f));
}

const state = {
  runs: [], run: null, block: null, chosenBlock: null, image: 0, feature: null,
  labels: {}, // sae name -> {feature: label}
  mode: "view", pending: {}, // prompt id -> "icon" | "find"
};

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
.sae-wb { padding: 8px; display: flex; flex-direction: column; gap: 8px; font-size: 13px; }
.sae-wb select, .sae-wb input, .sae-wb textarea, .sae-wb button { font: inherit; color: inherit;
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); border-radius: 4px; padding: 2px 6px; }
.sae-wb .row { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.sae-wb .stage { position: relative; width: 100%; background: #000; }
.sae-wb .stage img, .sae-wb .stage canvas { position: absolute; inset: 0; width: 100%; height: 100%; }
.sae-wb .stage img { position: relative; display: block; height: auto; }
.sae-wb .overlay { image-rendering: pixelated; pointer-events: none; }
.sae-wb .paint { opacity: .45; mix-blend-mode: screen; pointer-events: none; }
.sae-wb .paint.on { pointer-events: auto; cursor: crosshair; }
.sae-wb .ranking { display: flex; flex-direction: column; gap: 2px; max-height: 14em; overflow: auto; }
.sae-wb .ranking button { text-align: left; }
.sae-wb .ranking button.sel { border-color: #ffcc33; }
.sae-wb .dim { opacity: .7; font-size: 12px; }
.sae-wb .thumbs { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; }
.sae-wb .thumbs img, .sae-wb .icon img { width: 100%; display: block; }
.sae-wb h4 { margin: 6px 0 2px; font-size: 13px; }
`;

// ---- the panel's elements (built once: the sidebar may render it again into a new or a reused container) ----

const $ = {};
const field = (name, node) => ($[name] = node);
const root = el("div", { class: "sae-wb", "data-testid": "sae-workbench" },
  el("style", {}, STYLE),
  el("div", { class: "row" },
    field("runSelect", el("select", { "data-testid": "sae-run", on: { change: () => selectRun($.runSelect.value) } })),
    field("blockSelect", el("select", { "data-testid": "sae-block", on: { change: () => {
      state.chosenBlock = $.blockSelect.value;
      selectBlock($.blockSelect.value);
    } } })),
    el("button", { "data-testid": "sae-refresh", title: "Reload the runs the server kept", on: { click: () => refreshRuns() } }, "↻")),
  field("stage", el("div", { class: "stage", "data-testid": "sae-stage" },
    field("image", el("img", { "data-testid": "sae-image", alt: "" })),
    field("overlay", el("canvas", { class: "overlay", "data-testid": "sae-overlay", width: 1, height: 1 })),
    field("paint", el("canvas", { class: "paint", "data-testid": "sae-paint", width: 1, height: 1 })))),
  el("div", { class: "row" },
    el("label", {}, "overlay ", field("alpha", el("input", { type: "range", min: 0, max: 1, step: 0.05, value: 0.6,
      "data-testid": "sae-alpha", on: { input: () => { $.overlay.style.opacity = $.alpha.value; } } }))),
    el("label", {}, "feature ", field("featureId", el("input", { type: "number", min: 0, style: "width:6em", "data-testid": "sae-feature-id" }))),
    el("button", { "data-testid": "sae-show", on: { click: () => selectFeature(Number($.featureId.value)) } }, "show")),
  field("status", el("div", { class: "dim", "data-testid": "sae-status" }, "Run a graph with SAE Top Features to see its features here.")),
  el("h4", {}, "Top features"),
  field("ranking", el("div", { class: "ranking", "data-testid": "sae-ranking" })),
  el("h4", {}, "Feature"),
  field("detail", el("div", { "data-testid": "sae-detail", class: "dim" })),
  el("div", { class: "row" },
    field("labelInput", el("input", { placeholder: "label this feature", maxlength: 200, style: "flex:1", "data-testid": "sae-label-input" })),
    el("button", { "data-testid": "sae-label-save", on: { click: () => saveLabel() } }, "save label")),
  field("topImages", el("div", { class: "thumbs", "data-testid": "sae-top-images" })),
  el("h4", {}, "Paint"),
  el("div", { class: "row" },
    field("paintMode", el("button", { "data-testid": "sae-paint-mode", on: { click: () => setMode(state.mode === "paint" ? "view" : "paint") } }, "brush")),
    el("label", {}, "size ", field("brush", el("input", { type: "number", min: 1, max: 512, value: 48, style: "width:4.5em", "data-testid": "sae-brush" }))),
    el("label", {}, field("erase", el("input", { type: "checkbox", "data-testid": "sae-erase" })), " erase"),
    el("button", { "data-testid": "sae-clear", on: { click: () => clearPaint() } }, "clear")),
  el("div", { class: "row" },
    el("label", {}, "strength ", field("strength", el("input", { type: "number", step: 0.5, value: 4, style: "width:5em", "data-testid": "sae-strength" }))),
    el("label", {}, "steps ", field("start", el("input", { type: "number", min: 0, max: 1, step: 0.05, value: 0, style: "width:4.5em", "data-testid": "sae-start" })),
      "–", field("end", el("input", { type: "number", min: 0, max: 1, step: 0.05, value: 1, style: "width:4.5em", "data-testid": "sae-end" }))),
    el("button", { "data-testid": "sae-apply", on: { click: () => applyPaint() } }, "Apply"),
    el("button", { "data-testid": "sae-icon", title: "The paper's feature icon: empty prompt, the block's update replaced by k × mean × the feature", on: { click: () => featureIcon() } }, "feature icon")),
  field("icon", el("div", { class: "icon", "data-testid": "sae-icon-result" })),
  el("h4", {}, "Find features by a concept"),
  el("div", { class: "row" },
    field("concept", el("input", { value: "a red car", style: "flex:1", "data-testid": "sae-concept" })),
    field("neutral", el("input", { value: "a car", style: "flex:1", title: "neutral prompts, separated by ;", "data-testid": "sae-neutral" })),
    el("button", { "data-testid": "sae-find", on: { click: () => findFeatures() } }, "find")),
  field("found", el("div", { class: "ranking", "data-testid": "sae-found" })),
  el("h4", {}, "Labels"),
  el("div", { class: "row" },
    field("labelSearch", el("input", { type: "search", placeholder: "search the labels", style: "flex:1", "data-testid": "sae-label-search", on: { input: () => showLabelSearch() } })),
    el("label", { title: "Import a published label set (JSON, JSON Lines or CSV) for this SAE" }, "import ",
      field("labelFile", el("input", { type: "file", accept: ".json,.jsonl,.csv,.txt", "data-testid": "sae-label-import", on: { change: () => importLabels() } })))),
  field("labelHits", el("div", { class: "ranking", "data-testid": "sae-label-hits" })),
);

function setStatus(text) { $.status.textContent = text; }

// ---- runs, blocks, features ----

async function getJSON(path, init) {
  const r = await api.fetchApi(path, init);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${path}: HTTP ${r.status}`);
  return body;
}

function currentRun() { return state.runs.find((r) => r.run === state.run) || null; }
function currentBlock() { return currentRun()?.blocks.find((b) => b.block === state.block) || null; }

export async function refreshRuns(prefer) {
  state.runs = await getJSON("/sae_unbox/workbench/runs");
  $.runSelect.replaceChildren(...state.runs.map((r, i) =>
    el("option", { value: r.run }, `run ${state.runs.length - i} (${r.blocks.map((b) => b.block).join(", ")})`)));
  const keep = prefer || (state.runs.some((r) => r.run === state.run) ? state.run : state.runs[0]?.run);
  if (keep) await selectRun(keep);
  else setStatus("No run with probes yet: run a graph with SAE Top Features.");
}

async function selectRun(id) {
  state.run = id;
  $.runSelect.value = id;
  const run = currentRun();
  if (!run) return;
  $.blockSelect.replaceChildren(...run.blocks.map((b) => el("option", { value: b.block }, `${b.block} (${b.sae})`)));
  state.image = 0;
  await new Promise((resolve) => {
    $.image.onload = resolve;
    $.image.onerror = resolve;
    $.image.src = api.apiURL(`/sae_unbox/workbench/image?run=${encodeURIComponent(id)}&index=0`);
  });
  if (state.run !== id) return; // another run was chosen meanwhile
  sizePaint();
  const has = (name) => run.blocks.some((b) => b.block === name);
  const block = has(state.chosenBlock) ? state.chosenBlock : has(state.block) ? state.block : run.blocks[0]?.block;
  await selectBlock(block);
}

async function loadLabels(sae) {
  try {
    state.labels[sae] = (await getJSON(`/sae_unbox/labels?sae=${encodeURIComponent(sae)}`)).labels;
  } catch {
    state.labels[sae] = {};
  }
  return state.labels[sae];
}

async function selectBlock(name) {
  state.block = name;
  $.blockSelect.value = name;
  const b = currentBlock();
  if (!b) return;
  const labels = await loadLabels(b.sae);
  if (state.block !== name || currentBlock() !== b) return; // another block or run was chosen meanwhile
  $.ranking.dataset.block = name;
  $.ranking.replaceChildren(...b.ranking.map((f) => el("button", {
    "data-testid": `sae-feature-${f.feature}`, on: { click: () => selectFeature(f.feature) },
  }, `#${f.feature}  ${f.mean_activation.toPrecision(3)}${labels[f.feature] ? "  " + labels[f.feature] : ""}`)));
  setStatus(`${b.block}: ${b.grid[0]}×${b.grid[1]} positions, SAE ${b.sae}`);
  showLabelSearch();
  const keep = b.ranking.some((r) => r.feature === state.feature) ? state.feature : b.ranking[0]?.feature;
  if (keep !== undefined && keep !== null) await selectFeature(keep);
}

export async function selectFeature(feature) {
  const b = currentBlock();
  if (!b) return;
  if (!Number.isInteger(feature) || feature < 0 || feature >= b.n_features) { // refused: nothing changes
    setStatus(`feature ${$.featureId.value} is out of range: SAE ${b.sae} has features 0..${b.n_features - 1}`);
    $.featureId.value = state.feature ?? "";
    return;
  }
  state.feature = feature;
  $.featureId.value = feature;
  for (const btn of $.ranking.children) btn.classList.toggle("sel", btn.dataset.testid === `sae-feature-${feature}`);
  let heat;
  try {
    heat = await getJSON(`/sae_unbox/workbench/heat?run=${encodeURIComponent(state.run)}&block=${encodeURIComponent(b.block)}&feature=${feature}&index=${state.image}`);
  } catch (e) {
    setStatus(String(e.message || e));
    return;
  }
  if (state.feature !== feature || currentBlock() !== b) return; // superseded by a newer choice
  drawHeat(heat);
  const label = (state.labels[b.sae] || {})[feature] || "";
  $.labelInput.value = label;
  const stats = Object.entries(heat.stats).map(([k, v]) => `${k} ${Number(v).toPrecision(3)}`).join(", ");
  $.detail.textContent = `#${feature} on ${b.block}${label ? ` — ${label}` : ""}: max here ${heat.max.toPrecision(3)}` +
    (stats ? `; over the SAE's data: ${stats}` : "");
  showTopImages(b.sae, feature);
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

async function showTopImages(sae, feature) {
  $.topImages.replaceChildren();
  try {
    const page = await getJSON(`/sae_unbox/features?sae=${encodeURIComponent(sae)}&q=${encodeURIComponent("#" + feature)}&limit=1`);
    for (const e of (page.features[0]?.top || []).slice(0, 6)) {
      if (!e.file) continue;
      $.topImages.append(el("img", { title: `${e.prompt || ""} (${Number(e.value).toPrecision(3)})`,
        src: api.apiURL(`/sae_unbox/image?sae=${encodeURIComponent(sae)}&file=${encodeURIComponent(e.file)}`) }));
    }
  } catch {
    // an SAE without a features index has no dataset images to show
  }
}

// ---- labels ----

async function saveLabel() {
  const b = currentBlock();
  if (!b || state.feature === null) return;
  try {
    const r = await getJSON("/sae_unbox/labels", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sae: b.sae, feature: state.feature, label: $.labelInput.value }) });
    state.labels[b.sae] = r.labels;
    setStatus(`label of #${state.feature} saved`);
    await selectBlock(state.block);
  } catch (e) {
    setStatus(String(e.message || e));
  }
}

function showLabelSearch() {
  const b = currentBlock();
  const q = $.labelSearch.value.trim().toLowerCase();
  const labels = (b && state.labels[b.sae]) || {};
  const hits = q ? Object.entries(labels).filter(([, t]) => t.toLowerCase().includes(q)).slice(0, 50) : [];
  $.labelHits.replaceChildren(...hits.map(([f, t]) => el("button", { "data-testid": `sae-label-hit-${f}`,
    on: { click: () => selectFeature(Number(f)) } }, `#${f}  ${t}`)));
}

async function importLabels() {
  const b = currentBlock();
  const file = $.labelFile.files[0];
  if (!b || !file) return;
  try {
    const r = await getJSON("/sae_unbox/labels/import", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sae: b.sae, text: await file.text() }) });
    setStatus(`imported ${r.imported} labels (${r.labels} in all)`);
    await selectBlock(state.block);
  } catch (e) {
    setStatus(String(e.message || e));
  }
  $.labelFile.value = "";
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

// ---- the graph: where the probed block is sampled ----

const widget = (node, name) => node?.widgets?.find((w) => w.name === name);
const inputNode = (node, name) => { const slot = node.findInputSlot(name); return slot >= 0 ? node.getInputNode(slot) : null; };

function setWidget(node, name, value) {
  const w = widget(node, name);
  if (w) { w.value = value; w.callback?.(value); }
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

function paintedPNG() {
  return $.paint.toDataURL("image/png");
}

export async function applyPaint() {
  const b = currentBlock();
  if (!b || state.feature === null) return setStatus("choose a feature first");
  const where = locate(b.block, b.sae);
  if (!where) return setStatus(`no Probe Block of ${b.block} with SAE ${b.sae} that reaches a sampler in this graph`);
  const { saeNode, sampler } = where;
  let steer = app.graph.nodes.find((n) => n.type === STEER && n.properties?.sae_workbench?.block === b.block &&
    n.properties.sae_workbench.feature === state.feature && n.properties.sae_workbench.sae === b.sae);
  if (!steer) {
    steer = LiteGraph.createNode(STEER);
    steer.pos = [sampler.pos[0] - 360, sampler.pos[1] + 260];
    app.graph.add(steer);
    const modelSlot = sampler.findInputSlot("model");
    const upstream = sampler.getInputLink(modelSlot);
    app.graph.getNodeById(upstream.origin_id).connect(upstream.origin_slot, steer, "model");
    steer.connect(0, sampler, "model");
    saeNode.connect(0, steer, "sae");
    steer.properties = { ...(steer.properties || {}), sae_workbench: { block: b.block, feature: state.feature, sae: b.sae } };
  }
  let painted = inputNode(steer, "mask");
  if (!painted || painted.type !== PAINTED) {
    painted = LiteGraph.createNode(PAINTED);
    hidePNG(painted);
    painted.pos = [steer.pos[0] - 340, steer.pos[1]];
    app.graph.add(painted);
    painted.connect(0, steer, "mask");
  }
  setWidget(painted, "width", $.paint.width);
  setWidget(painted, "height", $.paint.height);
  setWidget(painted, "mask", paintedPNG());
  setWidget(steer, "features", String(state.feature));
  setWidget(steer, "strength", Number($.strength.value));
  setWidget(steer, "mode", "add");
  setWidget(steer, "block", b.block);
  setWidget(steer, "units", "mean activation");
  setWidget(steer, "start_percent", Number($.start.value));
  setWidget(steer, "end_percent", Number($.end.value));
  app.graph.setDirtyCanvas(true, true);
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
    on: { click: () => selectFeature(f.feature) } },
    `#${f.feature}  +${f.score.toPrecision(3)}${f.label ? "  " + f.label : ""}`)));
  setStatus(`features of "${result.concept}" on ${result.block}`);
}

function showIcon(output) {
  const img = output.images?.[0];
  if (!img) return;
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
  const shown = detail?.output?.sae_workbench;
  if (shown?.length) refreshSoon(shown[0].run);
});

// The nodes of one run report one after the other: one refresh for them all.
let refreshTimer = null;
function refreshSoon(run) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => refreshRuns(run).catch((e) => setStatus(String(e.message || e))), 200);
}

// The painted PNG is kept in a widget of SAE Painted Mask; its base64 text is no use on the canvas.
function hidePNG(node) {
  const w = widget(node, "mask");
  if (w) { w.hidden = true; w.options = { ...(w.options || {}), hidden: true }; w.computeSize = () => [0, -4]; }
}

app.registerExtension({
  name: "sae_unbox.workbench",
  nodeCreated(node) {
    if (node.comfyClass === PAINTED) hidePNG(node);
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
        refreshRuns().catch((e) => setStatus(String(e.message || e)));
      },
    });
  },
});
