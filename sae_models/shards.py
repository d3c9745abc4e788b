"""Activation dumps: crash-safe sharded storage of UNet block activations, and a resumable shuffled reader.

Folder layout (`<dump>`):

    manifest.json                     {"format": "sae-unbox-dump", "version": 1, "dtype": "float16"|"float32",
                                       "rows_per_shard": N, "blocks": {"down.2.1": {"d_in": 1280,
                                       "fields": ["update", ...]}, ...}}
    <block>/<writer>-<seq:06d>.safetensors
                                      one shard: "<field>" [rows, d_in] in the dump dtype for each field, and the
                                      per-row columns "image", "batch_index", "step", "cond", "position", "seed",
                                      "grid_h", "grid_w" (int64) and "sigma" (float32); metadata: block, writer,
                                      grid ("HxW", or "mixed"), n_rows.
    images/<writer>.jsonl             one JSON line per image whose rows (all blocks) are in committed shards.

Every file is written under a temporary name in its final folder, fsynced, then renamed into place, so a crash
never leaves a partial shard. Rows of images without a record in `images/` (the process died before their last
shard was committed) are skipped by the reader. Several writers (processes, machines on a shared disk) may fill
one folder at once, each with its own `writer_id`; one `writer_id` must not be used by two writers at once.

    with ShardWriter("dumps/run1") as w:
        w.add_image({"prompt": p, "seed": s}, {"down.2.1": {"update": u, "position": pos, "step": st, ...}})
    for x in iter_vectors("dumps/run1", "down.2.1", batch_size=4096):
        ...
"""

from __future__ import annotations

import contextlib
import errno as _errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .blocks import find_block
from .errors import SAEError

FORMAT_NAME = "sae-unbox-dump"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGES_DIR = "images"

INT_COLUMNS = ("image", "batch_index", "step", "cond", "position", "seed", "grid_h", "grid_w")
FLOAT_COLUMNS = ("sigma",)
COLUMNS = INT_COLUMNS + FLOAT_COLUMNS
_COLUMN_DEFAULTS = {"batch_index": 0, "step": 0, "cond": 0, "seed": -1, "sigma": float("nan")}
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_SHARD_RE = re.compile(r"^(?P<writer>[A-Za-z0-9_.-]+)-(?P<seq>\d{6,})\.safetensors$")


