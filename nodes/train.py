"""Train SAE: the paper's TopK training (`sae_models.training.train`) on a dump folder, from a graph."""

from __future__ import annotations

import os
import shutil
import time

import torch
from comfy_api.latest import io

import comfy.model_management
import comfy.utils
import folder_paths

from .. import sae_models
from ..sae_models import shards
from ..sae_models.blocks import SHORT_NAMES
from ..sae_models.metrics import evaluate
from ..sae_models.stats import features_index_path, summarize_features, write_features_index
from ..sae_models.training import train
from .common import CATEGORY, SAE, NodeInputError
from . import paths
from .dump import _valid, resolve_dump_folder
from .sae_folder import FOLDER
from .sae_handle import SAEHandle

NODE = "SAE Train"
ONLY_BLOCK = "the dump's only block"
ARCHS = ["topk", "batchtopk"]


def _dump_block(node: str, folder: str, choice: str) -> str:
    try:
        return shards.dump_block(folder, None if choice == ONLY_BLOCK else choice)
    except (ValueError, OSError) as e:
        raise NodeInputError(node, str(e)) from None


def _output_path(node: str, name: str, overwrite: bool) -> str:
    path = paths.sae_file(node, "save_name", name)
    if os.path.exists(path) and not overwrite:
        raise NodeInputError(node, f"{path} exists; choose another save_name or turn on overwrite")
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
                io.Int.Input("n_features", default=5120, min=1, max=1 << 20),
                io.Int.Input("k", default=10, min=1, max=4096),
                io.Combo.Input("architecture", options=ARCHS, default="topk"),
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
        for value, check in ((dump_folder, lambda: resolve_dump_folder(NODE, dump_folder, "dump_folder")),
                             (save_name, lambda: paths.sae_file(NODE, "save_name", save_name))):
            answer = _valid(check, value)
            if answer is not True:
                return answer
        return True

    @classmethod
    def execute(cls, dump_folder, block, n_features, k, architecture, max_tokens, batch_size, lr, eval_fraction,
                seed, save_name, overwrite) -> io.NodeOutput:
        out = _output_path(NODE, save_name, overwrite)
        if k > n_features:
            raise NodeInputError(NODE, f"k={k} is larger than n_features={n_features}")
        folder = resolve_dump_folder(NODE, dump_folder, "dump_folder")
        blk = _dump_block(NODE, folder, block)

        def stream(split, **kw):
            return shards.iter_vectors(folder, blk, batch_size=batch_size, seed=seed, split=split,
                                       eval_fraction=eval_fraction, **kw)

        data = stream("train" if eval_fraction > 0 else "all")
        if data.n_rows == 0:
            raise NodeInputError(NODE, f"{folder} has no complete {blk} rows to train on")
        if data.n_rows < batch_size:  # a small dump (e.g. a first try): one batch of everything
            batch_size = data.n_rows
            data = stream("train" if eval_fraction > 0 else "all")
        tokens = min(max_tokens or data.n_rows, data.n_rows)
        steps = max(tokens // batch_size, 1)
        pbar = comfy.utils.ProgressBar(steps)
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        last_text = [0.0]

        def progress(m):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(min(int(m["step"]), steps), steps)
            if node_id is not None and "loss" in m and time.monotonic() - last_text[0] > 1.0:
                last_text[0] = time.monotonic()
                _show_text(node_id, f"step {m['step']}/{steps}  loss {m['loss']:.4f}  FVU {m['fvu']:.4f}\n"
                                    f"L0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}  {m.get('tokens_per_s', 0):,.0f} tok/s")

        checkpoints = os.path.join(folder, "checkpoints", os.path.basename(out).removesuffix(".safetensors"))
        # ComfyUI runs nodes under torch.inference_mode(); training needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            sae = train(data, n_features=n_features, k=k, architecture=architecture, batch_size=batch_size, lr=lr,
                        max_tokens=tokens, seed=seed, block=blk, base_model="sdxl", hook="update",
                        checkpoint_dir=checkpoints, callback=progress, log_every=1)
        held_out = stream("eval", shuffle=False) if eval_fraction > 0 else None
        metrics = evaluate(sae, held_out if held_out is not None and held_out.n_rows else stream("all", shuffle=False))
        sae.stats, index = summarize_features(sae, stream("all", shuffle=False, with_meta=True), top_n=16)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        sae_models.save(sae, out)
        write_features_index(index, features_index_path(out))
        shutil.rmtree(checkpoints, ignore_errors=True)
        name = os.path.relpath(out, folder_paths.get_folder_paths(FOLDER)[0]).replace(os.sep, "/")
        handle = SAEHandle(sae, name, out)
        text = (f"{handle.describe()} trained on {tokens} vectors of {blk}; held-out FVU {metrics['fvu']:.4f}, "
                f"L0 {metrics['l0']:.2f}, dead {metrics['dead_fraction']:.1%} -> {out}")
        return io.NodeOutput(handle, ui={"text": [text]})
