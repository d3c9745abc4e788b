"""The training step on a CUDA GPU (skipped where there is none): what `test_training_gpu_path.py` checks on
the CPU, checked where it matters.

- PyTorch's CUDA sync check (`torch.cuda.set_sync_debug_mode("error")`) raises at each synchronizing call
  (`.item()`, `nonzero`, a copy to or from pageable host memory, ...). Between log steps the `gpu` path's
  loop makes none: not the step, nor the batch copied from the host (as from a dump on disk), nor the check
  for a next batch.
- The `gpu` path on CUDA trains as the `cpu` path on the CPU (to 1e-4 after 40 steps: far below one Adam
  update, lr 3e-3; CUDA's products and atomics round differently).
- A checkpoint written on CUDA resumes on the CPU and back.

Run on a machine with a GPU: `python -m pytest tests/unit/test_training_cuda.py` (`scripts/gpu_checks.sh`
runs it with the GPU benches).
"""

from __future__ import annotations

import pytest
import torch

from sae_models.training import TrainConfig, Trainer, train

from test_training import planted
from test_training_gpu_path import ARCHS, OPTS, PARAMS, resumed_after_step_21

CUDA = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class SyncsRaise:
    """While on, PyTorch raises at any synchronizing CUDA call; `off()` lets the log steps' reads through."""

    def __enter__(self):
        self.before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.before)

    def off(self, f):
        def unchecked(*a, **kw):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return f(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return unchecked


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_path_on_cuda_syncs_only_at_log_steps(arch):
    x, _ = planted(64 * 30, seed=4)  # on the host, in pageable memory, as read from a dump
    logs = []
    trainer = Trainer([x], TrainConfig(architecture=arch, device=CUDA, log_every=10, **OPTS), callback=logs.append)
    assert trainer.path == "gpu"  # `auto` on CUDA
    with SyncsRaise() as syncs:
        trainer.log = syncs.off(trainer.log)
        trainer.loss.refresh_candidates = syncs.off(trainer.loss.refresh_candidates)
        trainer._loop()
    assert trainer.step == 30 and [d["step"] for d in logs] == [10, 20, 30]
    assert trainer.loss.candidates is not None  # latents died: AuxK ran on its candidates


def test_cuda_reports_the_cpu_paths_reads():
    """The check above is not blind: the `cpu` path's step, run on CUDA, reads values back and raises."""
    x, _ = planted(64 * 8, seed=4)
    trainer = Trainer([x], TrainConfig(architecture="batchtopk", device=CUDA, step_path="cpu", **OPTS))
    batch = trainer.data.peek(64)  # on the device, as the CPU twin's check takes it
    with SyncsRaise(), pytest.raises(RuntimeError, match="synchroniz"):
        trainer.train_step(batch)


@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_path_on_cuda_trains_as_the_cpu_path_on_the_cpu(arch):
    x, _ = planted(64 * 40, seed=9)
    cpu = train([x], architecture=arch, device="cpu", step_path="cpu", **OPTS)
    gpu = train([x], architecture=arch, device=CUDA, **OPTS)
    assert gpu.config.hyperparameters["step_path"] == "gpu"
    assert gpu.config.hyperparameters["dead_fraction"] == cpu.config.hyperparameters["dead_fraction"] > 0
    for name in PARAMS:
        assert torch.allclose(getattr(gpu, name).cpu(), getattr(cpu, name), atol=1e-4, rtol=0), name
    if arch != "topk":
        assert float(gpu.threshold) == pytest.approx(float(cpu.threshold), rel=1e-4) and float(gpu.threshold) > 0


@pytest.mark.parametrize("first, then", [(CUDA, "cpu"), ("cpu", CUDA)])
def test_checkpoint_moves_between_cuda_and_the_cpu(tmp_path, first, then):
    x, _ = planted(64 * 40, seed=9)
    opts = dict(OPTS, architecture="batchtopk")
    full = train([x], device="cpu", step_path="cpu", **opts)
    resumed = resumed_after_step_21(x, tmp_path, opts, dict(device=first), dict(device=then))
    assert resumed.config.hyperparameters["steps"] == 40
    for name in PARAMS:
        assert torch.allclose(getattr(resumed, name).cpu(), getattr(full, name), atol=1e-4, rtol=0), name
    assert float(resumed.threshold) == pytest.approx(float(full.threshold), rel=1e-4)
