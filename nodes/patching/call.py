"""What one call of the diffusion model tells the edits, read from the host only: the step (a `StepClock` that the
sampler's own step callback advances), the rows (ComfyUI's `cond_or_uncond`), and a block's input and output as
grids (`BlockView`) that an edit reads and writes in place. Also the base class of every edit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...sae_models.blocks import Block
from ..errors import PUBLIC_MODULE

SIGMA_TOLERANCE = 1e-5
CLOCK = "sae_unbox_step_clock"  # the key of the sampling run's StepClock in transformer_options


class NonFiniteEdit(RuntimeError):
    """An edit turned a block's finite output into inf or NaN (e.g. a float16 overflow)."""

    __module__ = PUBLIC_MODULE


class StepClock:
    """One sampling run's steps, on the host: the schedule (read once, before sampling) and the step in progress,
    advanced by the sampler's step callback, so that a call of the diffusion model knows its step without
    reading a tensor from the device. It also holds the non-finite flags the hooks leave on the device, and
    reads them once per step (one host sync per step, whatever the number of edits)."""

    def __init__(self, sigmas: list[float]):
        self.sigmas = sigmas
        self.step = 0
        self._flags: list[tuple[torch.Tensor, tuple, torch.dtype]] = []

    @property
    def n_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def sigma(self) -> float:
        return self.sigmas[min(self.step, self.n_steps - 1)] if self.n_steps > 0 else math.nan

    def watch(self, peak: torch.Tensor, edits: tuple, dtype: torch.dtype) -> None:
        """Keep a hook's device scalar (the edited output's largest magnitude; inf or NaN when it is not finite)
        until the step ends."""
        self._flags.append((peak, edits, dtype))

    def end_step(self, step: int) -> None:
        """The sampler finished `step`: check its flags (raising NonFiniteEdit for the first block an edit made
        non-finite), then move on."""
        self.check()
        self.step = step + 1

    def check(self) -> None:
        flags, self._flags = self._flags, []
        check_finite(flags)


def check_finite(flags: list) -> None:
    """Raise NonFiniteEdit naming the first of `flags` ((device scalar, edits, dtype), in call order) that is not
    finite. One read from the device for all of them."""
    if not flags:
        return
    ok = torch.isfinite(torch.stack([f.float() for f, _, _ in flags]))
    if bool(ok.all()):
        return
    first = ok.tolist().index(False)
    _, edits, dtype = flags[first]
    raise NonFiniteEdit(non_finite_message(edits, dtype))


def non_finite_message(edits, dtype: torch.dtype) -> str:
    nodes = ", ".join(dict.fromkeys(e.node for e in edits))
    block = edits[0].block
    name = str(dtype).replace("torch.", "")
    limit = f" (the largest {name} is {torch.finfo(dtype).max:.4g})" if dtype.is_floating_point else ""
    return (f"{nodes}: the edit of block {block.short} ({block.comfy}) made the block's output non-finite "
            f"(inf or NaN) in the UNet's {name}{limit}; lower the strength")


