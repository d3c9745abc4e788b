"""Data-parallel training: 2 CPU processes (gloo) with batch B each == 1 process with batch 2B, on both step
paths (the GPU path's code run on the CPU)."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_models.training import train

B, STEPS, D = 32, 24, 10
OPTS = dict(n_features=40, k=3, auxk=8, dead_toks_threshold=2 * B * 3, lr=3e-3, seed=2,
            geometric_median_samples=4 * B, mse_scale_batches=3, device="cpu")


def _data():
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(20, D, generator=g), dim=-1)
    codes = torch.rand(STEPS * 2 * B, 20, generator=g) * (torch.rand(STEPS * 2 * B, 20, generator=g) < 0.15)
    return codes @ atoms + 0.05 * torch.randn(STEPS * 2 * B, D, generator=g)


def _rank_rows(x, rank):
    """Rank r's share: rows [r*B, (r+1)*B) of every 2B-row global batch."""
    return x.view(STEPS, 2, B, D)[:, rank].reshape(-1, D)


def _worker(rank, init_file, out_dir, path, short_rank=None):
    # a collective that waits longer than this raises (the test fails) instead of hanging
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        x = _rank_rows(_data(), rank)
        if rank == short_rank:
            x = x[: (STEPS - 4) * B + B // 2]  # 20 whole batches and half of one
        sae = train(list(x.split(50)), batch_size=B, step_path=path, **OPTS)
        dist.barrier()
    finally:
        dist.destroy_process_group()  # on both ranks together, before either does anything else
    if rank == 0:
        torch.save({n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
                   | {"steps": sae.config.hyperparameters["steps"]}, os.path.join(out_dir, "ddp.pt"))
    # As `python -m sae_models` does under torchrun: no interpreter teardown, where gloo's leftover worker
    # threads can abort the process after the work is done.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_two_ranks_equal_one_process_with_double_batch(tmp_path, path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), path), nprocs=2,
                       start_method="spawn")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = train([_data()], batch_size=2 * B, step_path="cpu", **OPTS)
    assert ddp["steps"] == single.config.hyperparameters["steps"] == STEPS
    for name in ("W_dec", "b_dec", "W_enc", "b_enc"):
        diff = (ddp[name] - getattr(single, name).detach()).abs().max()
        assert diff < 1e-4, (name, float(diff))


@pytest.mark.slow
def test_ranks_stop_together_when_one_runs_out_of_data(tmp_path):
    """Rank 1 has 20 batches, rank 0 has 24: every rank stops after step 20 (their answers to "do all ranks
    have the next batch" are agreed on one step ahead)."""
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), "gpu", 1), nprocs=2,
                       start_method="spawn")
    assert torch.load(tmp_path / "ddp.pt", weights_only=True)["steps"] == STEPS - 4
