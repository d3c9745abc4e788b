"""Cost of the SAE patches on a full-size SDXL UNet (random weights: the same cost as SDXL Turbo).

One sampling step at 512x512 (a 64x64 latent, 16x16 = 256 vectors per paper block) through ComfyUI's own
sampler, with:
  plain   - the bare MODEL;
  probe   - the four paper-size SAEs (1280 -> 5120, k = 10) probing down.2.1, mid.0, up.0.0 and up.0.1;
  add     - the same four SAEs each adding one feature (the paper's paint: no encoding needed);
  ablate  - the same four SAEs each ablating one feature (needs an encode per block).
The configurations are interleaved, `--reps` times each, and the medians compared as ratios in one run.
The floor for probing is the time of the four encodes alone (256 x 1280 -> 5120, top-10), measured in the
same run.

    python benches/bench_patch_overhead.py [--reps 3] [--size 512]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT))

from comfyui_locate import find_comfyui  # noqa: E402

SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
    use_temporal_resblock=False,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()

    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        sys.exit(f"ComfyUI not found: {reason}")
    sys.path.insert(0, str(comfy_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch

    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    import nodes as comfy_nodes

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; building a full-size SDXL UNet ...",
          flush=True)
    model = comfy.supported_models.SDXL(dict(SDXL_UNET)).get_model({})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())
    mp = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    print(f"UNet parameters: {n_params / 1e9:.2f} B", flush=True)

    asyncio.run(comfy_nodes.load_custom_node(str(ROOT)))
    pack = next(m for name, m in sys.modules.items() if name.endswith(".nodes.patch") and hasattr(m, "attach_edit"))
    pack_root = pack.__name__.rsplit(".nodes.patch", 1)[0]
    sm = sys.modules[pack_root + ".sae_models"]
    SAEHandle = sys.modules[pack_root + ".nodes.sae_handle"].SAEHandle
    N = comfy_nodes.NODE_CLASS_MAPPINGS

    handles = []
    for block in sm.PAPER_BLOCKS:
        sae = sm.build(sm.SAEConfig(architecture="topk", d_in=1280, n_features=5120, k=10, block=block))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.03)
            sae.W_dec.copy_(sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True))
        sae.stats = sm.FeatureStats(mean=torch.rand(5120) + 0.5)
        handles.append(SAEHandle(sae, block))

    auto = "auto (the SAE's block)"
    probe_model, add_model, ablate_model = mp, mp, mp
    for h in handles:
        probe_model = N["UnboxProbeBlock"].execute(probe_model, h, auto, "all", "cond").args[0]
        steer = N["UnboxSteerFeatures"]
        add_model = steer.execute(add_model, h, "7", 2.0, "add", auto, "mean activation", 0.0, 1.0, "cond").args[0]
        ablate_model = steer.execute(ablate_model, h, "7", 1.0, "ablate", auto, "mean activation", 0.0, 1.0,
                                     "cond").args[0]

    lat = args.size // 8
    latent = torch.zeros(1, 4, lat, lat)
    cond = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280), "width": args.size,
                                        "height": args.size}]]

    def sample(m):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        comfy.sample.sample(m, noise, 1, 1.0, "euler", "normal", cond, cond, latent, denoise=1.0,
                            disable_pbar=True, seed=1)
        return time.perf_counter() - t0

    grid = (lat // 4) ** 2
    x = torch.randn(grid, 1280)

    def four_encodes():
        t0 = time.perf_counter()
        with torch.no_grad():
            for h in handles:
                h.sae.encode_sparse(x)
        return time.perf_counter() - t0

    configs = {"plain": mp, "probe": probe_model, "add": add_model, "ablate": ablate_model}
    print("warm-up ...", flush=True)
    sample(mp)
    times = {k: [] for k in configs}
    enc = []
    for rep in range(args.reps):
        for name, m in configs.items():
            times[name].append(sample(m))
            enc.append(statistics.median(four_encodes() for _ in range(5)))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    plain = statistics.median(times["plain"])
    floor = statistics.median(enc)
    print(f"\n1 step at {args.size}x{args.size}, {grid} vectors per paper block, median of {args.reps} "
          f"interleaved runs each")
    print(f"plain sampling                      {plain:8.2f} s   1.000")
    for name in ("probe", "add", "ablate"):
        t = statistics.median(times[name])
        print(f"{name:<8} (4 SAEs)                   {t:8.2f} s   {t / plain:.3f}")
    print(f"four encodes alone (probe floor)    {floor:8.3f} s   {floor / plain:.3f} of plain")
    probe_over = statistics.median(times["probe"]) / plain - 1
    print(f"probe overhead / floor              {probe_over / (floor / plain):8.2f}")


if __name__ == "__main__":
    main()
