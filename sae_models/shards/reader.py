"""Reading a dump: a block's complete shards, and `VectorStream`, a resumable, seeded, bounded-memory shuffled
stream of a block's vectors (only rows of images with a record)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import DumpFormatError
from .layout import COLUMN_DEFAULTS, COLUMNS, SHARD_RE, column_dtype, shard_writer
from .manifest import block_dir, read_manifest
from .records import done_images
from .shard_files import parse_grid, read_shard


def list_shards(folder, block) -> list[Path]:
    """The complete shards of `block`, sorted by name (temporary files are ignored)."""
    folder = Path(folder)
    _, bdir = block_dir(folder, block)
    if not bdir.is_dir():
        return []
    return sorted(p for p in bdir.iterdir() if SHARD_RE.match(p.name) and p.is_file())


def split_hash(writer: str, image: int) -> float:
    """A stable number in [0, 1) for an image; images below `eval_fraction` form the eval split."""
    h = hashlib.blake2b(f"{writer}\0{int(image)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def _derive_seed(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def iter_vectors(folder, block, *, batch_size: int = 4096, field: str = "update", shuffle: bool = True,
                 shuffle_shards: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, with_meta: bool = False, split: str = "all",
                 eval_fraction: float = 0.0, drop_last: bool = False, epochs: int | None = 1) -> VectorStream:
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
        self.block, _ = block_dir(self.folder, block, manifest)
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
        self.writers: list[str] = sorted({shard_writer(p) for p in all_shards})
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
            t, _ = read_shard(self.shards[0], [self.field])
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
            cols, _ = read_shard(path, ["image"])
            self._counts[path] = int(self._mask(shard_writer(path), cols["image"]).sum())
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
            t, meta = read_shard(p, names)
            if self.field not in t:
                raise DumpFormatError(p, f"shard has no field {self.field!r}")
            writer = shard_writer(p)
            mask = self._mask(writer, t["image"])
            self._counts[p] = int(mask.sum())
            idx = mask.nonzero().squeeze(1)
            xs.append(t[self.field].index_select(0, idx))
            if self.with_meta:
                n = len(idx)
                m = {k: t[k].index_select(0, idx) for k in COLUMNS if k in t}
                gh, gw = parse_grid(meta.get("grid"))  # used only by a shard without grid_h/grid_w columns
                m.setdefault("grid_h", torch.full((n,), gh, dtype=torch.int64))
                m.setdefault("grid_w", torch.full((n,), gw, dtype=torch.int64))
                for k in COLUMNS:
                    if k not in m:
                        m[k] = torch.full((n,), COLUMN_DEFAULTS.get(k, -1), dtype=column_dtype(k))
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
