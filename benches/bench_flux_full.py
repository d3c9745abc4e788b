"""Cost of the SAE patches on the whole FLUX.1 transformer (12 B parameters, random weights, bfloat16): the
same configurations as bench_flux_block.py (plain, probe, add, ablate with a paper-size FLUX SAE on the
paper's block, double.18) on 4096 image tokens (1024x1024) and 512 text tokens, one call each, interleaved
`--reps` times, ratios of the medians.

The model needs about 24 GB of accelerator memory: the script runs on a CUDA GPU and, where there is none,
says so and stops (it does not fit a 2-core, 24 GB CPU machine).

    python benches/bench_flux_full.py [--reps 5]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_sdxl import ROOT, paper_size_flux_variants, run_args  # noqa: E402


def main() -> int:
    args = run_args(__doc__, size=1024)
    import torch

    if not torch.cuda.is_available():
        print("bench_flux_full: no CUDA GPU here. The whole FLUX.1 transformer (12 B parameters, ~24 GB in "
              "bfloat16) does not fit this machine; run this script where a GPU is. On the CPU, "
              "bench_flux_block.py measures one full-size double-stream block.")
        return 0
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from comfyui_locate import find_comfyui

    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(f"ComfyUI not found: {reason}")
    sys.path.insert(0, str(comfy_path))
    import nodes as comfy_nodes

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import tiny_flux
    from full_sdxl import load_pack

    config = comfy.supported_models.FluxSchnell(tiny_flux.unet_config(
        False, hidden=3072, heads=24, axes=(16, 56, 56), depth=19, depth_single=38, context=4096, vec=768))
    config.set_inference_dtype(torch.bfloat16, None)
    device = comfy.model_management.get_torch_device()
    model = config.get_model({}, device=device)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.normal_(0, 0.02)
    mp = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                          offload_device=comfy.model_management.unet_offload_device())
    comfy.model_management.load_models_gpu([mp])
    dm = mp.model.diffusion_model
    print(f"{torch.cuda.get_device_name()}: FLUX.1 transformer, "
          f"{sum(p.numel() for p in dm.parameters()) / 1e9:.1f} B parameters, bfloat16", flush=True)

    pack_root = load_pack(comfy_nodes)
    models, sae = paper_size_flux_variants(comfy_nodes, pack_root, mp, "double.18", device=device)
    side = args.size // 8
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, 16, side, side, generator=g, device=device, dtype=torch.bfloat16)
    context = torch.randn(1, 512, 4096, generator=g, device=device, dtype=torch.bfloat16)
    y = torch.randn(1, 768, generator=g, device=device, dtype=torch.bfloat16)
    t = torch.tensor([0.8], device=device)

    def call(m):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            dm(x, t, context, y, transformer_options={"wrappers": m.wrappers})
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    call(mp)
    times = {name: [] for name in models}
    for _ in range(args.reps):
        for name, m in models.items():
            times[name].append(call(m))
    plain = statistics.median(times["plain"])
    print("configuration | median | ratio to plain")
    for name, v in times.items():
        print(f"{name:13s} | {statistics.median(v) * 1000:8.1f} ms | {statistics.median(v) / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
