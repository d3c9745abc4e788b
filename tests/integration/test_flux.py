"""The pack on FLUX, in process on real ComfyUI: a tiny FLUX.1-architecture model (tests/support/tiny_flux.py:
FLUX.1's 19 double-stream and 38 single-stream blocks at hidden size 64) through the same patching
mechanism as SDXL.

Expected values come from the SAE's raw weights and from each block's input and output captured by
independent hooks (a pre-hook copying the input before the block overwrites it, a hook on the output, and
a pre-hook on the next module to see what it really received), not from the pack's code.
"""

from __future__ import annotations

import json

import pytest
import torch

AUTO = "auto (the SAE's block)"
D = 64  # the tiny model's hidden size (FLUX.1: 3072)


@pytest.fixture(scope="module")
def flux(comfyui_path):
    import tiny_flux

    return tiny_flux


@pytest.fixture(scope="module")
def fmodel(flux):
    return flux.tiny_flux_model(seed=0)


def make_sae(pk, block="double.18", d=D, n=128, k=8, seed=0):
    from test_patching import make_sae as random_sae

    return random_sae(pk, block, d, n, k, seed, frequency=True)


def fsample(flux, m, steps=1, prompt="a cat on a mat", seed=1, size=(16, 16), cfg=1.0):
    import comfy.sample

    latent = torch.zeros(1, 16, *size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    pos, neg = flux.tiny_flux_conditioning(prompt), flux.tiny_flux_conditioning("")
    return comfy.sample.sample(m, noise, steps, cfg, "euler", "simple", pos, neg, latent, denoise=1.0,
                               disable_pbar=True, seed=seed)


class FluxCapture:
    """An independent view of one FLUX block: its input and output image tokens (text tokens too), and the
    tokens the next module really received."""

    def __init__(self, model, block: str):
        self.dm = model.model.diffusion_model
        self.kind, i = block.split(".")
        self.mod = self.dm.double_blocks[int(i)] if self.kind == "double" else self.dm.single_blocks[int(i)]
        self.calls = []
        if self.kind == "double":
            nxt = self.dm.double_blocks[int(i) + 1] if int(i) + 1 < len(self.dm.double_blocks) else self.dm.single_blocks[0]
        else:
            nxt = self.dm.single_blocks[int(i) + 1] if int(i) + 1 < len(self.dm.single_blocks) else self.dm.final_layer
        self.handles = [self.mod.register_forward_pre_hook(self._pre, with_kwargs=True),
                        self.mod.register_forward_hook(self._post, with_kwargs=True),
                        nxt.register_forward_pre_hook(self._next, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        x = kwargs["img"] if self.kind == "double" else args[0]
        call = {"in": x.clone()}
        if self.kind == "double":
            call["txt_in"] = kwargs["txt"].clone()
        self.calls.append(call)

    def _post(self, module, args, kwargs, output):
        call = self.calls[-1]
        if self.kind == "double":
            call["out"], call["txt_out"] = output[0].clone(), output[1].clone()
        else:
            call["out"] = output.clone()

    def _next(self, module, args, kwargs):
        x = kwargs["img"] if "img" in kwargs else args[0]
        self.calls[-1]["next"] = x.clone()

    def close(self):
        for h in self.handles:
            h.remove()


def run_captured(flux, fmodel, m, block, **kw):
    cap = FluxCapture(fmodel, block)
    try:
        latent = fsample(flux, m, **kw)
    finally:
        cap.close()
    return cap.calls, latent


def image_grid(tokens, n_txt, h, w):
    """Image tokens `[B, N, C]` -> `[B, h, w, C]`, row-major (how FLUX lays out its 2x2 patches)."""
    return tokens[:, n_txt:n_txt + h * w].reshape(tokens.shape[0], h, w, tokens.shape[-1])


def test_flux_is_detected_and_offers_its_blocks(pk, fmodel, model):
    models = __import__(pk.patch.__name__.rsplit(".", 1)[0] + ".models", fromlist=["x"])
    assert models.model_arch(fmodel).name == "flux" and models.model_arch(model).name == "sdxl"
    assert models.block_channels(fmodel, pk.sm.get_block("double.18")) == D
    assert models.block_channels(fmodel, pk.sm.get_block("single.37")) == D


@pytest.mark.parametrize("block", ["double.18", "single.10"])
def test_a_probe_changes_nothing_and_records_the_image_tokens_codes(pk, flux, fmodel, block):
    h = make_sae(pk, block)
    base = fsample(flux, fmodel, steps=2)
    probed, probes = pk.N["UnboxProbeBlock"].execute(fmodel, h, AUTO, "all", "cond").args
    calls, latent = run_captured(flux, fmodel, probed, block, steps=2)
    assert torch.equal(latent, base)  # bit-identical
    n_txt = flux.text_length("a cat on a mat") if block.startswith("single") else 0
    update = image_grid(calls[-1]["out"], n_txt, 8, 8) - image_grid(calls[-1]["in"], n_txt, 8, 8)  # [1, 8, 8, D]
    rec = probes[0].get(-1)
    assert rec.values.shape[:3] == (1, 8, 8) and sorted(probes[0].records) == [0, 1]
    pre = (update - h.sae.b_dec) @ h.sae.W_enc.T + h.sae.b_enc
    kth = pre.topk(8, dim=-1).values[..., -1:]
    dense = torch.where(pre >= kth, pre, 0.0).clamp_min(0)
    for f in range(0, 128, 7):
        assert torch.allclose(rec.feature_map(f)[0], dense[0, ..., f], atol=1e-4), f


def steer(pk, m, h, features, strength, mode="add", target="cond", mask=None, units="mean activation", block=AUTO,
          start=0.0, end=1.0):
    return pk.N["UnboxSteerFeatures"].execute(m, h, features, strength, mode, block, units, start, end, target,
                                              mask=mask).args[0]


@pytest.mark.parametrize("block", ["double.18", "single.10"])
def test_add_moves_exactly_the_painted_image_tokens_by_the_feature(pk, flux, fmodel, block):
    h = make_sae(pk, block, seed=3)
    mask = torch.zeros(128, 128)
    mask[32:48, 80:96] = 1.0  # pixels -> latent 4..6 x 10..12 -> token (2, 5) of the 8x8 grid
    calls, _ = run_captured(flux, fmodel, steer(pk, fmodel, h, "11", 3.0, mask=mask), block)
    (call,) = calls
    n_txt = flux.text_length("a cat on a mat") if block.startswith("single") else 0
    if block.startswith("double"):  # the next module (single.0) receives text tokens, then image tokens
        received_img, received_txt = call["next"][:, call["txt_out"].shape[1]:], call["next"][:, :call["txt_out"].shape[1]]
        assert torch.equal(received_txt, call["txt_out"])  # the text stream is untouched
        delta = image_grid(received_img, 0, 8, 8) - image_grid(call["out"], 0, 8, 8)
    else:
        assert torch.equal(call["next"][:, :n_txt], call["out"][:, :n_txt])  # text tokens untouched
        delta = image_grid(call["next"], n_txt, 8, 8) - image_grid(call["out"], n_txt, 8, 8)
    expected = 3.0 * float(h.mean[11]) * h.sae.W_dec[11]
    assert torch.allclose(delta[0, 2, 5], expected, atol=1e-5)
    delta[0, 2, 5] = 0
    assert delta.abs().max() == 0  # nothing else moved


def test_every_mode_and_reconstruct_run_on_flux_and_strength_zero_is_a_no_op(pk, flux, fmodel):
    h = make_sae(pk, "double.18", seed=5)
    base = fsample(flux, fmodel)
    assert steer(pk, fmodel, h, "4", 0.0) is fmodel
    every = ", ".join(map(str, range(128)))  # ablate: every feature, so that those that fire go
    for mode, features in (("add", "1, 2"), ("ablate", every), ("set", "1, 2"), ("replace", "1, 2")):
        out = fsample(flux, steer(pk, fmodel, h, features, 1.0 if mode == "ablate" else 2.0, mode=mode))
        assert torch.isfinite(out).all() and not torch.equal(out, base), mode
    rec = pk.N["UnboxReconstructBlock"].execute(fmodel, h, AUTO, True, 0.0, 1.0, "cond").args[0]
    assert torch.allclose(fsample(flux, rec), base, atol=1e-4)  # keep_error: (nearly) the identity


def test_an_odd_latent_gives_a_padded_grid(pk, flux, fmodel):
    h = make_sae(pk, "single.0")
    probed, probes = pk.N["UnboxProbeBlock"].execute(fmodel, h, AUTO, "all", "cond").args
    fsample(flux, probed, size=(9, 13))
    assert probes[0].get(-1).values.shape[1:3] == (5, 7)  # ceil(9/2) x ceil(13/2) patches


def test_sdxl_and_flux_saes_are_not_mixed_up(pk, fmodel, model):
    from test_patching import make_sae as sdxl_sae

    with pytest.raises(ValueError, match=r"^SAE Probe Block: SAE test-mid.0 was trained on SDXL block mid.0, but the "
                                         r"MODEL is FLUX.1"):
        pk.N["UnboxProbeBlock"].execute(fmodel, sdxl_sae(pk, "mid.0"), AUTO, "all", "cond")
    with pytest.raises(ValueError, match=r"^SAE Steer Features: SAE test-double.18 was trained on FLUX.1 block "
                                         r"double.18, but the MODEL is SDXL"):
        steer(pk, model, make_sae(pk), "1", 1.0)
    with pytest.raises(ValueError, match=r"^SAE Steer Features: block up.0.1 is a block of SDXL, but the MODEL is "
                                         r"FLUX.1 \(its blocks: double.0 ... single.37\)"):
        steer(pk, fmodel, make_sae(pk), "1", 1.0, block="up.0.1")
    text = make_sae(pk)
    text.sae.config.stream = "text"
    with pytest.raises(ValueError, match="reads the text stream; this pack's patches read the image tokens"):
        steer(pk, fmodel, text, "1", 1.0)


def test_dump_rows_are_the_blocks_image_updates(pk, flux, fmodel, output_dir):
    from test_dump import dump_node, fake_images, read_shards, records, save_images

    folder = output_dir / "flux_dump"
    m, dump = dump_node(pk, fmodel, folder, blocks="double.18 single.5", fields="update, input, output")
    caps = {b: FluxCapture(fmodel, b) for b in ("double.18", "single.5")}
    try:
        fsample(flux, m, prompt="a lighthouse", seed=3)
    finally:
        for c in caps.values():
            c.close()
    save_images(pk, fake_images(1), dump, prompt="a lighthouse", seed=3)
    n_txt = flux.text_length("a lighthouse")
    for block, cap in caps.items():
        (call,) = cap.calls
        skip = n_txt if block.startswith("single") else 0
        x_in = call["in"][0, skip:skip + 64]
        out = call["out"][0, skip:skip + 64]
        rows = read_shards(folder, block)
        assert rows["update"].shape == (64, D)
        assert torch.allclose(rows["update"], out - x_in, atol=1e-5)
        assert torch.allclose(rows["input"], x_in) and torch.allclose(rows["output"], out, atol=1e-5)
        assert rows["position"].tolist() == list(range(64))
        assert set(rows["grid_h"].tolist()) == {8} and set(rows["grid_w"].tolist()) == {8}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["blocks"]["double.18"]["d_in"] == D
    assert [r["prompt"] for r in records(folder)] == ["a lighthouse"]


def test_paper_blocks_of_flux_are_double_18(pk, fmodel, output_dir):
    from test_dump import dump_node

    m, dump = dump_node(pk, fmodel, output_dir / "paper", blocks="paper")
    assert [b.short for b in dump.blocks] == ["double.18"]
    with pytest.raises(ValueError, match=r"^SAE Dump Activations: block mid.0 is a block of SDXL, but the MODEL is"):
        dump_node(pk, fmodel, output_dir / "paper", blocks="mid.0")


def test_dump_train_load_and_steer_on_flux(pk, flux, fmodel, tmp_path, output_dir, monkeypatch):
    """Dump FLUX's double.18 image updates, train with the Train node (FLUX defaults), load, steer."""
    import folder_paths

    from test_dump import FULL, dump_node, fake_images, save_images

    sae_dir = tmp_path / "models_sae"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sae", ([str(sae_dir)], {".safetensors"}))
    m, dump = dump_node(pk, fmodel, output_dir / "fd", blocks="double.18", rows=256)
    for i in range(12):
        fsample(flux, m, prompt=f"prompt number {i}", seed=i)
        save_images(pk, fake_images(1), dump, prompt=f"prompt number {i}", seed=i, commit=FULL)
    dump.flush()
    with torch.inference_mode():
        out = pk.N["UnboxTrainSAE"].execute("fd", "the dump's only block", 256, 8, "topk", 0, 128, 1e-3, 0.1, 0,
                                            "flux_trained", False)
    sae = out.args[0].sae
    assert (sae.config.block, sae.config.block_arch, sae.d_in, sae.n_features) == ("double.18", "flux", D, 256)
    loaded = pk.N["UnboxLoadSAE"].execute("flux_trained.safetensors").args[0]
    feature = int(loaded.sae.stats.frequency.argmax())
    steered = steer(pk, fmodel, loaded, str(feature), 4.0)
    assert not torch.equal(fsample(flux, steered, seed=7), fsample(flux, fmodel, seed=7))


def test_the_train_node_defaults_to_the_papers_flux_sae_size(pk, flux, fmodel, tmp_path, output_dir, monkeypatch):
    """n_features and k at 0 take the paper's SAE size for the dump's architecture: FLUX 12288 and 20."""
    import folder_paths

    from test_dump import dump_node, fake_images, save_images

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sae", ([str(tmp_path / "sae")], {".safetensors"}))
    m, dump = dump_node(pk, fmodel, output_dir / "small", blocks="single.3", rows=256)
    for i in range(4):
        fsample(flux, m, prompt=f"p {i}", seed=i)
        save_images(pk, fake_images(1), dump, prompt=f"p {i}", seed=i)
    with torch.inference_mode():
        out = pk.N["UnboxTrainSAE"].execute("small", "the dump's only block", 0, 0, "topk", 64, 64, 1e-3, 0.0, 0,
                                            "paper_size", False)
    sae = out.args[0].sae
    assert (sae.n_features, sae.config.k, sae.config.block) == (12288, 20, "single.3")


def test_top_features_can_leave_out_always_on_features(pk, flux, fmodel):
    h = make_sae(pk, "double.18", seed=9)
    probed, probes = pk.N["UnboxProbeBlock"].execute(fmodel, h, AUTO, "all", "cond").args
    fsample(flux, probed)
    image = torch.rand(1, 128, 128, 3)

    def ranking(hide):
        out = pk.N["UnboxTopFeatures"].execute(probes, image, 5, "first probed block", -1, 0, 3, "inferno", 0.6, "",
                                               hide_above_frequency=hide)
        return json.loads(out.args[1])

    first = ranking(1.0)
    top = first["features"][0]["feature"]
    h.sae.stats.frequency[:] = 0.1
    h.sae.stats.frequency[top] = 0.97  # fires nearly everywhere: an always-on feature
    hidden = ranking(0.9)
    assert hidden["hidden_features"] == [top] and top not in [f["feature"] for f in hidden["features"]]
    # the rest of the ranking moves up by one
    assert [f["feature"] for f in hidden["features"]][:4] == [f["feature"] for f in first["features"]][1:5]
    h.sae.stats.frequency = None
    with pytest.raises(ValueError, match="has no frequency statistics to tell always-on features by"):
        ranking(0.5)
