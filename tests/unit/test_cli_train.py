"""Training on a dump: `sae_models.pipeline.train_on_dump` in-process, and `python -m sae_models train / stats /
eval` on a dump of planted-dictionary data in subprocesses (also under torchrun with two CPU processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sae_models
from sae_models.pipeline import train_on_dump
from sae_models.shards import DumpFormatError, ShardWriter, iter_vectors

ROOT = Path(__file__).resolve().parents[2]
D, ATOMS, ACTIVE, ROWS_PER_IMAGE, IMAGES = 32, 48, 3, 64, 96


def planted_dump(folder: Path, block: str = "mid.0", images: int = IMAGES) -> torch.Tensor:
    """Vectors = sparse non-negative combinations of known unit atoms + small noise, as a dump."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(ATOMS, D, generator=g), dim=1)
    with ShardWriter(folder, writer_id="planted", rows_per_shard=1024, dtype=torch.float32) as w:
        for i in range(images):
            idx = torch.stack([torch.randperm(ATOMS, generator=g)[:ACTIVE] for _ in range(ROWS_PER_IMAGE)])
            coef = torch.rand(ROWS_PER_IMAGE, ACTIVE, generator=g) * 2 + 0.5
            x = (coef.unsqueeze(-1) * atoms[idx]).sum(1) + 0.01 * torch.randn(ROWS_PER_IMAGE, D, generator=g)
            w.add_image({"prompt": f"image {i}", "seed": i},
                        {block: {"update": x, "grid": (8, 8), "position": torch.arange(ROWS_PER_IMAGE)}})
    return atoms


