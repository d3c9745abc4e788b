"""EleutherAI sparsify folders (`<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`), written in sparsify's own
layout, checked against sparsify's encode/decode written out here with plain torch ops."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import sae_models
from sae_models import SAEFormatError

D, EXPANSION, K = 16, 4, 6
N = D * EXPANSION
HOOKPOINT = "unet.down_blocks.2.attentions.1"  # -> down.2.1


def sparsify_cfg(d=D, k=K, **extra):
    """cfg.json as SparseCoder.save_to_disk writes it: SparseCoderConfig.to_dict() plus d_in."""
    cfg = {
        "activation": "topk",
        "expansion_factor": EXPANSION,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d,
    }
    cfg.update(extra)
    return cfg


def random_weights(d=D, n=N, dtype=torch.float32):
    """The SparseCoder state dict: encoder = nn.Linear(d_in, num_latents), W_dec [num_latents, d_in], b_dec [d_in]."""
    w = {
        "encoder.weight": torch.randn(n, d) / math.sqrt(d) * 2,
        "encoder.bias": torch.randn(n) * 0.3,
        "W_dec": torch.randn(n, d) / math.sqrt(d),
        "b_dec": torch.randn(d) * 0.5,
    }
    return {key: v.to(dtype) for key, v in w.items()}


def write(root, cfg, weights, hookpoint=HOOKPOINT):
    folder = root / "checkpoints" / "run" / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae.safetensors"))
    return folder


# ---- sparsify's math, written out ----------------------------------------------------------------

def sparsify_encode(w, x, k=K):
    """SparseCoder.encode: top-k of ReLU(encoder(x - b_dec)) -> (top_acts, top_indices)."""
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    return pre.topk(k, dim=-1, sorted=False)


def sparsify_decode(w, top_acts, top_indices):
    """SparseCoder.decode (eager_decode): sum of top_acts * W_dec[top_indices], plus b_dec."""
    return (top_acts.unsqueeze(-1) * w["W_dec"][top_indices]).sum(-2) + w["b_dec"]


def dense(top_acts, top_indices, n=N):
    return torch.zeros(*top_acts.shape[:-1], n).scatter(-1, top_indices, top_acts)


# ---- tests ---------------------------------------------------------------------------------------

def test_sparsify_matches_sparsify_math(tmp_path):
    torch.manual_seed(0)
    w = random_weights()
    folder = write(tmp_path, sparsify_cfg(), w)
    sae = sae_models.load(folder)
    assert sae_models.detect(folder)[0] == "sparsify"
    c = sae.config
    assert (c.architecture, c.k, c.d_in, c.n_features, c.source_format) == ("topk", K, D, N, "sparsify")
    assert c.block == "down.2.1" and c.block_comfy == "input_blocks.8.1" and c.hook == "update"
    assert c.apply_b_dec_to_input and c.normalize == "none"
    assert c.hyperparameters["hookpoint"] == HOOKPOINT and c.hyperparameters["expansion_factor"] == EXPANSION

    x = torch.randn(50, D) * 2
    acts, idx = sparsify_encode(w, x)
    z = dense(acts, idx)
    assert torch.allclose(sae.encode(x), z, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae(x), sparsify_decode(w, acts, idx), atol=1e-4, rtol=1e-5)
    assert torch.allclose(sae.decode(z), sparsify_decode(w, acts, idx), atol=1e-4, rtol=1e-5)
    # the sparse path gives the same active features
    sparse = sae.encode_sparse(x)
    assert torch.allclose(sparse.to_dense(N), z, atol=1e-5, rtol=1e-5)
    assert torch.allclose(sae.decode_sparse(sparse), sparsify_decode(w, acts, idx), atol=1e-4, rtol=1e-5)


def test_sparsify_num_latents_overrides_expansion_factor(tmp_path):
    torch.manual_seed(1)
    w = random_weights(n=40)
    sae = sae_models.load(write(tmp_path, sparsify_cfg(num_latents=40, expansion_factor=32), w))
    assert sae.n_features == 40
    x = torch.randn(10, D)
    acts, idx = sparsify_encode(w, x)
    assert torch.allclose(sae.encode(x), dense(acts, idx, 40), atol=1e-5)


def test_sparsify_older_config_and_d_in_from_the_tensors(tmp_path):
    """Configs from before `activation` / `transcode` existed; a config without d_in."""
    torch.manual_seed(2)
    w = random_weights()
    cfg = {"expansion_factor": EXPANSION, "normalize_decoder": True, "num_latents": 0, "k": K, "multi_topk": False}
    sae = sae_models.load(write(tmp_path, cfg, w, hookpoint="diffusion_model.middle_block.1"))
    assert (sae.d_in, sae.n_features, sae.config.block) == (D, N, "mid.0")
    x = torch.randn(10, D)
    acts, idx = sparsify_encode(w, x)
    assert torch.allclose(sae(x), sparsify_decode(w, acts, idx), atol=1e-4)


def test_sparsify_hookpoint_without_a_block(tmp_path):
    sae = sae_models.load(write(tmp_path, sparsify_cfg(), random_weights(), hookpoint="layers.6"))
    assert sae.config.block is None and sae.config.hyperparameters["hookpoint"] == "layers.6"


def test_sparsify_keeps_the_files_dtype(tmp_path):
    w = random_weights(dtype=torch.bfloat16)
    sae = sae_models.load(write(tmp_path, sparsify_cfg(), w))
    assert sae.dtype == torch.bfloat16 and torch.equal(sae.W_dec, w["W_dec"])


def test_sparsify_file_path_and_native_round_trip(tmp_path):
    torch.manual_seed(3)
    folder = write(tmp_path, sparsify_cfg(), random_weights())
    sae = sae_models.load(folder / "sae.safetensors")
    assert sae_models.detect(folder / "sae.safetensors")[0] == "sparsify"
    back = sae_models.load(sae_models.save(sae, tmp_path / "x.safetensors"))
    assert type(back) is type(sae) and back.config == sae.config
    assert sae.state_dict().keys() == back.state_dict().keys()
    for name, t in sae.state_dict().items():
        assert t.dtype == back.state_dict()[name].dtype and torch.equal(t, back.state_dict()[name]), name


# ---- errors -------------------------------------------------------------------------------------

def test_sparsify_missing_tensor(tmp_path):
    w = random_weights()
    del w["W_dec"]
    with pytest.raises(SAEFormatError, match="sae.safetensors.*missing tensor 'W_dec'"):
        sae_models.load(write(tmp_path, sparsify_cfg(), w))


def test_sparsify_shape_contradicting_config(tmp_path):
    with pytest.raises(SAEFormatError, match=r"sae.safetensors.*'encoder.weight'.*\[64, 16\].*\[80, 20\]"):
        sae_models.load(write(tmp_path / "a", sparsify_cfg(d=20), random_weights()))
    with pytest.raises(SAEFormatError, match=r"sae.safetensors.*'encoder.weight'.*\[64, 16\].*\[32, 16\]"):
        sae_models.load(write(tmp_path / "b", sparsify_cfg(num_latents=32), random_weights()))
    with pytest.raises(SAEFormatError, match="sae.safetensors.*k=65"):
        sae_models.load(write(tmp_path / "c", sparsify_cfg(k=N + 1), random_weights()))


@pytest.mark.parametrize("extra,message", [
    ({"activation": "groupmax"}, "unsupported sparsify activation 'groupmax'"),
    ({"activation": "jumprelu"}, "unknown sparsify activation 'jumprelu'"),
    ({"transcode": True}, "transcoder"),
    ({"signed": True}, "signed"),
    ({"skip_connection": True}, "skip connection"),
])
def test_sparsify_unknown_or_unsupported_architecture(tmp_path, extra, message):
    with pytest.raises(SAEFormatError, match="cfg.json.*" + message):
        sae_models.load(write(tmp_path, sparsify_cfg(**extra), random_weights()))


def test_sparsify_skip_connection_tensor_is_refused(tmp_path):
    w = {**random_weights(), "W_skip": torch.zeros(D, D)}
    with pytest.raises(SAEFormatError, match="sae.safetensors.*skip connection.*W_skip"):
        sae_models.load(write(tmp_path / "a", sparsify_cfg(), w))
    w = {**random_weights(), "mystery": torch.zeros(3)}
    with pytest.raises(SAEFormatError, match=r"sae.safetensors.*unexpected tensors \['mystery'\]"):
        sae_models.load(write(tmp_path / "b", sparsify_cfg(), w))


def test_sparsify_config_errors(tmp_path):
    cfg = sparsify_cfg()
    del cfg["k"]
    with pytest.raises(SAEFormatError, match="cfg.json.*missing config key 'k'"):
        sae_models.load(write(tmp_path / "a", cfg, random_weights()))
    with pytest.raises(SAEFormatError, match="cfg.json.*'k' must be a positive integer"):
        sae_models.load(write(tmp_path / "b", sparsify_cfg(k="ten"), random_weights()))
    folder = write(tmp_path / "c", sparsify_cfg(), random_weights())
    (folder / "sae.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(SAEFormatError, match="sae.safetensors.*(corrupt|truncated)"):
        sae_models.load(folder)
