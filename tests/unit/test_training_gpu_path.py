"""The training step's GPU path (`step_path="gpu"`), run on the CPU with the same code: its gradients against
the paper's loss written densely, its trajectory against the CPU path's, the host reads it makes (none
between log steps), checkpoints across the two paths, and Matryoshka BatchTopK."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sae_models import SAEConfig, build, load
from sae_models.formats import native
from sae_models.training import TrainConfig, Trainer, train
from sae_models.training.recipe import TrainingLoss

from test_training import Interrupt, _reference_loss, _setup_step, planted, stop_at_21

ARCHS = ["topk", "batchtopk", "matryoshka_batchtopk"]
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
# small enough that latents die within the run, so that AuxK takes part
OPTS = dict(n_features=96, k=4, auxk=16, dead_toks_threshold=64 * 4, batch_size=64, lr=3e-3,
            geometric_median_samples=256, seed=1, mse_scale_batches=2)


def _loss(sae, tr, path, widths=None):
    loss = TrainingLoss(sae, auxk=tr.auxk, auxk_coef=tr.auxk_coef, mse_scale=tr.mse_scale,
                        dead_steps_threshold=tr.dead_steps_threshold, stats_last_nonzero=tr.stats_last_nonzero,
                        widths=widths, path=path)
    if path == "gpu":
        loss.refresh_candidates(1)
    return loss


def _matryoshka_reference(sae, tr, x, widths):
    """The inner prefixes' terms of the Matryoshka loss, written densely: for each inner width w, the MSE of
    `z[:, :w] @ W_dec[:w] + b_dec`, scaled as the main MSE (SAELens adds the same terms to its loss)."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    flat = pre.relu().flatten()
    v, i = flat.topk(tr.k * x.shape[0])
    z = torch.zeros_like(flat).scatter(0, i, v).view_as(pre)
    return sum(tr.mse_scale * ((z[:, :w] @ sae.W_dec[:w] + sae.b_dec - x) ** 2).mean() for w in widths[:-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_path_gradients_match_dense_reference(arch):
    dead = torch.arange(0, 40, 3)
    widths = (5, 12, 40) if arch == "matryoshka_batchtopk" else None
    sae, tr, x = _setup_step(arch, dead=dead)
    loss, info = _loss(sae, tr, "gpu", widths)(x)
    loss.backward()
    dead_mask = info["dead"]
    assert dead_mask.any()
    ref_sae, _, _ = _setup_step(arch, dead=dead)
    ref_loss, ref_mse, ref_aux = _reference_loss(ref_sae, tr, x, dead_mask)
    if widths:
        ref_loss = ref_loss + _matryoshka_reference(ref_sae, tr, x, widths)
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert float(info["mse"]) == pytest.approx(float(ref_mse.detach()), rel=1e-5)
    assert float(info["aux_loss"]) == pytest.approx(float(ref_aux.detach()), rel=1e-5) and float(ref_aux.detach()) > 0
    for name in PARAMS:
        assert torch.allclose(getattr(sae, name).grad, getattr(ref_sae, name).grad, atol=1e-5, rtol=1e-4), name


def test_gpu_path_without_dead_latents_gives_auxk_only_its_b_dec_term():
    sae, tr, x = _setup_step(dead=None, auxk=16)
    tr.mse_scale = 0.0
    loss = _loss(sae, tr, "gpu")
    assert loss.candidates is None  # no latent can die within the horizon: AuxK touches no latent
    loss(x)[0].backward()
    assert sae.W_dec.grad.abs().max() == 0 and sae.W_enc.grad.abs().max() == 0
    assert sae.b_dec.grad.abs().max() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_path_trains_as_the_cpu_path(arch):
    """40 steps (latents die from step 5 on, so AuxK is in) of both paths from the same start: the same
    parameters to 1e-6 (float rounding of different summation orders; fused vs. unfused Adam)."""
    x, _ = planted(64 * 40, seed=9)
    cpu = train([x], architecture=arch, step_path="cpu", **OPTS)
    gpu = train([x], architecture=arch, step_path="gpu", **OPTS)
    assert gpu.config.hyperparameters["step_path"] == "gpu" and cpu.config.hyperparameters["step_path"] == "cpu"
    assert gpu.config.hyperparameters["dead_fraction"] > 0
    assert gpu.config.hyperparameters["dead_fraction"] == cpu.config.hyperparameters["dead_fraction"]
    for name in PARAMS:
        assert torch.allclose(getattr(gpu, name), getattr(cpu, name), atol=1e-6, rtol=0), name
    if arch != "topk":
        assert float(gpu.threshold) == pytest.approx(float(cpu.threshold), rel=1e-6) and float(gpu.threshold) > 0


# ---------------------------------------------------------------------------------------------------
# host reads
# ---------------------------------------------------------------------------------------------------

# operations that read a device value back to the host (on a GPU: a stream sync), or copy from it
SYNC = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
        "aten::unique_consecutive", "aten::_unique2", "aten::equal", "aten::lift_fresh", "aten::lift_fresh_copy",
        "aten::_pin_memory"}


class HostReads(TorchDispatchMode):
    """Records each operation that reads a device value on the host (boolean-mask indexing included), with
    the trainer's step and whether it ran inside `train_step`."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.in_step, self.seen = trainer, False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name.startswith("aten::index") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for a in args if isinstance(a, (list, tuple))
            for t in a)
        if name in SYNC or bool_index:
            self.seen.append((self.trainer.step, self.in_step, name))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_path_reads_nothing_back_between_log_steps(arch):
    x, _ = planted(64 * 30, seed=4)
    logs = []
    trainer = Trainer([x], TrainConfig(architecture=arch, step_path="gpu", log_every=10, **OPTS),
                      callback=logs.append)
    mode = HostReads(trainer)
    step = trainer.train_step

    def counted_step(batch):
        mode.in_step = True
        try:
            return step(batch)
        finally:
            mode.in_step = False

    trainer.train_step = counted_step
    with mode:
        trainer._loop()
    assert trainer.step == 30 and [d["step"] for d in logs] == [10, 20, 30]
    assert trainer.loss.candidates is not None  # latents died: AuxK ran on its candidates
    assert not [s for s in mode.seen if s[1]], "a training step read a value back to the host"
    assert mode.seen and {s[0] for s in mode.seen} <= {10, 20, 30}  # only the log steps' bookkeeping


def test_cpu_path_reads_values_back_as_before():
    """The counter sees the CPU path's reads (so an empty count above is not blindness)."""
    x, _ = planted(64 * 8, seed=4)
    trainer = Trainer([x], TrainConfig(architecture="batchtopk", step_path="cpu", log_every=10, **OPTS))
    mode = HostReads(trainer)
    with mode:
        trainer.train_step(trainer.data.peek(64))
    assert any(name in ("aten::_local_scalar_dense", "aten::nonzero") or name.startswith("aten::index")
               for _, _, name in mode.seen)


# ---------------------------------------------------------------------------------------------------
# checkpoints across the paths
# ---------------------------------------------------------------------------------------------------

def resumed_after_step_21(x, ckpt_dir, opts: dict, first: dict, then: dict):
    """Train on `x` with `opts | first`, checkpointed at step 20 and interrupted at step 21; then the SAE of
    the run resumed from that checkpoint with `opts | then`."""
    with pytest.raises(Interrupt):
        train([x], checkpoint_dir=ckpt_dir, checkpoint_every=20, callback=stop_at_21, log_every=1, **opts, **first)
    return train([x], checkpoint_dir=ckpt_dir, checkpoint_every=20, **opts, **then)


@pytest.mark.parametrize("first, then", [("gpu", "cpu"), ("cpu", "gpu")])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_checkpoint_resumes_on_the_other_path(tmp_path, arch, first, then):
    x, _ = planted(64 * 40, seed=9)
    opts = dict(OPTS, architecture=arch)
    full = train([x], step_path=first, **opts)
    resumed = resumed_after_step_21(x, tmp_path, opts, dict(step_path=first), dict(step_path=then))
    assert resumed.config.hyperparameters["steps"] == 40
    for name in PARAMS:
        assert torch.allclose(getattr(resumed, name), getattr(full, name), atol=1e-6, rtol=0), name
    if arch == "batchtopk":
        assert float(resumed.threshold) == pytest.approx(float(full.threshold), rel=1e-6)


def test_threshold_window_is_the_mean_of_the_last_batches():
    x, _ = planted(64 * 12, seed=2)
    minima = []
    trainer = Trainer([x], TrainConfig(architecture="batchtopk", step_path="gpu", threshold_batches=5, **OPTS))
    while trainer.data.fill(64):
        trainer.train_step(trainer.data.take(64))
        minima.append(float(trainer.loss.batch_min))
    assert len(minima) == 12
    assert trainer.threshold_window.tolist() == pytest.approx(minima[-5:])
    assert float(trainer.sae.threshold) == pytest.approx(sum(minima[-5:]) / 5)


# ---------------------------------------------------------------------------------------------------
# Matryoshka BatchTopK
# ---------------------------------------------------------------------------------------------------

def test_matryoshka_widths_default_and_checks():
    assert TrainConfig(architecture="matryoshka_batchtopk", n_features=5120).matryoshka_widths == (
        320, 640, 1280, 2560, 5120)
    assert TrainConfig(architecture="matryoshka_batchtopk", n_features=96,
                       matryoshka_widths=[8, 96]).matryoshka_widths == (8, 96)
    for bad in ([8, 90], [16, 8, 96], [0, 96]):
        with pytest.raises(ValueError, match="matryoshka_widths"):
            TrainConfig(architecture="matryoshka_batchtopk", n_features=96, matryoshka_widths=bad)
    with pytest.raises(ValueError, match="matryoshka_batchtopk architecture only"):
        TrainConfig(architecture="topk", matryoshka_widths=[8, 96])


def _prefix_fvu(sae, x, width):
    with torch.no_grad():
        codes = sae.encode(x)
        rec = codes[:, :width] @ sae.W_dec[:width] + sae.b_dec
        return float((rec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_matryoshka_prefix_reconstructs_on_its_own_and_round_trips(tmp_path):
    """On the planted dictionary, the first 16 latents of a Matryoshka SAE explain the data far better than
    the first 16 of a BatchTopK SAE trained the same way (whose useful latents are spread over all 128);
    the file saves and loads as a matryoshka_batchtopk SAE with its widths."""
    x, _ = planted(256 * 150, seed=3)
    opts = dict(n_features=128, k=4, auxk=32, dead_toks_threshold=256 * 25, batch_size=256, lr=1e-2,
                geometric_median_samples=2048, seed=0, device="cpu")
    mat = train([x], architecture="matryoshka_batchtopk", matryoshka_widths=[16, 48, 128], **opts)
    plain = train([x], architecture="batchtopk", **opts)
    held = planted(4096, seed=77)[0]
    assert _prefix_fvu(mat, held, 16) < 0.8 * _prefix_fvu(plain, held, 16)
    path = native.save(mat, tmp_path / "m.safetensors")
    loaded = load(path)
    assert loaded.architecture == "matryoshka_batchtopk"
    assert loaded.config.hyperparameters["matryoshka_widths"] == [16, 48, 128]
    assert torch.equal(loaded.threshold, mat.threshold) and float(loaded.threshold) > 0
    assert torch.equal(loaded.encode(held), mat.encode(held))
    assert isinstance(loaded, type(build(SAEConfig(architecture="batchtopk", d_in=4, n_features=8, k=1))))


# ---------------------------------------------------------------------------------------------------
# reduced-precision matrix products
# ---------------------------------------------------------------------------------------------------

def test_bf16_encoder_trains_to_nearly_the_same_quality():
    x, _ = planted(64 * 60, seed=5)
    held = planted(2048, seed=6)[0]
    opts = dict(OPTS, architecture="topk", step_path="gpu")
    fp32 = train([x], **opts)
    bf16 = train([x], matmul="bf16", **opts)
    assert bf16.config.hyperparameters["matmul"] == "bf16"
    assert not torch.equal(bf16.W_enc, fp32.W_enc)  # the selection saw bfloat16-rounded pre-activations
    fvu = {name: float(((s(held).detach() - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum())
           for name, s in (("fp32", fp32), ("bf16", bf16))}
    assert abs(fvu["bf16"] - fvu["fp32"]) < 0.02, fvu


def test_tf32_is_on_only_while_training():
    x, _ = planted(64 * 12, seed=5)
    seen = []
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        train([x], matmul="tf32", log_every=5, callback=lambda d: seen.append(torch.backends.cuda.matmul.allow_tf32),
              **OPTS)
        assert seen and all(seen) and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
