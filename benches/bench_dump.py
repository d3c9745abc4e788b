"""Cost and size of training-data dumps on a full-size SDXL UNet (random weights: the same cost as SDXL Turbo).

Time: one sampling step at 512x512 through ComfyUI's sampler, plain, against the same with SAE Dump
Activations on the paper's four blocks (fp16 updates, 4 x 256 rows per image) plus SAE Dump Images
writing the rows and a PNG. The shard size is set to 256 rows, so every image commits a full shard per
block, and the timed run waits for the session's writer thread: all writing is inside the timed run (the
default, 16384 rows, writes the same bytes in fewer files; in a queue of prompts the writer thread overlaps
the next prompt's sampling).
Runs are interleaved, `--reps` times each, and the medians compared as a ratio in one run.

Size: bytes per stored update vector in the pack's shards (fp16 and fp32) against the paper's format, fp32
torch pickles in webdataset tars (one tar per block; per sample `diff.pth` and `output.pth`, as the
paper's `scripts/collect_latents_dataset.py` writes them), made here with `tarfile` from the same vectors.

    python benches/bench_dump.py [--reps 3] [--size 512]
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_sdxl import run_args, conditioning, full_sdxl, import_comfyui, load_pack  # noqa: E402


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def paper_tar_bytes(rows: dict[str, list], folder: Path) -> tuple[int, int]:
    """Bytes of the paper-style tars holding `diff` only, and `diff` + `output`, for the given vectors."""
    import torch

    def pth(t) -> bytes:
        buf = io.BytesIO()
        torch.save(t, buf)
        return buf.getvalue()

    sizes = []
    for with_output in (False, True):
        total = 0
        for block, samples in rows.items():
            path = folder / f"{block}{'_out' if with_output else ''}.tar"
            with tarfile.open(path, "w") as tar:
                for i, (diff, out) in enumerate(samples):
                    members = {"diff.pth": pth(diff.float()), "gen_args.json": json.dumps({"prompt": "x"}).encode()}
                    if with_output:
                        members["output.pth"] = pth(out.float())
                    for name, data in members.items():
                        info = tarfile.TarInfo(f"sample_{i}.{name}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            total += path.stat().st_size
        sizes.append(total)
    return sizes[0], sizes[1]


def main():
    args = run_args(__doc__)

    comfy_nodes = import_comfyui()
    import torch

    import comfy.sample

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; building a full-size SDXL UNet ...", flush=True)
    mp = full_sdxl()
    pack = load_pack(comfy_nodes)
    N = comfy_nodes.NODE_CLASS_MAPPINGS
    lat = args.size // 8
    latent = torch.zeros(1, 4, lat, lat)
    cond = conditioning(args.size)
    image = torch.rand(1, args.size, args.size, 3)

    def sample(m):
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
        return comfy.sample.sample(m, noise, 1, 1.0, "euler", "normal", cond, cond, latent, denoise=1.0,
                                   disable_pbar=True, seed=1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import folder_paths

        folder_paths.output_directory = str(tmp)  # a dump folder is named relative to ComfyUI's output folder
        dump_model, dump = N["UnboxDumpActivations"].execute(
            mp, "dump16", "paper", "all", "cond", "update", "float16", 256, "bench").args

        def plain():
            t0 = time.perf_counter()
            sample(mp)
            return time.perf_counter() - t0

        def dumped():
            t0 = time.perf_counter()
            sample(dump_model)
            N["UnboxDumpImages"].execute(image, dump, prompt="bench", seed=1, commit="only when a shard is full")
            dump.wait()  # the writer thread's PNG and full shards inside the timed run too
            return time.perf_counter() - t0

        print("warm-up ...", flush=True)
        plain()
        times = {"plain": [], "dump": []}
        for rep in range(args.reps):
            times["plain"].append(plain())
            times["dump"].append(dumped())
            print(f"rep {rep + 1}: plain {times['plain'][-1]:.2f}s, dump {times['dump'][-1]:.2f}s", flush=True)
        p, d = statistics.median(times["plain"]), statistics.median(times["dump"])
        print(f"\n1 step at {args.size}x{args.size}, median of {args.reps} interleaved runs each")
        print(f"plain sampling                          {p:8.2f} s   1.000")
        print(f"with the dump of 4 blocks (fp16 shards) {d:8.2f} s   {d / p:.3f}")

        # Size: the same vectors in fp32 shards and in the paper's tar layout.
        sm = sys.modules[pack + ".sae_models"]
        rows16 = {b: sm.shards.iter_vectors(tmp / "dump16", b, batch_size=256, shuffle=False, dtype=torch.float16)
                  for b in sm.PAPER_BLOCKS}
        n_vectors = sum(s.n_rows for s in rows16.values())
        samples = {b: [(x, x) for x in s] for b, s in rows16.items()}  # output stands in with the same size
        with sm.shards.ShardWriter(tmp / "dump32", writer_id="bench", rows_per_shard=16384,
                                   dtype=torch.float32) as w32, \
                sm.shards.ShardWriter(tmp / "dump16big", writer_id="bench", rows_per_shard=16384,
                                      dtype=torch.float16) as w16:
            n = len(next(iter(samples.values())))
            for i in range(n):
                rows = {b: {"update": samples[b][i][0], **_columns(samples[b][i][0].shape[0])} for b in samples}
                w32.add_image({"prompt": "bench"}, rows)
                w16.add_image({"prompt": "bench"}, rows)
        diff_only, diff_and_out = paper_tar_bytes(samples, tmp)
        print(f"\nbytes per stored update vector ({n_vectors} vectors of 1280 values)")
        for name, size in [
            ("pack shards, fp16 (256-row shards)", folder_bytes(tmp / "dump16", "*.safetensors")),
            ("pack shards, fp16 (16384-row shards)", folder_bytes(tmp / "dump16big", "*.safetensors")),
            ("pack shards, fp32 (16384-row shards)", folder_bytes(tmp / "dump32", "*.safetensors")),
            ("paper tars, fp32 diff.pth only", diff_only),
            ("paper tars, fp32 diff.pth + output.pth", diff_and_out),
        ]:
            print(f"{name:<42} {size / n_vectors:10.1f}   {size / diff_only:.3f} of the paper's diff-only")


def _columns(n: int) -> dict:
    import torch

    return {"batch_index": torch.zeros(n, dtype=torch.int64), "step": torch.zeros(n, dtype=torch.int64),
            "sigma": torch.zeros(n), "cond": torch.zeros(n, dtype=torch.int64),
            "position": torch.arange(n, dtype=torch.int64), "seed": torch.ones(n, dtype=torch.int64)}


if __name__ == "__main__":
    main()
