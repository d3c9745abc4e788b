"""Command line of `sae_models`.

    python -m sae_models info PATH                       describe an SAE file or folder
    python -m sae_models convert SRC DST.safetensors     convert any readable SAE to the native format
    python -m sae_models train DUMP --block B --out OUT.safetensors [options]
    python -m sae_models stats SAE DUMP [--index OUT.features.json]
    python -m sae_models eval SAE DUMP [--split eval]

`train` also runs under `torchrun --nproc-per-node N -m sae_models train ...` (data-parallel over shards).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import detect, load, save
from .errors import SAEError
from .training.config import ARCHITECTURES as TRAINABLE_ARCHITECTURES, MATMUL_PRECISIONS, STEP_PATHS


def _info(path: str, as_json: bool, block: str | None = None) -> int:
    fmt, _ = detect(path)
    sae = load(path, block=block)
    c = sae.config
    info = {
        "path": path,
        "format": fmt,
        "architecture": c.architecture,
        "d_in": c.d_in,
        "n_features": c.n_features,
        "k": c.k,
        "block": c.block,
        "block_arch": c.block_arch,
        "block_comfy": c.block_comfy,
        "block_diffusers": c.block_diffusers,
        "hook": c.hook,
        "stream": c.stream,
        "base_model": c.base_model,
        "dtype": str(sae.dtype).replace("torch.", ""),
        "statistics": sae.stats.present(),
        "hyperparameters": c.hyperparameters,
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if isinstance(value, list):
                value = ", ".join(value) or "none"
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def _convert(src: str, dst: str, block: str | None = None, to: str = "native") -> int:
    from .formats import saelens

    sae = load(src, block=block)
    (saelens.save if to == "saelens" else save)(sae, dst)
    print(f"wrote {dst} ({sae.config.architecture}, d_in={sae.d_in}, n_features={sae.n_features})")
    return 0


def _block(dump: str, block: str | None) -> str:
    from .shards import dump_block

    return dump_block(dump, block)


class _Progress:
    """A one-line progress report on stderr (loss, FVU, L0, dead fraction, tokens/s)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, m: dict) -> None:
        if "loss" not in m:
            return
        rate = m["tokens"] / max(time.perf_counter() - self.t0, 1e-9)
        of = f"/{m['total_steps']}" if m.get("total_steps") else ""
        print(f"\rstep {m['step']}{of}  tokens {m['tokens']}  loss {m['loss']:.4f}  fvu {m['fvu']:.4f}  "
              f"l0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}  {rate:,.0f} tok/s", end="", file=sys.stderr, flush=True)


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be whole numbers separated by commas, not {text!r}") from None


def _train(args) -> int:
    from .pipeline import train_on_dump
    from .training import TrainConfig

    config = TrainConfig(n_features=args.n_features, k=args.k, architecture=args.architecture, auxk=args.auxk,
                         batch_size=args.batch_size, lr=args.lr, max_tokens=args.max_tokens, seed=args.seed,
                         device=args.device, base_model=args.base_model, checkpoint_dir=args.checkpoint_dir,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                         matryoshka_widths=args.matryoshka_widths, step_path=args.step_path, matmul=args.matmul)
    # Under torchrun the pipeline makes the process group and tears it down when training ends; only rank 0
    # (callbacks included) evaluates and writes, the other ranks get None (see the os._exit at the bottom).
    done = train_on_dump(args.dump, args.out, config, block=args.block, eval_fraction=args.eval_fraction,
                         epochs=args.epochs, shuffle_shards=args.shuffle_shards, statistics=not args.no_stats,
                         top_n=args.top_n, stats_tokens=args.stats_tokens, callback=_Progress())
    if done is None:
        return 0
    print(file=sys.stderr)
    m = done.metrics
    print(f"{'held-out' if done.held_out else 'whole dump'}: fvu {m['fvu']:.4f}  l0 {m['l0']:.2f}  "
          f"dead {m['dead_fraction']:.1%}  ({m['n_tokens']} vectors)")
    print(f"wrote {args.out}" + (f" and {done.index_path}" if done.index_path else ""))
    return 0


