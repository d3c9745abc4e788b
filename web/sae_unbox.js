// SAE Unbox frontend extension: shows the text a node reports (the top-features ranking, the loaded
// SAE's description) in a read-only box on the node, after each run and when a workflow is reopened.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const TEXT_NODES = new Set(["UnboxTopFeatures", "UnboxLoadSAE"]);
const WIDGET = "sae_unbox_text";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.75;
    // display only: neither saved in the workflow nor sent to the server as an input
    widget.serialize = false;
    widget.options = { ...(widget.options || {}), serialize: false };
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
        `  max ${f.max_activation.toPrecision(3)}  at ${f.active_positions} positions`
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
