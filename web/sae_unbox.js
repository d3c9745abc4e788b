// SAE Unbox frontend extension: shows the text a node reports (the top-features ranking, the loaded
// SAE's description) in a read-only box on the node, after each run and when a workflow is reopened; and a
// button on Load SAE that opens the feature browser page (served by the pack at /sae_unbox/browser).
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const TEXT_NODES = new Set(["UnboxTopFeatures", "UnboxLoadSAE"]);
const WIDGET = "sae_unbox_text";

// A widget for display or action only: neither saved in the workflow nor sent to the server as an input.
function notAnInput(widget) {
  widget.serialize = false;
  widget.options = { ...(widget.options || {}), serialize: false };
}

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.75;
    notAnInput(widget);
  }
  widget.value = text;
  node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  app.graph?.setDirtyCanvas(true, true);
}

function summary(text) {
  // The ranking JSON is long; show one feature a line, the full JSON stays on the STRING output.
  try {
    const r = JSON.parse(text);
    if (!Array.isArray(r.features)) return text;
    const head = `${r.block} step ${r.step} (${r.ranked_over}), ${r.sae}`;
    const lines = r.features.map(
      (f, i) => `${String(i + 1).padStart(2)}. #${f.feature}  mean ${f.mean_activation.toPrecision(3)}` +
        `  max ${f.max_activation.toPrecision(3)}  at ${f.active_positions} positions` + (f.label ? `  ${f.label}` : "")
    );
    return [head, ...lines].join("\n");
  } catch {
    return text;
  }
}

app.registerExtension({
  name: "sae_unbox.show_text",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TEXT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text.map(summary).join("\n\n"));
    };
  },
});

export function featureBrowserURL(saeName) {
  const path = `/sae_unbox/browser${saeName ? `?sae=${encodeURIComponent(saeName)}` : ""}`;
  return api.apiURL ? api.apiURL(path) : path;
}

app.registerExtension({
  name: "sae_unbox.feature_browser",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "UnboxLoadSAE") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const sae = () => this.widgets?.find((w) => w.name === "sae_name")?.value;
      const button = this.addWidget("button", "browse features", null, () => {
        window.open(featureBrowserURL(sae()), "_blank");
      });
      notAnInput(button);
      return r;
    };
  },
});

// On SAE Steer Features, hovering the feature list shows each feature's label (labels of the SAE connected to
// the node, read from /sae_unbox/labels).
const labelCache = new Map(); // sae name -> {labels, time}

function labelsOf(sae) {
  const hit = labelCache.get(sae);
  if (!hit || Date.now() - hit.time > 5000) {
    labelCache.set(sae, { labels: hit?.labels || {}, time: Date.now() });
    api.fetchApi(`/sae_unbox/labels?sae=${encodeURIComponent(sae)}`)
      .then((r) => (r.ok ? r.json() : { labels: {} }))
      .then((body) => labelCache.set(sae, { labels: body.labels || {}, time: Date.now() }))
      .catch(() => {});
  }
  return labelCache.get(sae).labels;
}

export function featureTooltip(node, base) {
  const slot = node.findInputSlot?.("sae") ?? -1;
  const sae = slot >= 0 ? node.getInputNode(slot)?.widgets?.find((w) => w.name === "sae_name")?.value : null;
  const features = String(node.widgets?.find((w) => w.name === "features")?.value || "")
    .split(/[,;\s]+/).map((t) => parseInt(t, 10)).filter(Number.isInteger);
  if (!sae || !features.length) return base;
  const labels = labelsOf(sae);
  const lines = features.slice(0, 20).map((f) => `#${f}: ${labels[f] || "(no label)"}`);
  return [base, ...lines].filter(Boolean).join("\n");
}

app.registerExtension({
  name: "sae_unbox.steer_labels",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "UnboxSteerFeatures") return;
    const base = nodeData.input?.required?.features?.[1]?.tooltip || "";
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const w = this.widgets?.find((x) => x.name === "features");
      const node = this;
      if (w) Object.defineProperty(w, "tooltip", { configurable: true, get: () => featureTooltip(node, base) });
      return r;
    };
  },
});
