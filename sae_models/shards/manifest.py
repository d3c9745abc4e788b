"""A dump's `manifest.json`: reading it, the one check that a writer agrees with it, creating it and adding
blocks (read, merged and written under a lock), and finding a block of the dump."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import files
from ..blocks import find_block
from .errors import DumpFormatError, DumpWriteError
from .layout import DTYPES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, is_block_name


def read_manifest(folder) -> dict:
    """The manifest of a dump folder; DumpFormatError if the folder is not a dump."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        why = "folder does not exist" if not folder.exists() else f"no {MANIFEST}"
        raise DumpFormatError(folder, f"not an activation dump folder ({why})") from None
    except OSError as e:
        raise DumpFormatError(folder, f"cannot read {MANIFEST} ({e.strerror or e})") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise DumpFormatError(folder, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise DumpFormatError(folder, f"{MANIFEST} is not an activation dump manifest (format != {FORMAT_NAME!r})")
    if m.get("version") != FORMAT_VERSION:
        raise DumpFormatError(folder, f"unsupported dump version {m.get('version')!r} "
                                      f"(this code reads {FORMAT_VERSION})")
    if m.get("dtype") not in DTYPES:
        raise DumpFormatError(folder, f"unsupported dump dtype {m.get('dtype')!r}")
    m.setdefault("blocks", {})
    return m


def check_compatible(folder, dtype: str, rows_per_shard: int,
                     blocks: Mapping[str, tuple[int, Sequence[str]]] | None = None, *,
                     who: str = "this writer") -> dict:
    """The manifest of the dump in `folder`, checked against a writer of `dtype` ("float16" or "float32"),
    `rows_per_shard` rows a shard and `blocks` {name: (d_in, fields)} (a block the dump does not hold yet
    agrees). DumpFormatError names the first disagreement, `who` being the writer in its message."""
    m = read_manifest(folder)
    if m["dtype"] != dtype:
        raise DumpFormatError(folder, f"the folder holds a {m['dtype']} dump; {who} writes {dtype} "
                                      "(a dump has one dtype)")
    if m.get("rows_per_shard") != rows_per_shard:
        raise DumpFormatError(folder, f"the folder holds shards of {m.get('rows_per_shard')} rows; {who} is set "
                                      f"to {rows_per_shard} (a dump has one rows_per_shard)")
    for block, (d_in, fields) in (blocks or {}).items():
        entry = m["blocks"].get(block)
        if entry is None:
            continue
        if int(entry.get("d_in", -1)) != d_in:
            raise DumpFormatError(folder, f"the folder holds {block} vectors of size d_in={entry.get('d_in')}; "
                                          f"{who} writes size {d_in}")
        if sorted(entry.get("fields", [])) != sorted(fields):
            raise DumpFormatError(folder, f"the folder holds the fields {entry.get('fields')} of {block}; "
                                          f"{who} writes {list(fields)}")
    return m


def create_manifest(folder: Path, dtype: str, rows_per_shard: int) -> None:
    """Write the manifest of a new, empty dump unless `folder` has one."""
    try:
        with _lock(folder):
            if not (folder / MANIFEST).exists():
                _write(folder, {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": dtype,
                                "rows_per_shard": rows_per_shard, "blocks": {}})
    except OSError as e:
        raise DumpWriteError(folder, f"cannot write {MANIFEST} ({e.strerror or e})", e.errno) from None


def add_block(folder: Path, block: str, d_in: int, fields: list[str]) -> None:
    """Add `block` to the manifest unless it is there: re-read, merged and written under the lock, so that
    writers adding blocks at once keep each other's."""
    try:
        with _lock(folder):
            m = read_manifest(folder)
            if block not in m["blocks"]:
                m["blocks"][block] = {"d_in": d_in, "fields": fields}
                _write(folder, m)
    except OSError as e:
        raise DumpWriteError(folder, f"cannot update {MANIFEST} ({e.strerror or e})", e.errno) from None


def _write(folder: Path, manifest: dict) -> None:
    files.atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


@contextlib.contextmanager
def _lock(folder: Path):
    """An advisory lock around read-modify-write of the manifest (POSIX; elsewhere the writer's
    re-read-and-verify loop is what keeps concurrent additions)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder / ".manifest.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def block_dir(folder: Path, block: str, manifest: dict | None = None) -> tuple[str, Path]:
    """(the name `block` has in the dump, its folder): any naming scheme of a block the manifest holds is
    accepted; DumpFormatError if the dump has no such block."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    name = block
    if name not in manifest["blocks"]:
        b = find_block(name)
        if b is not None and b.short in manifest["blocks"]:
            name = b.short
    if not is_block_name(name):
        raise DumpFormatError(folder, f"invalid block name {block!r}")
    if name not in manifest["blocks"] and not (folder / name).is_dir():
        known = ", ".join(sorted(manifest["blocks"])) or "none"
        raise DumpFormatError(folder, f"the dump has no block {block!r} (blocks: {known})")
    return name, folder / name


def dump_block(folder, block: str | None = None) -> str:
    """`block` checked against the blocks a dump holds; None picks the dump's only block."""
    blocks = sorted(read_manifest(folder).get("blocks", {}))
    if block:
        if block not in blocks:
            raise ValueError(f"{folder} holds no {block} vectors (it holds: {', '.join(blocks) or 'none'})")
        return block
    if len(blocks) != 1:
        raise ValueError(f"{folder} holds {len(blocks)} blocks ({', '.join(blocks)}); choose one")
    return blocks[0]
