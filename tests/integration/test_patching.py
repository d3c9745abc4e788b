"""The patching mechanism and the steering/probe nodes on real ComfyUI (in-process, tiny SDXL model).

Expected values are computed here from the SAE's raw weights and from the block's own input and output,
captured by an independent forward hook, not from the pack's code.
"""

from __future__ import annotations

import pytest
import torch

AUTO = "auto (the SAE's block)"
MEAN = "mean activation"


def make_sae(pk, block="mid.0", d=128, n=256, k=8, seed=0, frequency=False):
    """A random TopK SAE handle with mean activations (and, with `frequency`, activation frequencies)."""
    g = torch.Generator().manual_seed(seed)
    sae = pk.sm.build(pk.sm.SAEConfig(architecture="topk", d_in=d, n_features=n, k=k, block=block))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=g) / d ** 0.5)
        sae.W_dec.copy_(torch.randn(n, d, generator=g) / d ** 0.5)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
    mean = torch.rand(n, generator=g) + 0.5
    sae.stats = pk.sm.FeatureStats(mean=mean, frequency=torch.rand(n, generator=g) if frequency else None)
    return pk.handle.SAEHandle(sae, f"test-{block}")


def record_rows(model):
    """The `cond_or_uncond` rows of every UNet call, in order, and the hook that records them (remove it)."""
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(list(kwargs["transformer_options"]["cond_or_uncond"])) or None,
        with_kwargs=True)
    return seen, hook


def sample(tiny, m, steps=1, cfg=1.0, prompt="a cat", seed=1, size=16):
    import comfy.sample

    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    pos, neg = tiny.tiny_conditioning(prompt), tiny.tiny_conditioning("")
    return comfy.sample.sample(m, noise, steps, cfg, "euler", "normal", pos, neg, latent, denoise=1.0,
                               disable_pbar=True, seed=seed)


def steer(pk, m, h, features, strength, mode="add", target="cond", mask=None, start=0.0, end=1.0, units=MEAN,
          block=AUTO):
    node = pk.N["UnboxSteerFeatures"]
    return node.execute(m, h, features, strength, mode, block, units, start, end, target, mask=mask).args[0]


class Capture:
    """An independent view of one block: its input, its original output, and the output the next layer
    actually received (a pre-hook on the following module)."""

    def __init__(self, model, path, next_path):
        unet = model.model.diffusion_model
        self.calls = []
        self.h1 = unet.get_submodule(path).register_forward_hook(self._block)
        self.h2 = unet.get_submodule(next_path).register_forward_pre_hook(self._next)

    def _block(self, module, args, output):
        self.calls.append({"x_in": args[0].clone(), "orig": output.clone()})

    def _next(self, module, args):
        # skip connections may be concatenated after the block's output: keep the block's own channels
        self.calls[-1]["final"] = args[0][:, : self.calls[-1]["orig"].shape[1]].clone()

    def close(self):
        self.h1.remove()
        self.h2.remove()


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.model.diffusion_model.modules())


NODES = {  # id (saved in workflows) -> display name
    "UnboxLoadSAE": "Load SAE", "UnboxSteerFeatures": "SAE Steer Features",
    "UnboxReconstructBlock": "SAE Reconstruct Block", "UnboxProbeBlock": "SAE Probe Block",
    "UnboxFeatureHeatmap": "SAE Feature Heatmap", "UnboxTopFeatures": "SAE Top Features",
    "UnboxDumpActivations": "SAE Dump Activations", "UnboxDumpImages": "SAE Dump Images",
    "UnboxPromptList": "SAE Prompt List", "UnboxTrainSAE": "SAE Train",
    "UnboxPaintedMask": "SAE Painted Mask", "UnboxFindFeatures": "SAE Find Features",
}


