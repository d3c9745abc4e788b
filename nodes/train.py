"""Train SAE: `sae_models.pipeline.train_on_dump` (the paper's TopK training, evaluation, statistics, save)
on a dump folder, from a graph."""

from __future__ import annotations

import os
import time

import torch
from comfy_api.v0_0_2 import io

import comfy.model_management
import comfy.utils

from ..sae_models import shards
from ..sae_models.blocks import SDXL, SHORT_NAMES, arch_of
from ..sae_models.pipeline import train_on_dump
from ..sae_models.training.config import ARCHITECTURES as TRAINABLE_ARCHITECTURES
from . import paths
from .errors import NodeInputError, excerpt, validation_answers
from .sae_folder import sae_file, sae_root
from .sae_handle import SAEHandle
from .schema import CATEGORY, SAE, checked_numbers

NODE = "SAE Train"
ONLY_BLOCK = "the dump's only block"
ARCHS = list(TRAINABLE_ARCHITECTURES)
# On a GPU a step takes milliseconds and each progress report reads values back from it (a stall): report
# (and notice an interrupt) every 25 steps there, every step on the CPU.
_LOG_EVERY_GPU = 25


def _dump_block(node: str, folder: str, choice: str) -> str:
    try:
        return shards.dump_block(folder, None if choice == ONLY_BLOCK else choice)
    except (ValueError, OSError) as e:
        raise NodeInputError(node, str(e)) from None


def _output_path(node: str, name: str, overwrite: bool) -> str:
    path = sae_file(node, "save_name", name)
    if os.path.exists(path) and not overwrite:
        raise NodeInputError(node, f"models/sae already holds {excerpt(os.path.basename(path))}; choose another "
                                   "save_name or turn on overwrite")
    return path


def _show_text(node_id: str, text: str) -> None:
    """Live text on the node in the frontend (nothing when no server runs, e.g. ComfyUI used as a library)."""
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:
        pass


class TrainSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxTrainSAE",
            display_name=NODE,
            category=CATEGORY,
            description="Train a TopK SAE on a dump folder exactly as the paper does (geometric-median b_pre, "
            "unit-norm decoder, AuxK on dead latents, Adam), evaluate it on held-out images, compute the "
            "per-feature statistics used by steering and a features index, and save it to models/sae.",
            inputs=[
                io.String.Input("dump_folder", default="sae_dumps/sdxl_turbo",
                                tooltip="A folder written by SAE Dump Images: under the output folder, or "
                                "'<name>/<path>' in a registered dump folder."),
                io.Combo.Input("block", options=[ONLY_BLOCK, *SHORT_NAMES], default=ONLY_BLOCK),
                io.Int.Input("n_features", default=0, min=0, max=1 << 20,
                             tooltip="Features of the SAE; 0 = the paper's for the dump's model (SDXL 5120, FLUX 12288)."),
                io.Int.Input("k", default=0, min=0, max=4096,
                             tooltip="Active features per vector; 0 = the paper's (SDXL 10, FLUX 20)."),
                io.Combo.Input("architecture", options=ARCHS, default="topk",
                               tooltip="topk: the paper's SAE. batchtopk: k active on average over a batch, a "
                               "threshold at inference. matryoshka_batchtopk: batchtopk whose nested prefixes "
                               "(n/16, n/8, n/4, n/2, n) each learn to reconstruct, general features first."),
                io.Int.Input("max_tokens", default=0, min=0, max=1 << 40,
                             tooltip="Stop after this many vectors; 0 = one pass over the training split."),
                io.Int.Input("batch_size", default=4096, min=1, max=1 << 20),
                io.Float.Input("lr", default=1e-4, min=1e-7, max=1.0, step=1e-5),
                io.Float.Input("eval_fraction", default=0.05, min=0.0, max=0.5, step=0.01,
                               tooltip="Fraction of the images held out for evaluation (FVU, L0, dead fraction)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF),
                io.String.Input("save_name", default="my_sae",
                                tooltip="Saved as models/sae/<save_name>.safetensors, with <save_name>.features.json."),
                io.Boolean.Input("overwrite", default=False),
            ],
            outputs=[SAE.Output(display_name="SAE")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dump_folder, save_name):
        return validation_answers((lambda: paths.dump_folder(NODE, "dump_folder", dump_folder), dump_folder),
                                  (lambda: sae_file(NODE, "save_name", save_name), save_name))

    @classmethod
    @checked_numbers
    def execute(cls, dump_folder, block, n_features, k, architecture, max_tokens, batch_size, lr, eval_fraction,
                seed, save_name, overwrite) -> io.NodeOutput:
        out = _output_path(NODE, save_name, overwrite)
        folder = paths.dump_folder(NODE, "dump_folder", dump_folder)
        blk = _dump_block(NODE, folder, block)
        arch = arch_of(blk)
        n_features = n_features or (arch.n_features if arch else SDXL.n_features)
        k = k or (arch.k if arch else SDXL.k)
        if k > n_features:
            raise NodeInputError(NODE, f"k={k} is larger than n_features={n_features}")
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        progress = _Progress(node_id)
        checkpoints = os.path.join(folder, "checkpoints", os.path.basename(out).removesuffix(".safetensors"))
        try:
            # ComfyUI runs nodes under torch.inference_mode(); training needs autograd back.
            with torch.inference_mode(False), torch.enable_grad():
                done = train_on_dump(folder, out, block=blk, eval_fraction=eval_fraction, n_features=n_features, k=k,
                                     architecture=architecture, batch_size=batch_size, lr=lr,
                                     max_tokens=max_tokens or None, seed=seed, base_model=arch.name if arch else None,
                                     checkpoint_dir=checkpoints, remove_checkpoints=True, callback=progress,
                                     log_every=_LOG_EVERY_GPU if torch.cuda.is_available() else 1)
        except shards.DumpFormatError as e:
            raise NodeInputError(NODE, str(e)) from None
        m = done.metrics
        name = os.path.relpath(out, sae_root()).replace(os.sep, "/")
        handle = SAEHandle(done.sae, name, out)
        text = (f"{handle.describe()} trained on {done.sae.config.hyperparameters['tokens']} vectors of {blk}; "
                f"{'held-out' if done.held_out else 'whole-dump'} FVU {m['fvu']:.4f}, L0 {m['l0']:.2f}, "
                f"dead {m['dead_fraction']:.1%} -> {out}")
        return io.NodeOutput(handle, ui={"text": [text]})


class _Progress:
    """The node's progress bar and live text, from the training callback; stops the run when the user
    interrupts it."""

    def __init__(self, node_id: str | None):
        self.node_id, self.bar, self.last_text = node_id, None, 0.0

    def __call__(self, m: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        steps = m.get("total_steps") or 1
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(steps)
        self.bar.update_absolute(min(int(m["step"]), steps), steps)
        if self.node_id is not None and "loss" in m and time.monotonic() - self.last_text > 1.0:
            self.last_text = time.monotonic()
            _show_text(self.node_id, f"step {m['step']}/{steps}  loss {m['loss']:.4f}  FVU {m['fvu']:.4f}\n"
                                     f"L0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}  "
                                     f"{m.get('tokens_per_s', 0):,.0f} tok/s")
