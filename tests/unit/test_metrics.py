"""Quality measures (sae_models.metrics) and the running moments behind them and the feature statistics
(sae_models.moments), against formulas written here independently."""

import pytest
import torch
import torch.nn.functional as F

from sae_models import SAEConfig, build, metrics
from sae_models.moments import RunningMoments


def random_topk_sae(d=12, n=40, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = build(SAEConfig(architecture="topk", d_in=d, n_features=n, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=g) * 0.4)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        sae.W_dec.copy_(F.normalize(torch.randn(n, d, generator=g), dim=-1))
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae


def test_fvu_against_independent_formula():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 7, generator=g) * torch.arange(1, 8) + 5
    x_hat = x + 0.3 * torch.randn(200, 7, generator=g)
    num = sum(float((x[i, j] - x_hat[i, j]) ** 2) for i in range(200) for j in range(7))
    means = [sum(float(x[i, j]) for i in range(200)) / 200 for j in range(7)]
    den = sum((float(x[i, j]) - means[j]) ** 2 for i in range(200) for j in range(7))
    assert float(metrics.fvu(x, x_hat)) == pytest.approx(num / den, rel=1e-9)
    assert float(metrics.fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)
    codes = torch.tensor([[0.0, 1, 0, 2], [0, 0, 0, 3]])
    assert float(metrics.l0(codes)) == 1.5 and float(metrics.dead_fraction(codes)) == 0.5


def test_evaluate_accumulates_exactly():
    sae = random_topk_sae()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(333, 12, generator=g) * 2 + torch.linspace(-3, 3, 12)
    whole = metrics.evaluate(sae, [x])
    parts = metrics.evaluate(sae, list(x.split(50)))  # per-batch means differ: must not average FVUs
    with torch.no_grad():
        x_hat = sae(x)
        codes = sae.encode(x)
    assert whole["fvu"] == pytest.approx(float(metrics.fvu(x, x_hat)), rel=1e-6)
    assert parts["fvu"] == pytest.approx(whole["fvu"], rel=1e-9)
    assert parts["mse"] == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-5)
    assert parts["l0"] == pytest.approx(float(metrics.l0(codes)))
    assert parts["dead_fraction"] == pytest.approx(float(metrics.dead_fraction(codes)))
    assert parts["n_tokens"] == 333
    assert metrics.evaluate(sae, list(x.split(50)), max_tokens=120)["n_tokens"] == 120


def test_running_moments_of_rows_match_the_whole_data():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64) * torch.arange(1, 6) + 1e4  # a large offset
    m = RunningMoments(5)
    for part in (x[:1], x[1:1], x[1:260], x[260:]):  # uneven batches, an empty one
        m.add_rows(part)
    assert torch.equal(m.count, torch.full((5,), 500.0, dtype=torch.float64))
    assert torch.allclose(m.mean, x.mean(0), rtol=1e-12)
    assert torch.allclose(m.m2, ((x - x.mean(0)) ** 2).sum(0), rtol=1e-9)
    assert torch.allclose(m.std(), x.std(0, unbiased=False), rtol=1e-9)


def test_running_moments_of_scattered_values_match_per_slot_computations():
    g = torch.Generator().manual_seed(7)
    values = torch.rand(1000, generator=g, dtype=torch.float64) * 3 + 100
    slots = torch.randint(0, 6, (1000,), generator=g)
    slots[slots == 4] = 5  # slot 4 never gets a value
    m = RunningMoments(6)
    for s in (slice(0, 10), slice(10, 10), slice(10, 600), slice(600, None)):
        m.add_values(values[s], slots[s])
    for slot in range(6):
        v = values[slots == slot]
        assert m.count[slot] == len(v)
        if len(v):
            assert float(m.mean[slot]) == pytest.approx(float(v.mean()), rel=1e-12)
            assert float(m.std()[slot]) == pytest.approx(float(v.std(unbiased=False)), rel=1e-9)
        else:
            assert m.mean[slot] == 0 and m.std()[slot] == 0
