"""The training loop: a `Trainer` started from the data or resumed from a checkpoint, and `train`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .. import metrics
from ..architectures import BatchTopKSAE, SparseAutoencoder, build
from ..files import atomic_target
from ..metadata import SAEConfig
from . import distributed
from .config import TrainConfig
from .rebatcher import Rebatcher
from .recipe import (
    TrainingLoss,
    data_mse_scale,
    geometric_median,
    init_tied_,
    project_decoder_grad_,
    unit_norm_decoder_,
)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "comfyui-sae-training-checkpoint"
TRAINER_NAME = "sae_models.training (Surkov et al. sdxl-unbox / OpenAI TopK recipe)"


def train(batches: Iterable[torch.Tensor], config: TrainConfig | None = None, *,
          eval_batches: Iterable[torch.Tensor] | None = None, callback: Callable[[dict], Any] | None = None,
          **options) -> SparseAutoencoder:
    """Train a TopK (or BatchTopK) SAE on `batches`, any iterable of `[n, d_in]` float tensors (any `n`;
    rows are re-batched to `batch_size`, the incomplete last batch dropped), following the paper's recipe
    (`sae_models.training.recipe`). `config` and/or `options` (the fields of `TrainConfig`, e.g.
    `n_features=5120, k=10`) set the options.

    - `eval_batches`: re-iterable data evaluated with `metrics.evaluate` every `eval_every` steps and at the
      end; the final result is stored in `config.hyperparameters["final_eval"]`.
    - `callback(dict)`: every `log_every` steps with `step, tokens, loss, mse, auxk_loss, fvu, l0,
      dead_fraction, tokens_per_s`; after an evaluation with `step, tokens, eval` (the metrics dict).
    """
    config = dataclasses.replace(config, **options) if config is not None else TrainConfig(**options)
    return Trainer(batches, config, eval_batches=eval_batches, callback=callback).fit()


class Trainer:
    """One training run: set up from the first rows of the data, or from the checkpoint in
    `config.checkpoint_dir` when there is one (and `config.resume`); then `fit()`."""

    def __init__(self, batches: Iterable[torch.Tensor], config: TrainConfig, *,
                 eval_batches: Iterable[torch.Tensor] | None = None, callback: Callable[[dict], Any] | None = None):
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        self.cfg, self.eval_batches, self.callback = config, eval_batches, callback
        self.device = distributed.default_device(config.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.global_batch = config.batch_size * self.world
        self.dead_steps_threshold = config.dead_toks_threshold // self.global_batch
        self.ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir is not None else None
        self.data = Rebatcher(batches, self.device, config.dtype)
        gpu = config.step_path == "gpu" or (config.step_path == "auto" and self.device.type == "cuda")
        self.path = "gpu" if gpu else "cpu"
        # the host reads values back only every `sync_every` steps on the GPU path (logging, dead candidates)
        self.sync_every = config.log_every or 100
        self._agreed = None  # across ranks: the pending answer of `_agree_on_next_batch`

        ckpt = self._read_checkpoint()
        if ckpt is None:
            self._init_from_data()
        else:
            self._resume(ckpt)
        params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
        # fused Adam keeps its step counters on the device (the unfused one reads them back each step)
        fused = self.device.type == "cuda" or self.path == "gpu"
        self.opt = torch.optim.Adam(params, lr=config.lr, eps=config.eps, fused=fused)
        if ckpt is not None:
            self.opt.load_state_dict(ckpt["optimizer"])
        self.loss = TrainingLoss(self.sae, auxk=config.auxk, auxk_coef=config.auxk_coef, mse_scale=self.mse_scale,
                                 dead_steps_threshold=self.dead_steps_threshold,
                                 stats_last_nonzero=self.stats_last_nonzero, widths=config.matryoshka_widths,
                                 path=self.path, refresh_every=self.sync_every, bf16_encoder=config.matmul == "bf16")
        if self.path == "gpu":
            self.loss.refresh_candidates()
        self.model = distributed.wrap(self.loss, self.device)

    # -- setup -------------------------------------------------------------------------------------
    def _new_sae(self, d_in: int) -> SparseAutoencoder:
        c = self.cfg
        config = SAEConfig(architecture=c.architecture, d_in=d_in, n_features=c.n_features, k=c.k, block=c.block,
                           base_model=c.base_model, hook=c.hook, source_format="native")
        return build(config, dtype=c.dtype).to(self.device)

    def _init_from_data(self) -> None:
        """b_dec from the geometric median and the MSE scale from the variance of the first rows (gathered
        over the ranks), the tied init; every rank starts from rank 0's weights."""
        c = self.cfg
        self.sae = self._new_sae(self.data.start())
        per_rank_gm = math.ceil(c.geometric_median_samples / self.world)
        per_rank_var = c.mse_scale_batches * c.batch_size
        sample = self.data.peek(max(per_rank_gm, per_rank_var))
        gm_sample = distributed.gather_rows(sample[:per_rank_gm]).float()
        var_sample = distributed.gather_rows(sample[:per_rank_var]).float()
        del sample
        mse_scale = torch.tensor([data_mse_scale(var_sample)], dtype=torch.float64, device=self.device)
        init_tied_(self.sae, geometric_median(gm_sample.cpu()).to(self.device), c.seed)
        # identical start on every rank (DDP also broadcasts rank 0's parameters)
        distributed.broadcast_(self.sae.W_enc.data, self.sae.W_dec.data, self.sae.b_dec.data, mse_scale)
        self.mse_scale = float(mse_scale)
        self.stats_last_nonzero = torch.zeros(c.n_features, dtype=torch.long, device=self.device)
        self.step, self.tokens = 0, 0
        self._new_window([])

    def _read_checkpoint(self) -> dict | None:
        """The checkpoint to resume from, checked against this run; None for a fresh start."""
        path, c = self.ckpt_path, self.cfg
        if path is None or not c.resume or not path.exists():
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["world_size"] != self.world:
            raise ValueError(f"{path} was written by {ckpt['world_size']} ranks, this run has {self.world}")
        saved = json.loads(ckpt["config"])
        asked = {"architecture": c.architecture, "n_features": c.n_features, "k": c.k}
        differ = {key: (saved.get(key), v) for key, v in asked.items() if saved.get(key) != v}
        if differ:
            raise ValueError(f"{path} is a checkpoint of another SAE ("
                             + ", ".join(f"{key} {a} there, {b} here" for key, (a, b) in differ.items())
                             + "); remove it or use another checkpoint folder")
        return ckpt

    def _resume(self, ckpt: dict) -> None:
        """Model, counters, data position and RNG as the checkpoint left them."""
        mine = ckpt["ranks"][self.rank]
        config = SAEConfig.from_dict(json.loads(ckpt["config"]))
        self.data.resume(mine, config.d_in)
        self.sae = build(config, dtype=self.cfg.dtype).to(self.device)
        with torch.no_grad():
            for name, t in ckpt["model"].items():
                getattr(self.sae, name).copy_(t)
        self.mse_scale = ckpt["mse_scale"]
        self.stats_last_nonzero = ckpt["stats_last_nonzero"].to(self.device)
        self.step, self.tokens = ckpt["step"], ckpt["tokens"]
        self._new_window(ckpt["threshold_window"])
        torch.set_rng_state(mine["rng"])

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        """Steps until `max_tokens` or the end of the data; every `sync_every` steps the bookkeeping that
        reads values back to the host (logging; the GPU path's dead-latent candidates)."""
        c = self.cfg
        self._t0, self._tokens0 = time.perf_counter(), self.tokens
        while c.max_tokens is None or self.tokens < c.max_tokens:
            if not self._has_batch():
                break
            x = self.data.take(c.batch_size)
            self._agree_on_next_batch()
            loss, info = self.train_step(x)
            if self.step % self.sync_every == 0:
                if c.log_every:
                    self.log(x, loss, info)
                if self.path == "gpu":
                    self.loss.refresh_candidates()
            if self.eval_batches is not None and c.eval_every and self.step % c.eval_every == 0:
                self.evaluate()
            if self.ckpt_path is not None and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save_checkpoint()

    def _has_batch(self) -> bool:
        """Whether every rank has a next batch. In one process a host-side check. Across ranks the answer to
        "does every rank have batch t" was all-reduced while step t-1 was queued (`_agree_on_next_batch`),
        so reading it waits for that reduction only, not for the GPU's queue to drain."""
        if self.world == 1:
            return self.data.fill(self.cfg.batch_size)
        agreed, self._agreed = self._agreed, None
        if agreed is None:  # the first step after start or resume
            self._agree_on_next_batch()
            agreed, self._agreed = self._agreed, None
        flag, done = agreed
        if done is not None:
            done.synchronize()
        return bool(int(flag[0]))

    def _agree_on_next_batch(self) -> None:
        """Start the all-reduce (min over ranks) of whether this rank has its next batch."""
        if self.world == 1:
            return
        flag = torch.full((1,), int(self.data.fill(self.cfg.batch_size)), device=self.device)
        distributed.all_reduce(flag, "min")
        if self.device.type != "cuda":  # gloo: the reduction has finished
            self._agreed = (flag, None)
            return
        host = torch.empty(1, dtype=flag.dtype, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._agreed = (host, done)

    def fit(self) -> SparseAutoencoder:
        """Train until `max_tokens` or until any rank's data ends; the SAE, in eval mode, with its
        hyperparameters (and the final evaluation) in its config."""
        with _matmul_precision(self.cfg.matmul):
            self._loop()
        self._set_threshold()
        if self.ckpt_path is not None:
            self.save_checkpoint()
        hyper = self.hyperparameters()
        if self.eval_batches is not None:
            hyper["final_eval"] = distributed.broadcast_object(self.evaluate())
        self.sae.config.hyperparameters = hyper
        self.sae.train(False)
        return self.sae

    def train_step(self, x: torch.Tensor):
        """One step in the recipe's order: loss and backward; decoder rows to unit norm; their parallel
        gradient component removed; Adam. Then BatchTopK's threshold window."""
        self.opt.zero_grad(set_to_none=True)
        loss, info = self.model(x)
        loss.backward()
        unit_norm_decoder_(self.sae.W_dec.data)
        project_decoder_grad_(self.sae.W_dec.data, self.sae.W_dec.grad)
        self.opt.step()
        self.step += 1
        self.tokens += self.global_batch
        if self.batchtopk:
            batch_min = distributed.all_reduce(self.loss.batch_min.detach().reshape(1).double())
            self._window[self._window_count % self._window.numel()] = batch_min[0] / self.world
            self._window_count += 1
            self._set_threshold()
        return loss, info

    @property
    def batchtopk(self) -> bool:
        """Whether the SAE learns BatchTopK's inference threshold (Matryoshka's subclass included)."""
        return isinstance(self.sae, BatchTopKSAE)

    def _new_window(self, minima) -> None:
        """BatchTopK's window of the last `threshold_batches` batch minima, on the device (a ring), started
        from `minima` (oldest first)."""
        size = self.cfg.threshold_batches
        minima = torch.as_tensor(minima, dtype=torch.float64).reshape(-1)[-size:]
        self._window = torch.zeros(size, dtype=torch.float64, device=self.device)
        self._window[: minima.numel()] = minima.to(self.device)
        self._window_count = minima.numel()

    @property
    def threshold_window(self) -> torch.Tensor:
        """The batch minima of the window, oldest first (on the device)."""
        size, n = self._window.numel(), self._window_count
        if n <= size:
            return self._window[:n]
        return self._window.roll(-(n % size))

    def _set_threshold(self) -> None:
        """BatchTopK's inference threshold: the mean of the window of batch minima."""
        if self.batchtopk and self._window_count:
            with torch.no_grad():
                n = min(self._window_count, self._window.numel())
                self.sae.threshold.copy_(self._window[:n].mean())

    def log(self, x: torch.Tensor, loss: torch.Tensor, info: dict) -> None:
        """The step's metrics over the global batch, to `callback` on rank 0."""
        with torch.no_grad():
            sq = (x - info["x_hat"]).double().pow(2).sum().reshape(1)
            ss, _ = distributed.global_centered_sq(x.double())
            stats = torch.cat([sq, ss.reshape(1), loss.detach().double().reshape(1),
                               info["mse"].double().reshape(1), info["aux_loss"].double().reshape(1),
                               torch.as_tensor(info["n_active"], device=self.device).double().reshape(1)])
            distributed.all_reduce(stats)
        if self.rank != 0 or self.callback is None:
            return
        elapsed = time.perf_counter() - self._t0
        self.callback({
            "step": self.step, "tokens": self.tokens,
            "loss": float(stats[2]) / self.world, "mse": float(stats[3]) / self.world,
            "auxk_loss": float(stats[4]) / self.world, "fvu": float(stats[0] / stats[1]),
            "l0": float(stats[5]) / self.global_batch,
            "dead_fraction": float(info["dead"].double().mean()),
            "tokens_per_s": (self.tokens - self._tokens0) / elapsed if elapsed > 0 else float("nan"),
        })

    def evaluate(self) -> dict | None:
        """`metrics.evaluate` on `eval_batches`, on rank 0 (None elsewhere); reported to `callback`."""
        if self.rank != 0:
            return None
        was = self.sae.training
        self.sae.eval()
        result = metrics.evaluate(self.sae, self.eval_batches)
        self.sae.train(was)
        if self.callback is not None:
            self.callback({"step": self.step, "tokens": self.tokens, "eval": result})
        return result

    # -- checkpoints and provenance ------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Rank 0 writes everything `_resume` needs, every rank's data position included (atomically)."""
        mine = {**self.data.state(), "rng": torch.get_rng_state()}
        ranks = distributed.all_gather_objects(mine)
        if self.rank == 0:
            sae = self.sae
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": 1,
                "config": json.dumps(sae.config.to_dict()),
                "model": {n: getattr(sae, n).detach().cpu()
                          for n in ("W_enc", "b_enc", "W_dec", "b_dec", *sae.extra_tensors)},
                "optimizer": self.opt.state_dict(),
                "step": self.step,
                "tokens": self.tokens,
                "mse_scale": self.mse_scale,
                "stats_last_nonzero": self.stats_last_nonzero.cpu(),
                "threshold_window": self.threshold_window.cpu(),
                "world_size": self.world,
                "ranks": ranks,
            }
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_target(self.ckpt_path) as tmp:
                torch.save(state, tmp)
        distributed.barrier()

    def hyperparameters(self) -> dict:
        """What the SAE file records about its training."""
        c = self.cfg
        hyper = {
            "trainer": TRAINER_NAME,
            "architecture": c.architecture, "n_features": c.n_features, "k": c.k, "auxk": c.auxk,
            "auxk_coef": c.auxk_coef, "dead_toks_threshold": c.dead_toks_threshold,
            "dead_steps_threshold": self.dead_steps_threshold, "batch_size": c.batch_size, "world_size": self.world,
            "global_batch_size": self.global_batch, "lr": c.lr, "eps": c.eps, "optimizer": "Adam",
            "geometric_median_samples": c.geometric_median_samples, "mse_scale_batches": c.mse_scale_batches,
            "mse_scale": self.mse_scale, "seed": c.seed, "dtype": str(c.dtype), "max_tokens": c.max_tokens,
        }
        if self.batchtopk:
            hyper["threshold_batches"] = c.threshold_batches
        if c.matryoshka_widths:
            hyper["matryoshka_widths"] = list(c.matryoshka_widths)
        hyper.update({"step_path": self.path, "matmul": c.matmul})
        hyper.update({"steps": self.step, "tokens": self.tokens,
                      "dead_fraction": float((self.stats_last_nonzero > self.dead_steps_threshold).double().mean())})
        return hyper


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """CUDA's float32 matrix products in TF32 for the block when `precision` is "tf32" (restored after)."""
    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
