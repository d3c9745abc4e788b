"""SAE training (sae_models.training), on CPU with small sizes.

The paper-exact pieces are compared to formulas written here independently of the implementation.
"""

import math
import types

import pytest
import torch
import torch.nn.functional as F

from sae_models import SAEConfig, build
from sae_models import metrics, training
from sae_models.training import TrainConfig, geometric_median, project_decoder_grad_, train, unit_norm_decoder_
from sae_models.training.distributed import global_centered_sq
from sae_models.training.rebatcher import Rebatcher
from sae_models.training.recipe import TrainingLoss


# ---------------------------------------------------------------------------------------------------
# planted dictionary
# ---------------------------------------------------------------------------------------------------

D, N_ATOMS, ACTIVE = 32, 64, 4


def planted(n_rows, seed=0, atoms_seed=123):
    """Sparse non-negative combinations of ACTIVE of N_ATOMS random unit vectors in D dims, plus noise."""
    g = torch.Generator().manual_seed(atoms_seed)
    atoms = F.normalize(torch.randn(N_ATOMS, D, generator=g), dim=-1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_rows, N_ATOMS, generator=g).argsort(-1)[:, :ACTIVE]
    coef = 0.5 + torch.rand(n_rows, ACTIVE, generator=g)
    codes = torch.zeros(n_rows, N_ATOMS).scatter_(1, idx, coef)
    x = codes @ atoms + 0.01 * torch.randn(n_rows, D, generator=g) + 0.3  # an offset for b_dec to find
    return x, atoms


def best_match(W_dec, atoms):
    cos = F.normalize(atoms, dim=-1) @ F.normalize(W_dec, dim=-1).T
    return cos.max(dim=1).values


PLANTED_OPTS = dict(n_features=128, k=ACTIVE, auxk=32, dead_toks_threshold=256 * 25, batch_size=256,
                    lr=1e-2, geometric_median_samples=2048, seed=0, device="cpu")


@pytest.fixture(scope="module")
def planted_data():
    x, atoms = planted(256 * 300)
    return x, atoms


def test_topk_recovers_planted_dictionary(planted_data):
    x, atoms = planted_data
    chunks = list(x.split(1000))  # incoming batch size differs from batch_size: re-batched inside
    logs = []
    sae = train(chunks, callback=logs.append, log_every=50, eval_batches=[x[:8192]], **PLANTED_OPTS)
    match = best_match(sae.W_dec.detach(), atoms)
    # >= 90% of the 64 atoms have a decoder row with cosine > 0.9
    assert (match > 0.9).float().mean() >= 0.9, match.sort().values[:10]
    ev = metrics.evaluate(sae, [x[:8192]])
    assert ev["fvu"] < 0.1, ev  # bound: FVU below 0.1 on the training distribution
    assert ev["l0"] <= ACTIVE
    assert sae.config.hyperparameters["final_eval"]["fvu"] == pytest.approx(ev["fvu"], rel=1e-6)
    assert sae.config.hyperparameters["steps"] == len(x) // 256
    assert logs and set(logs[0]) >= {"step", "tokens", "loss", "mse", "auxk_loss", "fvu", "l0", "dead_fraction"}
    assert logs[-1]["step"] % 50 == 0
    # decoder rows unit norm up to the last Adam step
    norms = sae.W_dec.detach().norm(dim=-1)
    assert (norms - 1).abs().max() <= 1e-2 * math.sqrt(D) * 1.01


def test_batchtopk_on_planted_dictionary(planted_data):
    x, atoms = planted_data
    sae = train(list(x.split(700)), architecture="batchtopk", threshold_batches=50, **PLANTED_OPTS)
    assert sae.architecture == "batchtopk"
    match = best_match(sae.W_dec.detach(), atoms)
    assert (match > 0.9).float().mean() >= 0.85, match.sort().values[:10]
    thr = float(sae.threshold)
    assert thr > 0
    ev = metrics.evaluate(sae, [x[:8192]])
    assert ev["fvu"] < 0.15, ev  # inference with the learnt threshold
    assert 0.5 * ACTIVE <= ev["l0"] <= 2 * ACTIVE  # about k active on average at inference