class DumpFormatError(SAEError, ValueError):
    """A folder is not an activation dump, or does not agree with what a writer wants to put in it."""

    def __init__(self, path, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


class DumpWriteError(SAEError, OSError):
    """Writing to a dump folder failed (folder not writable, disk full, ...). `errno` is the cause's."""

    def __init__(self, path, message: str, errno: int | None = None):
        OSError.__init__(self, errno if errno is not None else 0, f"{path}: {message}")
        self.path = str(path)
        self.reason = message

    def __str__(self):
        return f"{self.path}: {self.reason}"


# ---------------------------------------------------------------------------------------------------------
# low-level file writing (tests monkeypatch these to simulate full disks and crashes)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a new file `path` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_lines(path: Path, text: str) -> None:
    """Append `text` (whole lines) to `path`, flush and fsync; start on a fresh line if the file does not end
    with one (a line cut short by a crash stays alone and is skipped by readers)."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
            f.seek(0, os.SEEK_END)
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_bytes(tmp, text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _manifest_lock(folder: Path):
    """An advisory lock around read-modify-write of the manifest (POSIX; elsewhere the re-read-and-verify loop
    of `_ensure_block` is what keeps concurrent additions)."""
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


# ---------------------------------------------------------------------------------------------------------
# reading the folder


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
        raise DumpFormatError(folder, f"unsupported dump version {m.get('version')!r} (this code reads {FORMAT_VERSION})")
    if m.get("dtype") not in _DTYPES:
        raise DumpFormatError(folder, f"unsupported dump dtype {m.get('dtype')!r}")
    m.setdefault("blocks", {})
    return m


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and isinstance(rec.get("image"), int):
            out.append(rec)
    return out


def done_images(folder) -> list[dict]:
    """Records of all completed images of all writers (writer by writer, in order of completion)."""
    folder = Path(folder)
    read_manifest(folder)
    out = []
    images = folder / IMAGES_DIR
    if not images.is_dir():
        return out
    for path in sorted(images.glob("*.jsonl")):
        for rec in _read_jsonl(path):
            rec.setdefault("writer", path.stem)
            out.append(rec)
    return out


def _block_dir(folder: Path, block: str, manifest: dict | None = None) -> tuple[str, Path]:
    manifest = manifest if manifest is not None else read_manifest(folder)
    name = block
    if name not in manifest["blocks"]:
        b = find_block(name)
        if b is not None and b.short in manifest["blocks"]:
            name = b.short
    if not _NAME_RE.match(name) or name in (".", "..", IMAGES_DIR):
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


def list_shards(folder, block) -> list[Path]:
    """The complete shards of `block`, sorted by name (temporary files are ignored)."""
    folder = Path(folder)
    _, bdir = _block_dir(folder, block)
    if not bdir.is_dir():
        return []
    return sorted(p for p in bdir.iterdir() if _SHARD_RE.match(p.name) and p.is_file())


def _shard_writer(path: Path) -> str:
    return _SHARD_RE.match(path.name).group("writer")


def _read_shard(path: Path, names: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The named tensors of a shard (those present) and its metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            return {n: f.get_tensor(n) for n in names if n in keys}, meta
    except FileNotFoundError:
        raise DumpFormatError(path, "shard disappeared while reading the dump") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DumpFormatError(path, f"corrupt shard ({e})") from None


def _parse_grid(text: str | None) -> tuple[int, int]:
    m = re.match(r"^(\d+)x(\d+)$", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def split_hash(writer: str, image: int) -> float:
    """A stable number in [0, 1) for an image; images below `eval_fraction` form the eval split."""
    h = hashlib.blake2b(f"{writer}\0{int(image)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def _derive_seed(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------------------
# writer


def _default_writer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ShardWriter:
    """Appends images' activation rows to a dump folder; see the module docstring for the layout.

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
        if not isinstance(self.writer_id, str) or not _NAME_RE.match(self.writer_id):
            raise ValueError(f"writer_id must match [A-Za-z0-9_.-]+, got {self.writer_id!r}")
        if int(rows_per_shard) < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.rows_per_shard = int(rows_per_shard)
        names = {v: k for k, v in _DTYPES.items()}
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
        self._init_manifest()
        self._records_path = self.folder / IMAGES_DIR / f"{self.writer_id}.jsonl"
        self._next_image = self._resume()

    # -- manifest --------------------------------------------------------------------------------------
    def _check_manifest(self, m: dict) -> None:
        for key, mine in (("dtype", self._dtype_name), ("rows_per_shard", self.rows_per_shard)):
            if m.get(key) != mine:
                raise DumpFormatError(self.folder, f"the dump has {key}={m.get(key)!r} but this writer uses {key}={mine!r}")

    def _init_manifest(self) -> None:
        path = self.folder / MANIFEST
        try:
            with _manifest_lock(self.folder):
                if not path.exists():
                    m = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": self._dtype_name,
                         "rows_per_shard": self.rows_per_shard, "blocks": {}}
                    _atomic_write_text(path, json.dumps(m, indent=1, sort_keys=True))
        except OSError as e:
            raise DumpWriteError(self.folder, f"cannot write {MANIFEST} ({e.strerror or e})", e.errno) from None
        self._check_manifest(read_manifest(self.folder))

    def _ensure_block(self, block: str, d_in: int, fields: list[str]) -> None:
        """Check `block` against the manifest, adding it if absent (re-read and merged under a lock, verified)."""
        path = self.folder / MANIFEST
        for _ in range(20):
            m = read_manifest(self.folder)
            self._check_manifest(m)
            entry = m["blocks"].get(block)
            if entry is not None:
                if int(entry.get("d_in", -1)) != d_in:
                    raise DumpFormatError(self.folder, f"block {block!r} has d_in={entry.get('d_in')} in the dump "
                                                       f"but the rows given have d_in={d_in}")
                if sorted(entry.get("fields", [])) != sorted(fields):
                    raise DumpFormatError(self.folder, f"block {block!r} has fields {entry.get('fields')} in the "
                                                       f"dump but the rows given have fields {fields}")
                return
            try:
                with _manifest_lock(self.folder):
                    m = read_manifest(self.folder)
                    if block not in m["blocks"]:
                        m["blocks"][block] = {"d_in": d_in, "fields": fields}
                        _atomic_write_text(path, json.dumps(m, indent=1, sort_keys=True))
            except OSError as e:
                raise DumpWriteError(self.folder, f"cannot update {MANIFEST} ({e.strerror or e})", e.errno) from None
        raise DumpWriteError(self.folder, f"could not add block {block!r} to {MANIFEST} (concurrent writers?)")

    # -- resume ----------------------------------------------------------------------------------------
    def _resume(self) -> int:
        """Remove this writer's stale temporary files; the next image index after its records and shards."""
        last = -1
        for rec in _read_jsonl(self._records_path):
            last = max(last, int(rec["image"]))
        tmp_re = re.compile(rf"^\.?{re.escape(self.writer_id)}-\d{{6,}}\.safetensors\.[0-9a-f]+\.tmp$")
        for sub in self.folder.iterdir():
            if not sub.is_dir() or sub.name == IMAGES_DIR:
                continue
            for p in sub.iterdir():
                if tmp_re.match(p.name):
                    with contextlib.suppress(OSError):
                        p.unlink()
                    continue
                m = _SHARD_RE.match(p.name)
                if m and m.group("writer") == self.writer_id:
                    self._next_seq[sub.name] = max(self._next_seq.get(sub.name, 0), int(m.group("seq")) + 1)
                    cols, _ = _read_shard(p, ["image"])
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

    def _grid(self, block: str, spec: dict, record: dict, n: int, position) -> tuple[int, int]:
        grid = spec.get("grid")
        if grid is not None:
            if isinstance(grid, str):
                grid = _parse_grid(grid)
            h, w = (int(v) for v in grid)
            if h < 1 or w < 1:
                raise ValueError(f"block {block!r}: invalid grid {spec.get('grid')!r}")
            return h, w
        b = find_block(block)
        if b is not None and record.get("width") and record.get("height"):
            return b.grid(int(record["height"]) // 8, int(record["width"]) // 8)
        if position is not None and torch.is_tensor(position) and position.numel():
            side = math.isqrt(int(position.max()) + 1)
            if side * side == int(position.max()) + 1:
                return side, side
        side = math.isqrt(n)
        if position is None and side * side == n:
            return side, side
        raise ValueError(f"block {block!r}: give the feature map size as rows[{block!r}]['grid'] = (H, W)")

    def _prepare(self, record: dict, block: str, spec: dict, image: int):
        if not isinstance(spec, dict):
            raise ValueError(f"rows[{block!r}] must be a dict of tensors, got {type(spec).__name__}")
        if not _NAME_RE.match(block) or block in (".", "..", IMAGES_DIR):
            raise ValueError(f"invalid block name {block!r}")
        fields, columns = {}, {}
        for key, value in spec.items():
            if key == "grid":
                continue
            if key == "image":
                raise ValueError(f"rows[{block!r}]: 'image' is filled in by the writer")
            if key in COLUMNS:
                columns[key] = value
            elif torch.is_tensor(value) and value.dim() == 2:
                if not _NAME_RE.match(key):
                    raise ValueError(f"rows[{block!r}]: invalid field name {key!r}")
                fields[key] = value
            else:
                raise ValueError(f"rows[{block!r}][{key!r}]: not a field tensor [n, d_in] nor a known column "
                                 f"({', '.join(c for c in COLUMNS if c != 'image')})")
        if not fields:
            raise ValueError(f"rows[{block!r}] has no field tensor [n, d_in] (e.g. 'update')")
        shapes = {tuple(t.shape) for t in fields.values()}
        if len(shapes) != 1:
            raise ValueError(f"rows[{block!r}]: field tensors differ in shape: {sorted(shapes)}")
        n, d_in = shapes.pop()
        out = {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in fields.items()}
        for key, value in columns.items():
            dt = torch.float32 if key in FLOAT_COLUMNS else torch.int64
            t = torch.as_tensor(value).detach().to("cpu")
            if t.dim() == 0:
                t = t.expand(n)
            if t.shape != (n,):
                raise ValueError(f"rows[{block!r}][{key!r}] has shape {tuple(t.shape)}, expected ({n},) or a scalar")
            columns[key] = t.to(dt).contiguous()
        gh, gw = self._grid(block, spec, record, n, columns.get("position"))
        if "position" not in columns:
            columns["position"] = torch.arange(n, dtype=torch.int64) % (gh * gw)
        elif n and (int(columns["position"].min()) < 0 or int(columns["position"].max()) >= gh * gw):
            raise ValueError(f"rows[{block!r}]['position'] outside the {gh}x{gw} grid")
        for key, default in _COLUMN_DEFAULTS.items():
            if key not in columns:
                columns[key] = torch.full((n,), default, dtype=torch.float32 if key in FLOAT_COLUMNS else torch.int64)
        columns["image"] = torch.full((n,), image, dtype=torch.int64)
        columns["grid_h"] = torch.full((n,), gh, dtype=torch.int64)
        columns["grid_w"] = torch.full((n,), gw, dtype=torch.int64)
        out.update(columns)
        return n, d_in, list(fields), out

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
            n, d_in, fields, tensors = self._prepare(record, block, spec, image)
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
        from safetensors.torch import save as st_save

        tensors = self._take(block, n)
        bdir = self.folder / block
        seq = self._next_seq.get(block)
        if seq is None:
            seq = 0
            if bdir.is_dir():
                for p in bdir.iterdir():
                    m = _SHARD_RE.match(p.name)
                    if m and m.group("writer") == self.writer_id:
                        seq = max(seq, int(m.group("seq")) + 1)
        name = f"{self.writer_id}-{seq:06d}.safetensors"
        final = bdir / name
        tmp = bdir / f"{name}.{secrets.token_hex(4)}.tmp"
        gh, gw = tensors["grid_h"], tensors["grid_w"]
        uniform = bool((gh == gh[0]).all() and (gw == gw[0]).all())
        meta = {"format": FORMAT_NAME, "block": block, "writer": self.writer_id, "n_rows": str(n),
                "grid": f"{int(gh[0])}x{int(gw[0])}" if uniform else "mixed", "dtype": self._dtype_name}
        try:
            bdir.mkdir(exist_ok=True)
            data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
            _write_bytes(tmp, data)
            del data
            if final.exists():  # never overwrite a committed shard
                raise FileExistsError(_errno.EEXIST, "shard exists", str(final))
            os.replace(tmp, final)
            _fsync_dir(bdir)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
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
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in done)
        try:
            _append_lines(self._records_path, text)
        except OSError as e:
            raise DumpWriteError(self.folder, f"could not append to {IMAGES_DIR}/{self._records_path.name} "
                                              f"({e.strerror or e}); the records stay pending", e.errno) from e
        self._pending = keep