@dataclass
class CallInfo:
    """What an edit knows about the current call of the diffusion model (host values only)."""

    sigma: float
    step: int | None  # index in the sampler's schedule, None when unknown
    n_steps: int | None
    row_kind: list[int]  # per batch row: 0 = cond, 1 = uncond (ComfyUI's cond_or_uncond)
    row_image: list[int]  # per batch row: index of the image within its cond/uncond chunk
    schedule: object = None  # the sampler's sigmas tensor; a new object means a new sampling run
    clock: StepClock | None = field(default=None, repr=False)

    def rows(self, target: str) -> list[int]:
        if target == "both":
            return list(range(len(self.row_kind)))
        want = 0 if target == "cond" else 1
        return [r for r, k in enumerate(self.row_kind) if k == want]

    def row_runs(self, target: str) -> list[slice]:
        """The rows of `target` as runs of consecutive rows (ComfyUI batches each cond/uncond chunk in one
        piece, so there is usually one): slices select them without an index tensor."""
        return runs(self.rows(target))

    @classmethod
    def from_call(cls, x: torch.Tensor, transformer_options: dict) -> "CallInfo":
        """From the host's view of the call: the StepClock the sampling run put in `transformer_options`, and
        `cond_or_uncond`. Without a clock (the model called outside ComfyUI's samplers) the step is found by
        reading the call's sigma from the device."""
        clock = transformer_options.get(CLOCK)
        schedule = transformer_options.get("sample_sigmas")
        if isinstance(clock, StepClock):
            sigma, step, n_steps = clock.sigma, min(clock.step, max(clock.n_steps - 1, 0)), clock.n_steps
        else:
            sigma, step, n_steps = _step_from_device(transformer_options.get("sigmas"), schedule)
            clock = None
        batch = x.shape[0]
        chunks = list(transformer_options.get("cond_or_uncond") or [0])
        per_chunk = max(batch // len(chunks), 1)
        row_kind = [chunks[min(r // per_chunk, len(chunks) - 1)] for r in range(batch)]
        row_image = [r % per_chunk for r in range(batch)]
        return cls(sigma, step, n_steps, row_kind, row_image, schedule, clock)


def _step_from_device(sigmas, schedule) -> tuple[float, int | None, int | None]:
    sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else math.nan
    if isinstance(schedule, torch.Tensor) and schedule.numel() > 1 and not math.isnan(sigma):
        return sigma, int((schedule[:-1].float().cpu() - sigma).abs().argmin()), schedule.numel() - 1
    return sigma, None, None


def runs(rows: list[int]) -> list[slice]:
    """[0, 1, 2, 5, 6] -> [slice(0, 3), slice(5, 7)]."""
    out: list[slice] = []
    for r in rows:
        if out and out[-1].stop == r:
            out[-1] = slice(out[-1].start, r + 1)
        else:
            out.append(slice(r, r + 1))
    return out


class BlockView:
    """One call of one hooked block: its input and output as grids `[B, h, w, C]`. `out` is a view into the
    block's own output, so an edit that writes into it edits the output in place (positions it does not write
    keep their exact values). `update()` is the output minus the input, in float32 for half-precision models,
    computed when first asked for and again after a write."""

    def __init__(self, x_in: torch.Tensor | None, out: torch.Tensor):
        self.x_in, self.out = x_in, out
        self.work = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
        self._update: torch.Tensor | None = None

    def update(self) -> torch.Tensor:
        if self.x_in is None:
            raise RuntimeError("the block's input was not kept: an edit that reads it must say so (reads_input)")
        if self._update is None:
            self._update = self.out.to(self.work) - self.x_in.to(self.work)
        return self._update

    def add_(self, rows: slice, delta: torch.Tensor, alpha: float = 1.0) -> None:
        """Add `delta` (broadcast to `out[rows]`) into the output, in one operation."""
        self.out[rows].add_(delta.to(self.out.dtype), alpha=alpha)
        self._update = None

    def addcmul_(self, rows: slice, weights: torch.Tensor, vector: torch.Tensor, value: float = 1.0) -> None:
        """Add `value * weights * vector` (`[n, h, w, 1]` times `[C]`) into the output, in one operation."""
        self.out[rows].addcmul_(weights, vector, value=value)
        self._update = None

    def copy_(self, rows: slice, source: torch.Tensor) -> None:
        """Set the output to `source` (e.g. the block's input: an update of zero), in one operation."""
        self.out[rows].copy_(source)
        self._update = None

    def set_(self, rows: slice, base: torch.Tensor, vector: torch.Tensor) -> None:
        """Set the output to `base + vector` (the block's input plus a new update), in one operation."""
        torch.add(base, vector, out=self.out[rows])
        self._update = None

    def lerp_(self, rows: slice, target: torch.Tensor, weights: torch.Tensor) -> None:
        """Move the output towards `target` by `weights` (`[n, h, w, 1]`), in one operation."""
        self.out[rows].lerp_(target, weights)
        self._update = None


@dataclass(frozen=True, eq=False)
class Edit:
    """Base of everything that hooks a block.

    `target` picks cond, uncond or both rows; an edit is active while `sigma_end < sigma <= sigma_start`
    (the nodes derive these from start/end percent with the model's own sampling schedule). An edit implements
    `apply_view(view, info)` (read or write the block through a BlockView; return True when it wrote), or the
    simpler `apply(update, info)` (return an edited update, or None).
    """

    block: Block
    target: str = "cond"
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    node: str = "SAE Unbox"  # the node that made the edit, named in run-time errors

    def reads_input(self) -> bool:
        """Whether the edit needs the block's input (to read the update, or to write relative to it). A block
        whose edits need none is not copied before it runs (FLUX blocks overwrite their input)."""
        return True

    def active(self, info: CallInfo) -> bool:
        """In the edit's range: from `sigma_start` (included) down to `sigma_end` (excluded), as the paper's
        step indices run from a start step to an end step that is not edited; a step whose sigma equals a
        bound up to float rounding (1e-5) counts as on it."""
        if math.isnan(info.sigma):
            return True
        slack = 1.0 + SIGMA_TOLERANCE
        return self.sigma_end * slack < info.sigma <= self.sigma_start * slack

    def sae_handles(self) -> tuple:
        """The SAEs this edit uses (attached to the MODEL so ComfyUI manages their memory)."""
        return ()

    def apply_view(self, view: BlockView, info: CallInfo) -> bool:
        update = view.update()
        new = self.apply(update, info)
        if new is None:
            return False
        view.add_(slice(None), new - update)
        return True

    def apply(self, update: torch.Tensor, info: CallInfo) -> torch.Tensor | None:
        """Given the block's update `[B, H, W, C]`, return the edited update, or None for no change."""
        raise NotImplementedError
