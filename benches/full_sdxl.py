"""Shared by the benches: ComfyUI imported from its checkout, the pack loaded by ComfyUI's own loader,
and a full-size SDXL UNet with random weights (the same cost as SDXL Turbo; its weights are not needed)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from comfyui_locate import find_comfyui  # noqa: E402

SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
    use_temporal_resblock=False,
)


def run_args(description: str, size: int = 512) -> argparse.Namespace:
    """The benches' command line: --reps (interleaved repetitions) and --size (image side in pixels)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=size)
    return ap.parse_args()


def import_comfyui(cpu: bool = True):
    """Put ComfyUI's checkout on sys.path (in CPU mode unless `cpu` is False) and return ComfyUI's `nodes`
    module."""
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(f"ComfyUI not found: {reason}")
    sys.path.insert(0, str(comfy_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import nodes as comfy_nodes

    return comfy_nodes


def load_pack(comfy_nodes) -> str:
    """Load the pack with ComfyUI's custom-node loader; returns the pack's module name."""
    asyncio.run(comfy_nodes.load_custom_node(str(ROOT)))
    pack = next(m for name, m in sys.modules.items() if name.endswith(".nodes.patching") and hasattr(m, "attach_edit"))
    return pack.__name__.rsplit(".nodes.patching", 1)[0]


def full_sdxl(seed: int = 0):
    """A ModelPatcher around a full-size SDXL model (2.57 B UNet parameters) with random weights."""
    import torch

    import comfy.model_patcher
    import comfy.supported_models

    torch.manual_seed(seed)
    model = comfy.supported_models.SDXL(dict(SDXL_UNET)).get_model({})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def conditioning(size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g),
                                                     "width": size, "height": size}]]


def paper_size_flux_variants(comfy_nodes, pack_root: str, mp, block: str, device=None) -> tuple[dict, object]:
    """The MODEL variants the FLUX benches time (plain, probed, and steered with add and ablate) on `block`
    with a paper-size FLUX SAE (3072 -> 12288, k 20) of random unit-norm directions; and that SAE."""
    import torch

    sm = sys.modules[pack_root + ".sae_models"]
    SAEHandle = sys.modules[pack_root + ".nodes.sae_handle"].SAEHandle
    N = comfy_nodes.NODE_CLASS_MAPPINGS
    torch.manual_seed(0)
    sae = sm.build(sm.SAEConfig(architecture="topk", d_in=3072, n_features=12288, k=20, block=block))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.02)
        sae.W_dec.copy_(sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True))
    sae.stats = sm.FeatureStats(mean=torch.rand(12288) + 0.5)
    if device is not None:
        sae = sae.to(device)
    h = SAEHandle(sae, "paper-size FLUX SAE")
    auto = "auto (the SAE's block)"
    steer = N["UnboxSteerFeatures"]
    return {
        "plain": mp,
        "probe": N["UnboxProbeBlock"].execute(mp, h, auto, "all", "cond").args[0],
        "add": steer.execute(mp, h, "7", 2.0, "add", auto, "mean activation", 0.0, 1.0, "cond").args[0],
        "ablate": steer.execute(mp, h, "7", 1.0, "ablate", auto, "mean activation", 0.0, 1.0, "cond").args[0],
    }, sae