def test_all_nodes_are_registered_through_the_v3_entry_point(comfy_pack):
    assert comfy_pack.pack_node_names == set(NODES)
    assert {n: comfy_pack.nodes.NODE_DISPLAY_NAME_MAPPINGS[n] for n in NODES} == NODES
    assert not hasattr(comfy_pack.module, "NODE_CLASS_MAPPINGS")  # ComfyUI would ignore the entry point
    assert all(comfy_pack.node(n).GET_SCHEMA().category == "sae_unbox" for n in NODES)


def test_strength_zero_returns_the_model_untouched(pk, tiny, model):
    h = make_sae(pk)
    base = sample(tiny, model)
    m = steer(pk, model, h, "3, 5", 0.0)
    assert m is model
    assert torch.equal(sample(tiny, m), base)


def test_probe_only_is_bit_identical(pk, tiny, model):
    base = sample(tiny, model, steps=3, cfg=2.0)
    m = model
    probes = None
    for block in ("down.2.1", "mid.0", "up.0.0", "up.0.1"):
        m, probes = pk.N["UnboxProbeBlock"].execute(m, make_sae(pk, block), AUTO, "all", "both", probe=probes).args
    assert torch.equal(sample(tiny, m, steps=3, cfg=2.0), base)
    rec = probes[1].get(-1)
    assert rec.values.shape[:3] == (2, 4, 4) and sorted(probes[1].records) == [0, 1, 2]
    assert sorted(set(rec.row_kind)) == [0, 1]
    assert no_hooks_left(model)


def test_add_changes_the_update_by_exactly_the_intended_vector(pk, tiny, model):
    h = make_sae(pk, "mid.0")
    mask = torch.zeros(64, 64)
    mask[16:32, 32:48] = 1.0  # exactly grid cell (1, 2) of mid.0's 4x4 grid at a 16x16 latent
    m = steer(pk, model, h, "11", 3.0, mask=mask)
    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        sample(tiny, m)
    finally:
        cap.close()
    (call,) = cap.calls
    delta = (call["final"] - call["orig"])[0].permute(1, 2, 0)  # [4, 4, C]
    expected = 3.0 * float(h.mean[11]) * h.sae.W_dec[11]
    assert torch.allclose(delta[1, 2], expected, atol=1e-5)
    delta[1, 2] = 0
    assert delta.abs().max() == 0  # nothing else moved


