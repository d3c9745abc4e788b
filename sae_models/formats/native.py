"""The pack's own format: one `.safetensors` file.

Tensors: `W_enc [n, d]`, `b_enc [n]`, `W_dec [n, d]`, `b_dec [d]`, `threshold` (batchtopk: scalar,
jumprelu: `[n]`), and the optional statistics `stats.mean`, `stats.frequency`, `stats.std` (`[n]`).
Metadata (safetensors header, strings): `format` = `comfyui-sae`, `format_version` = `1`,
`config` = the JSON of `SAEConfig.to_dict()`, `stats_n_vectors` when known.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..architectures import SparseAutoencoder
from ..errors import SAEFormatError
from ..files import atomic_target
from ..metadata import STAT_NAMES, FeatureStats, SAEConfig
from .common import assemble, check_stats, load_safetensors, require

FORMAT_NAME = "comfyui-sae"
FORMAT_VERSION = "1"


def is_native(meta: dict) -> bool:
    return meta.get("format") == FORMAT_NAME


def save(sae: SparseAutoencoder, path) -> Path:
    """Write `sae` to `path` atomically (temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: native SAE files end in .safetensors")
    tensors = {
        "W_enc": sae.W_enc.detach(),
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    for name in sae.extra_tensors:
        tensors[name] = getattr(sae, name).detach()
    tensors.update({k: v.detach() for k, v in sae.stats.tensors().items()})
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(sae.config.to_dict(), sort_keys=True),
    }
    if sae.stats.n_vectors is not None:
        meta["stats_n_vectors"] = str(int(sae.stats.n_vectors))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def from_loaded(path, tensors: dict, meta: dict) -> SparseAutoencoder:
    """Build the SAE from the contents of a native file."""
    _check_header(path, meta)
    config = _config(path, meta)
    stats = FeatureStats(
        **{n: tensors[f"stats.{n}"] for n in STAT_NAMES if f"stats.{n}" in tensors},
        n_vectors=int(meta["stats_n_vectors"]) if "stats_n_vectors" in meta else None,
    )
    n, d = config.n_features, config.d_in
    return assemble(
        path,
        config,
        W_enc=require(path, tensors, "W_enc", (n, d)),
        b_enc=require(path, tensors, "b_enc", (n,)),
        W_dec=require(path, tensors, "W_dec", (n, d)),
        b_dec=require(path, tensors, "b_dec", (d,)),
        threshold=tensors.get("threshold"),
        stats=stats,
    )


def _config(path, meta: dict) -> SAEConfig:
    try:
        return SAEConfig.from_dict(json.loads(meta["config"]))
    except KeyError:
        raise SAEFormatError(path, "metadata has no 'config' entry") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise SAEFormatError(path, f"metadata 'config' is invalid ({e})") from None


def read_summary(path) -> tuple[SAEConfig, FeatureStats]:
    """The configuration and per-feature statistics of a native file, without reading its weights."""
    tensors, meta = load_safetensors(Path(path), select=lambda name: name.startswith("stats."))
    _check_header(path, meta)
    config = _config(path, meta)
    stats = {n: require(path, tensors, f"stats.{n}", (config.n_features,))
             for n in STAT_NAMES if f"stats.{n}" in tensors}
    n = int(meta["stats_n_vectors"]) if "stats_n_vectors" in meta else None
    summary = FeatureStats(**stats, n_vectors=n)
    check_stats(path, summary, config.n_features)
    return config, summary


def _check_header(path, meta: dict) -> None:
    if not is_native(meta):
        raise SAEFormatError(path, f"not a {FORMAT_NAME} file (no 'format' entry in its metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SAEFormatError(path, f"unsupported {FORMAT_NAME} format_version {meta.get('format_version')!r}")


def load(path) -> SparseAutoencoder:
    tensors, meta = load_safetensors(Path(path))
    return from_loaded(path, tensors, meta)
