"""Bad input, in process on real ComfyUI: non-finite numbers, malformed masks, limits and long inputs are
refused before sampling with an error naming the node; an edit that still makes non-finite values at run
time is reported, never returned as a black image."""

from __future__ import annotations

import json
import re

import pytest
import torch

from test_patching import AUTO, Capture, make_sae, no_hooks_left, record_rows, sample, steer

STEER = "SAE Steer Features"


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), float("-inf"), 1e30, -1000.5])
def test_non_finite_or_huge_strength_is_refused(pk, model, strength):
    with pytest.raises(ValueError, match=re.escape(f"{STEER}: strength must be a finite number between -1000 and "
                                                   f"1000, got {strength!r}")):
        steer(pk, model, make_sae(pk), "3", strength)


@pytest.mark.parametrize("features, value", [("1:1e999", "inf"), ("1:-1e999", "-inf"), ("1:1e30", "1e+30"),
                                             ("2, 1:nan", None)])
def test_non_finite_or_huge_per_feature_strength_is_refused(pk, model, features, value):
    if value is None:  # 'nan' is not a number the parser reads
        with pytest.raises(ValueError, match=f"^{STEER}: cannot read feature '1:nan'"):
            steer(pk, model, make_sae(pk), features, 1.0)
        return
    with pytest.raises(ValueError, match=re.escape(f"{STEER}: the strength of feature 1 must be a finite number "
                                                   f"between -1000 and 1000, got {value}")):
        steer(pk, model, make_sae(pk), features, 1.0)


def test_strengths_at_the_bounds_are_accepted(pk, model):
    assert steer(pk, model, make_sae(pk), "1:1000, 2:-1000", 1000.0) is not model


def write_native(pk, path, sae):
    pk.sm.save(sae, path)
    return path


