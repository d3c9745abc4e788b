"""SDXL base with CFG, as the paper's later code paints on it: the feature added to the cond rows and
subtracted from the uncond rows (its `add_feature_on_area_base_both`), and edits over a range of steps
selecting the same steps as the paper's step indices (its `TimedHook`: steps start <= i < end)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from test_patching import Capture, make_sae, record_rows, sample, steer

PAINT_BOTH = "cond +, uncond -"


def test_paint_both_adds_to_cond_and_subtracts_from_uncond(pk, tiny, model):
    h = make_sae(pk, "mid.0", seed=2)
    mask = torch.zeros(64, 64)
    mask[0:16, 0:16] = 1.0  # grid cell (0, 0)
    m = steer(pk, model, h, "6", 2.0, target=PAINT_BOTH, mask=mask)
    seen, hook = record_rows(model)
    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        sample(tiny, m, steps=2, cfg=8.0)
    finally:
        cap.close()
        hook.remove()
    vector = 2.0 * float(h.mean[6]) * h.sae.W_dec[6]
    for call, order in zip(cap.calls, seen):
        delta = (call["final"] - call["orig"]).permute(0, 2, 3, 1)  # [2, 4, 4, C]
        for row, kind in enumerate(order):
            assert torch.allclose(delta[row, 0, 0], vector if kind == 0 else -vector, atol=1e-5), (row, kind)
            delta[row, 0, 0] = 0
        assert delta.abs().max() == 0


@pytest.mark.parametrize("mode", ["ablate", "set", "replace"])
def test_paint_both_goes_with_add_only(pk, model, mode):
    with pytest.raises(ValueError, match=f"apply_to 'cond \\+, uncond -' .* goes with mode add, not {mode}"):
        steer(pk, model, make_sae(pk), "1", 1.0, mode=mode, target=PAINT_BOTH)


def paper_sigmas(ms, timesteps) -> list[float]:
    return [float(ms.sigma(torch.tensor(float(t)))) for t in timesteps]


def sdxl_base_timesteps(n=25):
    """diffusers' EulerDiscreteScheduler of SDXL base: 'leading' spacing, steps_offset 1 (961, 921, ..., 1)."""
    return (np.arange(0, n) * (1000 // n)).round()[::-1].astype(np.int64) + 1


def turbo_timesteps(n):
    """diffusers' EulerAncestralDiscreteScheduler of SDXL Turbo: 'trailing' spacing (999, 749, 499, 249 at n=4)."""
    return np.round(np.arange(1000, 0, -1000 / n)).astype(np.int64) - 1


@pytest.mark.parametrize("schedule", ["sdxl base, 25 steps", *(f"turbo, {n} steps" for n in range(1, 5))])
def test_start_and_end_percent_select_the_papers_step_indices(pk, model, schedule):
    """For every start < end index of the paper's schedule, start_percent = start/n and end_percent = end/n
    edit exactly the steps start <= i < end."""
    ms = model.get_model_object("model_sampling")
    n = int(schedule.split(", ")[1].split()[0])
    timesteps = sdxl_base_timesteps(n) if schedule.startswith("sdxl") else turbo_timesteps(n)
    assert len(timesteps) == n
    sigmas = paper_sigmas(ms, timesteps)
    h = make_sae(pk)
    for start, end in itertools.combinations(range(n + 1), 2):
        m = steer(pk, model, h, "1", 1.0, start=start / n, end=end / n)
        (edit,) = pk.patch.current_patch(m).edits
        chosen = [i for i, s in enumerate(sigmas)
                  if edit.active(pk.patch.CallInfo(s, i, n, [0], [0]))]
        assert chosen == list(range(start, end)), (start, end, chosen)


def test_a_step_range_edits_those_steps_while_sampling(pk, tiny, model):
    """The same on a real run of the paper's 4-step Turbo schedule (custom sigmas, as ComfyUI's SamplerCustom
    takes them): steps 1 and 2 of 0..3 are edited."""
    import comfy.sample
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    sigmas = torch.tensor(paper_sigmas(ms, turbo_timesteps(4)) + [0.0])
    h = make_sae(pk, "mid.0")
    m = steer(pk, model, h, "3", 2.0, start=0.25, end=0.75)
    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        latent = torch.zeros(1, 4, 16, 16)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        comfy.sample.sample_custom(m, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                   tiny.tiny_conditioning("a cat"), tiny.tiny_conditioning(""), latent,
                                   disable_pbar=True, seed=0)
    finally:
        cap.close()
    edited = [bool((c["final"] != c["orig"]).any()) for c in cap.calls]
    assert edited == [False, True, True, False]


ICON_BASE = "cond, uncond zeroed"


def test_the_papers_base_icon_replaces_cond_and_zeroes_the_uncond_update(pk, tiny, model):
    """The paper's `replace_with_feature_base` at cfg > 1: the cond rows' update becomes k x mean_f x d_f, the
    uncond rows' update is zero (the block returns its input), at every position and step."""
    h = make_sae(pk, "mid.0", seed=3)
    k = h.sae.config.k
    m = steer(pk, model, h, "5", float(k), mode="replace", target=ICON_BASE)
    seen, hook = record_rows(model)
    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        sample(tiny, m, steps=2, cfg=7.5, prompt="")
    finally:
        cap.close()
        hook.remove()
    vector = k * float(h.mean[5]) * h.sae.W_dec[5]
    assert len(cap.calls) == 2 and all(sorted(order) == [0, 1] for order in seen)
    for call, order in zip(cap.calls, seen):
        update = (call["final"] - call["x_in"]).permute(0, 2, 3, 1)  # what the next layer got, minus the input
        for row, kind in enumerate(order):
            if kind == 0:
                assert torch.allclose(update[row], vector.expand_as(update[row]), atol=1e-5)
            else:
                assert torch.equal(call["final"][row], call["x_in"][row])  # exactly the block's input


def test_the_base_icon_goes_with_replace_only(pk, model):
    with pytest.raises(ValueError, match="apply_to 'cond, uncond zeroed' .*feature icon.* goes with mode replace, "
                                         "not add"):
        steer(pk, model, make_sae(pk), "1", 1.0, mode="add", target=ICON_BASE)
