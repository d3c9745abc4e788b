"""saprmarks/dictionary_learning folders (`config.json` + `ae.pt`), written in the library's own layout (its
trainers' `config` and each dictionary class's state_dict), checked against each class's encode/decode written
out here with plain torch ops."""

import json
import math

import pytest
import torch

import sae_models
from sae_models import SAEFormatError, UnsafePickleError

D, N, K = 16, 64, 5
SUBMODULE = "unet.up_blocks.0.attentions.0"  # -> up.0.0


def trainer_cfg(dict_class, d=D, n=N, k=K, **extra):
    """config.json as training.trainSAE writes it: {"trainer": trainer.config, "buffer": data.config}."""
    trainer_class = {
        "AutoEncoder": "StandardTrainerAprilUpdate",
        "AutoEncoderNew": "StandardTrainerNew",
        "AutoEncoderTopK": "TopKTrainer",
        "BatchTopKSAE": "BatchTopKTrainer",
        "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer",
        "JumpReluAutoEncoder": "JumpReluTrainer",
        "GatedAutoEncoder": "GatedSAETrainer",
    }.get(dict_class, "SomeTrainer")
    trainer = {
        "trainer_class": trainer_class,
        "dict_class": dict_class,
        "lr": 1e-4,
        "steps": 1000,
        "seed": 0,
        "activation_dim": d,
        "dict_size": n,
        "device": "cuda:0",
        "layer": 3,
        "lm_name": "stabilityai/sdxl-turbo",
        "wandb_name": dict_class,
        "submodule_name": SUBMODULE,
    }
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        trainer.update(k=k, auxk_alpha=1 / 32, threshold_beta=0.999, threshold_start_step=1000)
    if dict_class == "AutoEncoder":
        trainer.update(l1_penalty=0.1, sparsity_warmup_steps=100)
    if dict_class == "JumpReluAutoEncoder":
        trainer.update(bandwidth=0.001, sparsity_penalty=1.0, target_l0=20.0)
    trainer.update(extra)
    return {
        "trainer": trainer,
        "buffer": {"d_submodule": d, "io": "out", "n_ctxs": 3000, "ctx_len": 128, "refresh_batch_size": 512,
                   "out_batch_size": 8192, "device": "cuda:0"},
    }


def state_dict(dict_class, d=D, n=N, k=K, threshold=None):
    """A random state_dict with the class's parameter and buffer names and shapes."""
    enc_w = torch.randn(n, d) / math.sqrt(d) * 2
    enc_b = torch.randn(n) * 0.3
    dec = torch.randn(n, d) / math.sqrt(d) * (torch.rand(n, 1) + 0.5)  # decoder rows of varied norm
    b_dec = torch.randn(d) * 0.5
    if dict_class == "AutoEncoder":  # nn.Linear encoder / decoder(bias=False) + `bias`
        return {"bias": b_dec, "encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec.T.contiguous()}
    if dict_class == "AutoEncoderNew":  # nn.Linear encoder and decoder, both with bias
        return {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec.T.contiguous(),
                "decoder.bias": b_dec}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):  # buffers k (int), threshold (float32 scalar)
        thr = torch.tensor(-1.0 if threshold is None else threshold)
        return {"k": torch.tensor(k, dtype=torch.int), "threshold": thr,
                "decoder.weight": dec.T.contiguous(), "encoder.weight": enc_w, "encoder.bias": enc_b, "b_dec": b_dec}
    if dict_class == "MatryoshkaBatchTopKSAE":  # nn.Parameter W_enc [d, n], W_dec [n, d]
        return {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold),
                "group_sizes": torch.tensor([8, 24, n - 32]), "W_enc": enc_w.T.contiguous(), "b_enc": enc_b,
                "W_dec": dec, "b_dec": b_dec}
    if dict_class == "JumpReluAutoEncoder":
        return {"W_enc": enc_w.T.contiguous(), "b_enc": enc_b, "W_dec": dec, "b_dec": b_dec,
                "threshold": torch.rand(n) * 1.5}  # cuts a good share of the positive pre-activations
    raise ValueError(dict_class)


