"""`ShardWriter`: appends images' activation rows to a dump folder, a shard at a time, crash-safe."""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any

import torch

from .. import files
from .errors import DumpWriteError
from .layout import (
    DTYPES,
    IMAGES_DIR,
    MANIFEST,
    NAME_RE,
    next_seq,
    shard_name,
    writer_shards,
    writer_temporaries,
)
from .manifest import add_block, check_compatible, create_manifest
from .records import append_records, read_records, records_path
from .rows import prepare_rows
from .shard_files import read_shard, shard_metadata, write_shard


def _default_writer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ShardWriter:
    """Appends images' activation rows to a dump folder; see the package docstring for the layout.

    `add_image(record, rows)`: `rows` maps a block name to a dict of field tensors `[n, d_in]` ("update", and
    optionally "input", "output") and per-row columns (`batch_index`, `step`, `sigma`, `cond`, `position`, `seed`;
    tensors of length n, or scalars for the whole image; missing ones get defaults) and optionally `grid`:
    (H, W) of the block's feature map (otherwise derived from the record's width/height, or from the positions
    of a square grid). Returns the image's index within this writer.
    """

    def __init__(self, folder, *, writer_id: str | None = None, rows_per_shard: int = 16384,
                 dtype: torch.dtype = torch.float16):
        self.folder = Path(folder)
        self.writer_id = writer_id if writer_id is not None else _default_writer_id()
        if not isinstance(self.writer_id, str) or not NAME_RE.match(self.writer_id):
            raise ValueError(f"writer_id must match [A-Za-z0-9_.-]+, got {self.writer_id!r}")
        if int(rows_per_shard) < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.rows_per_shard = int(rows_per_shard)
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dump dtype must be torch.float16 or torch.float32, got {dtype}")
        self.dtype = dtype
        self._dtype_name = names[dtype]
        self._closed = False
        self._buffers: dict[str, list[dict[str, torch.Tensor]]] = {}
        self._buffered: dict[str, int] = {}
        self._added: dict[str, int] = {}  # rows ever added per block (this session)
        self._committed: dict[str, int] = {}  # rows committed per block (this session)
        self._pending: list[tuple[dict, dict[str, int]]] = []  # (record, block -> end offset in _added)
        self._blocks_checked: set[str] = set()
        self._next_seq: dict[str, int] = {}

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / IMAGES_DIR).mkdir(exist_ok=True)
        except OSError as e:
            raise DumpWriteError(self.folder, f"cannot create the dump folder ({e.strerror or e})", e.errno) from None
        if not os.access(self.folder, os.W_OK):
            raise DumpWriteError(self.folder, "the dump folder is not writable", _errno.EACCES)
        create_manifest(self.folder, self._dtype_name, self.rows_per_shard)
        check_compatible(self.folder, self._dtype_name, self.rows_per_shard)
        self._records_path = records_path(self.folder, self.writer_id)
        self._next_image = self._resume()

    def _ensure_block(self, block: str, d_in: int, fields: list[str]) -> None:
        """Check `block` against the manifest, adding it if absent (and verifying the addition)."""
        for _ in range(20):
            m = check_compatible(self.folder, self._dtype_name, self.rows_per_shard, {block: (d_in, fields)})
            if block in m["blocks"]:
                return
            add_block(self.folder, block, d_in, fields)
        raise DumpWriteError(self.folder, f"could not add block {block!r} to {MANIFEST} (concurrent writers?)")

    def _resume(self) -> int:
        """Remove the temporary files that this writer left, and those of dead writers of this machine (a
        killed dump, in any writer's name); the next image index after this writer's records and shards."""
        last = max((int(rec["image"]) for rec in read_records(self._records_path)), default=-1)
        files.remove_stale_temporaries(self.folder)
        for sub in self.folder.iterdir():
            if not sub.is_dir():
                continue
            files.remove_stale_temporaries(sub)
            if sub.name == IMAGES_DIR:
                continue
            for p in writer_temporaries(sub, self.writer_id):
                with contextlib.suppress(OSError):
                    p.unlink()
            for p in writer_shards(sub, self.writer_id).values():
                cols, _ = read_shard(p, ["image"])
                if "image" in cols and cols["image"].numel():
                    last = max(last, int(cols["image"].max()))
        return last + 1

    # -- adding ----------------------------------------------------------------------------------------
    @property
    def pending_rows(self) -> int:
        return sum(self._buffered.values())

    @property
    def pending_images(self) -> int:
        return len(self._pending)

    def add_image(self, record: dict, rows: dict[str, dict[str, Any]]) -> int:
        """Buffer one image's rows (all blocks); commit full shards; append records of completed images.
        Returns the image's index within this writer."""
        if self._closed:
            raise ValueError(f"{self.folder}: the writer {self.writer_id} is closed")
        if not isinstance(record, dict):
            raise ValueError(f"record must be a dict, got {type(record).__name__}")
        image = self._next_image
        record = {**record, "image": image, "writer": self.writer_id}
        try:
            json.dumps(record)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the image record is not JSON-serialisable ({e})") from None
        prepared = {}
        for block, spec in rows.items():
            n, d_in, fields, tensors = prepare_rows(record, block, spec, image, self.dtype)
            if n:
                prepared[block] = (n, d_in, fields, tensors)
        for block, (n, d_in, fields, _) in prepared.items():
            if block not in self._blocks_checked:
                self._ensure_block(block, d_in, fields)
                self._blocks_checked.add(block)
        # everything validated: mutate
        self._next_image += 1
        ends = {}
        for block, (n, _, _, tensors) in prepared.items():
            self._buffers.setdefault(block, []).append(tensors)
            self._buffered[block] = self._buffered.get(block, 0) + n
            self._added[block] = self._added.get(block, 0) + n
            self._committed.setdefault(block, 0)
            ends[block] = self._added[block]
        self._pending.append((record, ends))
        try:
            for block in list(self._buffers):
                while self._buffered[block] >= self.rows_per_shard:
                    self._commit(block, self.rows_per_shard)
        finally:
            self._write_records()
        return image

    def flush(self) -> None:
        """Commit every block's buffered rows (a shorter shard each), then the records of completed images."""
        try:
            for block in list(self._buffers):
                while self._buffered[block] > 0:
                    self._commit(block, min(self._buffered[block], self.rows_per_shard))
        finally:
            self._write_records()

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- committing ------------------------------------------------------------------------------------
    def _take(self, block: str, n: int) -> dict[str, torch.Tensor]:
        chunks = self._buffers[block]
        if len(chunks) > 1:
            chunks[:] = [{k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}]
        return {k: v[:n] for k, v in chunks[0].items()}

    def _commit(self, block: str, n: int) -> Path:
        tensors = self._take(block, n)
        bdir = self.folder / block
        if block not in self._next_seq:
            self._next_seq[block] = next_seq(bdir, self.writer_id)
        seq = self._next_seq[block]
        name = shard_name(self.writer_id, seq)
        final = bdir / name
        try:
            bdir.mkdir(exist_ok=True)
            write_shard(final, tensors, shard_metadata(block, self.writer_id, self._dtype_name, tensors))
        except OSError as e:
            why = "disk full" if e.errno == _errno.ENOSPC else (e.strerror or str(e))
            raise DumpWriteError(
                self.folder,
                f"could not write shard {block}/{name} ({why}); its {n} rows stay buffered "
                f"({self.pending_rows} rows in all) and a later flush() retries",
                e.errno,
            ) from e
        self._next_seq[block] = seq + 1
        rest = {k: v[n:].clone() for k, v in self._buffers[block][0].items()}
        self._buffered[block] -= n
        self._committed[block] += n
        self._buffers[block] = [rest] if self._buffered[block] else []
        return final

    def _write_records(self) -> None:
        done, keep = [], []
        for record, ends in self._pending:
            if all(self._committed[b] >= e for b, e in ends.items()):
                done.append(record)
            else:
                keep.append((record, ends))
        if not done:
            return
        try:
            append_records(self._records_path, done)
        except OSError as e:
            raise DumpWriteError(self.folder, f"could not append to {IMAGES_DIR}/{self._records_path.name} "
                                              f"({e.strerror or e}); the records stay pending", e.errno) from e
        self._pending = keep
