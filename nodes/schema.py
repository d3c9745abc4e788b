"""What the pack's nodes share in their schemas: the category, the socket types, and the choices and
inputs several nodes offer."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..sae_models.blocks import SHORT_NAMES

CATEGORY = "sae_unbox"
AUTO = "auto (the SAE's block)"
BLOCK_CHOICES = [AUTO, *SHORT_NAMES]
TARGET_CHOICES = ["cond", "uncond", "both"]
# The paper's painting on SDXL base (its `add_feature_on_area_base_both`): add to the cond rows, subtract from
# the uncond rows, so that CFG amplifies the feature.
PAINT_BOTH = "cond +, uncond -"
STEER_TARGETS = [*TARGET_CHOICES, PAINT_BOTH]

SAE = io.Custom("SAE")
SAE_PROBE = io.Custom("SAE_PROBE")
SAE_DUMP = io.Custom("SAE_DUMP")
