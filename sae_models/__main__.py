"""Command line: `python -m sae_models info PATH` and `python -m sae_models convert SRC DST.safetensors`."""

from __future__ import annotations

import argparse
import json
import sys

from . import detect, load, save
from .errors import SAEError


def _info(path: str, as_json: bool) -> int:
    fmt, _ = detect(path)
    sae = load(path)
    c = sae.config
    info = {
        "path": path,
        "format": fmt,
        "architecture": c.architecture,
        "d_in": c.d_in,
        "n_features": c.n_features,
        "k": c.k,
        "block": c.block,
        "block_comfy": c.block_comfy,
        "block_diffusers": c.block_diffusers,
        "hook": c.hook,
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


def _convert(src: str, dst: str) -> int:
    sae = load(src)
    save(sae, dst)
    print(f"wrote {dst} ({sae.config.architecture}, d_in={sae.d_in}, n_features={sae.n_features})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="describe an SAE file or folder")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("convert", help="convert any readable SAE to the native .safetensors format")
    p.add_argument("src")
    p.add_argument("dst")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info(args.path, args.json)
        return _convert(args.src, args.dst)
    except (SAEError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
