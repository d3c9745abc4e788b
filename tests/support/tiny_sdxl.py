"""A tiny SDXL-architecture model, text encoder stand-in and VAE built from ComfyUI's own classes.

Import only once ComfyUI is importable (its checkout on sys.path, `comfy.cli_args.args.cpu` set on
machines without a GPU). Everything is random but deterministic from a seed; nothing is downloaded.
"""

from __future__ import annotations

import hashlib

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils

CONTEXT_DIM = 64  # SDXL: 2048
POOLED_DIM = 1280  # as SDXL: adm_in_channels 2816 = 1280 pooled + 6 * 256 size embeddings
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
    "adm_in_channels": 2816, "dtype": torch.float32,
    "model_channels": 32, "channel_mult": [1, 2, 4], "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "context_dim": CONTEXT_DIM, "use_linear_in_transformer": True,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
NUM_HEAD_CHANNELS = 16  # SDXL: 64
# SDXL's transformer blocks in call order; the tiny model has the same module paths.
TRANSFORMER_BLOCKS = [
    "input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1",
    *(f"output_blocks.{i}.1" for i in range(6)),
]
# VAE: ComfyUI's AutoencoderKL (SD/SDXL layout) with 4 latent channels, 8x compression, 32/64 channels.
VAE_CONFIG = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter (ComfyUI's ops leave them uninitialised): norms 1/0, biases 0, and
    weights ~ N(0, 1/fan_in) so activations keep a unit scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or p.dim() < 2:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def tiny_model(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a `model_base.SDXL` (EPS, SDXL latent format) with tiny random weights."""
    config = comfy.supported_models.SDXL(UNET_CONFIG)
    config.unet_config["num_head_channels"] = NUM_HEAD_CHANNELS  # BASE.__init__ forces 64
    model = config.get_model({})
    _fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


COMPUTE_CHOICES = ("as ComfyUI chooses", "in the weight dtype")


def tiny_checkpoint_model(seed: int = 0, compute: str = COMPUTE_CHOICES[0]) -> comfy.model_patcher.ModelPatcher:
    """The tiny model's weights loaded as ComfyUI loads a checkpoint (comfy.sd.load_state_dict_guess_config):
    the UNet dtype and the compute dtype come from ComfyUI's own unet_dtype()/unet_manual_cast(), so the
    server's --fp16-unet, --bf16-unet and --force-fp16 flags apply. On a CPU ComfyUI then computes in fp32
    (manual cast); `compute="in the weight dtype"` computes in the weight dtype, as ComfyUI does on a GPU."""
    sd = tiny_model(seed).model.diffusion_model.state_dict()
    config = comfy.supported_models.SDXL(UNET_CONFIG)
    config.unet_config["num_head_channels"] = NUM_HEAD_CHANNELS
    mm = comfy.model_management
    load_device = mm.get_torch_device()
    params = comfy.utils.calculate_parameters(sd)
    unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(config.supported_inference_dtypes),
                               weight_dtype=comfy.utils.weight_dtype(sd))
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, config.supported_inference_dtypes)
    if compute == COMPUTE_CHOICES[1]:
        manual_cast = None
    config.set_inference_dtype(unet_dtype, manual_cast)
    model = config.get_model(sd, "", device=mm.unet_inital_load_device(params, unet_dtype))
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def _channels(patcher) -> dict[str, int]:
    unet = patcher.model.diffusion_model
    return {p: unet.get_submodule(p).proj_in.in_features for p in TRANSFORMER_BLOCKS}


# {block path: channels}: 64 for input_blocks.4.1/5.1 and output_blocks.3.1-5.1, 128 elsewhere
# (SDXL: 640 and 1280). Computed from a model so a config change cannot make it lie.
TINY_CHANNELS = _channels(tiny_model())


def _text_seed(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "little")


def tiny_conditioning(text: str, seed: int = 0) -> list:
    """CONDITIONING `[[cross_attn [1,77,64], {"pooled_output": [1,1280]}]]`, deterministic from text and seed."""
    gen = torch.Generator().manual_seed(_text_seed(text, seed))
    cond = torch.randn(1, 77, CONTEXT_DIM, generator=gen)
    pooled = torch.randn(1, POOLED_DIM, generator=gen)
    return [[cond, {"pooled_output": pooled}]]


class TinyCLIP:
    """Stand-in text encoder for CLIPTextEncode (SDXL's CLIP weights are not available in tests).

    It does not understand text: each prompt maps to its own pseudo-random conditioning of SDXL's
    shape (with a 64-wide context), so different prompts give different conditioning.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"tiny": text}

    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict=False):
        (cond, extra), = tiny_conditioning(tokens["tiny"], self.seed)
        if return_dict:
            return {"cond": cond, **extra}
        return (cond, extra["pooled_output"]) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected=False, add_dict: dict = {}, show_pbar=True):
        (cond, extra), = tiny_conditioning(tokens["tiny"], self.seed)
        return [[cond, {**extra, **add_dict}]]


def tiny_vae(seed: int = 0) -> comfy.sd.VAE:
    """A real `comfy.sd.VAE` (AutoencoderKL, 4 latent channels, 8x compression) with small random weights."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    template = AutoencoderKL(**VAE_CONFIG["params"])
    _fill(template, seed)
    return comfy.sd.VAE(sd=template.state_dict(), config=VAE_CONFIG)
