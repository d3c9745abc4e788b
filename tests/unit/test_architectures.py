"""The four architectures against their published formulas, written here independently."""

import pytest
import torch

import sae_models
from sae_models import SAEConfig, build


def make(arch, d=24, n=96, k=5, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    sae = build(SAEConfig(architecture=arch, d_in=d, n_features=n, k=k, **kw))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(n, generator=g) * 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
    return sae


def reference_pre(sae, x):
    return (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc


def test_topk_is_the_papers_formula():
    sae = make("topk")
    x = torch.randn(7, 3, 24)
    pre = reference_pre(sae, x)
    # z = ReLU(TopK(pre)): keep the k largest pre-activations, zero the rest, then ReLU
    kth = pre.sort(dim=-1, descending=True).values[..., 4:5]
    z = torch.where(pre >= kth, pre, torch.zeros_like(pre)).clamp_min(0)
    assert torch.allclose(sae.encode(x), z, atol=1e-6)
    assert torch.allclose(sae.decode(z), z @ sae.W_dec + sae.b_dec, atol=1e-5)
    assert torch.allclose(sae(x), z @ sae.W_dec + sae.b_dec, atol=1e-5)
    assert ((sae.encode(x) > 0).sum(-1) <= 5).all()


def test_jumprelu_and_relu_and_batchtopk_formulas():
    x = torch.randn(50, 24)
    sae = make("jumprelu")
    pre = reference_pre(sae, x)
    assert torch.allclose(sae.encode(x), torch.where(pre > sae.threshold, pre, 0.0).clamp_min(0), atol=1e-6)
    sae = make("relu")
    assert torch.allclose(sae.encode(x), reference_pre(sae, x).clamp_min(0), atol=1e-6)
    sae = make("batchtopk")
    pre = reference_pre(sae, x).clamp_min(0)
    assert torch.allclose(sae.encode(x), torch.where(pre > 0.4, pre, 0.0), atol=1e-6)
    # training activation keeps exactly k * batch entries of the batch
    kept = sae.batch_activation(reference_pre(sae, x))
    assert int((kept > 0).sum()) == 5 * 50
    assert torch.equal(kept > 0, kept >= kept[kept > 0].min())


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_sparse_form_matches_dense(arch):
    sae = make(arch)
    x = torch.randn(4, 9, 24)
    dense = sae.encode(x)
    sparse = sae.encode_sparse(x)
    assert sparse.values.shape[:-1] == (4, 9)
    assert torch.allclose(sparse.to_dense(sae.n_features), dense, atol=1e-6)
    assert torch.allclose(sae.decode_sparse(sparse), sae.decode(dense), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_input_dtypes(dtype):
    sae = make("topk")
    # seeded: rounding to fp16 may change which features top-k picks for unlucky inputs
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(11))
    out = sae(x.to(dtype))
    assert out.dtype == dtype and sae.encode(x.to(dtype)).dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert torch.allclose(out.float(), sae(x), atol=tol)
    half = make("topk").to(torch.bfloat16)
    assert half(x).dtype == torch.float32


def test_wrong_d_in_is_a_clear_error():
    sae = make("topk")
    with pytest.raises(ValueError, match="d_in=24"):
        sae.encode(torch.randn(3, 23))
    with pytest.raises(ValueError, match="96 features"):
        sae.decode(torch.randn(3, 95))


def test_bad_configs():
    with pytest.raises(ValueError, match="k"):
        build(SAEConfig(architecture="topk", d_in=4, n_features=8, k=0))
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        build(SAEConfig(architecture="gated", d_in=4, n_features=8))
    with pytest.raises(ValueError, match="hook"):
        SAEConfig(architecture="relu", d_in=4, n_features=8, hook="middle")


def test_normalisations_are_undone_by_forward():
    x = torch.randn(10, 24) * 5 + 2
    for how in ("layer_norm", "constant_norm_rescale", "scale"):
        sae = make("relu", normalize=how, input_scale=0.25)
        xn = {
            "layer_norm": (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5),
            "constant_norm_rescale": x * 24 ** 0.5 / x.norm(dim=-1, keepdim=True),
            "scale": x * 0.25,
        }[how]
        z = reference_pre(sae, xn).clamp_min(0)
        assert torch.allclose(sae.encode(x), z, atol=1e-5)
        y = z @ sae.W_dec + sae.b_dec
        back = {
            "layer_norm": y * (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True) + x.mean(-1, keepdim=True),
            "constant_norm_rescale": y * x.norm(dim=-1, keepdim=True) / 24 ** 0.5,
            "scale": y / 0.25,
        }[how]
        assert torch.allclose(sae(x), back, atol=1e-4)


def test_block_names_resolve_in_every_scheme():
    b = sae_models.get_block("input_blocks.8.1")
    assert (b.short, b.diffusers, b.channels) == ("down.2.1", "down_blocks.2.attentions.1", 1280)
    assert sae_models.get_block("unet.up_blocks.0.attentions.1").comfy == "output_blocks.1.1"
    assert sae_models.block_from_text("unet.mid_block.attentions.0_k10_hidden5120").short == "mid.0"
    assert sae_models.get_block("up.0.0").grid(64, 64) == (16, 16)
    assert sae_models.get_block("down.1.0").grid(64, 64) == (32, 32)
    with pytest.raises(ValueError, match="known blocks"):
        sae_models.get_block("down.9.9")
    cfg = SAEConfig(architecture="relu", d_in=4, n_features=8, block="middle_block.1")
    assert (cfg.block, cfg.block_comfy, cfg.block_diffusers) == ("mid.0", "middle_block.1", "mid_block.attentions.0")