def test_set_mode_matches_the_formula_at_each_position(pk, tiny, model):
    h = make_sae(pk, "mid.0", seed=4)
    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        sample(tiny, steer(pk, model, h, "7", 2.0, mode="set"))
    finally:
        cap.close()
    (call,) = cap.calls
    u = (call["orig"] - call["x_in"])[0].permute(1, 2, 0).reshape(-1, 128)
    sae = h.sae
    pre = (u - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    kth = pre.topk(sae.config.k, dim=-1).values[:, -1:]
    c7 = torch.where(pre[:, 7:8] >= kth, pre[:, 7:8], 0.0).clamp_min(0)
    expected = (2.0 * float(h.mean[7]) - c7) * sae.W_dec[7]
    got = (call["final"] - call["orig"])[0].permute(1, 2, 0).reshape(-1, 128)
    assert torch.allclose(got, expected, atol=1e-4)


def test_edits_stack_on_one_block_and_across_blocks(pk, tiny, model):
    a, b = make_sae(pk, "mid.0", seed=1), make_sae(pk, "mid.0", seed=2)
    c = make_sae(pk, "up.0.1", seed=3)
    m = steer(pk, steer(pk, model, a, "1", 2.0), b, "2", -1.0)
    m = steer(pk, m, c, "4", 1.5)
    assert len(pk.patch.current_patch(m).edits) == 3
    cap = Capture(model, "middle_block.1", "middle_block.2")
    cap2 = Capture(model, "output_blocks.1.1", "output_blocks.2.0")
    try:
        sample(tiny, m)
    finally:
        cap.close()
        cap2.close()
    d_mid = (cap.calls[0]["final"] - cap.calls[0]["orig"])[0].permute(1, 2, 0)
    want = 2.0 * float(a.mean[1]) * a.sae.W_dec[1] - float(b.mean[2]) * b.sae.W_dec[2]
    assert torch.allclose(d_mid, want.expand_as(d_mid), atol=1e-5)
    d_up = (cap2.calls[0]["final"] - cap2.calls[0]["orig"])[0].permute(1, 2, 0)
    assert torch.allclose(d_up, (1.5 * float(c.mean[4]) * c.sae.W_dec[4]).expand_as(d_up), atol=1e-5)
    # the SAEs are attached as additional models, once each, for ComfyUI's memory management
    attached = m.get_additional_models_with_key(pk.patch.KEY)
    assert len(attached) == 3 and {p.model.sae for p in attached} == {a.sae, b.sae, c.sae}


def test_cond_uncond_targets_and_step_range(pk, tiny, model):
    h = make_sae(pk, "mid.0")
    m = steer(pk, model, h, "5", 4.0, target="uncond", start=0.4, end=1.0)
    cap = Capture(model, "middle_block.1", "middle_block.2")
    seen, hook = record_rows(model)
    try:
        sample(tiny, m, steps=4, cfg=3.0)
    finally:
        cap.close()
        hook.remove()
    assert len(cap.calls) == 4
    for step, (call, order) in enumerate(zip(cap.calls, seen)):
        changed = [(call["final"][r] != call["orig"][r]).any().item() for r in range(call["orig"].shape[0])]
        want = [kind == 1 and step >= 2 for kind in order]  # uncond rows, second half of the schedule
        assert changed == want, (step, order, changed)


def test_original_model_and_other_clones_are_unaffected(pk, tiny, model):
    h = make_sae(pk)
    base = sample(tiny, model)
    sibling = model.clone()
    m = steer(pk, model, h, "9", 5.0)
    assert not torch.equal(sample(tiny, m), base)
    assert torch.equal(sample(tiny, model), base)
    assert torch.equal(sample(tiny, sibling), base)
    assert pk.patch.current_patch(model) is None and pk.patch.current_patch(sibling) is None
    assert no_hooks_left(model)


def test_clone_shares_the_patch_and_never_copies_sae_weights(pk, model):
    h = make_sae(pk)
    m = steer(pk, model, h, "1", 1.0)
    ptr = h.sae.W_dec.data_ptr()
    for _ in range(3):
        c = m.clone()
        assert pk.patch.current_patch(c) is pk.patch.current_patch(m)
        assert pk.patch.current_patch(c).edits[0].handle.sae.W_dec.data_ptr() == ptr
        assert c.get_additional_models_with_key(pk.patch.KEY)[0].model is h.patcher(m).model


def test_no_hook_survives_an_exception_inside_a_patch(pk, tiny, model):
    class Boom(pk.patch.Edit):
        def apply(self, update, info):
            raise RuntimeError("edit exploded")

    m = pk.patch.attach_edit(model, Boom(block=pk.sm.get_block("mid.0")))
    with pytest.raises(RuntimeError, match="edit exploded"):
        sample(tiny, m)
    assert no_hooks_left(model)
    assert torch.isfinite(sample(tiny, model)).all()


def test_no_hook_survives_an_interrupted_run(pk, tiny, comfy_pack, model):
    import comfy.model_management as mm

    class Interrupt(pk.patch.Edit):
        def apply(self, update, info):  # the user presses Cancel while the UNet runs
            mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()

    m = pk.patch.attach_edit(model, Interrupt(block=pk.sm.get_block("up.0.0")))
    pos, neg = tiny.tiny_conditioning("x"), tiny.tiny_conditioning("")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy_pack.node("KSampler")().sample(m, 1, 4, 1.0, "euler", "normal", pos, neg, latent)
    finally:
        mm.interrupt_current_processing(False)
    assert no_hooks_left(model)


def test_composes_with_lora_weight_patches_and_other_wrappers(pk, tiny, model):
    import comfy.patcher_extension as pe

    h = make_sae(pk, "mid.0")
    lora = model.clone()
    key = "diffusion_model.middle_block.1.proj_in.weight"
    w = model.model.state_dict()[key]
    lora.add_patches({key: (torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.05,)}, 1.0)
    calls = []

    def other_pack(executor, *args, **kwargs):  # another pack's DIFFUSION_MODEL wrapper
        calls.append(1)
        return executor(*args, **kwargs) * 1.0

    lora.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "someone-else", other_pack)
    base_lora = sample(tiny, lora)
    assert not torch.equal(base_lora, sample(tiny, model))  # the LoRA does something
    m = steer(pk, lora, h, "3", 2.0)
    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        sample(tiny, m)
    finally:
        cap.close()
    d = (cap.calls[0]["final"] - cap.calls[0]["orig"])[0].permute(1, 2, 0)
    assert torch.allclose(d, (2.0 * float(h.mean[3]) * h.sae.W_dec[3]).expand_as(d), atol=1e-5)
    assert len(calls) == 2
    assert torch.equal(sample(tiny, lora), base_lora)  # unpatched LoRA model unchanged