def _stats(args) -> int:
    from .shards import iter_vectors
    from .stats import features_index_path, summarize_features, write_features_index

    sae = load(args.sae)
    block = _block(args.dump, args.block or sae.config.block)
    out = args.out or (args.sae if args.sae.endswith(".safetensors") else None)
    if out is None:
        raise ValueError(f"{args.sae} is not a native .safetensors file; give --out to write one with the statistics")
    stream = iter_vectors(args.dump, block, batch_size=4096, shuffle=False, with_meta=True)
    sae.stats, index = summarize_features(sae, stream, top_n=args.top_n, max_tokens=args.max_tokens)
    save(sae, out)
    index_path = args.index or features_index_path(out)
    write_features_index(index, index_path)
    alive = int((sae.stats.frequency > 0).sum())
    print(f"wrote {out} (statistics over {sae.stats.n_vectors} vectors, {alive}/{sae.n_features} features fire) "
          f"and {index_path}")
    return 0


def _eval(args) -> int:
    from .metrics import evaluate
    from .shards import iter_vectors

    sae = load(args.sae)
    block = _block(args.dump, args.block or sae.config.block)
    data = iter_vectors(args.dump, block, batch_size=4096, shuffle=False, split=args.split,
                        eval_fraction=args.eval_fraction)
    m = evaluate(sae, data, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(f"fvu {m['fvu']:.4f}  mse {m['mse']:.6g}  l0 {m['l0']:.2f}  dead {m['dead_fraction']:.1%}  "
              f"({m['n_tokens']} vectors of {block}, split {args.split})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="describe an SAE file or folder")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--block", help="the block the SAE reads, where its files do not name it (e.g. double.18)")
    p = sub.add_parser("convert", help="convert any readable SAE to the native .safetensors format, or to a "
                       "SAELens folder")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["native", "saelens"], default="native",
                   help="native: one .safetensors file; saelens: a SAELens inference folder (cfg.json, "
                   "sae_weights.safetensors)")
    p.add_argument("--block", help="the block the SAE reads, where its files do not name it (e.g. double.18)")

    p = sub.add_parser("train", help="train the paper's TopK SAE on a dump folder")
    p.add_argument("dump")
    p.add_argument("--block", help="block to train on (default: the dump's only block)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--n-features", type=int, default=5120)
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--architecture", choices=TRAINABLE_ARCHITECTURES, default="topk")
    p.add_argument("--matryoshka-widths", type=_widths, default=None,
                   help="matryoshka_batchtopk: nested prefix widths, e.g. 320,640,1280,2560,5120 (the default "
                   "for 5120 features: n/16 doubling up to n)")
    p.add_argument("--step-path", choices=STEP_PATHS, default="auto",
                   help="the training step's kernels: auto = gpu on a CUDA device")
    p.add_argument("--matmul", choices=MATMUL_PRECISIONS, default="fp32",
                   help="the big matrix products: fp32 (the paper's recipe), tf32 (CUDA) or bf16 (the "
                   "encoder under autocast): faster, less exact")
    p.add_argument("--auxk", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many vectors (all ranks)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval-fraction", type=float, default=0.05, help="fraction of images held out")
    p.add_argument("--shuffle-shards", type=int, default=8, help="shards shuffled together (memory bound)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--base-model", default="sdxl-turbo")
    p.add_argument("--checkpoint-dir", help="write checkpoints here and resume from them")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-stats", action="store_true", help="skip the statistics pass and features index")
    p.add_argument("--stats-tokens", type=int, default=None,
                   help="vectors read by the statistics pass and the features index (default: all)")
    p.add_argument("--top-n", type=int, default=16)

    p = sub.add_parser("stats", help="per-feature statistics and a features index of an SAE over a dump")
    p.add_argument("sae")
    p.add_argument("dump")
    p.add_argument("--block")
    p.add_argument("--out", help="SAE file to write (default: the SAE file itself)")
    p.add_argument("--index", help="features index JSON (default: <out>.features.json)")
    p.add_argument("--top-n", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="vectors read for the statistics and the features index (default: all)")

    p = sub.add_parser("eval", help="FVU, MSE, L0 and dead fraction of an SAE on a dump")
    p.add_argument("sae")
    p.add_argument("dump")
    p.add_argument("--block")
    p.add_argument("--split", choices=["eval", "train", "all"], default="eval")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info(args.path, args.json, args.block)
        if args.command == "convert":
            return _convert(args.src, args.dst, args.block, args.to)
        return {"train": _train, "stats": _stats, "eval": _eval}[args.command](args)
    except (SAEError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, leave without the interpreter's teardown: gloo's worker threads can outlive
        # destroy_process_group() and abort the process (SIGABRT, "terminate called without an active
        # exception") while Python finalizes, after the work is done and every file is written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
