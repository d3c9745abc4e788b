"""What the pack's nodes share in their schemas: the category, the socket types, and the choices and
inputs several nodes offer."""

from __future__ import annotations

import functools
import inspect
import math

from comfy_api.v0_0_2 import io

from ..sae_models.blocks import SHORT_NAMES
from .errors import NodeInputError, excerpt

CATEGORY = "sae_unbox"
AUTO = "auto (the SAE's block)"
BLOCK_CHOICES = [AUTO, *SHORT_NAMES]
TARGET_CHOICES = ["cond", "uncond", "both"]
# The paper's painting on SDXL base (its `add_feature_on_area_base_both`): add to the cond rows, subtract from
# the uncond rows, so that CFG amplifies the feature.
PAINT_BOTH = "cond +, uncond -"
# The paper's feature icon on SDXL base (its `replace_with_feature_base`): the cond rows' update replaced by the
# feature, the uncond rows' update set to zero (the block returns its input there).
ICON_BASE = "cond, uncond zeroed"
STEER_TARGETS = [*TARGET_CHOICES, PAINT_BOTH, ICON_BASE]
# apply_to choices that go with one steering mode only
TARGET_MODE = {PAINT_BOTH: "add", ICON_BASE: "replace"}

SAE = io.Custom("SAE")
SAE_PROBE = io.Custom("SAE_PROBE")
SAE_DUMP = io.Custom("SAE_DUMP")


def checked_numbers(execute):
    """Decorate a node's `execute` (under `@classmethod`) so that every INT and FLOAT input is checked against
    the bounds its own schema gives, and every FLOAT for NaN and infinity, before the node runs. ComfyUI checks
    a widget's bounds only for a value typed into the widget: a value that arrives through a link (a
    primitive node, another node's output) reaches `execute` unchecked, and NaN passes every comparison."""
    bounds: list = []  # [(node display name, {input id: input})], read from the schema on the first call

    signature = inspect.signature(execute)

    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        inputs = signature.bind(cls, *args, **kwargs).arguments
        del inputs[next(iter(signature.parameters))]  # cls
        if not bounds:
            schema = cls.define_schema()
            bounds.append((schema.display_name, {i.id: i for i in schema.inputs
                                                 if isinstance(i, (io.Int.Input, io.Float.Input))}))
        node, numeric = bounds[0]
        for name, spec in numeric.items():
            if inputs.get(name) is not None:
                inputs[name] = check_number(node, name, inputs[name], spec.min, spec.max,
                                            whole=isinstance(spec, io.Int.Input))
        return execute(cls, **inputs)

    run.checks_numbers = True
    return run


def check_number(node: str, name: str, value, low, high, whole: bool):
    """`value` as an int (`whole`) or a finite float, within [low, high] (a bound of None is no bound)."""
    low = -math.inf if low is None else low
    high = math.inf if high is None else high
    if whole:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and low <= value <= high)
    if not ok:
        kind = "a whole number" if whole else "a finite number"
        raise NodeInputError(node, f"{name} must be {kind} between {_number(low)} and {_number(high)}, "
                                   f"got {excerpt(value)}")
    return value if whole else float(value)


def _number(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
