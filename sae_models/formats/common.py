"""Helpers shared by the readers: safe file opening, config values, the block an SAE reads, and building an
SAE from named tensors with checks."""

from __future__ import annotations

import contextlib
import json
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..architectures import SparseAutoencoder, build
from ..blocks import block_from_text
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


@contextlib.contextmanager
def open_safetensors(path, *, error=SAEFormatError, missing: str = "file not found",
                     corrupt: str = "corrupt or truncated safetensors file") -> Iterator:
    """`safe_open(path)` on the CPU. A missing file raises `error(path, missing)`; a corrupt or truncated one
    (also when a tensor is read inside the block) `error(path, f"{corrupt} (<first line of the cause>)")`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except FileNotFoundError:
        raise error(path, missing) from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(path, f"{corrupt} ({msg})") from None


def load_safetensors(path: Path, select=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file (those whose name `select(name)` accepts, default all) and its
    metadata, with clear errors for bad files."""
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys() if select is None or select(k)}
    return tensors, meta


def positive_int(cfg_path, cfg: dict, key: str, prefix: str = "") -> int:
    """`cfg[key]`, which must be a positive integer (an integral float is accepted); the messages name the
    key as `prefix + key` (e.g. 'trainer.dict_size')."""
    name = prefix + key
    if cfg.get(key) is None:
        raise SAEFormatError(cfg_path, f"missing config key {name!r}")
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) < 1:
        raise SAEFormatError(cfg_path, f"config key {name!r} must be a positive integer, not {v!r}")
    return int(v)


def sae_folder(path) -> Path:
    """The folder of a library's SAE, given the folder or one of its files."""
    path = Path(path)
    return path.parent if path.is_file() else path


def block_of(folder: Path, hint=None) -> str | None:
    """The short name of the block an SAE reads: the one named in `hint` (e.g. the hook name in its config)
    when that is a string naming one, else the one named in the path of its folder; None if neither does."""
    block = block_from_text(hint) if isinstance(hint, str) else None
    block = block or block_from_text(str(Path(folder).resolve()))
    return block.short if block else None


def base_model_of(block) -> str | None:
    """The model a released SAE of this block was trained on, as the releases of the paper say: SDXL Turbo
    for SDXL's blocks, FLUX.1 for FLUX's."""
    if block is None:
        return None
    return {"sdxl": "sdxl-turbo", "flux": "flux.1"}.get(block.arch)


def reader_config(source_format: str, folder: Path, *, block_hint=None, base_model=None, hyperparameters: dict,
                  **fields) -> SAEConfig:
    """The SAEConfig of an SAE read from a library's folder: `fields` (architecture, sizes, ...), the block
    (`block_of(folder, block_hint)`), the hook 'update' (the block's output minus its input), `base_model` when
    it is a string, and the hyperparameters as plain JSON values."""
    return SAEConfig(
        block=block_of(folder, block_hint),
        base_model=base_model if isinstance(base_model, str) else None,
        hook="update",
        source_format=source_format,
        hyperparameters=json.loads(json.dumps(hyperparameters, default=str)),
        **fields,
    )


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