def test_max_tokens_and_saved_file_round_trip(tmp_path, planted_data):
    import sae_models

    x, _ = planted_data
    sae = train([x[:20000]], max_tokens=256 * 7 + 1, block="down.2.1", base_model="sdxl-turbo",
                **{**PLANTED_OPTS, "geometric_median_samples": 512})
    assert sae.config.hyperparameters["tokens"] == 256 * 8  # stops after crossing max_tokens
    assert sae.config.hook == "update" and sae.config.block == "down.2.1"
    path = sae_models.save(sae, tmp_path / "sae.safetensors")
    back = sae_models.load(path)
    assert torch.equal(back.W_dec, sae.W_dec) and back.config.hyperparameters["lr"] == 1e-2


# ---------------------------------------------------------------------------------------------------
# paper-exact pieces
# ---------------------------------------------------------------------------------------------------


def test_unit_norm_and_gradient_projection():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 7, generator=g) * 3
    ref = torch.stack([w / math.sqrt(sum(float(v) ** 2 for v in w)) for w in W])
    unit_norm_decoder_(W)
    assert torch.allclose(W, ref, atol=1e-6)
    grad = torch.randn(20, 7, generator=g)
    expected = torch.stack([gr - torch.dot(gr, w) * w for gr, w in zip(grad, W)])
    project_decoder_grad_(W, grad)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert (grad * W).sum(-1).abs().max() < 1e-6  # nothing left along the rows


def _weiszfeld_reference(p, iters=2000):
    p = p.double()
    m = p.mean(0)
    for _ in range(iters):
        w = 1 / (p - m).norm(dim=1).clamp_min(1e-12)
        m = (w[:, None] * p).sum(0) / w.sum()
    return m


def test_geometric_median():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(300, 5, generator=g)
    p[:30] += 40  # outliers pull the mean but not the median
    m = geometric_median(p)
    ref = _weiszfeld_reference(p)
    assert torch.allclose(m.double(), ref, atol=1e-3)
    obj = lambda c: (p.double() - c).norm(dim=1).sum()
    assert obj(m.double()) <= obj(p.double().mean(0))
    for _ in range(20):  # no better point nearby
        assert obj(m.double()) <= obj(m.double() + 0.01 * torch.randn(5, generator=g, dtype=torch.float64)) + 1e-6
    # collinear points: the median is the middle point
    q = torch.tensor([[0.0, 0], [1, 0], [2, 0], [10, 0], [50, 0]])
    assert torch.allclose(geometric_median(q), torch.tensor([2.0, 0]), atol=1e-3)


def _setup_step(arch="topk", B=64, d=12, n=40, k=3, auxk=8, dead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = build(SAEConfig(architecture=arch, d_in=d, n_features=n, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=g) * 0.4)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.1)
        sae.W_dec.copy_(F.normalize(torch.randn(n, d, generator=g), dim=-1))
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    tr = types.SimpleNamespace(architecture=arch, k=k, auxk=auxk, auxk_coef=1 / 32, mse_scale=1.7,
                               dead_steps_threshold=5, batch_min=None)
    tr.stats_last_nonzero = torch.zeros(n, dtype=torch.long)
    if dead is not None:
        tr.stats_last_nonzero[dead] = 100
    x = torch.randn(B, d, generator=g)
    return sae, tr, x


def _step(sae, tr):
    """The training forward with the options and counters of `tr` (the counters are updated in place)."""
    return TrainingLoss(sae, auxk=tr.auxk, auxk_coef=tr.auxk_coef, mse_scale=tr.mse_scale,
                        dead_steps_threshold=tr.dead_steps_threshold, stats_last_nonzero=tr.stats_last_nonzero)


