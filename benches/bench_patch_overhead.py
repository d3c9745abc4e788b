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

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_sdxl import run_args, conditioning, full_sdxl, import_comfyui, load_pack  # noqa: E402


def main():
    args = run_args(__doc__)

    comfy_nodes = import_comfyui()
    import torch

    import comfy.sample

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; building a full-size SDXL UNet ...",
          flush=True)
    mp = full_sdxl()
    n_params = sum(p.numel() for p in mp.model.diffusion_model.parameters())
    print(f"UNet parameters: {n_params / 1e9:.2f} B", flush=True)
    pack_root = load_pack(comfy_nodes)
    sm = sys.modules[pack_root + ".sae_models"]
    SAEHandle = sys.modules[pack_root + ".nodes.sae_handle"].SAEHandle
    N = comfy_nodes.NODE_CLASS_MAPPINGS
    torch.manual_seed(0)

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
    cond = conditioning(args.size)

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
