"""The paper's released SAEs and what was published beside them: the folder each is kept in, the hub files
of each feature's top images, and the label set.

    release = recognise("unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001")
    release.top_image_path(327)   # "surokpro2/sdxl_sae_images/resolve/main/down.2.1/327.jpg"
    release.label_set_path()      # the published labels of the block, or None

Paths are relative to a hub (`hub_url()`: Hugging Face, or the mirror named by `HF_ENDPOINT`, as
huggingface_hub reads it). The top-image layouts are the paper's demo's (`model_interfaces.py` of
surkovv/sdxl-unbox): `surokpro2/sdxl_sae_images/<block>/<index>.jpg` for the four SDXL SAEs, and
`datasets/antoniomari/flux_sae_images/flux_18/part<1|2>/<index>.jpg` for the FLUX one (part 1 up to feature
7000). Stdlib only, so that the quick start can read it before torch is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

HF = "https://huggingface.co"
SDXL_RELEASE = "unet.{}_k10_hidden5120_auxk256_bs4096_lr0.0001"
PAPER_SAE_FOLDERS = {
    "down.2.1": SDXL_RELEASE.format("down_blocks.2.attentions.1"),
    "mid.0": SDXL_RELEASE.format("mid_block.attentions.0"),
    "up.0.0": SDXL_RELEASE.format("up_blocks.0.attentions.0"),
    "up.0.1": SDXL_RELEASE.format("up_blocks.0.attentions.1"),
}
FLUX_SAE_FOLDER = "SAE_flux_18"  # the folder name tells the reader the block (double.18)
SDXL_TOP_IMAGES = "surokpro2/sdxl_sae_images"
FLUX_TOP_IMAGES = "datasets/antoniomari/flux_sae_images"
FLUX_PART_1_LAST = 7000
# 20,480 labels of the four SDXL SAEs made by a vision-language model (one JSON array per block of
# {feature_id, label, category, confidence}).
SDXL_LABEL_SET = "datasets/hammamiomar/sdxl-turbo-sae-labels"


def hub_url() -> str:
    """The hub the released files come from: `HF_ENDPOINT` where set (a mirror), else Hugging Face."""
    return (os.environ.get("HF_ENDPOINT") or HF).rstrip("/")


@dataclass(frozen=True)
class Release:
    """One of the paper's released SAEs, by the folder it is kept in."""

    folder: str
    block: str  # the paper's block name: down.2.1, mid.0, up.0.0, up.0.1 or double.18
    top_images: str  # the hub repository of its features' top images
    label_set: str | None  # the hub repository of its published labels, where there is one

    def top_image_path(self, feature: int) -> str:
        if not isinstance(feature, int) or feature < 0:
            raise ValueError(f"feature must be a whole number >= 0, got {feature!r}")
        if self.top_images == FLUX_TOP_IMAGES:
            part = 1 if feature <= FLUX_PART_1_LAST else 2
            return f"{self.top_images}/resolve/main/flux_18/part{part}/{feature}.jpg"
        return f"{self.top_images}/resolve/main/{self.block}/{feature}.jpg"

    def label_set_path(self) -> str | None:
        return f"{self.label_set}/resolve/main/{self.block}.json" if self.label_set else None


RELEASES = {
    **{folder: Release(folder, block, SDXL_TOP_IMAGES, SDXL_LABEL_SET) for block, folder in PAPER_SAE_FOLDERS.items()},
    FLUX_SAE_FOLDER: Release(FLUX_SAE_FOLDER, "double.18", FLUX_TOP_IMAGES, None),
}


def recognise(name: str) -> Release | None:
    """The release kept under the SAE name `name` (a path in the SAE folder; the paper's files may sit in a
    `final/` folder of the release folder), or None."""
    parts = [p for p in str(name).replace("\\", "/").split("/") if p]
    if parts and parts[-1] == "final":
        parts.pop()
    return RELEASES.get(parts[-1]) if parts else None