def write(root, cfg, sd, name="trainer_0"):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))
    torch.save(sd, folder / "ae.pt")
    return folder


# ---- each class's math, written out --------------------------------------------------------------

def normalized_autoencoder(sd):
    """AutoEncoder.from_pretrained(normalize_decoder=True): decoder columns to unit norm, encoder rows and
    encoder bias multiplied by the same norms."""
    norms = sd["decoder.weight"].norm(dim=0)
    return {**sd, "decoder.weight": sd["decoder.weight"] / norms,
            "encoder.weight": sd["encoder.weight"] * norms[:, None], "encoder.bias": sd["encoder.bias"] * norms}


def reference(dict_class, sd, x):
    """(codes, reconstruction) as the class's encode / decode compute them."""
    if dict_class == "AutoEncoder":
        f = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f, f @ sd["decoder.weight"].T + sd["bias"]
    if dict_class == "AutoEncoderNew":
        f = torch.relu(x @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f, f @ sd["decoder.weight"].T + sd["decoder.bias"]
    if dict_class == "AutoEncoderTopK":  # encode(use_threshold=False), the default
        post = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        vals, idx = post.topk(int(sd["k"]), dim=-1, sorted=False)
        f = torch.zeros_like(post).scatter(-1, idx, vals)
        return f, f @ sd["decoder.weight"].T + sd["b_dec"]
    if dict_class == "BatchTopKSAE":  # encode(use_threshold=True), the default
        post = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        f = post * (post > sd["threshold"])
        return f, f @ sd["decoder.weight"].T + sd["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        f = post * (post > sd["threshold"])
        return f, f @ sd["W_dec"] + sd["b_dec"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input = False
        pre = x @ sd["W_enc"] + sd["b_enc"]
        f = torch.relu(pre * (pre > sd["threshold"]))
        return f, f @ sd["W_dec"] + sd["b_dec"]
    raise ValueError(dict_class)


CLASSES = {
    "AutoEncoder": ("relu", None, True),
    "AutoEncoderNew": ("relu", None, False),
    "AutoEncoderTopK": ("topk", K, True),
    "BatchTopKSAE": ("batchtopk", K, True),
    "MatryoshkaBatchTopKSAE": ("batchtopk", K, True),
    "JumpReluAutoEncoder": ("jumprelu", None, False),
}


@pytest.mark.parametrize("dict_class", list(CLASSES))
def test_dictionary_learning_matches_each_class(tmp_path, dict_class):
    torch.manual_seed(0)
    x = torch.randn(40, D) * 2
    sd = state_dict(dict_class, threshold=0.6)
    folder = write(tmp_path, trainer_cfg(dict_class), sd)
    sae = sae_models.load(folder)
    assert sae_models.detect(folder)[0] == "dictionary_learning"
    arch, k, apply_b_dec = CLASSES[dict_class]
    c = sae.config
    assert (c.architecture, c.k, c.d_in, c.n_features, c.source_format) == (arch, k, D, N, "dictionary_learning")
    assert c.apply_b_dec_to_input is apply_b_dec and c.normalize == "none" and c.hook == "update"
    assert c.block == "up.0.0" and c.base_model == "stabilityai/sdxl-turbo"
    assert c.hyperparameters["dict_class"] == dict_class and c.hyperparameters["buffer_io"] == "out"

    ref_sd = normalized_autoencoder(sd) if dict_class == "AutoEncoder" else sd
    z, x_hat = reference(dict_class, ref_sd, x)
    assert (z > 0).any()
    if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):  # thresholds really cut
        if dict_class == "BatchTopKSAE":
            pre = (x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"]
        elif dict_class == "MatryoshkaBatchTopKSAE":
            pre = (x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]
        else:
            pre = x @ sd["W_enc"] + sd["b_enc"]
        assert (pre > 0).sum() - (z > 0).sum() > 20
    assert torch.allclose(sae.encode(x), z, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae(x), x_hat, atol=1e-4, rtol=1e-5)
    assert torch.allclose(sae.decode(z), x_hat, atol=1e-4, rtol=1e-5)
    assert torch.allclose(sae.encode(x.view(4, 10, D)), z.view(4, 10, N), atol=1e-5, rtol=1e-5)
    if dict_class == "AutoEncoder":
        # the loader's decoder normalisation keeps the reconstruction of the file's raw weights
        assert torch.allclose(sae(x), reference(dict_class, sd, x)[1], atol=1e-4, rtol=1e-5)
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(N), atol=1e-5)
        assert c.hyperparameters["decoder_normalized_on_load"] is True


def test_dictionary_learning_topk_threshold_and_old_files_without_k_buffer(tmp_path):
    """AutoEncoderTopK's tracked threshold does not change its (default) encode; files from before the k
    buffer take k from the config."""
    torch.manual_seed(1)
    sd = state_dict("AutoEncoderTopK", threshold=0.8)
    sae = sae_models.load(write(tmp_path / "a", trainer_cfg("AutoEncoderTopK"), sd))
    x = torch.randn(20, D)
    assert torch.allclose(sae.encode(x), reference("AutoEncoderTopK", sd, x)[0], atol=1e-5)
    assert sae.config.hyperparameters["threshold"] == pytest.approx(0.8)
    old = {key: v for key, v in sd.items() if key not in ("k", "threshold")}
    sae = sae_models.load(write(tmp_path / "b", trainer_cfg("AutoEncoderTopK", k=3), old))
    assert sae.config.k == 3


def test_dictionary_learning_batchtopk_untracked_threshold_is_relu(tmp_path):
    """threshold = -1 (never tracked): every positive activation passes, as in the library."""
    torch.manual_seed(2)
    sd = state_dict("BatchTopKSAE", threshold=-1.0)
    sae = sae_models.load(write(tmp_path, trainer_cfg("BatchTopKSAE"), sd))
    x = torch.randn(20, D)
    z = reference("BatchTopKSAE", sd, x)[0]
    assert torch.allclose(sae.encode(x), z, atol=1e-5)
    pre = (x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"]
    assert torch.equal(sae.encode(x) > 0, pre > 0)


def test_dictionary_learning_block_from_folder_and_old_config(tmp_path):
    """No submodule name: the block comes from the folder; configs without dict_class were AutoEncoders."""
    torch.manual_seed(3)
    cfg = trainer_cfg("AutoEncoder", submodule_name=None)
    del cfg["trainer"]["dict_class"]
    sae = sae_models.load(write(tmp_path / "unet.mid_block.attentions.0", cfg, state_dict("AutoEncoder")))
    assert sae.config.architecture == "relu" and sae.config.block == "mid.0"
    sae = sae_models.load(write(tmp_path / "elsewhere", trainer_cfg("AutoEncoder", submodule_name="resid_3"),
                                state_dict("AutoEncoder")))
    assert sae.config.block is None


def test_dictionary_learning_keeps_the_files_dtype(tmp_path):
    sd = {key: (v.to(torch.bfloat16) if v.is_floating_point() else v)
          for key, v in state_dict("JumpReluAutoEncoder").items()}
    sae = sae_models.load(write(tmp_path, trainer_cfg("JumpReluAutoEncoder"), sd))
    assert sae.dtype == torch.bfloat16 and torch.equal(sae.threshold, sd["threshold"])


@pytest.mark.parametrize("dict_class", list(CLASSES))
def test_dictionary_learning_file_path_and_native_round_trip(tmp_path, dict_class):
    torch.manual_seed(4)
    folder = write(tmp_path, trainer_cfg(dict_class), state_dict(dict_class, threshold=0.5))
    sae = sae_models.load(folder / "ae.pt")
    back = sae_models.load(sae_models.save(sae, tmp_path / "x.safetensors"))
    assert type(back) is type(sae) and back.config == sae.config
    assert sae.state_dict().keys() == back.state_dict().keys()
    for name, t in sae.state_dict().items():
        assert t.dtype == back.state_dict()[name].dtype and torch.equal(t, back.state_dict()[name]), name


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dict_class,missing", [
    ("AutoEncoder", "bias"), ("AutoEncoderTopK", "b_dec"), ("JumpReluAutoEncoder", "threshold"),
    ("MatryoshkaBatchTopKSAE", "W_dec"),
])
def test_dictionary_learning_missing_tensor(tmp_path, dict_class, missing):
    sd = state_dict(dict_class, threshold=0.5)
    del sd[missing]
    with pytest.raises(SAEFormatError, match=f"ae.pt.*missing tensor '{missing}'"):
        sae_models.load(write(tmp_path, trainer_cfg(dict_class), sd))


def test_dictionary_learning_batchtopk_without_threshold(tmp_path):
    sd = state_dict("BatchTopKSAE", threshold=0.5)
    del sd["threshold"]
    with pytest.raises(SAEFormatError, match="ae.pt.*missing tensor 'threshold'.*depends on the batch"):
        sae_models.load(write(tmp_path, trainer_cfg("BatchTopKSAE"), sd))


def test_dictionary_learning_shape_contradicting_config(tmp_path):
    with pytest.raises(SAEFormatError, match=r"ae.pt.*'encoder.weight'.*\[64, 16\].*\[64, 20\]"):
        sae_models.load(write(tmp_path / "a", trainer_cfg("AutoEncoderTopK", d=20), state_dict("AutoEncoderTopK")))
    with pytest.raises(SAEFormatError, match=r"ae.pt.*'W_enc'.*\[16, 64\].*\[16, 32\]"):
        sae_models.load(write(tmp_path / "b", trainer_cfg("JumpReluAutoEncoder", n=32),
                              state_dict("JumpReluAutoEncoder")))
    with pytest.raises(SAEFormatError, match="ae.pt.*tensor 'k' is 5 but config.json says trainer.k=7"):
        sae_models.load(write(tmp_path / "c", trainer_cfg("BatchTopKSAE", k=7),
                              state_dict("BatchTopKSAE", threshold=0.5)))
    sd = state_dict("MatryoshkaBatchTopKSAE", threshold=0.5)
    sd["group_sizes"] = torch.tensor([8, 8])
    with pytest.raises(SAEFormatError, match="ae.pt.*group_sizes sum to 16, not dict_size=64"):
        sae_models.load(write(tmp_path / "d", trainer_cfg("MatryoshkaBatchTopKSAE"), sd))


@pytest.mark.parametrize("dict_class,message", [
    ("FancySAE", "unknown dictionary class 'FancySAE'"),
    ("GatedAutoEncoder", "unsupported dictionary class 'GatedAutoEncoder'"),
])
def test_dictionary_learning_unknown_or_unsupported_class(tmp_path, dict_class, message):
    with pytest.raises(SAEFormatError, match="config.json.*" + message):
        sae_models.load(write(tmp_path, trainer_cfg(dict_class), state_dict("AutoEncoder")))


def test_dictionary_learning_config_and_file_errors(tmp_path):
    cfg = trainer_cfg("AutoEncoder")
    del cfg["trainer"]["dict_size"]
    with pytest.raises(SAEFormatError, match="config.json.*missing config key 'trainer.dict_size'"):
        sae_models.load(write(tmp_path / "a", cfg, state_dict("AutoEncoder")))
    with pytest.raises(SAEFormatError, match="config.json.*missing config key 'trainer'"):
        sae_models.load(write(tmp_path / "b", {"buffer": {}}, state_dict("AutoEncoder")))
    backup = {"step": 500, "ae": state_dict("AutoEncoder"), "optimizer": {"state": {}, "param_groups": []},
              "config": trainer_cfg("AutoEncoder")["trainer"], "norm_factor": 3.0}
    with pytest.raises(SAEFormatError, match="ae.pt.*mid-training backup"):
        sae_models.load(write(tmp_path / "c", trainer_cfg("AutoEncoder"), backup))
    folder = write(tmp_path / "d", trainer_cfg("AutoEncoder"), state_dict("AutoEncoder"))
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(SAEFormatError, match="ae.pt.*(corrupt|truncated)"):
        sae_models.load(folder)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def test_dictionary_learning_pickled_module_is_refused_and_not_run(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match="ae.pt.*refused"):
        sae_models.load(write(tmp_path, trainer_cfg("AutoEncoder"), {**state_dict("AutoEncoder"), "x": _Evil()}))
    assert not _Evil.marker.exists()
