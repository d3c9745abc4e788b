"""Steer features and Reconstruct through the SAE: edits of one block's update during sampling."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..sae_models.steering import MODES
from .errors import NodeInputError
from .inputs import check_mask, parse_features, sigma_range
from .models import resolve_block
from .schema import (AUTO, BLOCK_CHOICES, CATEGORY, ICON_BASE, PAINT_BOTH, SAE, STEER_TARGETS, TARGET_CHOICES,
                     TARGET_MODE, checked_numbers)
from .patching import ReconstructEdit, SteerEdit, attach_edit

STEER = "SAE Steer Features"
RECONSTRUCT = "SAE Reconstruct Block"
UNITS = ["mean activation", "absolute"]


def _range_inputs(targets=TARGET_CHOICES):
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Start of the edit, as a fraction of denoising (0 = first step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="End of the edit, as a fraction of denoising: steps from start_percent up to, not "
                       "including, end_percent are edited (1 = through the last step; with n steps, i/n is "
                       "step i, as the paper's step indices)."),
        io.Combo.Input("apply_to", options=targets, default="cond",
                       tooltip="Edit the positive (cond) rows, the negative (uncond) rows of CFG, or both"
                       + (f"; '{PAINT_BOTH}': add to cond and subtract from uncond (the paper's paint on SDXL "
                          f"base, mode add); '{ICON_BASE}': replace on cond, and the uncond rows' update set to "
                          "zero (the paper's feature icon on SDXL base, mode replace)." if PAINT_BOTH in targets
                          else ".")),
        io.Mask.Input("mask", optional=True,
                      tooltip="Where to edit. Any size: it is averaged over the block's grid "
                              "(16x16 for the paper's blocks at 512x512)."),
    ]


class SteerFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxSteerFeatures",
            display_name=STEER,
            category=CATEGORY,
            description="Turn SAE features on or off inside a transformer block while the model samples. "
            "add: add strength x mean x d_f at every position (the paper's paint); ablate: remove strength x the "
            "feature's own contribution where it fires (1 = all of it); set: clamp its code to strength x mean; replace: replace the block's "
            "whole update by strength x mean x d_f (the paper's feature icons use k = 10). The SAE's "
            "reconstruction error is kept, so what is not edited is not changed.",
            inputs=[
                io.Model.Input("model"),
                SAE.Input("sae"),
                io.String.Input("features", default="0",
                                tooltip="Feature indices, comma separated; 'f:s' gives feature f its own strength."),
                io.Float.Input("strength", default=1.0, min=-1000.0, max=1000.0, step=0.1,
                               tooltip="In units of each feature's mean activation (0 does nothing)."),
                io.Combo.Input("mode", options=list(MODES), default="add"),
                io.Combo.Input("block", options=BLOCK_CHOICES, default=AUTO),
                io.Combo.Input("units", options=UNITS, default=UNITS[0],
                               tooltip="'mean activation' multiplies strengths by the feature's mean activation "
                                       "(from the SAE's statistics); 'absolute' uses them as raw codes."),
                *_range_inputs(STEER_TARGETS),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    @checked_numbers
    def execute(cls, model, sae, features, strength, mode, block, units, start_percent, end_percent, apply_to,
                mask=None) -> io.NodeOutput:
        blk = resolve_block(STEER, sae, block, model)
        feats, strengths = parse_features(STEER, features, sae.sae.n_features, strength)
        mask = check_mask(STEER, mask)
        if TARGET_MODE.get(apply_to, mode) != mode:
            paper = "paint" if apply_to == PAINT_BOTH else "feature icon"
            raise NodeInputError(STEER, f"apply_to '{apply_to}' (the paper's {paper} on SDXL base) goes with mode "
                                        f"{TARGET_MODE[apply_to]}, not {mode}")
        if mode == "ablate":
            amounts = strengths  # the fraction of each feature's contribution to remove
        elif units == UNITS[0]:
            mean = sae.mean
            if mean is None:
                raise NodeInputError(
                    STEER,
                    f"SAE {sae.name} has no per-feature mean statistics, so strengths cannot be in mean units; "
                    "set units to 'absolute' (raw codes), or compute them over a dump with "
                    "'python -m sae_models stats <sae file> <dump folder>'",
                )
            dead = [f for f, s in zip(feats, strengths) if s != 0 and float(mean[f]) == 0.0]
            if dead:
                raise NodeInputError(
                    STEER,
                    f"feature(s) {', '.join(map(str, dead))} of SAE {sae.name} have mean activation 0 (they never "
                    "fired when its statistics were computed), so a strength in mean units does nothing; choose "
                    "features that fire (see SAE Top Features) or set units to 'absolute'",
                )
            amounts = tuple(s * float(mean[f]) for f, s in zip(feats, strengths))
        else:
            amounts = strengths
        if all(a == 0 for a in amounts):
            return io.NodeOutput(model)  # strength 0 is a no-op: the MODEL is passed on untouched
        s_start, s_end = sigma_range(STEER, model, start_percent, end_percent)
        edit = SteerEdit(block=blk, target=apply_to, sigma_start=s_start, sigma_end=s_end, node=STEER, handle=sae,
                         mask=mask, mode=mode, features=feats, amounts=amounts)
        return io.NodeOutput(attach_edit(model, edit))


class ReconstructBlock(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxReconstructBlock",
            display_name=RECONSTRUCT,
            category=CATEGORY,
            description="Replace a block's update by the SAE's reconstruction, to see what the SAE keeps and "
            "what it loses. With keep_error the error term is added back (the image should not change).",
            inputs=[
                io.Model.Input("model"),
                SAE.Input("sae"),
                io.Combo.Input("block", options=BLOCK_CHOICES, default=AUTO),
                io.Boolean.Input("keep_error", default=False),
                *_range_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    @checked_numbers
    def execute(cls, model, sae, block, keep_error, start_percent, end_percent, apply_to, mask=None):
        blk = resolve_block(RECONSTRUCT, sae, block, model)
        mask = check_mask(RECONSTRUCT, mask)
        s_start, s_end = sigma_range(RECONSTRUCT, model, start_percent, end_percent)
        edit = ReconstructEdit(block=blk, target=apply_to, sigma_start=s_start, sigma_end=s_end, node=RECONSTRUCT,
                               handle=sae, mask=mask, keep_error=keep_error)
        return io.NodeOutput(attach_edit(model, edit))
