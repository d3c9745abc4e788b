"""The pack's one patching mechanism.

Every probing, steering and dumping node adds an *edit* to a MODEL through `attach_edit`. The edits of a
MODEL live in one immutable `BlockPatch`, registered on the ModelPatcher as a keyed DIFFUSION_MODEL
wrapper. For the duration of one call of the diffusion model (SDXL's UNet, FLUX's transformer), the
wrapper puts a forward hook on each transformer block that has edits; the hook reads the block's input
and output as grids of image positions (`block_io`) and hands them to the edits, in the order they were
added, as a `BlockView`: an edit writes into the block's output in place, so what no edit touches keeps its
exact value. The hooks are removed in `finally`, so none survives the call, an exception or an interrupt.

Nothing in a hook waits for the device: the step comes from a `StepClock` that an OUTER_SAMPLE wrapper (same
key) sets up from the sampler's schedule before sampling and that the sampler's step callback advances; rows
come from ComfyUI's `cond_or_uncond`; what an edit needs per call (directions, amounts, mask weights) is made
once per device, dtype and grid. A hook whose edits wrote leaves a flag on the device (is the output still
finite?), and the clock reads the flags of a step once, when the step ends, naming the first block an edit made
non-finite.

A ModelPatcher clone shares the wrapper object (ComfyUI copies wrapper lists shallowly), and adding an
edit builds a new BlockPatch on the new clone only, so the parent MODEL and its other clones are never
affected. SAE weights are referenced, not copied; they are attached as additional models so that
ComfyUI moves them to the sampling device with the UNet and offloads them after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from comfy.patcher_extension import WrappersMP
from comfy.samplers import KSAMPLER
from comfy_api.torch_helpers.torch_compile import COMPILE_KEY

from .block_io import IO_BY_KIND, Layout
from .call import CLOCK, BlockView, CallInfo, Edit, StepClock, check_finite

KEY = "comfyui-sae-unbox"
log = logging.getLogger(__name__)


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
        flags = [] if info.clock is None else None  # without a clock, checked when this call ends
        handles = []
        try:
            for path, edits in self._by_block.items():
                active = tuple(e for e in edits if e.active(info))
                if not active:
                    continue
                module = model.get_submodule(path)
                hook = _BlockHook(active, info, IO_BY_KIND[edits[0].block.kind], layout, flags)
                if hook.io.needs_copy and hook.reads_input:
                    handles.append(module.register_forward_pre_hook(hook.before, with_kwargs=True))
                handles.append(module.register_forward_hook(hook.after, with_kwargs=True))
            out = executor(x, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        if flags:
            check_finite(flags)
        return out


class _BlockHook:
    def __init__(self, edits, info: CallInfo, io, layout: Layout, flags: list | None):
        self.edits, self.info, self.io, self.layout, self.flags = edits, info, io, layout, flags
        self.reads_input = any(e.reads_input() for e in edits)
        self.saved = None

    def before(self, module, args, kwargs):
        self.saved = self.io.capture(args, kwargs, self.layout)  # the block may overwrite its input
        return None

    def after(self, module, args, kwargs, output):
        saved, self.saved = self.saved, None
        x_in, out = self.io.grids(saved, args, kwargs, output, self.layout)  # [B, h, w, C]
        view = BlockView(x_in if self.reads_input else None, out)
        wrote = tuple(e for e in self.edits if e.apply_view(view, self.info))
        if wrote:  # the output's largest magnitude (inf or NaN if not finite), read once per step by the clock
            peak = torch.linalg.vector_norm(view.out, float("inf"))  # one reduction, no temporary
            if self.info.clock is not None:
                self.info.clock.watch(peak, wrote, view.out.dtype)
            else:
                self.flags.append((peak, wrote, view.out.dtype))
        return None  # the output was edited in place


def _find_transformer_options(args, kwargs) -> dict:
    # DIFFUSION_MODEL wrappers are called as (x, timesteps, context, y, control, transformer_options, **kw) on
    # SDXL's UNet and (x, timestep, context, y, guidance, ref_latents, control, transformer_options) on FLUX
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"]
    for a in args:
        if isinstance(a, dict) and ("cond_or_uncond" in a or "sigmas" in a or "wrappers" in a):
            return a
    return {}


def sampling_run(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper, around one sampling run of a patched MODEL:

    - gives the run a StepClock (its schedule read to the host once, before sampling; ComfyUI's samplers hand
      it over on the CPU) and advances it from the sampler's step callback (ComfyUI's KSAMPLER, which every
      built-in sampler is, reports every step; with another sampler the step is found per call, as without a
      sampler);
    - runs the diffusion model uncompiled: a graph compiled by TorchCompileModel is reused for calls whose
      `transformer_options` differ (its guard filter drops them), so it would run without the pack's wrapper
      and drop every edit without a word. One log line says so.
    """
    names = ("noise", "latent_image", "sampler", "sigmas", "denoise_mask", "callback")
    bound = dict(zip(names, args))
    sigmas, callback = bound.get("sigmas", kwargs.get("sigmas")), bound.get("callback", kwargs.get("callback"))
    options = getattr(executor.class_obj, "model_options", None)  # the guider's copy for this run
    if not isinstance(sigmas, torch.Tensor) or not isinstance(options, dict):
        return executor(*args, **kwargs)
    transformer_options = options.setdefault("transformer_options", {})
    _uncompiled(transformer_options)
    if not isinstance(bound.get("sampler", kwargs.get("sampler")), KSAMPLER):
        return executor(*args, **kwargs)  # a sampler that may not report its steps: the step is read per call
    clock = StepClock(sigmas.detach().float().cpu().tolist())

    def on_step(step, *rest):
        clock.end_step(step)
        if callback is not None:
            return callback(step, *rest)

    if len(args) > 5:
        args = (*args[:5], on_step, *args[6:])
    else:
        kwargs["callback"] = on_step
    transformer_options[CLOCK] = clock
    try:
        out = executor(*args, **kwargs)
    finally:
        transformer_options.pop(CLOCK, None)
    clock.check()  # a sampler that does not report its last step
    return out


def _uncompiled(transformer_options: dict) -> None:
    apply_model = transformer_options.get("wrappers", {}).get(WrappersMP.APPLY_MODEL, {})
    if apply_model.pop(COMPILE_KEY, None):
        log.warning("SAE Unbox: this MODEL was compiled (TorchCompileModel); it samples uncompiled while the "
                    "pack's probes, edits or dumps are on it, since a compiled graph would skip them")


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
    m.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, sampling_run)
    handles = {}
    for e in patch.edits:
        for h in e.sae_handles():
            handles[id(h)] = h
    patchers = [h.patcher(m) for h in handles.values()]
    if patchers:
        m.set_additional_models(KEY, patchers)
    return m


__all__ = ["KEY", "BlockPatch", "attach_edit", "current_patch", "sampling_run"]
