"""Probe a block during sampling, then turn the record and the decoded image into heatmaps and rankings."""

from __future__ import annotations

import json
import os

import torch
from comfy_api.latest import io, ui

import comfy.utils
import folder_paths

from .common import (
    AUTO, BLOCK_CHOICES, CATEGORY, SAE, SAE_PROBE, TARGET_CHOICES, NodeInputError, parse_steps, resolve_block,
)
from .edits import ProbeEdit, ProbeRecorder, StepRecord, mask_weights
from .patch import CallInfo, attach_edit
from .render import COLORMAPS, labelled_grid, overlay

PROBE = "SAE Probe Block"
HEATMAP = "SAE Feature Heatmap"
TOP = "SAE Top Features"
ANY_BLOCK = "first probed block"


class ProbeBlock(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxProbeBlock",
            display_name="SAE Probe Block",
            category=CATEGORY,
            description="Record the SAE codes of a block at chosen steps while the model samples (only the "
            "active features are kept). The image is not changed. Chain several probes through 'probe' to "
            "visualise several blocks from one SAE_PROBE.",
            inputs=[
                io.Model.Input("model"),
                SAE.Input("sae"),
                io.Combo.Input("block", options=BLOCK_CHOICES, default=AUTO),
                io.String.Input("steps", default="all", tooltip="'all', or step indices such as '0' or '0, 2-3'."),
                io.Combo.Input("apply_to", options=TARGET_CHOICES, default="cond",
                               tooltip="Record the positive (cond) rows, the negative (uncond) rows, or both."),
                SAE_PROBE.Input("probe", optional=True, tooltip="Earlier probes to keep in the same SAE_PROBE."),
            ],
            outputs=[io.Model.Output(), SAE_PROBE.Output(display_name="probe")],
        )

    @classmethod
    def execute(cls, model, sae, block, steps, apply_to, probe=None) -> io.NodeOutput:
        blk = resolve_block(PROBE, sae, block, model)
        recorder = ProbeRecorder(sae, blk.short, parse_steps(PROBE, steps))
        edit = ProbeEdit(block=blk, target=apply_to, handle=sae, recorder=recorder)
        probes = tuple(probe or ()) + (recorder,)
        return io.NodeOutput(attach_edit(model, edit), probes)


def _pick(node: str, probes, block: str) -> ProbeRecorder:
    if not probes:
        raise NodeInputError(node, "the probe input is empty")
    if block in (ANY_BLOCK, "", None):
        return probes[0]
    for p in probes:
        if p.block_name == block:
            return p
    raise NodeInputError(node, f"block {block} was not probed (probed: {', '.join(p.block_name for p in probes)})")


def _record(node: str, probes, block: str, step: int) -> tuple[ProbeRecorder, StepRecord]:
    rec = _pick(node, probes, block)
    try:
        return rec, rec.get(step)
    except ValueError as e:
        raise NodeInputError(node, str(e)) from None


def _match_images(node: str, record: StepRecord, image: torch.Tensor) -> torch.Tensor:
    if record.values.shape[0] not in (1, image.shape[0]):
        raise NodeInputError(node, f"the probe recorded {record.values.shape[0]} rows but the IMAGE has "
                                   f"{image.shape[0]} images; connect the image made with the probed MODEL")
    return image


def _feature_scale(probe: ProbeRecorder, feature: int, maps: torch.Tensor, how: str) -> torch.Tensor:
    if how == "feature mean x 2" and probe.handle.mean is not None:
        return torch.full((maps.shape[0],), 2.0 * float(probe.handle.mean[feature]))
    return maps.flatten(1).amax(1)


BLOCK_PICK = [ANY_BLOCK, *BLOCK_CHOICES[1:]]
SCALES = ["image max", "feature mean x 2"]


class FeatureHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxFeatureHeatmap",
            display_name="SAE Feature Heatmap",
            category=CATEGORY,
            description="Overlay where one feature fires on the generated image.",
            inputs=[
                SAE_PROBE.Input("probe"),
                io.Image.Input("image", tooltip="The image decoded from the probed sampling run."),
                io.Int.Input("feature", default=0, min=0, max=1 << 20),
                io.Combo.Input("block", options=BLOCK_PICK, default=ANY_BLOCK),
                io.Int.Input("step", default=-1, min=-1000, max=1000, tooltip="-1 = the last recorded step."),
                io.Combo.Input("colormap", options=list(COLORMAPS), default="inferno"),
                io.Float.Input("alpha", default=0.6, min=0.0, max=1.0, step=0.05),
                io.Combo.Input("scale", options=SCALES, default=SCALES[0],
                               tooltip="Map colours to [0, image max] or [0, 2 x the feature's mean activation]."),
            ],
            outputs=[io.Image.Output(display_name="overlay"), io.Mask.Output(display_name="heat")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, probe, image, feature, block, step, colormap, alpha, scale) -> io.NodeOutput:
        rec, record = _record(HEATMAP, probe, block, step)
        if feature >= rec.handle.sae.n_features:
            raise NodeInputError(HEATMAP, f"feature {feature} is out of range 0..{rec.handle.sae.n_features - 1}")
        image = _match_images(HEATMAP, record, image)
        maps = record.feature_map(feature)
        out, heat = overlay(image, maps, _feature_scale(rec, feature, maps, scale), colormap, alpha)
        return io.NodeOutput(out, heat, ui=ui.PreviewImage(out, cls=cls))


class TopFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxTopFeatures",
            display_name="SAE Top Features",
            category=CATEGORY,
            description="Rank a block's features by mean activation over the image (or over a MASK) and show "
            "the top ones as a labelled grid of heatmaps, plus the ranking as JSON.",
            inputs=[
                SAE_PROBE.Input("probe"),
                io.Image.Input("image"),
                io.Int.Input("top_n", default=9, min=1, max=256),
                io.Combo.Input("block", options=BLOCK_PICK, default=ANY_BLOCK),
                io.Int.Input("step", default=-1, min=-1000, max=1000),
                io.Int.Input("image_index", default=0, min=0, max=4096, tooltip="Which image of the batch."),
                io.Int.Input("columns", default=3, min=1, max=16),
                io.Combo.Input("colormap", options=list(COLORMAPS), default="inferno"),
                io.Float.Input("alpha", default=0.6, min=0.0, max=1.0, step=0.05),
                io.String.Input("filename_prefix", default="sae_top_features",
                                tooltip="The JSON is saved to the output folder under this prefix; empty: not saved."),
                io.Mask.Input("mask", optional=True, tooltip="Rank by mean activation inside this mask."),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.String.Output(display_name="json")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, probe, image, top_n, block, step, image_index, columns, colormap, alpha, filename_prefix,
                mask=None) -> io.NodeOutput:
        rec, record = _record(TOP, probe, block, step)
        image = _match_images(TOP, record, image)
        rows = record.values.shape[0]
        if image_index >= rows:
            raise NodeInputError(TOP, f"image_index {image_index} but only {rows} images were recorded")
        H, W = record.values.shape[1:3]
        weights = None
        if mask is not None:
            info = CallInfo(0.0, None, None, record.row_kind, record.row_image)
            weights = mask_weights(mask, info, list(range(rows)), H, W, "cpu")
        means = record.mean_activation(weights)[image_index]
        order = means.argsort(descending=True)[: min(top_n, int((means > 0).sum()) or 1)]
        stats_mean = rec.handle.mean
        index = rec.handle.features_index()
        pbar = comfy.utils.ProgressBar(len(order))
        tiles, labels, ranking = [], [], []
        img = image[min(image_index, image.shape[0] - 1)].unsqueeze(0)
        for f in order.tolist():
            fmap = record.feature_map(f)[image_index].unsqueeze(0)
            tile, _ = overlay(img, fmap, fmap.max(), colormap, alpha)
            tiles.append(tile[0])
            labels.append(f"#{f}  {float(means[f]):.3g}")
            entry = {
                "feature": f,
                "mean_activation": float(means[f]),
                "max_activation": float(fmap.max()),
                "active_positions": int((fmap > 0).sum()),
            }
            if stats_mean is not None and float(stats_mean[f]) > 0:
                entry["mean_in_feature_units"] = float(means[f]) / float(stats_mean[f])
            if index is not None:  # where the feature fired most in the SAE's training data
                entry["top_dataset_images"] = [
                    {k: e[k] for k in ("prompt", "file", "value", "position") if k in e}
                    for e in index["features"][f][:3]
                ]
            ranking.append(entry)
            pbar.update(1)
        grid = labelled_grid(tiles, labels, columns)
        result = {
            "block": rec.block_name,
            "sae": rec.handle.name,
            "step": record.step,
            "sigma": record.sigma,
            "image_index": image_index,
            "grid": [int(H), int(W)],
            "ranked_over": "mask" if mask is not None else "image",
            "features": ranking,
        }
        if index is not None and index.get("dump"):
            result["dataset"] = index["dump"]  # the folder the dataset image files are relative to
        text = json.dumps(result, indent=2)
        if filename_prefix:
            _save_json(text, filename_prefix, rec.block_name)
        return io.NodeOutput(grid, text, ui={**ui.PreviewImage(grid, cls=cls).as_dict(), "text": [text]})


def _save_json(text: str, prefix: str, block: str) -> str:
    out_dir = folder_paths.get_output_directory()
    full_dir, name, counter, _, _ = folder_paths.get_save_image_path(f"{prefix}_{block}", out_dir)
    path = os.path.join(full_dir, f"{name}_{counter:05}_.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