def run(*args, torchrun: int = 0, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if torchrun:
        exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
        cmd = [exe, "--standalone", f"--nproc-per-node={torchrun}", "-m", "sae_models", *args]
    else:
        cmd = [sys.executable, "-m", "sae_models", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


TRAIN = ["--n-features", "96", "--k", str(ACTIVE), "--batch-size", "128", "--lr", "1e-2", "--epochs", "6",
         "--eval-fraction", "0.1", "--log-every", "5"]


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dump")
    atoms = planted_dump(folder)
    return folder, atoms


SMALL = dict(n_features=16, k=2, auxk=4, lr=1e-2, geometric_median_samples=64, device="cpu")


def test_a_dump_smaller_than_a_batch_trains_in_one_batch_and_is_saved_with_its_index(tmp_path):
    folder = tmp_path / "small"
    planted_dump(folder, images=3)
    train_rows = iter_vectors(folder, "mid.0", split="train", eval_fraction=0.34).n_rows
    assert 0 < train_rows < 4096
    logs, ckpt, out = [], tmp_path / "ckpt", tmp_path / "sae" / "small.safetensors"
    done = train_on_dump(folder, out, eval_fraction=0.34, epochs=3, checkpoint_dir=ckpt, remove_checkpoints=True,
                         callback=logs.append, log_every=1, **SMALL)
    hyper = done.sae.config.hyperparameters
    assert hyper["batch_size"] == train_rows and hyper["steps"] == 3  # one batch of everything per pass
    assert [m["step"] for m in logs] == [1, 2, 3] and {m["total_steps"] for m in logs} == {3}
    assert done.block == "mid.0" and done.held_out and 0 < done.metrics["n_tokens"] < 3 * ROWS_PER_IMAGE
    saved = sae_models.load(out)
    assert torch.equal(saved.W_dec, done.sae.W_dec) and saved.stats.n_vectors == 3 * ROWS_PER_IMAGE
    assert done.index_path == out.with_suffix(".features.json") and done.index_path.is_file()
    assert not ckpt.exists()  # removed once everything is written


def test_train_on_dump_without_held_out_images_evaluates_on_the_whole_dump(dump, tmp_path):
    folder, _ = dump
    ckpt = tmp_path / "ckpt"
    done = train_on_dump(folder, tmp_path / "all.safetensors", eval_fraction=0.0, statistics=False,
                         batch_size=256, max_tokens=256 * 4, checkpoint_dir=ckpt, **SMALL)
    assert not done.held_out and done.metrics["n_tokens"] == IMAGES * ROWS_PER_IMAGE
    assert done.index_path is None and not (tmp_path / "all.features.json").exists()
    assert (ckpt / sae_models.training.CHECKPOINT_NAME).is_file()  # kept: a later run may continue from it


def test_train_on_dump_refuses_an_empty_training_split(dump, tmp_path):
    folder, _ = dump
    with pytest.raises(DumpFormatError, match="no complete mid.0 rows to train on"):
        train_on_dump(folder, tmp_path / "x.safetensors", eval_fraction=1.0, **SMALL)
    assert not (tmp_path / "x.safetensors").exists()


def test_train_stats_eval_on_a_dump(dump, tmp_path):
    folder, atoms = dump
    out = tmp_path / "sae.safetensors"
    r = run("train", str(folder), "--out", str(out), *TRAIN)
    assert r.returncode == 0, r.stderr
    assert "held-out: fvu" in r.stdout and "tok/s" in r.stderr
    sae = sae_models.load(out)
    assert (sae.config.block, sae.n_features, sae.config.k, sae.d_in) == ("mid.0", 96, ACTIVE, D)
    assert sae.stats.mean is not None and sae.stats.n_vectors == IMAGES * ROWS_PER_IMAGE
    # the planted atoms are found (best-match cosine), as the unit tests of training check at length
    cos = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ atoms.T
    assert (cos.max(0).values > 0.9).float().mean() > 0.8

    index = json.loads(out.with_suffix(".features.json").read_text())
    assert index["block"] == "mid.0" and len(index["features"]) == 96 and index["dump"] == str(folder)
    best = max(range(96), key=lambda f: float(sae.stats.frequency[f]))
    assert index["features"][best][0]["prompt"].startswith("image ")

    r = run("eval", str(out), str(folder), "--json")
    assert r.returncode == 0, r.stderr
    held_out = json.loads(r.stdout)
    assert held_out["fvu"] < 0.2 and 0 < held_out["l0"] <= ACTIVE
    assert 0 < held_out["n_tokens"] < IMAGES * ROWS_PER_IMAGE  # only the held-out images

    bare = tmp_path / "bare.safetensors"
    sae.stats = sae_models.FeatureStats()
    sae_models.save(sae, bare)
    r = run("stats", str(bare), str(folder), "--top-n", "4")
    assert r.returncode == 0, r.stderr
    again = sae_models.load(bare)
    assert torch.allclose(again.stats.frequency, sae_models.load(out).stats.frequency)
    assert len(json.loads(bare.with_suffix(".features.json").read_text())["features"][best]) == 4


def test_an_interrupted_cli_run_resumes_to_the_same_sae(dump, tmp_path):
    folder, _ = dump
    common = [*TRAIN, "--no-stats", "--checkpoint-every", "3"]
    steps = 20 * 128
    r = run("train", str(folder), "--out", str(tmp_path / "whole.safetensors"), *common, "--max-tokens", str(steps))
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "ckpt"
    r = run("train", str(folder), "--out", str(tmp_path / "half.safetensors"), *common, "--max-tokens", str(steps // 2),
            "--checkpoint-dir", str(ckpt))
    assert r.returncode == 0, r.stderr
    r = run("train", str(folder), "--out", str(tmp_path / "resumed.safetensors"), *common, "--max-tokens", str(steps),
            "--checkpoint-dir", str(ckpt))
    assert r.returncode == 0, r.stderr
    whole, resumed = (sae_models.load(tmp_path / f"{n}.safetensors") for n in ("whole", "resumed"))
    assert whole.config.hyperparameters["steps"] == resumed.config.hyperparameters["steps"] == 20
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(whole, name), getattr(resumed, name), atol=1e-5), name
    r = run("train", str(folder), "--out", str(tmp_path / "other.safetensors"), *common, "--n-features", "64",
            "--checkpoint-dir", str(ckpt))
    assert r.returncode == 2 and "is a checkpoint of another SAE (n_features 96 there, 64 here)" in r.stderr


def test_cli_errors_name_the_problem(dump, tmp_path):
    folder, _ = dump
    r = run("train", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "not an activation dump folder" in r.stderr
    r = run("train", str(folder), "--block", "up.0.1", "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "holds no up.0.1 vectors (it holds: mid.0)" in r.stderr


@pytest.mark.slow
def test_train_under_torchrun_with_two_processes(dump, tmp_path):
    folder, atoms = dump
    out = tmp_path / "ddp.safetensors"
    r = run("train", str(folder), "--out", str(out), *TRAIN, torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    sae = sae_models.load(out)
    cos = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ atoms.T
    assert (cos.max(0).values > 0.9).float().mean() > 0.8
    assert sae.config.hyperparameters["world_size"] == 2
