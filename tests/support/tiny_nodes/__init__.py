"""Test-only ComfyUI node pack: `TinySDXLCheckpointLoader`, a drop-in for CheckpointLoaderSimple.

It returns the tiny SDXL-architecture MODEL, stand-in CLIP and small VAE of `tests/support/tiny_sdxl.py`,
so workflows run on a CPU in seconds without any weights on disk.
"""

import os
import sys

_SUPPORT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # through symlinks
if _SUPPORT not in sys.path:
    sys.path.insert(0, _SUPPORT)

import tiny_sdxl  # noqa: E402  (ComfyUI imports this pack under a path-based name; import by folder)


class TinySDXLCheckpointLoader:
    """MODEL, CLIP, VAE like CheckpointLoaderSimple, built in memory from a seed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": ("STRING", {"default": "tiny"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = "testing"

    def load_checkpoint(self, ckpt_name, seed=0):
        return tiny_sdxl.tiny_model(seed), tiny_sdxl.TinyCLIP(seed), tiny_sdxl.tiny_vae(seed)


NODE_CLASS_MAPPINGS = {"TinySDXLCheckpointLoader": TinySDXLCheckpointLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"TinySDXLCheckpointLoader": "Tiny SDXL Checkpoint Loader (tests)"}
