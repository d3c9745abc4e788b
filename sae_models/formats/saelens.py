"""Reader of SAELens folders: `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`).

Tensors: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, and for jumprelu
`threshold [d_sae]`. SAELens computes

    x' = normalize(x);  pre = (x' - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    standard: ReLU(pre)   topk: ReLU of the k largest of pre   jumprelu: ReLU(pre) * (pre > threshold)
    x_hat = denormalize(codes @ W_dec + b_dec)

Config keys, SAELens >= 6: `architecture` (standard / topk / jumprelu / gated / ... ), `d_in`, `d_sae`, `k`
(topk), `rescale_acts_by_decoder_norm` (topk), `apply_b_dec_to_input`, `normalize_activations`, `dtype`,
and `metadata` {`hook_name`, `model_name`, `sae_lens_version`, ...}. Before 6: `hook_name` (older still:
`hook_point`) at the top level, `activation_fn_str` (or `activation_fn`) `"relu"` / `"topk"` with
`activation_fn_kwargs: {"k": ...}` (a "standard" SAE with a topk activation is a topk SAE),
`finetuning_scaling_factor` with a per-feature `scaling_factor` tensor that multiplies the codes before
decoding, and `normalize_activations` possibly a boolean (true = "expected_average_only_in").

`normalize_activations="expected_average_only_in"` means the SAE was trained on inputs multiplied by a
scaling factor that SAELens does not put in `cfg.json`: final checkpoints have it folded into the weights
(and say "none"); training checkpoints keep it in `activation_scaler.json` (SAELens >= 6,
`{"scaling_factor": ...}`) or in `activations_store_state.safetensors` (`estimated_norm_scaling_factor`,
SAELens 5). Without a recorded factor the SAE cannot be used faithfully, so it is refused.

`sparsity.safetensors` holds `sparsity [d_sae]` = log10(feature frequency + 1e-10); it becomes the
`frequency` statistic.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from ..architectures import SparseAutoencoder
from ..errors import SAEFormatError
from ..metadata import FeatureStats
from .common import (
    assemble,
    load_safetensors,
    open_safetensors,
    positive_int,
    read_json,
    reader_config,
    require,
    sae_folder,
)

NAME = "saelens"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SCALER_FILE = "activation_scaler.json"
STORE_FILE = "activations_store_state.safetensors"

_NORMALIZE = {
    "none": "none",
    "layer_norm": "layer_norm",
    "constant_norm_rescale": "constant_norm_rescale",
    "expected_average_only_in": "scale",
}
_NOT_REPRESENTABLE = {
    "gated": "a gated SAE (separate gate and magnitude paths) has no equivalent here",
    "batchtopk": "this is a SAELens training checkpoint of a batchtopk SAE; SAELens converts it to a "
    "jumprelu SAE for inference (save_inference_model), which this reader can load",
    "matryoshka_batchtopk": "this is a SAELens training checkpoint of a matryoshka batchtopk SAE; SAELens "
    "converts it to a jumprelu SAE for inference (save_inference_model), which this reader can load",
    "transcoder": "a transcoder predicts a module's output from its input; only autoencoders are supported",
    "skip_transcoder": "a transcoder predicts a module's output from its input; only autoencoders are supported",
    "jumprelu_transcoder": "a transcoder predicts a module's output from its input; only autoencoders are supported",
}
# cfg entries worth keeping as provenance (top level or under "metadata")
_KEEP = (
    "sae_lens_version", "sae_lens_training_version", "model_name", "hook_name", "hook_layer", "hook_head_index",
    "dataset_path", "context_size", "dtype", "reshape_activations", "rescale_acts_by_decoder_norm",
    "activation_fn", "l1_coefficient", "lp_norm", "aux_loss_coefficient", "decoder_init_norm",
    "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode", "l0_coefficient",
    "pre_act_loss_coefficient", "neuronpedia_id",
)
# old key names (SAELens < 6, and older still) -> current names
_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
            "hook_point_layer": "hook_layer", "activation_fn_str": "activation_fn"}


def _flat_config(raw: dict) -> dict:
    """Top-level entries with old names renamed, completed by the `metadata` entries (SAELens >= 6)."""
    cfg = {_RENAMES.get(k, k): v for k, v in raw.items()}
    meta = raw.get("metadata")
    if isinstance(meta, dict):
        for k, v in meta.items():
            cfg.setdefault(_RENAMES.get(k, k), v)
    return cfg


def _architecture(cfg_path, cfg: dict) -> tuple[str, int | None]:
    """(our architecture, k) from the SAELens architecture and activation entries."""
    arch = cfg.get("architecture") or "standard"
    if not isinstance(arch, str):
        raise SAEFormatError(cfg_path, f"config key 'architecture' must be a string, not {arch!r}")
    act = cfg.get("activation_fn") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SAEFormatError(cfg_path, f"config key 'activation_fn_kwargs' must be an object, not {kwargs!r}")
    if arch == "standard" and act == "topk":  # SAELens < 6 wrote topk SAEs this way
        arch = "topk"
    if arch in _NOT_REPRESENTABLE:
        raise SAEFormatError(cfg_path, f"unsupported SAELens architecture {arch!r}: {_NOT_REPRESENTABLE[arch]}")
    if arch not in ("standard", "topk", "jumprelu"):
        raise SAEFormatError(
            cfg_path, f"unknown SAELens architecture {arch!r} (supported: standard, topk, jumprelu)"
        )
    if arch == "topk":
        if act not in ("topk", "relu"):
            raise SAEFormatError(cfg_path, f"unsupported activation {act!r} for a topk SAE")
        if kwargs.get("k") is not None:  # SAELens < 6: activation_fn_kwargs wins
            return "topk", positive_int(cfg_path, kwargs, "k")
        return "topk", positive_int(cfg_path, cfg, "k")
    if act != "relu":
        raise SAEFormatError(
            cfg_path, f"unsupported activation function {act!r} for a {arch} SAE (only relu is supported)"
        )
    return ("relu" if arch == "standard" else "jumprelu"), None


def _normalization(cfg_path, cfg: dict) -> str:
    how = cfg.get("normalize_activations")
    if how is None or how is False:
        return "none"
    if how is True:  # SAELens < 6 used a boolean for the April-update scaling
        return "scale"
    if how not in _NORMALIZE:
        raise SAEFormatError(
            cfg_path, f"unknown normalize_activations {how!r} (known: {', '.join(_NORMALIZE)})"
        )
    return _NORMALIZE[how]


def _scaling_factor(folder: Path, cfg_path, cfg: dict) -> tuple[float, str]:
    """The input scaling factor of an `expected_average_only_in` SAE and where it was found."""
    found = []
    scaler = folder / SCALER_FILE
    if scaler.is_file():
        found.append((read_json(scaler).get("scaling_factor"), scaler))
    store = folder / STORE_FILE
    if store.is_file():
        found.append((_read_scalar(store, "estimated_norm_scaling_factor"), store))
    if cfg.get("norm_scaling_factor") is not None:  # the name SAELens's pretrained_saes.yaml uses
        found.append((cfg["norm_scaling_factor"], cfg_path))
    for value, where in found:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise SAEFormatError(where, f"the activation scaling factor must be a positive number, not {value!r}")
        return float(value), Path(where).name
    raise SAEFormatError(
        cfg_path,
        "normalize_activations is 'expected_average_only_in' but the scaling factor is missing: SAELens "
        f"folds it into the weights of finished SAEs and keeps it in {SCALER_FILE} (or, before version 6, "
        f"{STORE_FILE}) for training checkpoints; none of these holds it. For a pretrained release, add its "
        "norm_scaling_factor (listed in SAELens's pretrained_saes.yaml) to cfg.json",
    )


def _read_scalar(path: Path, name: str):
    """One scalar tensor of a safetensors file, or None; the rest of the file is not read."""
    with open_safetensors(path) as f:
        if name not in f.keys():
            return None
        t = f.get_tensor(name)
    if t.numel() != 1:
        raise SAEFormatError(path, f"tensor {name!r} has shape {list(t.shape)}, expected a scalar")
    return float(t.item())


def _frequency(folder: Path, n: int) -> torch.Tensor | None:
    path = folder / SPARSITY_FILE
    if not path.is_file():
        return None
    tensors, _ = load_safetensors(path)
    log_freq = require(path, tensors, "sparsity", (n,)).float()
    return (torch.pow(10.0, log_freq) - 1e-10).clamp_min(0.0)


def load(path) -> SparseAutoencoder:
    folder = sae_folder(path)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    raw = read_json(cfg_path)
    cfg = _flat_config(raw)
    d = positive_int(cfg_path, cfg, "d_in")
    n = positive_int(cfg_path, cfg, "d_sae")
    arch, k = _architecture(cfg_path, cfg)
    normalize = _normalization(cfg_path, cfg)
    input_scale = 1.0
    hyper = {key: cfg[key] for key in _KEEP if key in cfg and isinstance(cfg[key], (str, int, float, bool))}
    hyper["architecture"] = cfg.get("architecture") or "standard"
    hyper["normalize_activations"] = cfg.get("normalize_activations") or "none"
    if normalize == "scale":
        input_scale, source = _scaling_factor(folder, cfg_path, cfg)
        hyper["scaling_factor_source"] = source
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise SAEFormatError(cfg_path, f"config key 'apply_b_dec_to_input' must be true or false, not {apply_b_dec!r}")

    tensors, _ = load_safetensors(w_path)
    W_enc = require(w_path, tensors, "W_enc", (d, n)).T
    b_enc = require(w_path, tensors, "b_enc", (n,))
    W_dec = require(w_path, tensors, "W_dec", (n, d))
    b_dec = require(w_path, tensors, "b_dec", (d,))
    threshold = None
    if arch == "jumprelu":
        if "threshold" in tensors or "log_threshold" not in tensors:
            threshold = require(w_path, tensors, "threshold", (n,))
        else:  # a training SAE's state saved without SAELens's conversion
            threshold = require(w_path, tensors, "log_threshold", (n,)).exp()

    # SAELens < 6: codes are multiplied by a learnt per-feature factor before decoding; fold it into W_dec.
    scale_name = next((s for s in ("finetuning_scaling_factor", "scaling_factor") if s in tensors), None)
    if scale_name is not None:
        s = require(w_path, tensors, scale_name, (n,))
        if not torch.allclose(s, torch.ones_like(s)):
            if not cfg.get("finetuning_scaling_factor"):
                raise SAEFormatError(
                    w_path, f"tensor {scale_name!r} is present but cfg.json says finetuning_scaling_factor is false"
                )
            W_dec = W_dec * s[:, None]
            hyper["finetuning_scaling_factor_folded"] = True

    # topk SAEs trained with rescale_acts_by_decoder_norm choose the top k of `pre * |W_dec_f|` and divide the
    # codes by |W_dec_f| before decoding; folding the norms into W_enc, b_enc and W_dec gives the same codes
    # and reconstructions (what SAELens itself does when saving such an SAE for inference).
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1)
        if (norms == 0).any():
            raise SAEFormatError(w_path, "rescale_acts_by_decoder_norm with a zero row of W_dec cannot be folded")
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
        hyper["decoder_norm_folded"] = True

    config = reader_config(NAME, folder, block_hint=cfg.get("hook_name"), base_model=cfg.get("model_name"),
                           hyperparameters=hyper, architecture=arch, d_in=d, n_features=n, k=k,
                           apply_b_dec_to_input=apply_b_dec, normalize=normalize, input_scale=input_scale)
    stats = FeatureStats(frequency=_frequency(folder, n))
    return assemble(
        w_path, config, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold, stats=stats
    )


# -- writing -----------------------------------------------------------------------------------------
# our architecture -> SAELens's inference architecture (BatchTopK's scalar threshold becomes per-feature)
_SAVED_AS = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu",
             "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
# our normalisation -> SAELens's (`scale` is folded into the weights, so none is left)
_NORMALIZE_SAVED = {"none": "none", "scale": "none", "layer_norm": "layer_norm",
                    "constant_norm_rescale": "constant_norm_rescale"}


def save(sae: SparseAutoencoder, folder) -> Path:
    """Write `sae` as a SAELens (>= 6) inference folder: `cfg.json`, `sae_weights.safetensors` and, when the
    SAE has feature frequencies, `sparsity.safetensors`. BatchTopK and Matryoshka BatchTopK are written as
    SAELens writes them after training, a jumprelu SAE whose per-feature threshold is the scalar one (the
    same codes for a threshold >= 0). A `scale` normalisation is folded into the weights. The folder is
    written beside its place and renamed into it; an existing non-empty folder is refused."""
    from safetensors.torch import save_file

    from ..files import fsync_path, temporary_name

    c = sae.config
    if c.architecture not in _SAVED_AS:
        raise ValueError(f"a {c.architecture} SAE has no SAELens form")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(17, "exists and is not an empty folder, not overwritten", str(folder))
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().float().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if c.normalize == "scale":  # x' = s x: fold s into the encoder, 1/s into the decoder and b_dec
        s = float(c.input_scale)
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    arch = _SAVED_AS[c.architecture]
    tensors = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        t = sae.threshold.detach().float().cpu()
        tensors["threshold"] = t.expand(c.n_features).contiguous() if t.numel() == 1 else t.contiguous()
    cfg = {
        "architecture": arch, "d_in": c.d_in, "d_sae": c.n_features, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": bool(c.apply_b_dec_to_input),
        "normalize_activations": _NORMALIZE_SAVED[c.normalize], "reshape_activations": "none",
        "metadata": {"hook_name": c.block_diffusers or c.block, "model_name": c.base_model,
                     "sae_models_architecture": c.architecture},
    }
    if arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    tmp = temporary_name(folder)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if sae.stats.frequency is not None:
            log_freq = torch.log10(sae.stats.frequency.detach().float().cpu() + 1e-10)
            save_file({"sparsity": log_freq}, str(tmp / SPARSITY_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        for f in tmp.iterdir():
            fsync_path(f)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(folder.parent)
    return folder
