"""Statistics of an SAE's features over a data set: activation mean/std/frequency, and the top images per feature.

    stream = shards.iter_vectors(dump, "down.2.1", with_meta=True, shuffle=False)
    sae.stats, index = summarize_features(sae, stream, top_n=16)   # one pass: both at once
    write_features_index(index, "features.json")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .architectures import SparseAutoencoder
from .errors import SAEFormatError
from .files import atomic_write_text
from .metadata import FeatureStats
from .moments import RunningMoments

RECORD_KEYS = ("prompt", "seed", "file")
_IMAGE_BITS = 40  # key of an image: writer index << 40 | image index


class _FeatureMoments:
    """Running moments of each feature's activation where it is active, and the number of vectors seen."""

    def __init__(self, n_features: int, device):
        self.moments = RunningMoments(n_features, device)
        self.n_vectors = 0

    def add(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        active = values > 0
        self.moments.add_values(values[active], indices[active])
        self.n_vectors += len(values)

    def result(self) -> FeatureStats:
        if self.n_vectors == 0:
            raise ValueError("feature_stats: no vectors in the data")
        m = self.moments
        return FeatureStats(
            mean=m.mean.float().cpu(),
            frequency=(m.count / self.n_vectors).float().cpu(),
            std=m.std().float().cpu(),
            n_vectors=self.n_vectors,
        )


def _limited(batches: Iterable, max_tokens: int | None):
    """The batches (tensors or `(tensor, meta)` pairs), cut after `max_tokens` vectors; empty ones skipped."""
    seen = 0
    for batch in batches:
        x, meta = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        x = x.reshape(-1, x.shape[-1])
        if max_tokens is not None:
            keep = max(int(max_tokens) - seen, 0)
            if keep < len(x):
                x = x[:keep]
                meta = None if meta is None else {k: v[:keep] for k, v in meta.items()}
        if len(x):
            seen += len(x)
            yield x, meta
        if max_tokens is not None and seen >= max_tokens:
            break


@torch.no_grad()
def feature_stats(sae: SparseAutoencoder, batches: Iterable, *, max_tokens: int | None = None) -> FeatureStats:
    """Per-feature mean and (population) standard deviation of the activation where the feature is active
    (> 0), its frequency (fraction of vectors where active) and the number of vectors seen.

    `batches`: any iterable of `[n, d_in]` tensors (or `(tensor, meta)` pairs); at most `max_tokens` vectors are
    used. Sums run in float64 (`moments.RunningMoments`). Features never active get mean 0 and std 0.
    """
    moments = _FeatureMoments(sae.n_features, sae.device)
    for x, _ in _limited(batches, max_tokens):
        moments.add(*sae.encode_sparse(x.to(sae.device)))
    return moments.result()


def _lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting by the last key, then the one before, ... (stable)."""
    idx = torch.arange(len(keys[0]), device=keys[0].device)
    for k in keys:
        idx = idx[torch.sort(k[idx], stable=True).indices]
    return idx


class _TopImages:
    """Running top-N distinct images per feature (value of the image's best row, and that row's position)."""

    def __init__(self, n_features: int, top_n: int):
        if top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {top_n}")
        top_n = int(top_n)
        self.F, self.N = n_features, top_n
        self.value = torch.full((n_features, top_n), float("-inf"))
        self.key = torch.full((n_features, top_n), -1, dtype=torch.int64)
        self.pos = torch.zeros((n_features, top_n, 4), dtype=torch.int64)  # h, w, grid_h, grid_w (-1: unknown)

    def update(self, f, key, value, pos) -> None:
        valid = self.key >= 0
        feat = torch.arange(self.F).unsqueeze(1).expand(self.F, self.N)[valid]
        f = torch.cat([feat, f])
        key = torch.cat([self.key[valid], key])
        value = torch.cat([self.value[valid], value])
        pos = torch.cat([self.pos[valid], pos])
        # best row per (feature, image)
        order = _lexsort(-value, key, f)
        f, key, value, pos = f[order], key[order], value[order], pos[order]
        first = torch.ones(len(f), dtype=torch.bool)
        first[1:] = (f[1:] != f[:-1]) | (key[1:] != key[:-1])
        f, key, value, pos = f[first], key[first], value[first], pos[first]
        # top N images per feature
        order = _lexsort(-value, f)
        f, key, value, pos = f[order], key[order], value[order], pos[order]
        i = torch.arange(len(f))
        start = torch.ones(len(f), dtype=torch.bool)
        start[1:] = f[1:] != f[:-1]
        rank = i - torch.cummax(torch.where(start, i, torch.zeros_like(i)), 0).values
        keep = rank < self.N
        f, rank = f[keep], rank[keep]
        self.value.fill_(float("-inf"))
        self.key.fill_(-1)
        self.value[f, rank] = value[keep]
        self.key[f, rank] = key[keep]
        self.pos[f, rank] = pos[keep]

    def add_codes(self, values: torch.Tensor, indices: torch.Tensor, meta: dict) -> None:
        """Add the active codes of one batch, with its per-row metadata (writer, image, position, grid_h/w)."""
        values, indices = values.float().cpu(), indices.cpu()
        n = len(values)
        active = values > 0
        row = torch.arange(n).unsqueeze(1).expand_as(values)[active]
        writer = meta.get("writer", torch.zeros(n, dtype=torch.int64)).long().cpu()
        key = ((writer << _IMAGE_BITS) | meta["image"].long().cpu())[row]
        p = meta["position"].long().cpu()[row]
        gw = meta.get("grid_w", torch.full((n,), -1, dtype=torch.int64)).long().cpu()[row]
        gh = meta.get("grid_h", torch.full((n,), -1, dtype=torch.int64)).long().cpu()[row]
        ok = gw > 0
        safe = torch.where(ok, gw, torch.ones_like(gw))
        pos = torch.stack([torch.where(ok, p // safe, torch.full_like(p, -1)), torch.where(ok, p % safe, p),
                           torch.where(ok, gh, torch.full_like(gh, -1)), torch.where(ok, gw, torch.full_like(gw, -1))], 1)
        self.update(indices[active], key, values[active], pos)

    def to_index(self, writers: list, records, block) -> dict:
        by_image = {(str(r.get("writer")), int(r["image"])): r for r in records if "image" in r}
        features = []
        for fv, fk, fp in zip(self.value.tolist(), self.key.tolist(), self.pos.tolist()):
            entries = []
            for v, k, (h, w, gh, gw) in zip(fv, fk, fp):
                if k < 0:
                    break
                wi, image = k >> _IMAGE_BITS, k & ((1 << _IMAGE_BITS) - 1)
                name = writers[wi] if wi < len(writers) else str(wi)
                e = {"writer": name, "image": image, "position": [h, w], "value": v}
                if gh > 0:
                    e["grid"] = [gh, gw]
                rec = by_image.get((name, image))
                if rec:
                    e.update({r: rec[r] for r in RECORD_KEYS if r in rec})
                entries.append(e)
            features.append(entries)
        return {"block": block, "n_features": self.F, "top_n": self.N, "features": features}


def _stream_info(stream, records, sae):
    writers = list(getattr(stream, "writers", None) or [])
    if records is None:
        records = getattr(stream, "records", None) or []
    return writers, records, getattr(stream, "block", None) or sae.config.block


@torch.no_grad()
def features_index(sae: SparseAutoencoder, stream_with_meta, *, top_n: int = 16, records=None) -> dict:
    """For each feature, its `top_n` most activating images (distinct), with the position and value of each
    image's best row.

    `stream_with_meta` yields `(x [n, d_in], meta)` with per-row `meta["writer"]` (index into
    `stream.writers`), `meta["image"]`, `meta["position"]` (row-major), `meta["grid_h"]` and `meta["grid_w"]` (as
    `iter_vectors(..., with_meta=True)` does). `records`: done-image records (default: the stream's) whose
    `prompt` and `file` are copied into the entries.
    Returns `{"block", "n_features", "top_n", "features": [[{"writer", "image", "position": [h, w], "value",
    "grid": [H, W]?, "prompt"?, "seed"?, "file"?}, ...], ...]}`.
    """
    writers, records, block = _stream_info(stream_with_meta, records, sae)
    top = _TopImages(sae.n_features, top_n)
    for x, meta in _limited(stream_with_meta, None):
        if meta is None:
            raise ValueError("features_index needs a stream with metadata (iter_vectors(..., with_meta=True))")
        top.add_codes(*sae.encode_sparse(x.to(sae.device)), meta)
    return top.to_index(writers, records, block)


@torch.no_grad()
def summarize_features(sae: SparseAutoencoder, stream_with_meta, *, top_n: int = 16, records=None,
                       max_tokens: int | None = None) -> tuple[FeatureStats, dict]:
    """`feature_stats` and `features_index` in ONE pass over the data (each vector encoded once), on at most
    `max_tokens` vectors. The index also records the dump folder (`"dump"`) when the stream has one."""
    writers, records, block = _stream_info(stream_with_meta, records, sae)
    moments = _FeatureMoments(sae.n_features, sae.device)
    top = _TopImages(sae.n_features, top_n)
    for x, meta in _limited(stream_with_meta, max_tokens):
        if meta is None:
            raise ValueError("summarize_features needs a stream with metadata (iter_vectors(..., with_meta=True))")
        values, indices = sae.encode_sparse(x.to(sae.device))
        moments.add(values, indices)
        top.add_codes(values, indices, meta)
    index = top.to_index(writers, records, block)
    if getattr(stream_with_meta, "folder", None) is not None:
        index["dump"] = os.path.abspath(stream_with_meta.folder)
    return moments.result(), index


def features_index_path(sae_path) -> str:
    """Where the features index of the SAE file `sae_path` lives: beside it, `<name>.features.json`."""
    sae_path = os.fspath(sae_path)
    return sae_path.removesuffix(".safetensors") + ".features.json"


def write_features_index(index: dict, path) -> Path:
    """Write the index as JSON, atomically (`files.atomic_write_text`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(index, separators=(",", ":"), allow_nan=False))


def read_features_index(path, n_features: int | None = None) -> dict:
    """A features index written by `write_features_index`, checked (and against `n_features` when given).
    Raises SAEFormatError naming the file for anything unreadable or malformed."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise SAEFormatError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(path, f"not a readable JSON features index ({e})") from None
    features = index.get("features") if isinstance(index, dict) else None
    if not isinstance(features, list) or not all(isinstance(e, list) for e in features):
        raise SAEFormatError(path, "a features index holds {'features': [[entry, ...] per feature]}")
    if n_features is not None and len(features) != n_features:
        raise SAEFormatError(path, f"indexes {len(features)} features but the SAE has {n_features}")
    for f, entries in enumerate(features):
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("value"), (int, float))
                    and isinstance(e.get("position"), list) and len(e["position"]) == 2):
                raise SAEFormatError(path, f"feature {f}: an entry without a numeric 'value' and a [h, w] "
                                           f"'position' ({str(e)[:80]})")
    return index
