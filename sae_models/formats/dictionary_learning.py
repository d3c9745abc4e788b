"""Reader of saprmarks/dictionary_learning folders: `config.json` + `ae.pt`.

`config.json` = {"trainer": {dict_class, trainer_class, activation_dim, dict_size, k, lm_name, layer,
submodule_name, ...}, "buffer": {...}}; `ae.pt` = the dictionary's state_dict (a weights-only pickle).
What each class computes (its `encode` / `decode`), and what it becomes here:

- AutoEncoder: `ReLU(encoder(x - bias))`, `decoder(f) + bias`; tensors `bias [d]`, `encoder.weight [n, d]`,
  `encoder.bias [n]`, `decoder.weight [d, n]` -> relu. The library's loader (`from_pretrained`, used by
  `utils.load_dictionary`) rescales decoder columns to unit norm and the encoder rows and bias by the same
  norms, which keeps the reconstruction and rescales the codes; this reader does the same.
- AutoEncoderNew: `ReLU(encoder(x))`, `decoder(f)` with `decoder.bias [d]` -> relu, b_dec not subtracted.
- AutoEncoderTopK: `TopK_k(ReLU(encoder(x - b_dec)))`, `decoder(f) + b_dec`; tensors `encoder.*`,
  `decoder.weight [d, n]`, `b_dec [d]`, `k`, `threshold` (tracked, unused by `encode`) -> topk.
- BatchTopKSAE: at inference `ReLU(pre) * (ReLU(pre) > threshold)` with one scalar `threshold` -> batchtopk.
- MatryoshkaBatchTopKSAE: the same with `W_enc [d, n]`, `b_enc`, `W_dec [n, d]`, `b_dec`, `group_sizes`
  (all groups active once loaded) -> batchtopk.
- JumpReluAutoEncoder: `ReLU(pre * (pre > threshold))` with `pre = x @ W_enc + b_enc` (its
  `apply_b_dec_to_input` is False unless converted from SAELens), `f @ W_dec + b_dec` -> jumprelu.
- GatedAutoEncoder: separate gate and magnitude paths, no equivalent here: refused.

When training normalises activations, the library folds the factor into the biases before writing the
final `ae.pt`, so the file works on raw activations. An `ae.pt` written as a mid-training backup
({"step", "ae", "optimizer", ...}) is not a finished SAE and is refused.
"""

from __future__ import annotations

import torch

from ..architectures import SparseAutoencoder
from ..errors import SAEFormatError
from .common import assemble, load_pickle, positive_int, read_json, reader_config, require, sae_folder

NAME = "dictionary_learning"
CFG_FILE = "config.json"
WEIGHTS_FILE = "ae.pt"

_ARCH = {
    "AutoEncoder": "relu",
    "AutoEncoderNew": "relu",
    "AutoEncoderTopK": "topk",
    "BatchTopKSAE": "batchtopk",
    "MatryoshkaBatchTopKSAE": "batchtopk",
    "JumpReluAutoEncoder": "jumprelu",
}
_KEEP = (
    "trainer_class", "dict_class", "lm_name", "layer", "submodule_name", "lr", "steps", "seed", "l1_penalty",
    "sparsity_penalty", "auxk_alpha", "threshold_beta", "threshold_start_step", "top_k_aux", "bandwidth",
    "target_l0", "warmup_steps", "sparsity_warmup_steps", "decay_start", "resample_steps", "group_sizes",
    "group_fractions", "group_weights",
)


def _k(cfg_path, sd_path, trainer: dict, sd: dict) -> int:
    """k from the config and/or the state dict's `k` buffer; both must agree when both are present."""
    k_sd = None
    if "k" in sd:
        t = require(sd_path, sd, "k")
        if t.numel() != 1:
            raise SAEFormatError(sd_path, f"tensor 'k' has shape {list(t.shape)}, expected a scalar")
        k_sd = int(t.item())
    if trainer.get("k") is None:
        if k_sd is None:
            raise SAEFormatError(cfg_path, "missing config key 'trainer.k' (and no 'k' tensor in ae.pt)")
        return k_sd
    k = positive_int(cfg_path, trainer, "k", prefix="trainer.")
    if k_sd is not None and k_sd != k:
        raise SAEFormatError(sd_path, f"tensor 'k' is {k_sd} but config.json says trainer.k={k}")
    return k


def _scalar_threshold(sd_path, sd: dict, dict_class: str) -> torch.Tensor:
    if "threshold" not in sd:
        raise SAEFormatError(
            sd_path,
            f"missing tensor 'threshold': this {dict_class} has no inference threshold (older versions of the "
            "library chose the top k * batch activations of a whole batch, which depends on the batch)",
        )
    t = require(sd_path, sd, "threshold")
    if t.numel() != 1:
        raise SAEFormatError(sd_path, f"tensor 'threshold' has shape {list(t.shape)}, expected a scalar")
    return t.reshape(())


