"""Temporary re-exports while the node modules move to schema, inputs and models."""

from .errors import NodeInputError, excerpt  # noqa: F401
from .inputs import check_mask, check_strength, parse_features, parse_steps, sigma_range  # noqa: F401
from .models import resolve_block  # noqa: F401
from .schema import AUTO, BLOCK_CHOICES, CATEGORY, SAE, SAE_PROBE, TARGET_CHOICES  # noqa: F401
