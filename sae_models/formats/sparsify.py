"""Reader of EleutherAI sparsify folders: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`.

`cfg.json` is the SparseCoderConfig plus `d_in`: `activation` ("topk" or "groupmax"), `expansion_factor`,
`normalize_decoder`, `num_latents` (0 = `d_in * expansion_factor`), `k`, `multi_topk`, `skip_connection`,
`transcode` (older versions: no `activation` / `transcode`, and for a while a `signed` flag).
Tensors: `encoder.weight [n, d]`, `encoder.bias [n]`, `W_dec [n, d]`, `b_dec [d]`, and `W_skip [d, d]`
with a skip connection. sparsify computes

    pre = ReLU(encoder(x - b_dec));  codes = the k largest of pre;  x_hat = codes @ W_dec + b_dec

which is the paper's TopK SAE. Transcoders (no `b_dec` subtraction, output predicted from a different
place), skip connections, signed and groupmax activations have no equivalent here and are refused.
The block is read from the hookpoint folder's name (`unet.down_blocks.2.attentions.1`).
"""

from __future__ import annotations

from ..architectures import SparseAutoencoder
from ..errors import SAEFormatError
from .common import (
    assemble,
    load_safetensors,
    positive_int,
    read_json,
    reader_config,
    require,
    sae_folder,
)

NAME = "sparsify"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
KNOWN_TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}


def load(path) -> SparseAutoencoder:
    folder = sae_folder(path)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json(cfg_path)

    activation = cfg.get("activation", "topk")
    if activation == "groupmax":
        raise SAEFormatError(
            cfg_path, "unsupported sparsify activation 'groupmax' (one winner per group of latents); only topk"
        )
    if activation != "topk":
        raise SAEFormatError(cfg_path, f"unknown sparsify activation {activation!r}; only topk is supported")
    if cfg.get("signed"):
        raise SAEFormatError(cfg_path, "unsupported: a signed sparsify SAE (top k by absolute value, no ReLU)")
    if cfg.get("transcode"):
        raise SAEFormatError(
            cfg_path,
            "unsupported: this is a sparsify transcoder (it predicts a module's output from its input); "
            "only autoencoders are supported",
        )
    k = positive_int(cfg_path, cfg, "k")

    tensors, _ = load_safetensors(w_path)
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise SAEFormatError(
            w_path if "W_skip" in tensors else cfg_path,
            "unsupported: this sparsify SAE has a linear skip connection (W_skip), which has no equivalent here",
        )
    unknown = sorted(set(tensors) - KNOWN_TENSORS)
    if unknown:
        raise SAEFormatError(w_path, f"unexpected tensors {unknown} for a sparsify SAE")

    if cfg.get("d_in") is not None:
        d = positive_int(cfg_path, cfg, "d_in")
    else:
        d = int(require(w_path, tensors, "encoder.weight", (None, None)).shape[1])
    if cfg.get("num_latents"):
        n = positive_int(cfg_path, cfg, "num_latents")
    elif cfg.get("expansion_factor") is not None:
        n = d * positive_int(cfg_path, cfg, "expansion_factor")
    else:
        n = int(require(w_path, tensors, "encoder.weight", (None, d)).shape[0])

    hookpoint = folder.resolve().name
    hyper = {key: cfg[key] for key in ("expansion_factor", "num_latents", "normalize_decoder", "multi_topk")
             if key in cfg and isinstance(cfg[key], (int, float, bool))}
    hyper["activation"] = "topk"
    hyper["hookpoint"] = hookpoint
    config = reader_config(NAME, folder, block_hint=hookpoint, hyperparameters=hyper, architecture="topk", d_in=d,
                           n_features=n, k=k, apply_b_dec_to_input=True)
    return assemble(
        w_path,
        config,
        W_enc=require(w_path, tensors, "encoder.weight", (n, d)),
        b_enc=require(w_path, tensors, "encoder.bias", (n,)),
        W_dec=require(w_path, tensors, "W_dec", (n, d)),
        b_dec=require(w_path, tensors, "b_dec", (d,)),
    )
