"""Names in a dump folder: the format's constants, the per-row columns, valid names, and the files of one
writer in a block's folder (`<block>/<writer>-<seq:06d>.safetensors`)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

FORMAT_NAME = "sae-unbox-dump"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGES_DIR = "images"
DTYPES = {"float16": torch.float16, "float32": torch.float32}

INT_COLUMNS = ("image", "batch_index", "step", "cond", "position", "seed", "grid_h", "grid_w")
FLOAT_COLUMNS = ("sigma",)
COLUMNS = INT_COLUMNS + FLOAT_COLUMNS
COLUMN_DEFAULTS = {"batch_index": 0, "step": 0, "cond": 0, "seed": -1, "sigma": float("nan")}

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
SHARD_RE = re.compile(r"^(?P<writer>[A-Za-z0-9_.-]+)-(?P<seq>\d{6,})\.safetensors$")


def column_dtype(name: str) -> torch.dtype:
    """The dtype of a per-row column: float32 for `sigma`, int64 for the others."""
    return torch.float32 if name in FLOAT_COLUMNS else torch.int64


def is_block_name(name: str) -> bool:
    """Whether `name` can be a block's folder in a dump."""
    return bool(NAME_RE.match(name)) and name not in (".", "..", IMAGES_DIR)


def shard_name(writer: str, seq: int) -> str:
    return f"{writer}-{seq:06d}.safetensors"


def shard_writer(path: Path) -> str:
    """The writer id in a shard's file name."""
    return SHARD_RE.match(path.name).group("writer")


def writer_shards(block_dir: Path, writer: str) -> dict[int, Path]:
    """The complete shards of `writer` in `block_dir`, by sequence number (none if the folder is absent)."""
    if not block_dir.is_dir():
        return {}
    found = {}
    for p in block_dir.iterdir():
        m = SHARD_RE.match(p.name)
        if m and m.group("writer") == writer:
            found[int(m.group("seq"))] = p
    return found


def next_seq(block_dir: Path, writer: str) -> int:
    """The sequence number of `writer`'s next shard in `block_dir`."""
    return max(writer_shards(block_dir, writer), default=-1) + 1


def writer_temporaries(block_dir: Path, writer: str) -> list[Path]:
    """Temporary files of `writer`'s shards in `block_dir`: left by a writer that died while writing one."""
    tmp_re = re.compile(rf"^\.?{re.escape(writer)}-\d{{6,}}\.safetensors\.(?:[0-9a-f]{{8}}-\d+-)?[0-9a-f]+\.tmp$")
    return [p for p in block_dir.iterdir() if tmp_re.match(p.name)]
