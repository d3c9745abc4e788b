"""A tiny FLUX-architecture model, text encoder stand-in and 16-channel VAE built from ComfyUI's own classes.

Import only once ComfyUI is importable (as tiny_sdxl). The model is `comfy.supported_models.FluxSchnell`
(or `Flux`, FLUX.1-dev's class, with the guidance embedding) with FLUX.1's 19 double-stream and 38
single-stream blocks, so the paper's block (double.18) exists, but a hidden size of 64 (FLUX.1: 3072).
ComfyUI detects a FLUX file only at hidden size 3072 (it fixes 24 heads), so `write_loadable_flux` writes
the smallest file its UNETLoader detects as FLUX, for the test that loads one the way users do.
"""

from __future__ import annotations

import hashlib

import torch

import comfy.ldm.flux.model
import comfy.ops
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

HIDDEN = 64  # FLUX.1: 3072
CONTEXT_DIM = 64  # T5-XXL: 4096
T5_WIDTH = 4096
VEC_DIM = 32  # CLIP-L pooled: 768
LATENT_CHANNELS = 16


def unet_config(guidance: bool, hidden: int = HIDDEN, heads: int = 2, axes=(8, 12, 12), depth: int = 19,
                depth_single: int = 38, context: int = CONTEXT_DIM, vec: int = VEC_DIM) -> dict:
    config = {
        "image_model": "flux", "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "vec_in_dim": vec,
        "context_in_dim": context, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
        "depth_single_blocks": depth_single, "axes_dim": list(axes), "theta": 10000, "patch_size": 2,
        "qkv_bias": True, "guidance_embed": guidance,
    }
    if "txt_ids_dims" in comfy.ldm.flux.model.FluxParams.__dataclass_fields__:  # v0.8.0 has it, v0.3.64 not
        config["txt_ids_dims"] = []
    return config


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Norms 1, biases 0, weights ~ N(0, 1/fan_in) (ComfyUI's ops leave parameters uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale") or "norm" in name.split(".")[-2:][0]:
                p.fill_(1.0)
            elif name.endswith("bias") or p.dim() < 2:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def tiny_flux_model(seed: int = 0, variant: str = "schnell") -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around `model_base.Flux` of FLUX.1-schnell's class (or FLUX.1-dev's, `variant="dev"`)."""
    cls = comfy.supported_models.Flux if variant == "dev" else comfy.supported_models.FluxSchnell
    config = cls(unet_config(guidance=variant == "dev"))
    model = config.get_model({})
    _fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def _text_seed(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"flux:{seed}:{text}".encode()).digest()[:8], "little")


def text_length(text: str) -> int:
    """The stand-in T5's token count: it depends on the prompt (as T5's does), so tests see other lengths than
    the paper's fixed 512."""
    return 4 + len(text.split())


def tiny_flux_conditioning(t5_text: str, clip_text: str = "", seed: int = 0, guidance: float = 3.5,
                           width: int = CONTEXT_DIM) -> list:
    """CONDITIONING as CLIPTextEncodeFlux makes it: T5 tokens `[1, n, 64]` from `t5_text`, the pooled CLIP-L
    vector `[1, 32]` from `clip_text`, and the guidance. `width` is the T5 token width (T5-XXL's is 4096)."""
    gen = torch.Generator().manual_seed(_text_seed(t5_text, seed))
    cond = torch.randn(1, text_length(t5_text), width, generator=gen)
    pooled = torch.randn(1, VEC_DIM, generator=torch.Generator().manual_seed(_text_seed("clip:" + clip_text, seed)))
    return [[cond, {"pooled_output": pooled, "guidance": guidance}]]


class TinyFluxCLIP:
    """Stand-in for FLUX's CLIP-L + T5-XXL (DualCLIPLoader type flux), for CLIPTextEncode and
    CLIPTextEncodeFlux: each prompt maps to its own pseudo-random conditioning of FLUX's layout."""

    def __init__(self, seed: int = 0, width: int = CONTEXT_DIM):
        self.seed, self.width = seed, width

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"l": text, "t5xxl": text}

    def _encode(self, tokens: dict, guidance=None):
        (cond, extra), = tiny_flux_conditioning(tokens["t5xxl"], tokens.get("l", ""), self.seed,
                                               width=self.width)
        extra.pop("guidance")
        if guidance is not None:
            extra["guidance"] = guidance
        return cond, extra

    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict=False):
        cond, extra = self._encode(tokens)
        if return_dict:
            return {"cond": cond, **extra}
        return (cond, extra["pooled_output"]) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected=False, add_dict: dict = {}, show_pbar=True):
        cond, extra = self._encode(tokens)
        return [[cond, {**extra, **add_dict}]]


# FLUX's VAE has 16 latent channels and 8x compression; this one has its layout at 32/64 channels.
VAE_CONFIG = {"params": {"embed_dim": LATENT_CHANNELS, "ddconfig": {
    "double_z": True, "z_channels": LATENT_CHANNELS, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def tiny_flux_vae(seed: int = 0) -> comfy.sd.VAE:
    """A real `comfy.sd.VAE` (AutoencoderKL, 16 latent channels, 8x compression) with small random weights."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    import tiny_sdxl

    template = AutoencoderKL(**VAE_CONFIG["params"])
    tiny_sdxl._fill(template, seed)
    vae = comfy.sd.VAE(sd=template.state_dict(), config=VAE_CONFIG)
    vae.latent_channels = LATENT_CHANNELS
    return vae


def write_loadable_flux(path, seed: int = 0, guidance: bool = False) -> None:
    """The smallest FLUX file ComfyUI's UNETLoader detects as FLUX (hidden size 3072, as it requires): one
    double-stream and one single-stream block, T5-XXL's token width (v0.3.64 fixes it at 4096, v0.8.0 reads it
    from the file), a small CLIP width, random bfloat16 weights."""
    from safetensors.torch import save_file

    config = unet_config(guidance, hidden=3072, heads=24, axes=(16, 56, 56), depth=1, depth_single=1,
                         context=T5_WIDTH)
    model = comfy.ldm.flux.model.Flux(**config, dtype=torch.bfloat16, operations=comfy.ops.manual_cast)
    _fill(model, seed)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, str(path))
