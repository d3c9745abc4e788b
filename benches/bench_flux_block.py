"""Cost of the SAE patches on one full-size FLUX.1 double-stream block (random weights), on the CPU.

A FLUX model of ComfyUI's own class with FLUX.1's widths (hidden size 3072, 24 heads, T5 width 4096, CLIP
width 768) and one double-stream block (FLUX.1 has 19 and 38 single-stream blocks: the whole 12 B model does
not fit this machine; `bench_flux_full.py` runs it where a GPU is). One call of the diffusion model on
4096 image tokens (1024x1024) and 512 text tokens, with the pack's patch (its DIFFUSION_MODEL wrapper)
hooking that block, in these configurations:
  plain   - the bare MODEL;
  probe   - a paper-size FLUX SAE (3072 -> 12288, k = 20) probing the block (encode + record);
  add     - the same SAE adding one feature (the paper's paint: no encoding);
  ablate  - the same SAE ablating one feature (encode and decode).
Interleaved `--reps` times each; medians compared as ratios in one run. The floor for probing, the encode
alone (4096 x 3072 -> 12288, top-20), is timed in the same run.

    python benches/bench_flux_block.py [--reps 3] [--size 1024]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_sdxl import import_comfyui, load_pack, paper_size_flux_variants, run_args  # noqa: E402

FLUX_WIDTHS = dict(hidden=3072, heads=24, axes=(16, 56, 56), context=4096, vec=768)
TEXT_TOKENS = 512


def flux_one_block():
    """A ModelPatcher around ComfyUI's FLUX.1-schnell model class with one full-size double-stream block."""
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import tiny_flux

    w = FLUX_WIDTHS
    config = comfy.supported_models.FluxSchnell(tiny_flux.unet_config(
        False, hidden=w["hidden"], heads=w["heads"], axes=w["axes"], depth=1, depth_single=0, context=w["context"],
        vec=w["vec"]))
    model = config.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0))
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def main():
    args = run_args(__doc__, size=1024)
    comfy_nodes = import_comfyui()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; building a FLUX model with one "
          "full-size double-stream block ...", flush=True)
    mp = flux_one_block()
    dm = mp.model.diffusion_model
    print(f"parameters: {sum(p.numel() for p in dm.parameters()) / 1e6:.0f} M "
          f"(the double block: {sum(p.numel() for p in dm.double_blocks[0].parameters()) / 1e6:.0f} M)", flush=True)
    pack_root = load_pack(comfy_nodes)
    models, sae = paper_size_flux_variants(comfy_nodes, pack_root, mp, "double.0")
    side = args.size // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, side, side, generator=g)
    context = torch.randn(1, TEXT_TOKENS, FLUX_WIDTHS["context"], generator=g)
    y = torch.randn(1, FLUX_WIDTHS["vec"], generator=g)
    t = torch.tensor([0.8])
    tokens = (side // 2) ** 2
    print(f"{tokens} image tokens + {TEXT_TOKENS} text tokens, {args.reps} interleaved repetitions", flush=True)

    def call(m):
        t0 = time.perf_counter()
        with torch.no_grad():
            dm(x, t, context, y, transformer_options={"wrappers": m.wrappers})
        return time.perf_counter() - t0

    u = torch.randn(tokens, 3072)

    def encode():
        t0 = time.perf_counter()
        with torch.no_grad():
            sae.encode_sparse(u)
        return time.perf_counter() - t0

    call(mp)  # warm-up
    times = {name: [] for name in [*models, "encode"]}
    for rep in range(args.reps):
        for name, m in models.items():
            times[name].append(call(m))
        times["encode"].append(encode())
        print(f"  rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    plain = statistics.median(times["plain"])
    print("\nconfiguration | median | ratio to plain")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"{name:13s} | {med:7.3f} s | {med / plain:.3f}")


if __name__ == "__main__":
    main()
