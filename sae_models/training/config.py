"""The options of a training run, named as in the paper's config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ARCHITECTURES = ("topk", "batchtopk")


@dataclass
class TrainConfig:
    """Options of `train`; the defaults are the paper's (k=10, 5120 features, AuxK 256 with coefficient 1/32,
    dead after 10M tokens, batch 4096, Adam lr 1e-4, eps 6.25e-10).

    - `max_tokens`: stop once this many vectors (summed over ranks) have been trained on; None = until the
      data ends. The last step may go past it by less than one batch.
    - `geometric_median_samples`: vectors (over all ranks) for the geometric-median init of `b_dec`
      (paper: 32768); `mse_scale_batches`: batches for the fixed MSE scale (paper: 10).
    - `threshold_batches` (batchtopk): batches averaged for the inference threshold.
    - `block`, `base_model`, `hook`: recorded in the SAE's configuration.
    - `checkpoint_dir`: write `checkpoint.pt` there every `checkpoint_every` steps and at the end; with
      `resume`, continue from it (model, optimizer, step, tokens, dead-latent counters, RNG state, rows
      pending re-batching, and `batches.state_dict()` when the data has `state_dict`/`load_state_dict`,
      else the rows already consumed are skipped on resume). Its contents load with
      `torch.load(weights_only=True)`.
    - `eval_every`: steps between evaluations of `eval_batches` (and one at the end).
    - `log_every`: steps between calls of `callback` with the training metrics.
    """

    n_features: int = 5120
    k: int = 10
    auxk: int | None = 256
    auxk_coef: float = 1 / 32
    dead_toks_threshold: int = 10_000_000
    batch_size: int = 4096
    lr: float = 1e-4
    eps: float = 6.25e-10
    architecture: str = "topk"
    max_tokens: int | None = None
    geometric_median_samples: int = 32768
    mse_scale_batches: int = 10
    threshold_batches: int = 100
    seed: int = 0
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.float32
    block: str | None = None
    base_model: str | None = None
    hook: str = "update"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000
    resume: bool = True
    eval_every: int | None = None
    log_every: int = 100

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be 'topk' or 'batchtopk', not {self.architecture!r}")
        if self.batch_size < 1 or self.k < 1 or self.k > self.n_features:
            raise ValueError(f"need batch_size >= 1 and 1 <= k <= n_features "
                             f"(got {self.batch_size}, {self.k}, {self.n_features})")