@pytest.mark.parametrize("where", ["W_dec", "b_enc", "stats.mean", "stats.frequency"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_sae_file_with_non_finite_numbers_is_refused_at_load(pk, tmp_path, monkeypatch, where, bad):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sae", ([str(tmp_path)], {".safetensors"}))
    h = make_sae(pk)
    h.sae.stats.frequency = torch.rand(256)
    if where.startswith("stats."):
        getattr(h.sae.stats, where[6:])[5] = bad
        shown = f"statistic '{where[6:]}'"
    else:
        with torch.no_grad():
            getattr(h.sae, where).view(-1)[7] = bad
        shown = f"tensor {where}"
    write_native(pk, tmp_path / "bad.safetensors", h.sae)
    with pytest.raises(ValueError, match=f"^Load SAE: bad.safetensors: {shown} holds 1 non-finite "
                                         r"value\(s\) \(NaN or inf\)"):
        pk.N["UnboxLoadSAE"].execute("bad.safetensors")


def test_a_paper_release_with_a_nan_mean_is_refused(pk, tmp_path):
    from paper_release import write_paper_release

    folder = tmp_path / "unet.mid_block.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001"
    write_paper_release(folder, seed=0)
    mean = torch.load(folder / "final" / "mean.pt")
    mean[3] = float("nan")
    torch.save(mean, folder / "final" / "mean.pt")
    with pytest.raises(pk.sm.SAEError, match=r"statistic 'mean' holds 1 non-finite value\(s\)"):
        pk.sm.load(folder)


def test_an_edit_that_overflows_is_reported_not_returned(pk, tiny, model):
    h = make_sae(pk, "mid.0")
    with torch.no_grad():
        h.sae.W_dec[11] *= 1e38  # finite, but 1000 x it is not a float32
    m = steer(pk, model, h, "11", 1000.0, units="absolute")
    with pytest.raises(pk.patch.NonFiniteEdit, match=r"^SAE Steer Features: the edit of block mid.0 "
                                                     r"\(middle_block.1\) made the block's output non-finite \(inf or "
                                                     r"NaN\) in the UNet's float32 \(the largest float32 is 3.403e\+38\)"):
        sample(tiny, m)
    assert no_hooks_left(model)
    assert torch.isfinite(sample(tiny, model)).all()


# -- masks --------------------------------------------------------------------------------------------------


def mid_delta(pk, tiny, model, m, batch=1):
    """The change steering made to mid.0's output, [B, 4, 4, C], seen by an independent hook."""
    import comfy.sample

    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        latent = torch.zeros(batch, 4, 16, 16)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
        comfy.sample.sample(m, noise, 1, 1.0, "euler", "normal", tiny.tiny_conditioning("a cat"),
                            tiny.tiny_conditioning(""), latent, denoise=1.0, disable_pbar=True, seed=1)
    finally:
        cap.close()
    (call,) = cap.calls
    return (call["final"] - call["orig"]).permute(0, 2, 3, 1)


def square(h=64, w=64):
    m = torch.zeros(h, w)
    m[16:32, 32:48] = 1.0  # grid cell (1, 2) of mid.0's 4x4 grid
    return m


@pytest.mark.parametrize("shape", ["[H, W]", "[B, H, W]", "[B, 1, H, W]"])
def test_every_mask_shape_comfyui_makes_paints_the_same_cell(pk, tiny, model, shape):
    h = make_sae(pk, "mid.0")
    mask = {"[H, W]": square(), "[B, H, W]": square()[None], "[B, 1, H, W]": square()[None, None]}[shape]
    d = mid_delta(pk, tiny, model, steer(pk, model, h, "11", 3.0, mask=mask))[0]
    assert torch.allclose(d[1, 2], 3.0 * float(h.mean[11]) * h.sae.W_dec[11], atol=1e-5)
    d[1, 2] = 0
    assert d.abs().max() == 0


def test_a_mask_batch_repeats_over_the_image_batch(pk, tiny, model):
    """Image i takes mask i mod B (ComfyUI's rule for repeating a mask to a batch)."""
    h = make_sae(pk, "mid.0")
    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :16], right[:, 48:] = 1.0, 1.0  # grid column 0, grid column 3
    d = mid_delta(pk, tiny, model, steer(pk, model, h, "4", 2.0, mask=torch.stack([left, right])), batch=4)
    moved = (d.abs().amax(-1) > 0).int()  # [4, 4, 4]: which cells changed, per image
    col0 = torch.zeros(4, 4, dtype=torch.int)
    col0[:, 0] = 1
    col3 = col0.flip(1)
    assert [moved[i].tolist() for i in range(4)] == [col0.tolist(), col3.tolist(), col0.tolist(), col3.tolist()]


@pytest.mark.parametrize("mask, why", [
    (torch.zeros(0, 64, 64), r"mask has shape \[0, 64, 64\], with no pixels"),
    (torch.zeros(1, 0, 64), r"mask has shape \[1, 0, 64\], with no pixels"),
    (torch.zeros(64), r"mask has shape \[64\]; a MASK is \[H, W\], \[B, H, W\] or \[B, 1, H, W\]"),
    (torch.zeros(1, 1, 1, 8, 8), r"mask has shape \[1, 1, 1, 8, 8\]; a MASK is"),
    (torch.zeros(2, 3, 8, 8), r"mask has shape \[2, 3, 8, 8\]; a MASK is"),
    (torch.full((8, 8), float("nan")), r"mask holds non-finite values \(NaN or inf\)"),
])
@pytest.mark.parametrize("node", ["UnboxSteerFeatures", "UnboxReconstructBlock"])
def test_a_malformed_mask_is_refused_before_sampling(pk, model, mask, why, node):
    h = make_sae(pk, "mid.0")
    if node == "UnboxSteerFeatures":
        call = lambda: steer(pk, model, h, "1", 1.0, mask=mask)  # noqa: E731
        name = STEER
    else:
        call = lambda: pk.N[node].execute(model, h, AUTO, False, 0.0, 1.0, "cond", mask=mask)  # noqa: E731
        name = "SAE Reconstruct Block"
    with pytest.raises(ValueError, match=f"^{name}: {why}"):
        call()


def test_top_features_refuses_a_malformed_mask(pk, tiny, model):
    probed, probes = pk.N["UnboxProbeBlock"].execute(model, make_sae(pk), AUTO, "all", "cond").args
    sample(tiny, probed)
    with pytest.raises(ValueError, match=r"^SAE Top Features: mask has shape \[0, 64, 64\], with no pixels"):
        top(pk, probes, torch.rand(1, 128, 128, 3), mask=torch.zeros(0, 64, 64))


# -- limits and messages ---------------------------------------------------------------------------------


def test_an_error_quotes_only_an_excerpt_of_a_long_input(pk, model):
    h = make_sae(pk, "mid.0", n=256)
    features = ", ".join(str(i % 200) for i in range(100_000))  # a duplicate at item 201
    with pytest.raises(ValueError) as e:
        steer(pk, model, h, features, 1.0)
    text = str(e.value)
    assert text.startswith(f"{STEER}: feature 0 is listed twice in features '0, 1, 2")
    assert len(text) < 200 and f"({len(features)} characters)" in text


@pytest.mark.parametrize("steps, why", [("0-99999999999", "at most to 10000"), ("5-2", "from low to high")])
def test_step_ranges_are_bounded(pk, model, steps, why):
    with pytest.raises(ValueError, match=f"^SAE Probe Block: steps '{steps}': .*{why}"):
        pk.N["UnboxProbeBlock"].execute(model, make_sae(pk), AUTO, steps, "cond")


def top(pk, probes, image, top_n=3, rows="cond", cfg=8.0, mask=None, image_index=0):
    out = pk.N["UnboxTopFeatures"].execute(probes, image, top_n, "first probed block", -1, image_index, 3, "inferno",
                                           0.6, "", mask=mask, rows=rows, cfg=cfg)
    return out.args[0], json.loads(out.args[1])


def test_top_n_below_one_is_refused(pk, tiny, model):
    probed, probes = pk.N["UnboxProbeBlock"].execute(model, make_sae(pk), AUTO, "all", "cond").args
    sample(tiny, probed)
    with pytest.raises(ValueError, match="^SAE Top Features: top_n must be a whole number between 1 and 256, got 0$"):
        top(pk, probes, torch.rand(1, 128, 128, 3), top_n=0)


# -- CFG probes -------------------------------------------------------------------------------------------


def cfg_probe(pk, tiny, model, apply_to="both", cfg=2.5, steps=2):
    """Probe mid.0 while sampling with CFG; the block's updates as an independent hook saw them, per step,
    split into cond and uncond rows."""
    h = make_sae(pk, "mid.0", seed=5)
    probed, probes = pk.N["UnboxProbeBlock"].execute(model, h, AUTO, "all", apply_to).args
    seen, hook = record_rows(model)
    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        sample(tiny, probed, steps=steps, cfg=cfg)
    finally:
        cap.close()
        hook.remove()
    last, order = cap.calls[-1], seen[-1]
    u = (last["orig"] - last["x_in"]).permute(0, 2, 3, 1)  # [2, 4, 4, C]
    halves = {kind: u[order.index(kind)] for kind in (0, 1)}
    return h, probes, halves


def dense_codes(sae, u):
    """The SAE's TopK codes of updates `[..., d]`, from its raw weights (the paper's formula)."""
    pre = (u - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    kth = pre.topk(sae.config.k, dim=-1).values[..., -1:]
    return torch.where(pre >= kth, pre, 0.0).clamp_min(0)


def test_heatmap_and_top_features_with_cfg_show_cond_by_default(pk, tiny, model):
    h, probes, halves = cfg_probe(pk, tiny, model)
    image = torch.rand(1, 128, 128, 3)
    codes = {kind: dense_codes(h.sae, u) for kind, u in halves.items()}  # [4, 4, n]
    feature = int(codes[0].sum((0, 1)).argmax())
    heat = pk.N["UnboxFeatureHeatmap"]
    for rows, want in (("cond", codes[0]), ("uncond", codes[1]), ("cfg combined", codes[1] + 2.5 * (codes[0] - codes[1]))):
        _, mask = heat.execute(probes, image, feature, "first probed block", -1, "gray", 1.0, "image max", rows=rows,
                               cfg=2.5).args
        fmap = want[..., feature]
        expected = (fmap / fmap.max()).clamp(0, 1).repeat_interleave(32, 0).repeat_interleave(32, 1)
        assert torch.allclose(mask[0], expected, atol=1e-4), rows
        _, ranking = top(pk, probes, image, top_n=5, rows=rows, cfg=2.5)
        means = want.mean((0, 1))
        assert [f["feature"] for f in ranking["features"]] == means.argsort(descending=True)[:5].tolist(), rows
        assert ranking["rows"] == rows
    # the default is cond
    _, default = heat.execute(probes, image, feature, "first probed block", -1, "gray", 1.0, "image max").args
    _, cond = heat.execute(probes, image, feature, "first probed block", -1, "gray", 1.0, "image max", rows="cond").args
    assert torch.equal(default, cond)


def test_the_papers_heatmap_scale_is_min_to_max(pk, tiny, model):
    """The paper colours (code - min) / (max - min) over the image: here for a feature active at every position
    (where it differs from 'image max'), computed from the SAE's raw weights on the block's update."""
    h = make_sae(pk, "mid.0", seed=5)
    with torch.no_grad():
        h.sae.b_enc[7] = 100.0  # feature 7 is in every position's top k, with varying values
    probed, probes = pk.N["UnboxProbeBlock"].execute(model, h, AUTO, "all", "cond").args
    cap = Capture(model, "middle_block.1", "middle_block.2")
    try:
        sample(tiny, probed)
    finally:
        cap.close()
    u = (cap.calls[-1]["orig"] - cap.calls[-1]["x_in"]).permute(0, 2, 3, 1)[0]  # [4, 4, C]
    fmap = dense_codes(h.sae, u)[..., 7]
    assert fmap.min() > 0 and fmap.max() > fmap.min()
    heat = pk.N["UnboxFeatureHeatmap"]
    image = torch.rand(1, 128, 128, 3)
    _, paper = heat.execute(probes, image, 7, "first probed block", -1, "gray", 1.0, "paper (image min to max)").args
    expected = ((fmap - fmap.min()) / (fmap.max() - fmap.min())).repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert torch.allclose(paper[0], expected, atol=1e-4)
    _, image_max = heat.execute(probes, image, 7, "first probed block", -1, "gray", 1.0, "image max").args
    assert torch.allclose(image_max[0], (fmap / fmap.max()).repeat_interleave(32, 0).repeat_interleave(32, 1),
                          atol=1e-4)


def test_views_that_the_probe_did_not_record_are_refused(pk, tiny, model):
    _, probes, _ = cfg_probe(pk, tiny, model, apply_to="cond")
    image = torch.rand(1, 128, 128, 3)
    with pytest.raises(ValueError, match="^SAE Top Features: the probe recorded no uncond rows"):
        top(pk, probes, image, rows="uncond")
    with pytest.raises(ValueError, match="^SAE Feature Heatmap: the probe recorded no uncond rows"):
        pk.N["UnboxFeatureHeatmap"].execute(probes, image, 0, "first probed block", -1, "gray", 1.0, "image max",
                                            rows="cfg combined")
    assert top(pk, probes, image)[1]["features"]