def _reference_loss(sae, tr, x, dead_mask):
    """The paper's loss written densely: mse_scale * MSE + auxk_coef * normalized_mse on the residual."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    if tr.architecture == "topk":
        vals, inds = pre.topk(tr.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, inds, vals.relu())
    else:
        flat = pre.relu().flatten()
        v, i = flat.topk(tr.k * x.shape[0])
        z = torch.zeros_like(flat).scatter(0, i, v).view_as(pre)
    x_hat = z @ sae.W_dec + sae.b_dec
    mse = ((x_hat - x) ** 2).mean()
    masked = torch.where(dead_mask, pre, torch.zeros_like(pre))
    av, ai = masked.topk(tr.auxk, dim=-1)
    za = torch.zeros_like(pre).scatter(-1, ai, av.relu())
    aux_hat = za @ sae.W_dec + sae.b_dec
    target = x - x_hat.detach() + sae.b_dec.detach()
    nmse = ((aux_hat - target) ** 2).mean() / ((target - target.mean(0)) ** 2).mean()
    return tr.mse_scale * mse + tr.auxk_coef * nmse.nan_to_num(0), mse, tr.auxk_coef * nmse


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_loss_and_sparse_gradients_match_dense_reference(arch):
    dead = torch.arange(0, 40, 3)
    sae, tr, x = _setup_step(arch, dead=dead)
    loss, info = _step(sae, tr)(x)
    loss.backward()
    got = {n: getattr(sae, n).grad.clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    dead_mask = info["dead"]  # those of `dead` that did not fire in this batch (counters updated first)
    assert dead_mask.any() and not (dead_mask & ~torch.isin(torch.arange(40), dead)).any()
    ref_sae, _, _ = _setup_step(arch, dead=dead)
    ref_loss, ref_mse, ref_aux = _reference_loss(ref_sae, tr, x, dead_mask)
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert float(info["mse"]) == pytest.approx(float(ref_mse.detach()), rel=1e-5)
    assert float(info["aux_loss"]) == pytest.approx(float(ref_aux.detach()), rel=1e-5)
    assert float(ref_aux.detach()) > 0
    for name, gr in got.items():
        assert torch.allclose(gr, getattr(ref_sae, name).grad, atol=1e-5, rtol=1e-4), name


def test_auxk_uses_only_dead_latents():
    sae, tr, x = _setup_step(auxk=16)
    with torch.no_grad():  # latents not in any vector's top k of this batch, made dead
        main = (((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).topk(3, dim=-1).indices).flatten().unique()
    dead = torch.tensor([f for f in range(40) if f not in set(main.tolist())][:4])
    tr.stats_last_nonzero[dead] = 100
    tr.mse_scale = 0.0  # the AuxK term alone
    loss, info = _step(sae, tr)(x)
    loss.backward()
    rows = set(torch.nonzero(sae.W_dec.grad.abs().sum(-1)).flatten().tolist())
    assert rows and rows <= set(dead.tolist())
    rows = set(torch.nonzero(sae.b_enc.grad).flatten().tolist())
    assert rows and rows <= set(dead.tolist())
    # no dead latents: AuxK is the paper's constant-in-latents term, no latent gets a gradient from it
    sae2, tr2, x2 = _setup_step(dead=None, auxk=16)
    tr2.mse_scale = 0.0
    loss2, info2 = _step(sae2, tr2)(x2)
    loss2.backward()
    assert sae2.W_dec.grad.abs().max() == 0 and sae2.W_enc.grad.abs().max() == 0
    assert sae2.b_dec.grad.abs().max() > 0  # b_dec is in aux_hat, undetached, as in the paper's code


def test_dead_latent_counters_follow_the_paper():
    sae, tr, x = _setup_step(dead=None)
    tr.dead_steps_threshold = 2
    step = _step(sae, tr)
    with torch.no_grad():
        sae.b_enc[7] = -1e3  # latent 7 never fires
    for i in range(4):
        _, info = step(x)
        assert int(tr.stats_last_nonzero[7]) == i + 1  # steps since it last fired
    assert bool(info["dead"][7]) and int(tr.stats_last_nonzero.min()) >= 1
    fired_now = tr.stats_last_nonzero == 1
    assert fired_now.sum() >= 3


def test_normalized_mse_denominator_and_mse_scale():
    # normalized_mse(r, t) = mean((r - t)^2) / mean((t - mean_rows(t))^2): OpenAI's formula
    g = torch.Generator().manual_seed(3)
    t = torch.randn(50, 6, generator=g) * 2 + 1
    ss, count = global_centered_sq(t)
    var_ref = sum(float(((t[:, j] - t[:, j].mean()) ** 2).sum()) for j in range(6))
    assert float(ss) == pytest.approx(var_ref, rel=1e-5) and int(count) == 50
    # mse_scale = 1 / mean squared deviation of the sample (10 batches here, as the paper)
    x = torch.randn(64 * 12, 6, generator=g) * 3
    sae = train([x], n_features=12, k=2, batch_size=64, max_tokens=0, geometric_median_samples=128)
    sample = x[: 64 * 10]
    assert sae.config.hyperparameters["mse_scale"] == pytest.approx(
        1 / float(((sample - sample.mean(0)) ** 2).mean()), rel=1e-5)
    assert torch.allclose(sae.b_dec, geometric_median(x[:128]), atol=1e-6)


def test_init_is_tied_and_unit_norm():
    x = torch.randn(512, 16)
    sae = train([x], n_features=48, k=3, batch_size=64, max_tokens=0, geometric_median_samples=256, seed=5)
    W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
    assert torch.allclose(W_dec, W_enc / W_enc.norm(dim=-1, keepdim=True), atol=1e-6)
    assert W_enc.abs().max() <= 1 / math.sqrt(16)  # nn.Linear default init bound 1/sqrt(d_in)
    assert torch.allclose(W_dec.norm(dim=-1), torch.ones(48), atol=1e-6)
    assert sae.b_enc.abs().max() == 0


def test_options_as_a_config_or_as_keywords():
    x = torch.randn(512, 16)
    opts = dict(n_features=48, k=3, batch_size=64, max_tokens=64 * 2, geometric_median_samples=256, seed=5,
                device="cpu")
    config = TrainConfig(**opts)
    from_config = train([x], config)
    assert torch.equal(from_config.W_dec, train([x], **opts).W_dec)
    reseeded = train([x], config, seed=6)  # keywords override the config
    assert reseeded.config.hyperparameters["seed"] == 6 and not torch.equal(reseeded.W_dec, from_config.W_dec)
    with pytest.raises(ValueError, match="architecture must be one of topk, batchtopk, matryoshka_batchtopk"):
        TrainConfig(architecture="relu")
    with pytest.raises(ValueError, match="1 <= k <= n_features"):
        train([x], k=0)
    with pytest.raises(TypeError):
        train([x], n_feature=48)


def test_rebatcher_hands_out_fixed_batches_and_resumes_exactly():
    x = torch.arange(50 * 3, dtype=torch.float32).reshape(50, 3)
    chunks = [x[:7], x[7:7], x[7:30], x[30:]]
    data = Rebatcher(chunks, "cpu", torch.float32)
    assert data.start() == 3
    assert torch.equal(data.peek(5), x[:5])  # peeking hands nothing out
    assert data.fill(16) and torch.equal(data.take(16), x[:16])
    state = data.state()
    assert state["rows_consumed"] == 30 and torch.equal(state["pending"], x[16:30])
    resumed = Rebatcher(chunks, "cpu", torch.float32)
    resumed.resume(state, d_in=3)  # a source without state: the 30 rows pulled are skipped
    batches = []
    while resumed.fill(16):
        batches.append(resumed.take(16))
    assert torch.equal(torch.cat(batches), x[16:48])  # the 2 rows left are no full batch
    with pytest.raises(ValueError, match="yielded no data"):
        Rebatcher([torch.zeros(0, 3)], "cpu", torch.float32).start()
    mixed = Rebatcher([x[:4], torch.zeros(4, 5)], "cpu", torch.float32)
    mixed.start()
    with pytest.raises(ValueError, match=r"must be \[n, 3\]"):
        mixed.fill(8)


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------


class Resumable:
    """A data stream with state: yields chunks of 100 rows from a fixed tensor (not a multiple of the batch)."""

    def __init__(self, x, chunk=100):
        self.x, self.chunk, self.pos = x, chunk, 0

    def __iter__(self):
        while self.pos < len(self.x):
            out = self.x[self.pos : self.pos + self.chunk]
            self.pos += self.chunk
            yield out

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


class Interrupt(Exception):
    pass


def stop_at_21(info):
    """Training callback: interrupts after the step-20 checkpoint, in the middle of step 21's bookkeeping."""
    if info.get("step") == 21:
        raise Interrupt


