"""Turn a UI-format workflow (what the frontend saves, e.g. `example_workflows/*.json`) into the API format
that `POST /prompt` takes, using the server's `/object_info` to name each widget value."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SKIPPED_MODES = {2, 4}  # muted, bypassed


def _is_widget(spec) -> bool:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False  # a socket only: no widget, no value in widgets_values
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _input_order(info: dict) -> list[tuple[str, object]]:
    inputs = info.get("input", {})
    order = info.get("input_order")
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section, {}) or {}
        names = order.get(section, list(specs)) if order else list(specs)
        out.extend((name, specs[name]) for name in names if name in specs)
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt `{node_id: {"class_type", "inputs"}}` of a UI-format workflow."""
    links = {link[0]: (link[1], link[2]) for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in SKIPPED_MODES:
            continue
        class_type = node["type"]
        if class_type not in object_info:
            raise KeyError(f"node {node['id']}: type {class_type!r} is not installed on the server")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for name, spec in _input_order(object_info[class_type]):
            if not _is_widget(spec) or not values:
                continue
            inputs[name] = values.pop(0)
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if options.get("control_after_generate") and values and values[0] in (
                "fixed", "increment", "decrement", "randomize"
            ):
                values.pop(0)  # the frontend's "control after generate" value is not an input
        for socket in node.get("inputs", []):
            link = socket.get("link")
            if link is not None and link in links:
                src, slot = links[link]
                inputs[socket["name"]] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    return prompt