# ---------------------------------------------------------------------------------------------------------
# reader


def iter_vectors(folder, block, *, batch_size: int = 4096, field: str = "update", shuffle: bool = True,
                 shuffle_shards: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, with_meta: bool = False, split: str = "all",
                 eval_fraction: float = 0.0, drop_last: bool = False, epochs: int | None = 1) -> "VectorStream":
    """A resumable stream of batches `[batch_size, d_in]` of one block's vectors; see `VectorStream`."""
    return VectorStream(folder, block, batch_size=batch_size, field=field, shuffle=shuffle,
                        shuffle_shards=shuffle_shards, seed=seed, rank=rank, world_size=world_size, dtype=dtype,
                        with_meta=with_meta, split=split, eval_fraction=eval_fraction, drop_last=drop_last,
                        epochs=epochs)


class VectorStream:
    """Batches of a block's vectors from a dump folder.

    The shards (and the images with a done record) are those present when the stream was made. This rank's
    shards are every `world_size`-th in sorted order. Each epoch shuffles their order (seeded by seed and epoch),
    cuts it into windows of `shuffle_shards` shards, loads one window at a time (only rows of done images in the
    split) and walks it in a seeded random order; batches run on across windows and the last one of an epoch
    may be short (dropped with `drop_last`). `state_dict()` is the position (epoch, window, offset) after the
    last yielded batch, so a stream given it continues with exactly the same batches.

    With `with_meta`, items are `(x, meta)`, `meta` holding the per-row columns (`image`, `position`, `step`,
    `cond`, `sigma`, `seed`, `batch_index`, `grid_h`, `grid_w`) and `writer`, an index into `self.writers`.
    """

    def __init__(self, folder, block, *, batch_size=4096, field="update", shuffle=True, shuffle_shards=8,
                 seed=0, rank=0, world_size=1, dtype=torch.float32, with_meta=False, split="all",
                 eval_fraction=0.0, drop_last=False, epochs=1):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        self.block, _ = _block_dir(self.folder, block, manifest)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(shuffle_shards) < 1:
            raise ValueError(f"shuffle_shards must be >= 1, got {shuffle_shards}")
        if not (0 <= int(rank) < int(world_size)):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if split not in ("all", "train", "eval"):
            raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")
        if not (0.0 <= float(eval_fraction) <= 1.0):
            raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
        if epochs is not None and int(epochs) < 0:
            raise ValueError(f"epochs must be >= 0 or None, got {epochs}")
        self.batch_size, self.field, self.shuffle = int(batch_size), field, bool(shuffle)
        self.shuffle_shards = int(shuffle_shards) if shuffle else 1
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.dtype, self.with_meta, self.split = dtype, bool(with_meta), split
        self.eval_fraction, self.drop_last = float(eval_fraction), bool(drop_last)
        self.epochs = None if epochs is None else int(epochs)
        entry = manifest["blocks"].get(self.block, {})
        if entry and field not in entry.get("fields", [field]):
            raise DumpFormatError(self.folder, f"block {self.block!r} has no field {field!r} "
                                               f"(fields: {', '.join(entry.get('fields', []))})")
        all_shards = list_shards(self.folder, self.block)
        self.writers: list[str] = sorted({_shard_writer(p) for p in all_shards})
        self._writer_index = {w: i for i, w in enumerate(self.writers)}
        self.shards: list[Path] = all_shards[self.rank::self.world_size]
        self.records: list[dict] = done_images(self.folder)
        done: dict[str, list[int]] = {}
        for r in self.records:
            done.setdefault(str(r["writer"]), []).append(int(r["image"]))
        self._done = {w: torch.tensor(sorted(set(v)), dtype=torch.int64) for w, v in done.items()}
        self._d_in = entry.get("d_in")
        self._counts: dict[Path, int] = {}
        self._digest = hashlib.blake2b("\n".join(p.name for p in self.shards).encode(), digest_size=8).hexdigest()
        self.peak_window_rows = 0  # most rows held in memory at once (one window), for checks
        self._state = (0, 0, 0)
        self._finished = False

    # -- sizes -----------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        if self._d_in is None:
            if not self.shards:
                raise DumpFormatError(self.folder, f"block {self.block!r} has no shards")
            t, _ = _read_shard(self.shards[0], [self.field])
            self._d_in = int(t[self.field].shape[1])
        return int(self._d_in)

    def _mask(self, writer: str, image: torch.Tensor) -> torch.Tensor:
        done = self._done.get(writer)
        if done is None or not image.numel():
            return torch.zeros(image.shape, dtype=torch.bool)
        mask = torch.isin(image, done)
        if self.split != "all" and mask.any():
            uniq = torch.unique(image[mask])
            in_eval = torch.tensor([split_hash(writer, int(i)) < self.eval_fraction for i in uniq])
            keep = uniq[in_eval] if self.split == "eval" else uniq[~in_eval]
            mask &= torch.isin(image, keep)
        return mask

    def _count(self, path: Path) -> int:
        if path not in self._counts:
            cols, _ = _read_shard(path, ["image"])
            self._counts[path] = int(self._mask(_shard_writer(path), cols["image"]).sum())
        return self._counts[path]

    @property
    def n_rows(self) -> int:
        """Rows yielded per epoch (reads the shards' small `image` columns once)."""
        n = sum(self._count(p) for p in self.shards)
        return n // self.batch_size * self.batch_size if self.drop_last else n

    @property
    def batches_per_epoch(self) -> int:
        n = self.n_rows
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- state -----------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "shuffle": self.shuffle,
                "shuffle_shards": self.shuffle_shards, "field": self.field, "split": self.split,
                "eval_fraction": self.eval_fraction, "shards": self._digest, "block": self.block}

    def state_dict(self) -> dict:
        e, w, o = self._state
        return {"version": 1, "epoch": e, "window": w, "offset": o, "finished": self._finished, **self._config()}

    def load_state_dict(self, d: dict) -> None:
        mine = self._config()
        diff = [k for k in mine if d.get(k) != mine[k]]
        if diff:
            raise ValueError(f"{self.folder}: the saved stream state does not match this stream "
                             f"(differs in {', '.join(diff)}; a changed 'shards' means the dump gained or lost shards)")
        self._state = (int(d["epoch"]), int(d["window"]), int(d["offset"]))
        self._finished = bool(d.get("finished", False))

    # -- iteration -------------------------------------------------------------------------------------
    def _windows(self, epoch: int) -> list[list[Path]]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            g = torch.Generator().manual_seed(_derive_seed("order", self.seed, epoch))
            order = torch.randperm(len(order), generator=g).tolist()
        k = self.shuffle_shards
        return [[self.shards[i] for i in order[j:j + k]] for j in range(0, len(order), k)]

    def _load_window(self, paths: list[Path]):
        names = [self.field, *COLUMNS] if self.with_meta else [self.field, "image"]
        xs, metas = [], []
        for p in paths:
            t, meta = _read_shard(p, names)
            if self.field not in t:
                raise DumpFormatError(p, f"shard has no field {self.field!r}")
            writer = _shard_writer(p)
            mask = self._mask(writer, t["image"])
            self._counts[p] = int(mask.sum())
            idx = mask.nonzero().squeeze(1)
            xs.append(t[self.field].index_select(0, idx))
            if self.with_meta:
                n = len(idx)
                m = {k: t[k].index_select(0, idx) for k in COLUMNS if k in t}
                gh, gw = _parse_grid(meta.get("grid"))
                m.setdefault("grid_h", torch.full((n,), gh, dtype=torch.int64))
                m.setdefault("grid_w", torch.full((n,), gw, dtype=torch.int64))
                for k in COLUMNS:
                    if k not in m:
                        m[k] = torch.full((n,), _COLUMN_DEFAULTS.get(k, -1),
                                          dtype=torch.float32 if k in FLOAT_COLUMNS else torch.int64)
                m["writer"] = torch.full((n,), self._writer_index[writer], dtype=torch.int64)
                metas.append(m)
            del t
        x = torch.cat(xs) if xs else torch.zeros(0, self._d_in or 0)
        meta = {k: torch.cat([m[k] for m in metas]) for k in metas[0]} if metas else None
        self.peak_window_rows = max(self.peak_window_rows, len(x))
        if self._d_in is None and len(xs):
            self._d_in = int(xs[0].shape[1])
        return x, meta

    def _perm(self, n: int, epoch: int, window: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(_derive_seed("rows", self.seed, epoch, window))
        return torch.randperm(n, generator=g)

    def _emit(self, parts):
        x = torch.cat([p[0] for p in parts]).to(self.dtype)
        if not self.with_meta:
            return x
        return x, {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}

    def __iter__(self) -> Iterator:
        if self._finished:
            self._state, self._finished = (0, 0, 0), False
        e, w, o = self._state
        bs = self.batch_size
        while self.epochs is None or e < self.epochs:
            windows = self._windows(e)
            parts, have, yielded, fresh = [], 0, False, (w == 0 and o == 0)
            while w < len(windows):
                x, meta = self._load_window(windows[w])
                order = self._perm(len(x), e, w)
                while o < len(order):
                    take = min(bs - have, len(order) - o)
                    idx = order[o:o + take]
                    parts.append((x.index_select(0, idx), {k: v.index_select(0, idx) for k, v in meta.items()}
                                  if meta is not None else None))
                    have += take
                    o += take
                    if have == bs:
                        batch = self._emit(parts)
                        parts, have = [], 0
                        self._state = (e, w, o) if o < len(order) else (e, w + 1, 0)
                        yielded = True
                        yield batch
                del x, meta, order
                w, o = w + 1, 0
            if parts and not self.drop_last:
                batch = self._emit(parts)
                self._state = (e + 1, 0, 0)
                yielded = True
                yield batch
            e, w, o = e + 1, 0, 0
            self._state = (e, 0, 0)
            if self.epochs is None and fresh and not yielded:
                break  # a whole epoch gave nothing: so would every other
        self._finished = True
