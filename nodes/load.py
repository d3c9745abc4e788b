"""Load SAE: an SAE file or folder from `models/sae`, in any format `sae_models` reads."""

from __future__ import annotations

import os

from comfy_api.v0_0_2 import io

from .. import sae_models
from .errors import NodeInputError
from .sae_folder import available_saes, find_sae
from .sae_handle import SAEHandle
from .schema import CATEGORY, SAE, checked_numbers

NODE = "Load SAE"


class LoadSAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxLoadSAE",
            display_name=NODE,
            category=CATEGORY,
            description="Load a sparse autoencoder from ComfyUI/models/sae: the pack's .safetensors files, the "
            "paper's release folders as they are, SAELens, EleutherAI sparsify or dictionary_learning folders.",
            inputs=[
                io.Combo.Input(
                    "sae_name",
                    options=available_saes(),
                    tooltip="A file or folder under models/sae. Paper SAEs: put each release folder "
                    "(unet.<block>_k10_hidden5120_...) there unchanged.",
                ),
            ],
            outputs=[SAE.Output(display_name="SAE")],
        )

    @classmethod
    @checked_numbers
    def execute(cls, sae_name) -> io.NodeOutput:
        path = find_sae(NODE, sae_name)
        try:
            sae = sae_models.load(path)
        except sae_models.SAEError as e:  # named as the workflow names it, not by the server's folders
            raise NodeInputError(NODE, str(e).replace(path, sae_name)) from None
        handle = SAEHandle(sae, sae_name, path)
        return io.NodeOutput(handle, ui={"text": [handle.describe()]})

    @classmethod
    def fingerprint_inputs(cls, sae_name):
        # Reload when the file changes on disk.
        try:
            path = find_sae(NODE, sae_name)
        except NodeInputError:
            return sae_name
        stamps = []
        for dirpath, _, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]:
            for f in sorted(files):
                st = os.stat(os.path.join(dirpath, f))
                stamps.append((f, st.st_mtime_ns, st.st_size))
        return str(stamps)
