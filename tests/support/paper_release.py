"""SAE folders in the exact layout of the paper's release, at the tiny test model's width."""

from __future__ import annotations

import json
from pathlib import Path

import torch

D, N, K = 128, 512, 10  # the tiny model's channels at the paper's blocks; features; k


def _write_release(folder: Path, g: torch.Generator, d: int, n: int, k: int) -> None:
    """config.json, state_dict.pth and mean.pt of the paper's TopK SAE (its training code's names)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"n_dirs_local": n, "d_model": d, "k": k, "auxk": 256, "dead_steps_threshold": 2441}))
    enc = torch.randn(n, d, generator=g) / d ** 0.5
    sd = {"encoder.weight": enc, "decoder.weight": enc.T.clone(), "pre_bias": torch.zeros(d),
          "latent_bias": torch.zeros(n), "stats_last_nonzero": torch.zeros(n, dtype=torch.int64)}
    torch.save({"state_dict": sd}, folder / "state_dict.pth")
    torch.save(torch.rand(n, generator=g) + 0.5, folder / "mean.pt")


def write_paper_release(folder: Path, seed: int):
    """A release folder as the paper ships it: config.json, state_dict.pth, mean.pt, std.pt."""
    g = torch.Generator().manual_seed(seed)
    final = folder / "final"
    _write_release(final, g, D, N, K)
    torch.save(torch.rand(N, generator=g), final / "std.pt")


def write_flux_release(folder: Path, seed: int, d: int = 64, n: int = 256, k: int = 20):
    """The paper's FLUX SAE as its model repo holds it (config.json, state_dict.pth, mean.pt at the root, no
    std.pt), at the tiny FLUX model's width."""
    _write_release(folder, torch.Generator().manual_seed(seed), d, n, k)
