"""The pack's one patching mechanism.

Every probing, steering and dumping node adds an *edit* to a MODEL through `attach_edit`. The edits of a
MODEL live in one immutable `BlockPatch`, registered on the ModelPatcher as a keyed DIFFUSION_MODEL
wrapper. For the duration of one call of the diffusion model (SDXL's UNet, FLUX's transformer), the
wrapper puts a forward hook on each transformer block that has edits; the hook reads the block's input
and output as a grid of image positions (`block_io`), hands the update (output minus input; in float32
for half-precision models) to the edits in the order they were added, and returns the output plus what
the edits changed (so what no edit touched keeps its exact value). The hooks are removed in `finally`,
so none survives the call, an exception or an interrupt.

A ModelPatcher clone shares the wrapper object (ComfyUI copies wrapper lists shallowly), and adding an
edit builds a new BlockPatch on the new clone only, so the parent MODEL and its other clones are never
affected. SAE weights are referenced, not copied; they are attached as additional models so that
ComfyUI moves them to the sampling device with the UNet and offloads them after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from comfy.patcher_extension import WrappersMP

from ..sae_models.blocks import Block
from .block_io import IO_BY_KIND, Layout
from .errors import PUBLIC_MODULE

KEY = "comfyui-sae-unbox"
SIGMA_TOLERANCE = 1e-5


@dataclass
class CallInfo:
    """What an edit knows about the current UNet call."""

    sigma: float
    step: int | None  # index in the sampler's schedule, None when unknown
    n_steps: int | None
    row_kind: list[int]  # per batch row: 0 = cond, 1 = uncond (ComfyUI's cond_or_uncond)
    row_image: list[int]  # per batch row: index of the image within its cond/uncond chunk
    schedule: object = None  # the sampler's sigmas tensor; a new object means a new sampling run

    def rows(self, target: str) -> list[int]:
        if target == "both":
            return list(range(len(self.row_kind)))
        want = 0 if target == "cond" else 1
        return [r for r, k in enumerate(self.row_kind) if k == want]

    @classmethod
    def from_call(cls, x: torch.Tensor, transformer_options: dict) -> "CallInfo":
        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else math.nan
        schedule = transformer_options.get("sample_sigmas")
        step = n_steps = None
        if isinstance(schedule, torch.Tensor) and schedule.numel() > 1 and not math.isnan(sigma):
            n_steps = schedule.numel() - 1
            step = int((schedule[:-1].float().cpu() - sigma).abs().argmin())
        batch = x.shape[0]
        chunks = list(transformer_options.get("cond_or_uncond") or [0])
        per_chunk = max(batch // len(chunks), 1)
        row_kind = [chunks[min(r // per_chunk, len(chunks) - 1)] for r in range(batch)]
        row_image = [r % per_chunk for r in range(batch)]
        return cls(sigma, step, n_steps, row_kind, row_image, schedule)


@dataclass(frozen=True, eq=False)
class Edit:
    """Base of everything that hooks a block. Subclasses implement `apply`.

    `target` picks cond, uncond or both rows; an edit is active while `sigma_end < sigma <= sigma_start`
    (the nodes derive these from start/end percent with the model's own sampling schedule).
    """

    block: Block
    target: str = "cond"
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    node: str = "SAE Unbox"  # the node that made the edit, named in run-time errors

    # Edits that also read the block's input (e.g. dumps of inputs/outputs) set this; their `apply`
    # then gets `block_input=` the block's input `[B, H, W, C]` as a keyword.
    needs_block_input = False

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

    def apply(self, update: torch.Tensor, info: CallInfo) -> torch.Tensor | None:
        """Given the block's update `[B, H, W, C]`, return the edited update, or None for no change."""
        raise NotImplementedError


@dataclass(frozen=True)
class BlockPatch:
    """The DIFFUSION_MODEL wrapper: an immutable tuple of edits, grouped by block when called."""

    edits: tuple[Edit, ...] = ()
    _by_block: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for e in self.edits:
            self._by_block.setdefault(e.block.comfy, []).append(e)

    def __call__(self, executor, x, *args, **kwargs):
        transformer_options = _find_transformer_options(args, kwargs)
        info = CallInfo.from_call(x, transformer_options)
        model = executor.class_obj
        # (x, timesteps, context, ...) for SDXL's UNet and FLUX alike
        layout = Layout.of_call(model, x, args[1] if len(args) > 1 else kwargs.get("context"))
        handles = []
        try:
            for path, edits in self._by_block.items():
                module = model.get_submodule(path)
                hook = _BlockHook(edits, info, IO_BY_KIND[edits[0].block.kind], layout)
                if hook.io.needs_copy:
                    handles.append(module.register_forward_pre_hook(hook.before, with_kwargs=True))
                handles.append(module.register_forward_hook(hook.after, with_kwargs=True))
            return executor(x, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()


class NonFiniteEdit(RuntimeError):
    """An edit turned a block's finite output into inf or NaN (e.g. a float16 overflow)."""

    __module__ = PUBLIC_MODULE


class _BlockHook:
    def __init__(self, edits, info: CallInfo, io, layout: Layout):
        self.edits, self.info, self.io, self.layout = edits, info, io, layout
        self.saved = None

    def before(self, module, args, kwargs):
        self.saved = self.io.capture(args, kwargs, self.layout)  # the block may overwrite its input
        return None

    def after(self, module, args, kwargs, output):
        saved, self.saved = self.saved, None
        x_in, out = self.io.grids(saved, args, kwargs, output, self.layout)  # [B, h, w, C]
        # Half-precision models: the edits see the update in float32 (the exact difference of two halves).
        work = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
        original = out.to(work) - x_in.to(work)
        update, changed_by = original, []
        for edit in self.edits:
            if not edit.active(self.info):
                continue
            if edit.needs_block_input:
                new = edit.apply(update, self.info, block_input=x_in)
            else:
                new = edit.apply(update, self.info)
            if new is not None:
                update = new
                changed_by.append(edit)
        if not changed_by:
            return None  # leave the block's output untouched (bit-identical)
        # The output plus what the edits changed: positions no edit touched keep their exact output values.
        delta = update - original
        edited = out + delta.to(out.dtype)
        if not bool(torch.isfinite(edited).all()) and bool(torch.isfinite(out).all()):
            raise NonFiniteEdit(_non_finite_message(changed_by, out.dtype))
        return self.io.write(output, delta, self.layout)


def _non_finite_message(edits, dtype: torch.dtype) -> str:
    nodes = ", ".join(dict.fromkeys(e.node for e in edits))
    block = edits[0].block
    limit = f" (the largest {str(dtype).replace('torch.', '')} is {torch.finfo(dtype).max:.4g})" \
        if dtype.is_floating_point else ""
    return (f"{nodes}: the edit of block {block.short} ({block.comfy}) made the block's output non-finite "
            f"(inf or NaN) in the UNet's {str(dtype).replace('torch.', '')}{limit}; lower the strength")


def _find_transformer_options(args, kwargs) -> dict:
    # DIFFUSION_MODEL wrappers are called as (x, timesteps, context, y, control, transformer_options, **kw) on
    # SDXL's UNet and (x, timestep, context, y, guidance, ref_latents, control, transformer_options) on FLUX
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"]
    for a in args:
        if isinstance(a, dict) and ("cond_or_uncond" in a or "sigmas" in a or "wrappers" in a):
            return a
    return {}


def current_patch(model) -> BlockPatch | None:
    found = model.get_wrappers(WrappersMP.DIFFUSION_MODEL, KEY)
    return found[-1] if found else None


def attach_edit(model, edit: Edit):
    """A clone of `model` (a ComfyUI ModelPatcher) with `edit` added after its existing edits."""
    m = model.clone()
    old = current_patch(m)
    patch = BlockPatch((old.edits if old else ()) + (edit,))
    m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, patch)
    handles = {}
    for e in patch.edits:
        for h in e.sae_handles():
            handles[id(h)] = h
    patchers = [h.patcher(m) for h in handles.values()]
    if patchers:
        m.set_additional_models(KEY, patchers)
    return m


__all__ = ["KEY", "BlockPatch", "CallInfo", "Edit", "NonFiniteEdit", "attach_edit", "current_patch"]
