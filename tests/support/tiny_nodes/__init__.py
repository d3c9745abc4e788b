"""Test-only ComfyUI node pack: `TinySDXLCheckpointLoader`, a drop-in for CheckpointLoaderSimple.

It returns the tiny SDXL-architecture MODEL, stand-in CLIP and small VAE of `tests/support/tiny_sdxl.py`,
so workflows run on a CPU in seconds without any weights on disk.
"""

import os
import sys

_SUPPORT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # through symlinks
if _SUPPORT not in sys.path:
    sys.path.insert(0, _SUPPORT)

import tiny_flux  # noqa: E402  (ComfyUI imports this pack under a path-based name; import by folder)
import tiny_sdxl  # noqa: E402


class TinySDXLCheckpointLoader:
    """MODEL, CLIP, VAE like CheckpointLoaderSimple, built in memory from a seed; the UNet's dtype follows the
    server's flags (--fp16-unet, ...) as a real checkpoint's would."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": ("STRING", {"default": "tiny"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }, "optional": {
            "compute": (list(tiny_sdxl.COMPUTE_CHOICES), {"default": tiny_sdxl.COMPUTE_CHOICES[0]}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = "testing"

    def load_checkpoint(self, ckpt_name, seed=0, compute=tiny_sdxl.COMPUTE_CHOICES[0]):
        return tiny_sdxl.tiny_checkpoint_model(seed, compute), tiny_sdxl.TinyCLIP(seed), tiny_sdxl.tiny_vae(seed)


class TinyMaskOfShape:
    """A MASK of any shape (e.g. '0, 64, 64' or '1, 1, 64, 64'), filled with `value`: the shapes other packs
    might hand over, which ComfyUI's own mask nodes do not make."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "shape": ("STRING", {"default": "1, 64, 64"}),
            "value": ("FLOAT", {"default": 1.0, "min": -1e9, "max": 1e9}),
        }}

    RETURN_TYPES = ("MASK",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, shape, value):
        import torch

        dims = [int(d) for d in shape.replace(",", " ").split()]
        return (torch.full(dims, float(value)),)


class TinyFluxUNETLoader:
    """MODEL like UNETLoader on a FLUX.1 file: tests/support/tiny_flux.py's model, FLUX.1-schnell's class or
    FLUX.1-dev's."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": ("STRING", {"default": "tiny"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "variant": (["schnell", "dev"], {"default": "schnell"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, unet_name, seed=0, variant="schnell"):
        return (tiny_flux.tiny_flux_model(seed, variant),)


class TinyFluxDualCLIPLoader:
    """CLIP like DualCLIPLoader with type flux (CLIP-L + T5-XXL): a stand-in with FLUX's conditioning layout."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})},
                "optional": {"t5_width": ("INT", {"default": tiny_flux.CONTEXT_DIM, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, seed=0, t5_width=tiny_flux.CONTEXT_DIM):
        return (tiny_flux.TinyFluxCLIP(seed, t5_width),)


class TinyFluxVAELoader:
    """VAE like VAELoader on FLUX's ae.safetensors: 16 latent channels, 8x compression, small widths."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, seed=0):
        return (tiny_flux.tiny_flux_vae(seed),)


NODE_CLASS_MAPPINGS = {
    "TinySDXLCheckpointLoader": TinySDXLCheckpointLoader, "TinyMaskOfShape": TinyMaskOfShape,
    "TinyFluxUNETLoader": TinyFluxUNETLoader, "TinyFluxDualCLIPLoader": TinyFluxDualCLIPLoader,
    "TinyFluxVAELoader": TinyFluxVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: f"{name} (tests)" for name in NODE_CLASS_MAPPINGS}
