"""Statistics of an SAE's features over a data set: activation mean/std/frequency, and the top images per feature.

    stream = shards.iter_vectors(dump, "down.2.1", with_meta=True, shuffle=False)
    sae.stats = feature_stats(sae, (x for x, _ in stream))
    write_features_index(features_index(sae, stream, top_n=16), "features.json")
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterable

import torch

from .architectures import SparseAutoencoder
from .metadata import FeatureStats

RECORD_KEYS = ("prompt", "file")
_IMAGE_BITS = 40  # key of an image: writer index << 40 | image index


def _tensor_of(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def feature_stats(sae: SparseAutoencoder, batches: Iterable, *, max_tokens: int | None = None) -> FeatureStats:
    """Per-feature mean and (population) standard deviation of the activation where the feature is active
    (> 0), its frequency (fraction of vectors where active) and the number of vectors seen.

    `batches`: any iterable of `[n, d_in]` tensors (or `(tensor, meta)` pairs); at most `max_tokens` vectors are
    used. Sums run in float64 and batches are merged with the pairwise (Chan et al.) update of mean and M2,
    so the variance does not suffer from cancellation. Features never active get mean 0 and std 0.
    """
    F, dev = sae.n_features, sae.device
    count = torch.zeros(F, dtype=torch.float64, device=dev)
    mean = torch.zeros(F, dtype=torch.float64, device=dev)
    m2 = torch.zeros(F, dtype=torch.float64, device=dev)
    n_vectors = 0
    for batch in batches:
        x = _tensor_of(batch)
        x = x.reshape(-1, x.shape[-1])
        if max_tokens is not None:
            x = x[: max(int(max_tokens) - n_vectors, 0)]
        if not len(x):
            if max_tokens is not None and n_vectors >= max_tokens:
                break
            continue
        values, indices = sae.encode_sparse(x.to(dev))
        active = values > 0
        f = indices[active]
        v = values[active].to(torch.float64)
        c_b = torch.bincount(f, minlength=F).to(torch.float64)
        mean_b = torch.zeros(F, dtype=torch.float64, device=dev).index_add_(0, f, v) / c_b.clamp_min(1)
        m2_b = torch.zeros(F, dtype=torch.float64, device=dev).index_add_(0, f, (v - mean_b[f]) ** 2)
        total = count + c_b
        delta = mean_b - mean
        mean += delta * c_b / total.clamp_min(1)
        m2 += m2_b + delta**2 * count * c_b / total.clamp_min(1)
        count = total
        n_vectors += len(x)
    if n_vectors == 0:
        raise ValueError("feature_stats: no vectors in the data")
    std = (m2 / count.clamp_min(1)).clamp_min(0).sqrt()
    return FeatureStats(
        mean=mean.float().cpu(),
        frequency=(count / n_vectors).float().cpu(),
        std=std.float().cpu(),
        n_vectors=n_vectors,
    )


def _lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting by the last key, then the one before, ... (stable)."""
    idx = torch.arange(len(keys[0]), device=keys[0].device)
    for k in keys:
        idx = idx[torch.sort(k[idx], stable=True).indices]
    return idx


class _TopImages:
    """Running top-N distinct images per feature (value of the image's best row, and that row's position)."""

    def __init__(self, n_features: int, top_n: int):
        self.F, self.N = n_features, top_n
        self.value = torch.full((n_features, top_n), float("-inf"))
        self.key = torch.full((n_features, top_n), -1, dtype=torch.int64)
        self.pos = torch.zeros((n_features, top_n, 2), dtype=torch.int64)

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


@torch.no_grad()
def features_index(sae: SparseAutoencoder, stream_with_meta, *, top_n: int = 16, records=None) -> dict:
    """For each feature, its `top_n` most activating images (distinct), with the position and value of each
    image's best row.

    `stream_with_meta` yields `(x [n, d_in], meta)` with per-row `meta["writer"]` (index into
    `stream.writers`), `meta["image"]`, `meta["position"]` (row-major) and `meta["grid_w"]` (as
    `iter_vectors(..., with_meta=True)` does). `records`: done-image records (default: the stream's) whose
    `prompt` and `file` are copied into the entries.
    Returns `{"block", "n_features", "top_n", "features": [[{"writer", "image", "position": [h, w], "value",
    "prompt"?, "file"?}, ...], ...]}`.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    writers = list(getattr(stream_with_meta, "writers", None) or [])
    if records is None:
        records = getattr(stream_with_meta, "records", None) or []
    top = _TopImages(sae.n_features, int(top_n))
    for item in stream_with_meta:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError("features_index needs a stream with metadata (iter_vectors(..., with_meta=True))")
        x, meta = item
        if not len(x):
            continue
        values, indices = sae.encode_sparse(x.to(sae.device))
        values, indices = values.float().cpu(), indices.cpu()
        active = values > 0
        row = torch.arange(len(x)).unsqueeze(1).expand_as(values)[active]
        writer = meta.get("writer", torch.zeros(len(x), dtype=torch.int64)).long().cpu()
        key = ((writer << _IMAGE_BITS) | meta["image"].long().cpu())[row]
        p = meta["position"].long().cpu()[row]
        gw = meta.get("grid_w", torch.full((len(x),), -1, dtype=torch.int64)).long().cpu()[row]
        ok = gw > 0
        safe = torch.where(ok, gw, torch.ones_like(gw))
        pos = torch.stack([torch.where(ok, p // safe, torch.full_like(p, -1)), torch.where(ok, p % safe, p)], 1)
        top.update(indices[active], key, values[active], pos)

    by_image = {(str(r.get("writer")), int(r["image"])): r for r in records if "image" in r}
    value, key, pos = top.value.tolist(), top.key.tolist(), top.pos.tolist()
    features = []
    for fv, fk, fp in zip(value, key, pos):
        entries = []
        for v, k, (h, w) in zip(fv, fk, fp):
            if k < 0:
                break
            wi, image = k >> _IMAGE_BITS, k & ((1 << _IMAGE_BITS) - 1)
            name = writers[wi] if wi < len(writers) else str(wi)
            e = {"writer": name, "image": image, "position": [h, w], "value": v}
            rec = by_image.get((name, image))
            if rec:
                e.update({r: rec[r] for r in RECORD_KEYS if r in rec})
            entries.append(e)
        features.append(entries)
    block = getattr(stream_with_meta, "block", None) or sae.config.block
    return {"block": block, "n_features": sae.n_features, "top_n": int(top_n), "features": features}


def write_features_index(index: dict, path) -> Path:
    """Write the index as JSON, atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
