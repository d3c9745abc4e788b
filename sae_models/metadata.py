"""What an SAE file says about the SAE besides its weights: configuration, provenance and feature statistics."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocks import find_block

HOOKS = ("update", "output", "input")
STREAMS = ("image", "text")
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale", "scale")


@dataclass
class SAEConfig:
    """Configuration and provenance of an SAE.

    `hook` says what the SAE reads: `update` (block output minus block input, the paper's choice),
    `output` or `input` of the block; `stream` which tokens of it: `image` (SDXL's blocks have no other;
    FLUX's image stream, as the paper's FLUX SAE) or `text`. `block` is the short name (`down.2.1`,
    `double.18`); the architecture and the ComfyUI and diffusers names are derived from it. `normalize` describes what is done to an input before encoding
    (and undone after decoding): `none`; `layer_norm` (per-vector centring and scaling, as SAELens);
    `constant_norm_rescale` (each vector scaled to norm sqrt(d_in)); `scale` (multiply by `input_scale`).
    """

    architecture: str
    d_in: int
    n_features: int
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize: str = "none"
    input_scale: float = 1.0
    block: str | None = None
    base_model: str | None = None
    hook: str = "update"
    stream: str = "image"
    source_format: str = "native"
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.hook not in HOOKS:
            raise ValueError(f"hook must be one of {HOOKS}, not {self.hook!r}")
        if self.stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, not {self.stream!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {self.normalize!r}")
        if self.block is not None:
            b = find_block(self.block)
            if b is not None:
                self.block = b.short

    @property
    def block_arch(self) -> str | None:
        """The architecture of the block (`sdxl`, `flux`), or None when the block is not known."""
        b = find_block(self.block) if self.block else None
        return b.arch if b else None

    @property
    def block_comfy(self) -> str | None:
        b = find_block(self.block) if self.block else None
        return b.comfy if b else None

    @property
    def block_diffusers(self) -> str | None:
        b = find_block(self.block) if self.block else None
        return b.diffusers if b else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_arch"] = self.block_arch
        d["block_comfy"] = self.block_comfy
        d["block_diffusers"] = self.block_diffusers
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


STAT_NAMES = ("mean", "frequency", "std")


@dataclass
class FeatureStats:
    """Per-feature statistics over a data set.

    `mean` and `std`: mean and standard deviation of the feature's activation where it is active (> 0),
    the unit of steering strength; `frequency`: fraction of vectors where it is active.
    Any of them may be missing.
    """

    mean: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    std: torch.Tensor | None = None
    n_vectors: int | None = None

    def present(self) -> list[str]:
        return [n for n in STAT_NAMES if getattr(self, n) is not None]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"stats.{n}": getattr(self, n) for n in self.present()}