def test_reconstruct_keep_error_is_nearly_identity_and_without_is_not(pk, tiny, model):
    h = make_sae(pk, "up.0.0")
    rec = pk.N["UnboxReconstructBlock"]
    base = sample(tiny, model)
    same = sample(tiny, rec.execute(model, h, AUTO, True, 0.0, 1.0, "cond").args[0])
    diff = sample(tiny, rec.execute(model, h, AUTO, False, 0.0, 1.0, "cond").args[0])
    assert torch.allclose(same, base, atol=1e-4)
    assert (diff - base).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(block="down.1.0"), r"SAE Steer Features: SAE test-mid.0 has d_in=128 but block down.1.0 .* has 64"),
    (dict(features="300"), r"SAE Steer Features: feature 300 is out of range: the SAE has features 0..255"),
    (dict(features="1, x"), r"SAE Steer Features: cannot read feature 'x'"),
    (dict(start=0.8, end=0.2), r"SAE Steer Features: need 0 <= start_percent < end_percent <= 1"),
    (dict(start=0.5, end=0.5), r"SAE Steer Features: need 0 <= start_percent < end_percent <= 1"),
])
def test_bad_input_is_refused_before_sampling(pk, model, kwargs, message):
    h = make_sae(pk, "mid.0")
    args = dict(features="1", strength=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        steer(pk, model, h, args.pop("features"), args.pop("strength"), **args)


def test_sae_without_block_or_statistics(pk, model):
    h = make_sae(pk, "mid.0")
    h.sae.config.block = None
    with pytest.raises(ValueError, match="does not record which block"):
        steer(pk, model, h, "1", 1.0)
    h = make_sae(pk, "mid.0")
    h.sae.stats.mean = None
    with pytest.raises(ValueError, match="no per-feature mean statistics"):
        steer(pk, model, h, "1", 1.0)
    assert steer(pk, model, h, "1", 1.0, units="absolute") is not model


def test_paper_size_sae_is_refused_on_the_tiny_model(pk, model):
    sae = pk.sm.build(pk.sm.SAEConfig(architecture="topk", d_in=1280, n_features=5120, k=10, block="down.2.1"))
    with pytest.raises(ValueError, match=r"d_in=1280 but block down.2.1 \(input_blocks.8.1\) of this MODEL has 128"):
        pk.N["UnboxProbeBlock"].execute(model, pk.handle.SAEHandle(sae, "paper"), AUTO, "all", "cond")


def test_a_feature_that_never_fired_cannot_be_steered_in_mean_units(pk, model):
    h = make_sae(pk)
    h.sae.stats.mean[3] = 0.0
    with pytest.raises(ValueError, match="SAE Steer Features: feature\\(s\\) 3 of SAE test-mid.0 have mean activation 0"):
        steer(pk, model, h, "3, 5", 2.0)
    assert steer(pk, model, h, "3", 2.0, units="absolute") is not model
