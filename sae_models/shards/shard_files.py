"""One shard file: a safetensors file of field tensors `[rows, d_in]` and per-row columns, with metadata
(format, block, writer, n_rows, grid "HxW" or "mixed", dtype). Written whole under a temporary name and
renamed into place, never over another shard."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from .. import files
from ..formats.common import open_safetensors
from .errors import DumpFormatError
from .layout import FORMAT_NAME


def shard_metadata(block: str, writer: str, dtype: str, columns: dict[str, torch.Tensor]) -> dict[str, str]:
    """The metadata of a shard of `block` holding `columns` (its grid from the rows' grid_h/grid_w)."""
    gh, gw = columns["grid_h"], columns["grid_w"]
    uniform = bool((gh == gh[0]).all() and (gw == gw[0]).all())
    return {"format": FORMAT_NAME, "block": block, "writer": writer, "n_rows": str(len(gh)),
            "grid": f"{int(gh[0])}x{int(gw[0])}" if uniform else "mixed", "dtype": dtype}


def parse_grid(text: str | None) -> tuple[int, int]:
    """(H, W) of a grid written "HxW"; (-1, -1) for anything else."""
    m = re.match(r"^(\d+)x(\d+)$", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a complete shard to `path` atomically; FileExistsError if a shard is there already."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    files.atomic_write_bytes(path, data, replace=False)


def read_shard(path: Path, names: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The named tensors of a shard (those present) and its metadata."""
    with open_safetensors(path, error=DumpFormatError, missing="shard disappeared while reading the dump",
                          corrupt="corrupt shard") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        return {n: f.get_tensor(n) for n in names if n in keys}, meta
