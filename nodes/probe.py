"""Probe a block during sampling, then turn the record and the decoded image into heatmaps and rankings."""

from __future__ import annotations

import json
import os

import torch
from comfy_api.v0_0_2 import io, ui

import comfy.utils

from ..sae_models.files import atomic_write_text
from .errors import NodeInputError, validation_answer
from .inputs import check_mask, parse_steps
from .models import resolve_block
from .schema import AUTO, BLOCK_CHOICES, CATEGORY, SAE, SAE_PROBE, TARGET_CHOICES, checked_numbers
from .patching import ROW_VIEWS, ProbeEdit, ProbeRecorder, StepRecord, attach_edit, mask_weights
from .paths import output_prefix
from .render import COLORMAPS, labelled_grid, overlay
from .workbench import keep_run

PROBE = "SAE Probe Block"
HEATMAP = "SAE Feature Heatmap"
TOP = "SAE Top Features"
ANY_BLOCK = "first probed block"
DEFAULT_CFG = 8.0


class ProbeBlock(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxProbeBlock",
            display_name=PROBE,
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
    @checked_numbers
    def execute(cls, model, sae, block, steps, apply_to, probe=None) -> io.NodeOutput:
        blk = resolve_block(PROBE, sae, block, model)
        recorder = ProbeRecorder(steps=parse_steps(PROBE, steps), handle=sae, block_name=blk.short)
        edit = ProbeEdit(block=blk, target=apply_to, node=PROBE, handle=sae, record=recorder)
        probes = tuple(probe or ()) + (recorder,)
        return io.NodeOutput(attach_edit(model, edit), probes)

    @classmethod
    def validate_inputs(cls, steps):
        return validation_answer(lambda: parse_steps(PROBE, steps), steps)


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


def _view(node: str, record: StepRecord, per_row: torch.Tensor, view: str, cfg: float) -> torch.Tensor:
    try:
        return record.by_image(per_row, view, cfg)
    except ValueError as e:
        raise NodeInputError(node, str(e)) from None


def _match_images(node: str, n_rows: int, image: torch.Tensor) -> torch.Tensor:
    if n_rows not in (1, image.shape[0]):
        raise NodeInputError(node, f"the probe recorded {n_rows} images but the IMAGE has {image.shape[0]}; "
                                   "connect the image made with the probed MODEL")
    return image


def _scaled(probe: ProbeRecorder, feature: int, maps: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, scale) for the overlay, which colours maps / scale: per image `[0, max]`, `[0, 2 x mean_f]`, or
    the paper's `(code - min) / (max - min)` (its heatmaps; differs from 'image max' only where the feature is
    active everywhere)."""
    if how == SCALES[1] and probe.handle.mean is not None:
        return maps, torch.full((maps.shape[0],), 2.0 * float(probe.handle.mean[feature]))
    if how == SCALES[2]:
        maps = maps - maps.flatten(1).amin(1)[:, None, None]
    return maps, maps.flatten(1).amax(1)


BLOCK_PICK = [ANY_BLOCK, *BLOCK_CHOICES[1:]]
SCALES = ["image max", "feature mean x 2", "paper (image min to max)"]


class FeatureHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxFeatureHeatmap",
            display_name=HEATMAP,
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
                               tooltip="Map colours to [0, image max], to [0, 2 x the feature's mean activation], "
                               "or, as the paper's heatmaps, to [image min, image max]."),
                *_view_inputs(),
            ],
            outputs=[io.Image.Output(display_name="overlay"), io.Mask.Output(display_name="heat")],
            is_output_node=True,
        )

    @classmethod
    @checked_numbers
    def execute(cls, probe, image, feature, block, step, colormap, alpha, scale, rows=ROW_VIEWS[0],
                cfg=DEFAULT_CFG) -> io.NodeOutput:
        rec, record = _record(HEATMAP, probe, block, step)
        if feature >= rec.handle.sae.n_features:
            raise NodeInputError(HEATMAP, f"feature {feature} is out of range 0..{rec.handle.sae.n_features - 1}")
        maps = _view(HEATMAP, record, record.feature_map(feature), rows, cfg)
        image = _match_images(HEATMAP, maps.shape[0], image)
        out, heat = overlay(image, *_scaled(rec, feature, maps, scale), colormap, alpha)
        run = keep_run(rec.handle, record, rec.run_id, rec.block_name, image, rows, cfg, [])
        shown = {"run": run, "block": rec.block_name, "sae": rec.handle.name, "feature": feature}
        return io.NodeOutput(out, heat, ui={**ui.PreviewImage(out, cls=cls).as_dict(), "sae_workbench": [shown]})


class TopFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxTopFeatures",
            display_name=TOP,
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
                *_view_inputs(),
                io.Float.Input("hide_above_frequency", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Leave out features active on more than this fraction of all vectors "
                               "(the SAE's statistics): the always-on features that top every ranking (the "
                               "paper's FLUX demo hides 20). 1 = hide none."),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.String.Output(display_name="json")],
            is_output_node=True,
        )

    @classmethod
    @checked_numbers
    def execute(cls, probe, image, top_n, block, step, image_index, columns, colormap, alpha, filename_prefix,
                mask=None, rows=ROW_VIEWS[0], cfg=DEFAULT_CFG, hide_above_frequency=1.0) -> io.NodeOutput:
        save_to = _json_prefix(filename_prefix)
        rec, record = _record(TOP, probe, block, step)
        H, W = record.values.shape[1:3]
        weights = None
        mask = check_mask(TOP, mask)
        if mask is not None:
            weights = mask_weights(mask, record.row_image, H, W, "cpu")
        all_means = _view(TOP, record, record.mean_activation(weights), rows, cfg)
        image = _match_images(TOP, all_means.shape[0], image)
        if image_index >= all_means.shape[0]:
            raise NodeInputError(TOP, f"image_index {image_index} but only {all_means.shape[0]} images were recorded")
        means = all_means[image_index]
        hidden = _always_on(rec, hide_above_frequency)
        ranked = means.masked_fill(hidden, float("-inf")) if hidden is not None else means
        order = ranked.argsort(descending=True)[: min(top_n, int((ranked > 0).sum()) or 1)]
        stats_mean = rec.handle.mean
        index = rec.handle.features_index()
        names = rec.handle.labels()
        pbar = comfy.utils.ProgressBar(len(order))
        tiles, labels, ranking = [], [], []
        img = image[min(image_index, image.shape[0] - 1)].unsqueeze(0)
        for f in order.tolist():
            fmap = _view(TOP, record, record.feature_map(f), rows, cfg)[image_index].unsqueeze(0)
            tile, _ = overlay(img, fmap, fmap.max(), colormap, alpha)
            tiles.append(tile[0])
            labels.append(f"#{f}  {float(means[f]):.3g}" + (f"  {names[f]}" if f in names else ""))
            entry = {
                "feature": f,
                "mean_activation": float(means[f]),
                "max_activation": float(fmap.max()),
                "active_positions": int((fmap > 0).sum()),
            }
            if f in names:
                entry["label"] = names[f]
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
            "rows": rows,
            **({"cfg": cfg} if rows == "cfg combined" else {}),
            **({"hidden_above_frequency": hide_above_frequency, "hidden_features": hidden.nonzero()[:, 0].tolist()}
               if hidden is not None else {}),
            "features": ranking,
        }
        if index is not None and index.get("dump"):
            result["dataset"] = index["dump"]  # the folder the dataset image files are relative to
        result["run"] = keep_run(rec.handle, record, rec.run_id, rec.block_name, image, rows, cfg, ranking)
        text = json.dumps(result, indent=2)
        if save_to is not None:
            _save_json(text, save_to, rec.block_name)
        shown = {"run": result["run"], "block": rec.block_name, "sae": rec.handle.name}
        return io.NodeOutput(grid, text, ui={**ui.PreviewImage(grid, cls=cls).as_dict(), "text": [text],
                                             "sae_workbench": [shown]})


    @classmethod
    def validate_inputs(cls, filename_prefix):
        try:
            _json_prefix(filename_prefix)
        except NodeInputError as e:
            return str(e)
        return True


def _always_on(rec: ProbeRecorder, threshold: float) -> torch.Tensor | None:
    """Features active on more than `threshold` (in [0, 1], the schema's bounds) of all vectors by the SAE's
    statistics (None: hide none)."""
    if threshold >= 1.0:
        return None
    frequency = rec.handle.sae.stats.frequency
    if frequency is None:
        raise NodeInputError(TOP, f"SAE {rec.handle.name} has no frequency statistics to tell always-on features "
                                  "by; compute them over a dump with 'python -m sae_models stats <sae> <dump>', or set "
                                  "hide_above_frequency to 1")
    return frequency.float().cpu() > threshold


def _json_prefix(prefix: str | None) -> str | None:
    """The JSON's file name prefix, checked to stay inside the output folder; None: do not save."""
    if prefix is None or not prefix.strip():
        return None
    output_prefix(TOP, "filename_prefix", prefix, create=False)
    return prefix.strip()


def _save_json(text: str, prefix: str, block: str) -> str:
    folder, name, counter = output_prefix(TOP, "filename_prefix", f"{prefix}_{block}")
    path = os.path.join(folder, f"{name}_{counter:05}_.json")
    atomic_write_text(path, text)
    return path


def _view_inputs():
    return [
        io.Combo.Input("rows", options=ROW_VIEWS, default=ROW_VIEWS[0], optional=True,
                       tooltip="With CFG (cfg > 1) the probe may record both halves of the batch: show the "
                               "positive (cond) rows, the negative (uncond) rows, or the CFG combination "
                               "uncond + cfg x (cond - uncond)."),
        io.Float.Input("cfg", default=DEFAULT_CFG, min=0.0, max=100.0, step=0.1, optional=True,
                       tooltip="The sampler's cfg, for the 'cfg combined' rows."),
    ]