@pytest.mark.parametrize("stateful", [True, False])
def test_resume_matches_uninterrupted(tmp_path, stateful):
    x, _ = planted(64 * 40, seed=9)
    opts = dict(n_features=96, k=4, auxk=16, dead_toks_threshold=64 * 4, batch_size=64, lr=3e-3,
                geometric_median_samples=256, seed=1, mse_scale_batches=2)
    full = train(Resumable(x), **opts)
    src = Resumable(x) if stateful else list(x.split(100))
    with pytest.raises(Interrupt):
        train(src, checkpoint_dir=tmp_path, checkpoint_every=20, callback=stop_at_21, log_every=1, **opts)
    assert [p.name for p in tmp_path.iterdir()] == [training.CHECKPOINT_NAME]  # no temporary file left
    ck = torch.load(tmp_path / training.CHECKPOINT_NAME, weights_only=True)
    assert ck["step"] == 20 and ck["tokens"] == 20 * 64
    src = Resumable(x) if stateful else list(x.split(100))
    resumed = train(src, checkpoint_dir=tmp_path, checkpoint_every=20, **opts)
    assert resumed.config.hyperparameters["steps"] == full.config.hyperparameters["steps"] == 40
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(resumed, name), getattr(full, name), atol=1e-6, rtol=0), name