def _dict_class(cfg_path, trainer: dict, sd: dict) -> str:
    name = trainer.get("dict_class")
    if name is None:
        # configs older than the `dict_class` entry only had the standard AutoEncoder
        if {"bias", "encoder.weight", "decoder.weight"} <= set(sd):
            return "AutoEncoder"
        raise SAEFormatError(cfg_path, "missing config key 'trainer.dict_class'")
    if not isinstance(name, str):
        raise SAEFormatError(cfg_path, f"config key 'trainer.dict_class' must be a string, not {name!r}")
    if name == "GatedAutoEncoder":
        raise SAEFormatError(
            cfg_path, "unsupported dictionary class 'GatedAutoEncoder': a gated SAE (separate gate and magnitude "
            "paths) has no equivalent here"
        )
    if name not in _ARCH:
        raise SAEFormatError(
            cfg_path, f"unknown dictionary class {name!r} (supported: {', '.join(_ARCH)})"
        )
    return name


def load(path) -> SparseAutoencoder:
    folder = sae_folder(path)
    cfg_path, sd_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json(cfg_path)
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict):
        raise SAEFormatError(cfg_path, "missing config key 'trainer' (an object describing the dictionary)")
    d = positive_int(cfg_path, trainer, "activation_dim", prefix="trainer.")
    n = positive_int(cfg_path, trainer, "dict_size", prefix="trainer.")

    sd = load_pickle(sd_path)
    if not isinstance(sd, dict):
        raise SAEFormatError(sd_path, f"expected a state_dict (a dict of tensors), found {type(sd).__name__}")
    if "ae" in sd and "optimizer" in sd:
        raise SAEFormatError(
            sd_path,
            "this is a mid-training backup (step, ae, optimizer, ...), not a finished SAE: its biases are in "
            "normalised units; the library overwrites ae.pt with the final state_dict when training ends",
        )
    dict_class = _dict_class(cfg_path, trainer, sd)
    arch = _ARCH[dict_class]
    hyper = {key: trainer[key] for key in _KEEP if key in trainer}
    hyper["dict_class"] = dict_class
    buffer = cfg.get("buffer")
    if isinstance(buffer, dict) and "io" in buffer:
        hyper["buffer_io"] = buffer["io"]

    k = None
    threshold = None
    apply_b_dec = True
    if dict_class == "AutoEncoder":
        W_enc = require(sd_path, sd, "encoder.weight", (n, d))
        b_enc = require(sd_path, sd, "encoder.bias", (n,))
        W_dec = require(sd_path, sd, "decoder.weight", (d, n)).T
        b_dec = require(sd_path, sd, "bias", (d,))
        # as AutoEncoder.from_pretrained(normalize_decoder=True): unit decoder columns, codes rescaled
        norms = W_dec.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms)):
            if (norms == 0).any():
                raise SAEFormatError(sd_path, "decoder.weight has a zero column; it cannot be normalised")
            W_dec = W_dec / norms[:, None]
            W_enc = W_enc * norms[:, None]
            b_enc = b_enc * norms
            hyper["decoder_normalized_on_load"] = True
    elif dict_class == "AutoEncoderNew":
        W_enc = require(sd_path, sd, "encoder.weight", (n, d))
        b_enc = require(sd_path, sd, "encoder.bias", (n,))
        W_dec = require(sd_path, sd, "decoder.weight", (d, n)).T
        b_dec = require(sd_path, sd, "decoder.bias", (d,))
        apply_b_dec = False
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        W_enc = require(sd_path, sd, "encoder.weight", (n, d))
        b_enc = require(sd_path, sd, "encoder.bias", (n,))
        W_dec = require(sd_path, sd, "decoder.weight", (d, n)).T
        b_dec = require(sd_path, sd, "b_dec", (d,))
        k = _k(cfg_path, sd_path, trainer, sd)
        if dict_class == "BatchTopKSAE":
            threshold = _scalar_threshold(sd_path, sd, dict_class)
        elif "threshold" in sd:
            hyper["threshold"] = float(require(sd_path, sd, "threshold").reshape(-1)[0])
    elif dict_class == "MatryoshkaBatchTopKSAE":
        W_enc = require(sd_path, sd, "W_enc", (d, n)).T
        b_enc = require(sd_path, sd, "b_enc", (n,))
        W_dec = require(sd_path, sd, "W_dec", (n, d))
        b_dec = require(sd_path, sd, "b_dec", (d,))
        k = _k(cfg_path, sd_path, trainer, sd)
        threshold = _scalar_threshold(sd_path, sd, dict_class)
        groups = require(sd_path, sd, "group_sizes", (None,))
        if int(groups.sum()) != n:
            raise SAEFormatError(sd_path, f"group_sizes sum to {int(groups.sum())}, not dict_size={n}")
        hyper["group_sizes"] = [int(g) for g in groups.tolist()]
    else:  # JumpReluAutoEncoder
        W_enc = require(sd_path, sd, "W_enc", (d, n)).T
        b_enc = require(sd_path, sd, "b_enc", (n,))
        W_dec = require(sd_path, sd, "W_dec", (n, d))
        b_dec = require(sd_path, sd, "b_dec", (d,))
        threshold = require(sd_path, sd, "threshold", (n,))
        apply_b_dec = False

    config = reader_config(NAME, folder, block_hint=trainer.get("submodule_name"), base_model=trainer.get("lm_name"),
                           hyperparameters=hyper, architecture=arch, d_in=d, n_features=n, k=k,
                           apply_b_dec_to_input=apply_b_dec)
    return assemble(
        sd_path, config, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold
    )
