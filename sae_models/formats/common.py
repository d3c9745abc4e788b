"""Helpers shared by the readers: safe file opening and building an SAE from named tensors with checks."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from ..architectures import SparseAutoencoder, build
from ..errors import SAEFormatError, UnsafePickleError
from ..metadata import FeatureStats, SAEConfig


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SAEFormatError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SAEFormatError(path, "expected a JSON object at the top level")
    return data


def load_pickle(path: Path):
    """`torch.load(..., weights_only=True)`: tensors and plain containers only, nothing executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SAEFormatError(path, "file not found") from None
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            first = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln or "GLOBAL" in ln), "")
            raise UnsafePickleError(
                path,
                "refused: the pickle holds objects other than tensors and plain containers, and loading it would "
                f"execute code; only weights-only pickles are opened{(' (' + first + ')') if first else ''}",
            ) from None
        raise SAEFormatError(path, f"corrupt or truncated pickle ({text.splitlines()[0] if text else e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEFormatError(path, f"corrupt or truncated file ({msg})") from None


def load_safetensors(path: Path, select=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file (those whose name `select(name)` accepts, default all) and its
    metadata, with clear errors for bad files."""
    from safetensors import safe_open
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if select is None or select(k)}
    except FileNotFoundError:
        raise SAEFormatError(path, "file not found") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEFormatError(path, f"corrupt or truncated safetensors file ({msg})") from None
    return tensors, meta


def require(path, tensors: dict, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Tensor `name` from `tensors`, checked against `shape` (None entries match anything)."""
    if name not in tensors:
        raise SAEFormatError(path, f"missing tensor {name!r} (found: {', '.join(sorted(tensors)) or 'none'})")
    t = tensors[name]
    if not isinstance(t, torch.Tensor):
        raise SAEFormatError(path, f"{name!r} is a {type(t).__name__}, not a tensor")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape))):
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise SAEFormatError(path, f"tensor {name!r} has shape {list(t.shape)}, expected {want} from the config")
    return t


def assemble(
    path,
    config: SAEConfig,
    *,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    threshold: torch.Tensor | None = None,
    stats: FeatureStats | None = None,
) -> SparseAutoencoder:
    """Build an SAE from tensors in the canonical layout (`W_enc`, `W_dec` both `[n_features, d_in]`),
    checking every shape against the config. Missing biases are zeros. The SAE keeps the tensors' dtype."""
    n, d = config.n_features, config.d_in
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec), ("threshold", threshold)):
        check_finite(path, f"tensor {name}", t)
    checks = {"W_enc": (W_enc, (n, d)), "W_dec": (W_dec, (n, d))}
    if b_enc is not None:
        checks["b_enc"] = (b_enc, (n,))
    if b_dec is not None:
        checks["b_dec"] = (b_dec, (d,))
    for name, (t, shape) in checks.items():
        if tuple(t.shape) != shape:
            raise SAEFormatError(
                path, f"tensor {name} has shape {list(t.shape)} but the config says d_in={d}, n_features={n}"
            )
    dtype = W_enc.dtype if W_enc.is_floating_point() else torch.float32
    try:
        sae = build(config, stats, dtype=dtype)
    except ValueError as e:
        raise SAEFormatError(path, str(e)) from None
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        if b_enc is not None:
            sae.b_enc.copy_(b_enc)
        if b_dec is not None:
            sae.b_dec.copy_(b_dec)
        if "threshold" in sae.extra_tensors:
            if threshold is None:
                raise SAEFormatError(path, f"missing tensor 'threshold' needed by a {config.architecture} SAE")
            if threshold.numel() != sae.threshold.numel():
                raise SAEFormatError(
                    path, f"tensor threshold has shape {list(threshold.shape)}, expected {list(sae.threshold.shape)}"
                )
            sae.threshold.copy_(threshold.reshape(sae.threshold.shape))
    check_stats(path, stats, n)
    return sae.eval()


def check_stats(path, stats: FeatureStats | None, n: int):
    if stats is None:
        return
    for name in stats.present():
        t = getattr(stats, name)
        if tuple(t.shape) != (n,):
            raise SAEFormatError(path, f"statistic {name!r} has shape {list(t.shape)}, expected [{n}]")
        check_finite(path, f"statistic {name!r}", t)


def check_finite(path, what: str, t: torch.Tensor | None) -> None:
    """Refuse a tensor holding NaN or inf: an SAE with them turns every image it touches black."""
    if t is None or not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise SAEFormatError(path, f"{what} holds {int(bad.sum())} non-finite value(s) (NaN or inf), "
                                   f"the first at index {where}")
