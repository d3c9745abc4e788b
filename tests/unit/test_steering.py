"""Steering edits against the paper's formulas, computed here from the SAE's raw weights."""

import pytest
import torch

from sae_models import FeatureStats, SAEConfig, build, steering


@pytest.fixture
def sae():
    g = torch.Generator().manual_seed(3)
    s = build(SAEConfig(architecture="topk", d_in=32, n_features=128, k=6))
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    s.stats = FeatureStats(mean=torch.rand(128) + 0.5)
    return s


def ref_codes(sae, u):
    pre = (u - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    kth = pre.topk(sae.config.k, dim=-1).values[..., -1:]
    return torch.where(pre >= kth, pre, 0.0).clamp_min(0)


def test_add_is_paint(sae):
    u = torch.randn(10, 32)
    w = torch.tensor([1.0] * 5 + [0.0] * 4 + [0.5])
    out = steering.add(u, sae, [3, 9], [2.0, -1.0], w)
    delta = 2.0 * sae.W_dec[3] - 1.0 * sae.W_dec[9]
    assert torch.allclose(out, u + w[:, None] * delta, atol=1e-6)
    assert torch.equal(out[5:9], u[5:9])


def test_ablate_removes_own_contribution(sae):
    u = torch.randn(40, 32)
    z = ref_codes(sae, u)
    f = int(z.sum(0).argmax())  # a feature that fires somewhere
    out = steering.ablate(u, sae, [f], torch.ones(40))
    assert torch.allclose(out, u - z[:, f:f + 1] * sae.W_dec[f], atol=1e-5)
    # positions where the feature does not fire are untouched
    idle = z[:, f] == 0
    assert idle.any() and torch.equal(out[idle], u[idle])
    half = steering.ablate(u, sae, [f], torch.ones(40), [0.5])
    assert torch.allclose(half, u - 0.5 * z[:, f:f + 1] * sae.W_dec[f], atol=1e-5)


def test_set_clamps_the_code_and_keeps_the_error(sae):
    u = torch.randn(20, 32)
    z = ref_codes(sae, u)
    f = 17
    out = steering.clamp(u, sae, [f], [3.0], torch.ones(20))
    z_new = z.clone()
    z_new[:, f] = 3.0
    x_hat, x_hat_new = z @ sae.W_dec + sae.b_dec, z_new @ sae.W_dec + sae.b_dec
    error = u - x_hat
    assert torch.allclose(out, x_hat_new + error, atol=1e-5)


def test_replace_is_the_feature_icon(sae):
    u = torch.randn(8, 32)
    w = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    amount = 10 * float(sae.stats.mean[5])  # k * mean, as the paper's icons
    out = steering.replace(u, sae, [5], [amount], w)
    assert torch.allclose(out[w == 1], (amount * sae.W_dec[5]).expand(6, -1), atol=1e-5)
    assert torch.equal(out[w == 0], u[w == 0])


def test_reconstruct(sae):
    u = torch.randn(12, 32)
    z = ref_codes(sae, u)
    out = steering.reconstruct(u, sae, torch.ones(12))
    assert torch.allclose(out, z @ sae.W_dec + sae.b_dec, atol=1e-5)
    same = steering.reconstruct(u, sae, torch.ones(12), keep_error=True)
    assert torch.allclose(same, u, atol=1e-5)


def test_zero_weight_is_identity(sae):
    u = torch.randn(6, 32)
    for mode in steering.MODES:
        out = steering.apply(mode, u, sae, [1, 2], [1.0, 2.0], torch.zeros(6))
        assert torch.equal(out, u), mode
    with pytest.raises(ValueError, match="unknown steering mode"):
        steering.apply("boost", u, sae, [1], [1.0], torch.ones(6))
