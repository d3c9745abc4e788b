"""The SAE value that flows between nodes, and how ComfyUI's memory management sees it."""

from __future__ import annotations

import os

import torch
from torch import nn

import comfy.model_patcher

from ..sae_models import SAEFormatError, SparseAutoencoder
from ..sae_models.labels import LabelError, read_labels
from ..sae_models.stats import features_index_path, read_features_index


class _SAEContainer(nn.Module):
    """What ComfyUI loads and offloads: the SAE plus the `device` attribute ModelPatcher writes to."""

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        self.sae = sae
        self.device = sae.device


class SAEHandle:
    """An SAE loaded by a node (the `SAE` socket type). The module is shared by every MODEL that uses
    it; `patcher()` gives the ModelPatcher through which ComfyUI moves it with the UNet."""

    def __init__(self, sae: SparseAutoencoder, name: str, path: str | None = None):
        # Edits and probes compute in float32 whatever the file stores (an fp16 SAE would round every edited
        # update and could overflow); the UNet's own dtype is left to ComfyUI.
        self.sae = sae.float() if sae.dtype != torch.float32 else sae
        self.name = name
        self.path = path
        self._container = _SAEContainer(sae)
        self._patchers: dict = {}
        self._index: dict | None = None

    def patcher(self, model) -> comfy.model_patcher.ModelPatcher:
        key = (str(model.load_device), str(model.offload_device))
        if key not in self._patchers:
            size = sum(t.numel() * t.element_size() for t in self._container.state_dict().values())
            self._patchers[key] = comfy.model_patcher.ModelPatcher(
                self._container, load_device=model.load_device, offload_device=model.offload_device, size=size
            )
        return self._patchers[key]

    @property
    def mean(self) -> torch.Tensor | None:
        return self.sae.stats.mean

    def features_index(self) -> dict | None:
        """The features index written beside the SAE file by training or `python -m sae_models stats`
        (`<name>.features.json`: each feature's top images), or None when there is none."""
        if self._index is None and self.path:
            path = features_index_path(self.path)
            if os.path.isfile(path):
                try:
                    self._index = read_features_index(path, self.sae.n_features)
                except SAEFormatError:
                    return None  # an unreadable index only means no examples are shown
        return self._index

    def labels(self) -> dict[int, str]:
        """The feature labels kept beside the SAE (`sae_models.labels`); {} when there are none or they cannot
        be read (a bad labels file only means no labels are shown)."""
        if not self.path:
            return {}
        try:
            return read_labels(self.path, self.sae.n_features)
        except LabelError:
            return {}

    def describe(self) -> str:
        c = self.sae.config
        k = f", k={c.k}" if c.k else ""
        return f"{self.name} ({c.architecture}, {c.d_in}->{c.n_features}{k}, block {c.block or '?'})"

    def __repr__(self):
        return f"SAEHandle({self.describe()})"


def display_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))
