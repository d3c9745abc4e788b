"""SAELens folders (`cfg.json` + `sae_weights.safetensors`), written in SAELens's own layout, checked against
SAELens's encode/decode formulas written out here with plain torch ops."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import sae_models
from sae_models import SAEFormatError

D, N, K = 16, 64, 5
HOOK = "unet.up_blocks.0.attentions.1"  # -> up.0.1


def v6_cfg(arch, d=D, n=N, k=K, normalize="none", apply_b_dec=True, hook_name=HOOK, **extra):
    """cfg.json as SAELens >= 6 writes it (SAE.save_model / save_inference_model: cfg.to_dict())."""
    cfg = {
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": normalize,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.18.0",
            "sae_lens_training_version": "6.18.0",
            "model_name": "sdxl-turbo",
            "hook_name": hook_name,
            "hook_head_index": None,
            "context_size": 1024,
            "prepend_bos": False,
            "dataset_path": "prompts",
            "seqpos_slice": [None],
            "model_from_pretrained_kwargs": {},
        },
        "architecture": arch,
    }
    if arch == "topk":
        cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    cfg.update(extra)
    return cfg


def v5_cfg(arch, d=D, n=N, k=K, normalize="none", apply_b_dec=True, hook_key="hook_name", hook_name=HOOK, **extra):
    """cfg.json as SAELens 5.x wrote it (SAEConfig.to_dict()); topk SAEs were "standard" with a topk
    activation function and k in activation_fn_kwargs."""
    cfg = {
        "architecture": "standard" if arch == "topk" else arch,
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "sdxl-turbo",
        hook_key: hook_name,
        "hook_layer": 0,
        "hook_head_index": None,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": k} if arch == "topk" else {},
        "apply_b_dec_to_input": apply_b_dec,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "5.10.7",
        "prepend_bos": False,
        "dataset_path": "prompts",
        "dataset_trust_remote_code": True,
        "context_size": 1024,
        "normalize_activations": normalize,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }
    cfg.update(extra)
    return cfg


def random_weights(arch, d=D, n=N, dtype=torch.float32):
    w = {
        "W_enc": torch.randn(d, n) / math.sqrt(d) * 2,
        "b_enc": torch.randn(n) * 0.3,
        "W_dec": torch.randn(n, d) / math.sqrt(d),
        "b_dec": torch.randn(d) * 0.5,
    }
    if arch == "jumprelu":
        w["threshold"] = torch.rand(n) * 1.5  # cuts a good share of the positive pre-activations
    return {key: v.to(dtype) for key, v in w.items()}


def write(folder, cfg, weights, **files):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    for name, content in files.items():
        if name.endswith("_json"):
            (folder / (name[: -len("_json")] + ".json")).write_text(json.dumps(content))
        else:
            assert name.endswith("_st")
            save_file(content, str(folder / (name[: -len("_st")] + ".safetensors")))
    return folder


# ---- SAELens's math, written out -----------------------------------------------------------------

def saelens_norm_in(x, normalize, scale=None):
    """SAELens's run_time_activation_norm_fn_in (and, for expected_average_only_in, the ActivationScaler
    that multiplied the training activations)."""
    if normalize == "constant_norm_rescale":
        c = math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True)
        return x * c, c
    if normalize == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        return xc / (std + 1e-5), (mu, std)
    if normalize == "expected_average_only_in":
        return x * scale, scale
    return x, None


def saelens_norm_out(y, normalize, info):
    if normalize == "constant_norm_rescale":
        return y / info
    if normalize == "layer_norm":
        mu, std = info
        return y * std + mu
    if normalize == "expected_average_only_in":
        return y / info
    return y


def saelens_encode(w, arch, x, k=K, apply_b_dec=True, normalize="none", scale=None, rescale_by_norm=False):
    xin, _ = saelens_norm_in(x, normalize, scale)
    sae_in = xin - w["b_dec"] * apply_b_dec
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        if rescale_by_norm:
            pre = pre * w["W_dec"].norm(dim=-1)
        vals, idx = torch.topk(pre, k=k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    if arch == "jumprelu":
        return pre.relu() * (pre > w["threshold"]).to(pre.dtype)
    return pre.relu()


def saelens_decode(w, codes, rescale_by_norm=False, finetuning_scale=None):
    if rescale_by_norm:
        codes = codes / w["W_dec"].norm(dim=-1)
    if finetuning_scale is not None:
        codes = codes * finetuning_scale
    return codes @ w["W_dec"] + w["b_dec"]


def saelens_forward(w, arch, x, normalize="none", scale=None, apply_b_dec=True, rescale_by_norm=False,
                    finetuning_scale=None):
    _, info = saelens_norm_in(x, normalize, scale)
    codes = saelens_encode(w, arch, x, apply_b_dec=apply_b_dec, normalize=normalize, scale=scale,
                           rescale_by_norm=rescale_by_norm)
    y = saelens_decode(w, codes, rescale_by_norm, finetuning_scale)
    return saelens_norm_out(y, normalize, info)


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v6", "v5"])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_matches_saelens_math(tmp_path, version, arch, apply_b_dec):
    torch.manual_seed(0)
    make = v6_cfg if version == "v6" else v5_cfg
    w = random_weights(arch)
    folder = write(tmp_path / "sae", make(arch, apply_b_dec=apply_b_dec), w)
    sae = sae_models.load(folder)
    assert sae_models.detect(folder)[0] == "saelens"
    c = sae.config
    expected_arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    assert (c.architecture, c.d_in, c.n_features, c.source_format) == (expected_arch, D, N, "saelens")
    assert c.k == (K if arch == "topk" else None)
    assert c.apply_b_dec_to_input is apply_b_dec and c.normalize == "none" and c.hook == "update"
    assert c.block == "up.0.1" and c.base_model == "sdxl-turbo"
    assert c.hyperparameters["hook_name"] == HOOK

    x = torch.randn(40, D) * 2
    z = saelens_encode(w, arch, x, apply_b_dec=apply_b_dec)
    if arch == "jumprelu":  # the thresholds really cut features
        pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
        assert ((pre > 0) & (pre <= w["threshold"])).sum() > 20
    assert (z > 0).any()
    assert torch.allclose(sae.encode(x), z, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae.decode(z), saelens_decode(w, z), atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae(x), saelens_forward(w, arch, x, apply_b_dec=apply_b_dec), atol=1e-4, rtol=1e-5)
    # any leading shape
    assert torch.allclose(sae.encode(x.view(4, 10, D)), z.view(4, 10, N), atol=1e-5, rtol=1e-5)


def test_saelens_older_key_names(tmp_path):
    """SAELens < 6 also wrote `hook_point` and `activation_fn`, and a boolean normalize_activations."""
    torch.manual_seed(1)
    w = random_weights("topk")
    cfg = v5_cfg("topk", hook_key="hook_point", hook_name="diffusion_model.output_blocks.1.1")
    cfg["activation_fn"] = cfg.pop("activation_fn_str")
    cfg["normalize_activations"] = False
    del cfg["apply_b_dec_to_input"]  # SAELens defaults it to True
    sae = sae_models.load(write(tmp_path / "s", cfg, w))
    assert (sae.config.architecture, sae.config.k, sae.config.block) == ("topk", K, "up.0.1")
    assert sae.config.apply_b_dec_to_input and sae.config.normalize == "none"
    x = torch.randn(20, D)
    assert torch.allclose(sae.encode(x), saelens_encode(w, "topk", x), atol=1e-5)


def test_saelens_block_from_folder_when_hook_has_none(tmp_path):
    w = random_weights("standard")
    cfg = v6_cfg("standard", hook_name="blocks.3.hook_resid_post")
    folder = write(tmp_path / "unet.mid_block.attentions.0", cfg, w)
    assert sae_models.load(folder).config.block == "mid.0"
    folder = write(tmp_path / "plain", cfg, w)
    assert sae_models.load(folder).config.block is None


@pytest.mark.parametrize("normalize", ["constant_norm_rescale", "layer_norm"])
def test_saelens_runtime_normalisations(tmp_path, normalize):
    torch.manual_seed(2)
    w = random_weights("topk")
    sae = sae_models.load(write(tmp_path / "s", v6_cfg("topk", normalize=normalize), w))
    assert sae.config.normalize == normalize
    x = torch.randn(30, D) * 3 + 1
    assert torch.allclose(sae.encode(x), saelens_encode(w, "topk", x, normalize=normalize), atol=1e-5, rtol=1e-5)
    ref = saelens_forward(w, "topk", x, normalize=normalize)
    assert torch.allclose(sae(x), ref, atol=1e-4, rtol=1e-4)


def test_saelens_expected_average_only_in_with_activation_scaler(tmp_path):
    """SAELens >= 6 training checkpoints keep the factor in activation_scaler.json; the SAE works on x * factor."""
    torch.manual_seed(3)
    w = random_weights("jumprelu")
    cfg = v6_cfg("jumprelu", normalize="expected_average_only_in")
    folder = write(tmp_path / "s", cfg, w, activation_scaler_json={"scaling_factor": 0.37})
    sae = sae_models.load(folder)
    assert (sae.config.normalize, sae.config.input_scale) == ("scale", 0.37)
    assert sae.config.hyperparameters["scaling_factor_source"] == "activation_scaler.json"
    x = torch.randn(30, D) * 5
    z = saelens_encode(w, "jumprelu", x, normalize="expected_average_only_in", scale=0.37)
    assert (z > 0).any()
    assert torch.allclose(sae.encode(x), z, atol=1e-5, rtol=1e-5)
    ref = saelens_forward(w, "jumprelu", x, normalize="expected_average_only_in", scale=0.37)
    assert torch.allclose(sae(x), ref, atol=1e-4, rtol=1e-5)
    # decoder directions in input units
    assert torch.allclose(sae.feature_directions([3]), w["W_dec"][3:4] / 0.37)


def test_saelens_v5_scaling_factor_in_activations_store_state(tmp_path):
    torch.manual_seed(4)
    w = random_weights("standard")
    cfg = v5_cfg("standard", normalize=True)  # boolean: the April-update scaling
    store = {"n_dataset_processed": torch.tensor(10), "estimated_norm_scaling_factor": torch.tensor(2.5)}
    sae = sae_models.load(write(tmp_path / "s", cfg, w, activations_store_state_st=store))
    assert (sae.config.normalize, sae.config.input_scale) == ("scale", 2.5)
    x = torch.randn(10, D)
    z = saelens_encode(w, "standard", x, normalize="expected_average_only_in", scale=2.5)
    assert torch.allclose(sae.encode(x), z, atol=1e-5)


def test_saelens_expected_average_only_in_without_factor_is_refused(tmp_path):
    w = random_weights("topk")
    cfg = v6_cfg("topk", normalize="expected_average_only_in")
    with pytest.raises(SAEFormatError, match="cfg.json.*scaling factor is missing"):
        sae_models.load(write(tmp_path / "a", cfg, w))
    # a final checkpoint: SAELens has folded the factor and saved scaling_factor = null
    with pytest.raises(SAEFormatError, match="cfg.json.*scaling factor is missing"):
        sae_models.load(write(tmp_path / "b", cfg, w, activation_scaler_json={"scaling_factor": None}))
    with pytest.raises(SAEFormatError, match="activation_scaler.json.*positive number"):
        sae_models.load(write(tmp_path / "c", cfg, w, activation_scaler_json={"scaling_factor": -1}))


def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path):
    """A TopK training checkpoint with rescale_acts_by_decoder_norm: top k of pre * |W_dec_f|, codes divided by
    |W_dec_f| before decoding."""
    torch.manual_seed(5)
    w = random_weights("topk")
    w["W_dec"] = w["W_dec"] * (torch.rand(N, 1) * 3 + 0.2)
    cfg = v6_cfg("topk", rescale_acts_by_decoder_norm=True, aux_loss_coefficient=1.0, decoder_init_norm=0.1)
    sae = sae_models.load(write(tmp_path / "s", cfg, w))
    x = torch.randn(30, D)
    z = saelens_encode(w, "topk", x, rescale_by_norm=True)
    assert torch.allclose(sae.encode(x), z, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae.decode(z), saelens_decode(w, z, rescale_by_norm=True), atol=1e-4, rtol=1e-5)
    assert torch.allclose(sae(x), saelens_forward(w, "topk", x, rescale_by_norm=True), atol=1e-4, rtol=1e-5)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(N), atol=1e-5)
    assert sae.config.hyperparameters["decoder_norm_folded"] is True


def test_saelens_v5_finetuning_scaling_factor(tmp_path):
    torch.manual_seed(6)
    w = random_weights("standard")
    s = torch.rand(N) + 0.5
    cfg = v5_cfg("standard", finetuning_scaling_factor=True)
    sae = sae_models.load(write(tmp_path / "a", cfg, {**w, "scaling_factor": s}))
    x = torch.randn(20, D)
    z = saelens_encode(w, "standard", x)
    assert torch.allclose(sae.encode(x), z, atol=1e-5)
    assert torch.allclose(sae(x), saelens_forward(w, "standard", x, finetuning_scale=s), atol=1e-4)
    # all-ones factors are dropped, as SAELens does
    sae = sae_models.load(write(tmp_path / "b", v5_cfg("standard"), {**w, "scaling_factor": torch.ones(N)}))
    assert torch.equal(sae.W_dec, w["W_dec"])
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors.*finetuning_scaling_factor is false"):
        sae_models.load(write(tmp_path / "c", v5_cfg("standard"), {**w, "scaling_factor": s}))


def test_saelens_sparsity_file_gives_frequencies(tmp_path):
    torch.manual_seed(7)
    freq = torch.rand(N) * 0.1
    folder = write(tmp_path / "s", v6_cfg("topk"), random_weights("topk"),
                   sparsity_st={"sparsity": torch.log10(freq + 1e-10)})
    sae = sae_models.load(folder)
    assert torch.allclose(sae.stats.frequency, freq, rtol=1e-4, atol=1e-8)


def test_saelens_keeps_the_files_dtype(tmp_path):
    w = random_weights("jumprelu", dtype=torch.bfloat16)
    sae = sae_models.load(write(tmp_path / "s", v6_cfg("jumprelu", dtype="bfloat16"), w))
    assert sae.dtype == torch.bfloat16 and torch.equal(sae.threshold, w["threshold"])


def test_saelens_file_path_and_native_round_trip(tmp_path):
    torch.manual_seed(8)
    for arch in ("standard", "topk", "jumprelu"):
        folder = write(tmp_path / arch, v6_cfg(arch), random_weights(arch),
                       sparsity_st={"sparsity": torch.rand(N) * -5})
        sae = sae_models.load(folder / "sae_weights.safetensors")
        out = sae_models.save(sae, tmp_path / f"{arch}.safetensors")
        back = sae_models.load(out)
        assert type(back) is type(sae) and back.config == sae.config
        assert back.config.source_format == "saelens"
        assert sae.state_dict().keys() == back.state_dict().keys()
        for name, t in sae.state_dict().items():
            assert t.dtype == back.state_dict()[name].dtype and torch.equal(t, back.state_dict()[name]), name
        assert torch.equal(back.stats.frequency, sae.stats.frequency)


# ---- errors -------------------------------------------------------------------------------------

def test_saelens_missing_tensor(tmp_path):
    w = random_weights("standard")
    del w["b_enc"]
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors.*missing tensor 'b_enc'"):
        sae_models.load(write(tmp_path / "a", v6_cfg("standard"), w))
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors.*missing tensor 'threshold'"):
        sae_models.load(write(tmp_path / "b", v6_cfg("jumprelu"), random_weights("standard")))


def test_saelens_shape_contradicting_config(tmp_path):
    with pytest.raises(SAEFormatError, match=r"sae_weights.safetensors.*'W_enc'.*\[16, 64\].*\[20, 64\]"):
        sae_models.load(write(tmp_path / "a", v6_cfg("standard", d=20), random_weights("standard")))
    w = random_weights("jumprelu")
    w["threshold"] = torch.rand(N - 1)
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors.*'threshold'"):
        sae_models.load(write(tmp_path / "b", v6_cfg("jumprelu"), w))
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors.*k="):
        sae_models.load(write(tmp_path / "c", v6_cfg("topk", k=N + 1), random_weights("topk")))


@pytest.mark.parametrize("arch,message", [
    ("foo", "unknown SAELens architecture 'foo'"),
    ("gated", "unsupported SAELens architecture 'gated'"),
    ("batchtopk", "unsupported SAELens architecture 'batchtopk'.*jumprelu"),
    ("transcoder", "unsupported SAELens architecture 'transcoder'"),
])
def test_saelens_unknown_or_unsupported_architecture(tmp_path, arch, message):
    with pytest.raises(SAEFormatError, match="cfg.json.*" + message):
        sae_models.load(write(tmp_path / "a", v6_cfg(arch), random_weights("standard")))


def test_saelens_config_errors(tmp_path):
    w = random_weights("topk")
    cfg = v6_cfg("topk")
    del cfg["d_sae"]
    with pytest.raises(SAEFormatError, match="cfg.json.*missing config key 'd_sae'"):
        sae_models.load(write(tmp_path / "a", cfg, w))
    cfg = v6_cfg("topk")
    del cfg["k"]
    with pytest.raises(SAEFormatError, match="cfg.json.*missing config key 'k'"):
        sae_models.load(write(tmp_path / "b", cfg, w))
    with pytest.raises(SAEFormatError, match="cfg.json.*unknown normalize_activations 'zscore'"):
        sae_models.load(write(tmp_path / "c", v6_cfg("topk", normalize="zscore"), w))
    with pytest.raises(SAEFormatError, match="cfg.json.*activation function 'tanh-relu'"):
        sae_models.load(write(tmp_path / "d", v5_cfg("standard", activation_fn_str="tanh-relu"), w))
    folder = write(tmp_path / "e", v6_cfg("topk"), w)
    (folder / "cfg.json").write_text("{broken")
    with pytest.raises(SAEFormatError, match="cfg.json.*not valid JSON"):
        sae_models.load(folder)


# ---- writing -------------------------------------------------------------------------------------

def _sae_of(arch, normalize="none", input_scale=1.0, threshold=0.3):
    g = torch.Generator().manual_seed(4)
    config = sae_models.SAEConfig(architecture=arch, d_in=D, n_features=N, k=K if arch in ("topk", "batchtopk",
                                  "matryoshka_batchtopk") else None, block="up.0.1", base_model="sdxl-turbo",
                                  normalize=normalize, input_scale=input_scale)
    sae = sae_models.build(config)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g) * 0.5)
        if "threshold" in sae.extra_tensors:
            sae.threshold.fill_(threshold) if sae.threshold.numel() == 1 else sae.threshold.copy_(
                torch.rand(N, generator=g) * 0.5)
    sae.stats = sae_models.FeatureStats(frequency=torch.rand(N, generator=g) * 0.2)
    return sae


@pytest.mark.parametrize("arch, saved_as", [("topk", "topk"), ("batchtopk", "jumprelu"),
                                            ("matryoshka_batchtopk", "jumprelu"), ("jumprelu", "jumprelu"),
                                            ("relu", "standard")])
@pytest.mark.parametrize("normalize, scale", [("none", 1.0), ("scale", 0.25), ("layer_norm", 1.0)])
def test_written_folder_is_what_saelens_computes(tmp_path, arch, saved_as, normalize, scale):
    """The folder the pack writes, read with SAELens's math written out above (not the pack's reader), gives
    the pack's codes and reconstructions; the pack's reader loads it back; frequencies survive."""
    from safetensors.torch import load_file

    sae = _sae_of(arch, normalize, scale)
    folder = sae_models.formats.saelens.save(sae, tmp_path / "out")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == saved_as and (cfg["d_in"], cfg["d_sae"]) == (D, N)
    assert cfg["metadata"]["hook_name"] == "up_blocks.0.attentions.1"  # the block in diffusers naming
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (D, N)
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1)) * 2
    norm = "none" if normalize == "scale" else normalize  # a scale is folded into the weights
    assert cfg["normalize_activations"] == norm
    codes = saelens_encode(w, saved_as, x, k=cfg.get("k", K), normalize=norm)
    assert torch.allclose(codes, sae.encode(x), atol=1e-5)
    assert torch.allclose(saelens_forward(w, saved_as, x, normalize=norm), sae(x), atol=1e-4)
    back = sae_models.load(folder)
    assert back.config.block == "up.0.1" and torch.allclose(back(x), sae(x), atol=1e-4)
    assert torch.allclose(back.stats.frequency, sae.stats.frequency, atol=1e-6)


def test_writing_refuses_a_folder_with_files_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    sae = _sae_of("topk")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "cfg.json").write_text("{}")
    with pytest.raises(FileExistsError):
        sae_models.formats.saelens.save(sae, tmp_path / "taken")
    assert (tmp_path / "taken" / "cfg.json").read_text() == "{}"

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="No space"):
        sae_models.formats.saelens.save(sae, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu"])
def test_written_folder_loads_in_saelens_itself(tmp_path, arch):
    """Where SAELens is installed (the training bench's environment), SAELens's own loader reads the folder
    and computes the pack's codes and reconstructions."""
    sae_lens = pytest.importorskip("sae_lens")
    ours = _sae_of(arch, "scale", 0.25)
    folder = sae_models.formats.saelens.save(ours, tmp_path / "out")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        codes = theirs.encode(x)
        assert torch.allclose(codes, ours.encode(x), atol=1e-5)
        assert torch.allclose(theirs.decode(codes), ours(x), atol=1e-5)
