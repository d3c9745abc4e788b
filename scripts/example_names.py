"""The example workflows' file names. ComfyUI's Templates dialog shows a custom node's template by its file
name only (frontend 1.35 of ComfyUI v0.8.0: the name is the card's title, and again, with '-' and '_' read as
spaces, its description; the newest server lists names only), so each file is named by what it does.
Code names a workflow by its short key: `example_path("explore")`."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "example_workflows"
TITLES = {
    "explore": "Explore SDXL Turbo features, heatmaps and top features",
    "paint": "Paint a feature into a region",
    "feature_icon": "Feature icon, what one feature draws alone",
    "ablate": "Ablate features, remove what they add",
    "reconstruct": "Reconstruct a block through its SAE",
    "dump": "Dump activations, the training data of an SAE",
    "train": "Train an SAE and steer with it",
    "flux_explore": "FLUX explore, features of double block 18",
    "flux_paint": "FLUX paint a feature into a region",
    "sdxl_base_paint": "SDXL base paint with guidance",
    "workbench": "Workbench, click paint and find features in the SAE tab",
}


def example_path(key: str, suffix: str = ".json") -> Path:
    """The file of the example workflow `key` (or its thumbnail, with suffix '.jpg')."""
    return FOLDER / f"{TITLES[key]}{suffix}"
