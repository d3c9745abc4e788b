"""Reader of the paper's releases: the SDXL SAEs (surkovv/sdxl-unbox, `checkpoints/<block>_k10_hidden5120_...
/final/`) and the FLUX SAE (the files at the root of the model repo `antoniomari/SAE_flux_18`, or a
`<block>_k20_hidden12288_.../final/` training folder).

`config.json` {n_dirs_local, d_model, k, auxk, dead_steps_threshold}; `state_dict.pth` = torch pickle of
{"state_dict": {encoder.weight [n, d], decoder.weight [d, n], pre_bias [d], latent_bias [n],
stats_last_nonzero [n]}} (or that dict itself); `mean.pt` (and for the SDXL SAEs `std.pt`), per-feature
statistics of active activations. The block is read from a `block` or `hookpoint` key of the config when
there is one, else from the folder's name (`unet.down_blocks.2.attentions.1_k10_...`,
`transformer.transformer_blocks.18_k20_...`, `SAE_flux_18`); where neither names it, `sae_models.load(path,
block=...)` or the node's block choice does.
"""

from __future__ import annotations

from pathlib import Path

from ..architectures import SparseAutoencoder
from ..errors import SAEFormatError
from ..blocks import find_block
from ..metadata import FeatureStats
from .common import assemble, base_model_of, block_of, load_pickle, read_json, reader_config, require

NAME = "paper"
CONFIG_KEYS = ("n_dirs_local", "d_model", "k")


def resolve(path: Path) -> Path | None:
    """The release folder holding config.json and state_dict.pth, or None if `path` is not one."""
    if path.is_file():
        path = path.parent if path.name == "state_dict.pth" else None
        if path is None:
            return None
    for folder in (path, path / "final"):
        if (folder / "config.json").is_file() and (folder / "state_dict.pth").is_file():
            return folder
    return None


def load(path) -> SparseAutoencoder:
    folder = resolve(Path(path))
    if folder is None:
        raise SAEFormatError(path, "not a paper release folder (needs config.json and state_dict.pth)")
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise SAEFormatError(cfg_path, f"missing config keys {missing} of the paper's format")
    n, d, k = int(cfg["n_dirs_local"]), int(cfg["d_model"]), int(cfg["k"])

    sd_path = folder / "state_dict.pth"
    loaded = load_pickle(sd_path)
    sd = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(sd, dict):
        raise SAEFormatError(sd_path, f"expected a dict of tensors, found {type(loaded).__name__}")

    hyper = {key: cfg[key] for key in ("auxk", "dead_steps_threshold") if key in cfg}
    hint = next((cfg[key] for key in ("block", "hookpoint") if isinstance(cfg.get(key), str)), None)
    block = block_of(folder, hint)
    config = reader_config(NAME, folder, block_hint=hint, base_model=base_model_of(find_block(block or "")),
                           hyperparameters=hyper, architecture="topk", d_in=d, n_features=n, k=k,
                           apply_b_dec_to_input=True)
    stats = FeatureStats()
    for name, attr in (("mean.pt", "mean"), ("std.pt", "std")):
        if (folder / name).is_file():
            t = load_pickle(folder / name)
            if not hasattr(t, "shape") or tuple(t.shape) != (n,):
                raise SAEFormatError(folder / name, f"expected a tensor of shape [{n}], found {getattr(t, 'shape', type(t).__name__)}")
            setattr(stats, attr, t.float())
    return assemble(
        sd_path,
        config,
        W_enc=require(sd_path, sd, "encoder.weight", (n, d)),
        b_enc=require(sd_path, sd, "latent_bias", (n,)),
        W_dec=require(sd_path, sd, "decoder.weight", (d, n)).T,
        b_dec=require(sd_path, sd, "pre_bias", (d,)),
        stats=stats,
    )
