"""The pack's cost on a GPU, through ComfyUI's own sampler (`comfy.sample.sample`), full-size models with random
weights (the same cost as the real ones):

  SDXL fp16, 512x512, 1 step, batch 1 and batch 8: plain, probe x4, add x4, ablate x4, dump x4 (the paper's
      four blocks, paper-size SAEs 1280 -> 5120, k 10);
  SDXL fp16, 1024x1024, 4 steps, cfg 8: plain, probe x4 (cond and uncond rows), add x4 ('cond +, uncond -');
  FLUX.1 bf16 (12 B), 1024x1024, 1 step: plain, probe, add, ablate on double.18 (3072 -> 12288, k 20).

Each group's configurations are timed interleaved, `--reps` times, and printed as ratios of medians, with the
host syncs per sample that torch.profiler sees beside them (cudaStreamSynchronize, aten::_local_scalar_dense,
host-to-device and device-to-host copies), plain and patched in the same run.

Needs a CUDA GPU with about 40 GB free (FLUX.1 in bf16 is 24 GB); without one it says so and exits 0.
`--smoke` runs the same procedure on the CPU with ComfyUI's tiny test models, to check the script (its
figures mean nothing).

    python benches/bench_gpu.py [--reps 10] [--groups sdxl1,sdxl8,base,flux]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_sdxl import ROOT, SDXL_UNET, import_comfyui, load_pack  # noqa: E402

AUTO = "auto (the SAE's block)"
SYNC_EVENTS = {"cudaStreamSynchronize": "stream syncs", "aten::_local_scalar_dense": "item",
               "Memcpy HtoD (Pageable -> Device)": "HtoD", "Memcpy DtoH (Device -> Pageable)": "DtoH",
               "Memcpy HtoD (Pinned -> Device)": "HtoD", "Memcpy DtoH (Device -> Pinned)": "DtoH"}
GROUPS = ("sdxl1", "sdxl8", "base", "flux")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    return ap.parse_args()


class Bench:
    def __init__(self, args, comfy_nodes, device, torch):
        self.args, self.torch, self.device = args, torch, device
        self.pack = load_pack(comfy_nodes)
        self.sm = sys.modules[self.pack + ".sae_models"]
        self.SAEHandle = sys.modules[self.pack + ".nodes.sae_handle"].SAEHandle
        self.N = comfy_nodes.NODE_CLASS_MAPPINGS
        import folder_paths

        folder_paths.output_directory = tempfile.mkdtemp(prefix="bench_gpu_")  # the dump's rows go nowhere

    # -- models --------------------------------------------------------------------------------------------
    def sdxl(self):
        """The SDXL UNet in float16 (or the tiny test model) and the width of the paper's blocks."""
        import comfy.supported_models

        if self.args.smoke:
            import tiny_sdxl

            return tiny_sdxl.tiny_model(seed=0), 128
        return self.full_size(comfy.supported_models.SDXL(dict(SDXL_UNET)), self.torch.float16), 1280

    def flux(self):
        """FLUX.1 (12 B) in bfloat16 (or the tiny test model) and its hidden width."""
        import comfy.supported_models
        import tiny_flux

        if self.args.smoke:
            return tiny_flux.tiny_flux_model(seed=0), 64
        config = comfy.supported_models.FluxSchnell(tiny_flux.unet_config(
            False, hidden=3072, heads=24, axes=(16, 56, 56), depth=19, depth_single=38, context=4096, vec=768))
        return self.full_size(config, self.torch.bfloat16), 3072

    def full_size(self, config, dtype):
        """A ModelPatcher on the GPU around `config`'s model, in `dtype`, with random weights."""
        import comfy.model_management
        import comfy.model_patcher

        config.set_inference_dtype(dtype, None)
        model = config.get_model({}, device=self.device)
        _random_weights(model.diffusion_model, self.torch)
        return comfy.model_patcher.ModelPatcher(model, load_device=self.device,
                                                offload_device=comfy.model_management.unet_offload_device())

    def sae(self, block: str, d: int, n: int, k: int, seed: int):
        torch = self.torch
        torch.manual_seed(seed)
        sae = self.sm.build(self.sm.SAEConfig(architecture="topk", d_in=d, n_features=n, k=k, block=block))
        with torch.no_grad():
            sae.W_enc.normal_(0, d ** -0.5)
            sae.W_dec.copy_(sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True))
        sae.stats = self.sm.FeatureStats(mean=torch.rand(n) + 0.5)
        return self.SAEHandle(sae, block)

    # -- the patched MODELs --------------------------------------------------------------------------------
    def variants(self, mp, handles, kinds, rows="cond"):
        steer, out = self.N["UnboxSteerFeatures"], {"plain": mp}
        for kind in kinds:
            m = mp
            if kind == "dump":
                blocks = " ".join(h.sae.config.block for h in handles)
                m = self.N["UnboxDumpActivations"].execute(m, "bench", blocks, "all", rows, "update", "float16",
                                                           1 << 16, "").args[0]
            for h in handles if kind != "dump" else ():
                if kind == "probe":
                    m = self.N["UnboxProbeBlock"].execute(m, h, AUTO, "all", rows).args[0]
                else:
                    mode, strength = ("add", 2.0) if kind.startswith("add") else ("ablate", 1.0)
                    target = "cond +, uncond -" if kind == "add cond+/uncond-" else rows
                    m = steer.execute(m, h, "7", strength, mode, AUTO, "mean activation", 0.0, 1.0, target).args[0]
            out[f"{kind} x{len(handles)}" if kind != "dump" else f"dump x{len(handles)}"] = m
        return out

    # -- timing ----------------------------------------------------------------------------------------------
    def sampler(self, mp, latent, cond, steps, cfg, scheduler):
        torch = self.torch
        import comfy.sample

        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))

        def run(m):
            return comfy.sample.sample(m, noise, steps, cfg, "euler", scheduler, cond, cond, latent, denoise=1.0,
                                       disable_pbar=True, seed=1)
        return run

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def group(self, title, models, run):
        torch = self.torch
        for m in models.values():  # warm up: load, caches, cudnn choices
            run(m)
        times = {name: [] for name in models}
        for _ in range(self.args.reps):
            for name, m in models.items():
                self.sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    run(m)
                self.sync()
                times[name].append(time.perf_counter() - t0)
        counts = {name: self.profile(run, m) for name, m in models.items()}
        plain = statistics.median(times["plain"])
        print(f"\n{title}")
        print("configuration | median | ratio to plain | per sample: " + ", ".join(dict.fromkeys(SYNC_EVENTS.values())))
        for name, v in times.items():
            c = counts[name]
            print(f"{name:22s} | {statistics.median(v) * 1000:9.2f} ms | {statistics.median(v) / plain:6.3f} | "
                  + ", ".join(f"{c.get(k, 0)}" for k in dict.fromkeys(SYNC_EVENTS.values())), flush=True)

    def profile(self, run, m) -> dict:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            with self.torch.no_grad():
                run(m)
            self.sync()
        counts: dict[str, int] = {}
        for e in prof.key_averages():
            if e.key in SYNC_EVENTS:
                counts[SYNC_EVENTS[e.key]] = counts.get(SYNC_EVENTS[e.key], 0) + e.count
        return counts

    # -- the groups ------------------------------------------------------------------------------------------
    def sdxl_groups(self, groups):
        torch = self.torch
        mp, d = self.sdxl()
        n, k = (5120, 10) if not self.args.smoke else (256, 8)
        handles = [self.sae(b, d, n, k, i) for i, b in enumerate(self.sm.PAPER_BLOCKS)]
        side = 64 if not self.args.smoke else 16
        for batch, name in ((1, "sdxl1"), (8, "sdxl8")):
            if name not in groups:
                continue
            latent = torch.zeros(batch, 4, side, side)
            cond = [[torch.randn(1, 77, 2048 if not self.args.smoke else 64),
                     {"pooled_output": torch.randn(1, 1280), "width": side * 8, "height": side * 8}]]
            models = self.variants(mp, handles, ("probe", "add", "ablate", "dump"))
            self.group(f"SDXL, {side * 8}x{side * 8}, 1 step, batch {batch}", models,
                       self.sampler(mp, latent, cond, 1, 1.0, "normal"))
        if "base" in groups:
            side2 = 128 if not self.args.smoke else 16
            latent = torch.zeros(1, 4, side2, side2)
            cond = [[torch.randn(1, 77, 2048 if not self.args.smoke else 64),
                     {"pooled_output": torch.randn(1, 1280), "width": side2 * 8, "height": side2 * 8}]]
            models = self.variants(mp, handles, ("probe",), rows="both")
            models.update({k: v for k, v in self.variants(mp, handles, ("add cond+/uncond-",)).items() if k != "plain"})
            self.group(f"SDXL, {side2 * 8}x{side2 * 8}, 4 steps, cfg 8", models,
                       self.sampler(mp, latent, cond, 4, 8.0, "normal"))

    def flux_group(self):
        torch = self.torch
        mp, d = self.flux()
        n, k = (12288, 20) if not self.args.smoke else (128, 8)
        handles = [self.sae("double.18", d, n, k, 0)]
        models = self.variants(mp, handles, ("probe", "add", "ablate"))
        side = 128 if not self.args.smoke else 16
        latent = torch.zeros(1, 16, side, side)
        txt, vec = (4096, 768) if not self.args.smoke else (tiny_context(), 32)
        cond = [[torch.randn(1, 512 if not self.args.smoke else 8, txt), {"pooled_output": torch.randn(1, vec)}]]
        self.group(f"FLUX.1, {side * 8}x{side * 8}, 1 step, double.18", models,
                   self.sampler(mp, latent, cond, 1, 1.0, "simple"))


def tiny_context() -> int:
    import tiny_flux

    return tiny_flux.CONTEXT_DIM


def _random_weights(module, torch) -> None:
    """N(0, 1/fan_in) weights, unit norms, zero biases: stays finite in float16 (N(0, 0.02) need not)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def main() -> int:
    args = parse_args()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA GPU here; this bench measures the pack on a GPU and does not run on the CPU "
              "(--smoke checks the script with tiny models). On the CPU: bench_patch_overhead.py, "
              "bench_flux_block.py, bench_dump.py.")
        return 0
    comfy_nodes = import_comfyui(cpu=args.smoke)
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    device = torch.device("cuda") if not args.smoke else torch.device("cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test)"
    import comfy.model_management

    print(f"{name}; torch {torch.__version__}; ComfyUI at {comfy.model_management.__file__.rsplit('/comfy/', 1)[0]}")
    bench = Bench(args, comfy_nodes, device, torch)
    groups = set(args.groups.split(","))
    if groups & {"sdxl1", "sdxl8", "base"}:
        bench.sdxl_groups(groups)
    if "flux" in groups:
        bench.flux_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
