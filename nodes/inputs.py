"""Widget values checked and converted: feature lists, strengths, step lists, step ranges and masks.

Every error names the node and what is wrong, and is raised when the node runs, before the sampler that
uses its MODEL starts."""

from __future__ import annotations

import math
import re

import torch

from .errors import NodeInputError, excerpt

_FEATURE = re.compile(r"^\s*(\d+)\s*(?::\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?\s*$")
STRENGTH_LIMIT = 1000.0  # the strength widget's bound, also for per-feature strengths


def check_strength(node: str, name: str, value: float) -> float:
    """A finite strength within the widget's bounds (JSON lets a workflow hold NaN or 1e999)."""
    value = float(value)
    if not math.isfinite(value) or abs(value) > STRENGTH_LIMIT:
        raise NodeInputError(node, f"{name} must be a finite number between {-STRENGTH_LIMIT:g} and "
                                   f"{STRENGTH_LIMIT:g}, got {value!r}")
    return value


def parse_features(node: str, text: str, n_features: int, default: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """'12, 345:2.5' -> ((12, 345), (default, 2.5)). Every index is checked against the SAE's size and every
    strength against the strength widget's bounds."""
    features, strengths, seen = [], [], set()
    for item in re.split(r"[,;\s]+", re.sub(r"\s*:\s*", ":", text or "")):
        if not item:
            continue
        m = _FEATURE.match(item)
        if not m:
            raise NodeInputError(node, f"cannot read feature {excerpt(item)}; write indices like '12, 345:2.5'")
        f = int(m.group(1))
        if f >= n_features:
            raise NodeInputError(node, f"feature {excerpt(f)} is out of range: the SAE has features 0..{n_features - 1}")
        if f in seen:
            raise NodeInputError(node, f"feature {f} is listed twice in features {excerpt(text)}")
        seen.add(f)
        features.append(f)
        strengths.append(check_strength(node, f"the strength of feature {f}", m.group(2)) if m.group(2) else default)
    if not features:
        raise NodeInputError(node, "no feature given")
    return tuple(features), tuple(strengths)


def check_mask(node: str, mask) -> torch.Tensor | None:
    """A MASK as `[B, H, W]` float32 in [0, 1]. Takes the shapes ComfyUI's mask nodes make (`[H, W]`,
    `[B, H, W]`, `[B, 1, H, W]`); anything else, an empty mask or a non-finite value is refused."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise NodeInputError(node, f"mask is a {type(mask).__name__}, not a MASK tensor")
    shape = tuple(mask.shape)
    if mask.dim() == 4 and shape[1] == 1:
        mask = mask[:, 0]
    elif mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise NodeInputError(node, f"mask has shape {list(shape)}; a MASK is [H, W], [B, H, W] or [B, 1, H, W]")
    if mask.numel() == 0:
        raise NodeInputError(node, f"mask has shape {list(shape)}, with no pixels")
    mask = mask.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(mask).all()):
        raise NodeInputError(node, "mask holds non-finite values (NaN or inf)")
    return mask.clamp(0.0, 1.0)


def sigma_range(node: str, model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """Convert a start/end percent of denoising into sigmas with the model's own schedule. The steps from
    start_percent up to, not including, end_percent are edited (end_percent 1 reaches the last step), as
    the paper's start and end step indices select steps start <= i < end."""
    if not (0.0 <= start_percent < end_percent <= 1.0):
        raise NodeInputError(node, f"need 0 <= start_percent < end_percent <= 1, got {start_percent}, {end_percent}")
    ms = model.get_model_object("model_sampling")
    start = math.inf if start_percent <= 0.0 else float(ms.percent_to_sigma(start_percent))
    end = 0.0 if end_percent >= 1.0 else float(ms.percent_to_sigma(end_percent))
    return start, end


MAX_STEP = 10_000
MAX_STEPS_TEXT = 1000  # characters in a step list
MAX_STEP_PARTS = 64  # steps and ranges in a step list


def check_length(node: str, name: str, text, limit: int):
    """`text` unchanged, or an error naming the input when it is longer than `limit` characters (checked before
    anything reads it, so a megabyte in a widget costs nothing)."""
    if isinstance(text, str) and len(text) > limit:
        raise NodeInputError(node, f"{name} holds {len(text):,} characters, more than {limit:,}: {excerpt(text)}")
    return text


def parse_steps(node: str, text: str) -> frozenset | None:
    """'all' -> None; '0, 2-4' -> {0, 2, 3, 4}. At most MAX_STEP_PARTS steps or ranges, every one read before
    any range is expanded."""
    text = (check_length(node, "steps", text, MAX_STEPS_TEXT) or "").strip().lower()
    if text in ("", "all", "*"):
        return None
    parts = re.split(r"[,\s]+", text)
    if len(parts) > MAX_STEP_PARTS:
        raise NodeInputError(node, f"steps lists {len(parts)} steps or ranges, more than {MAX_STEP_PARTS}: {excerpt(text)}")
    ranges = []
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise NodeInputError(node, f"cannot read steps {excerpt(text)}; write 'all' or e.g. '0, 2-4'")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if a > b or b > MAX_STEP:
            raise NodeInputError(node, f"steps {excerpt(part)}: a range runs from low to high, at most to {MAX_STEP}")
        ranges.append(range(a, b + 1))
    return frozenset(step for r in ranges for step in r)
