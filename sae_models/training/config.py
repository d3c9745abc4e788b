"""The options of a training run, named as in the paper's config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")
STEP_PATHS = ("auto", "cpu", "gpu")
MATMUL_PRECISIONS = ("fp32", "tf32", "bf16")


def default_matryoshka_widths(n_features: int) -> tuple[int, ...]:
    """Nested prefixes doubling up to the whole dictionary: n/16, n/8, n/4, n/2, n (fewer for small n)."""
    widths = sorted({max(1, n_features >> s) for s in range(4, -1, -1)})
    return tuple(widths)


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
    - `log_every`: steps between calls of `callback` with the training metrics. On the GPU path the host
      reads values back from the device only at these steps (and the dead-latent candidates are renewed
      there); 0 = no callback, bookkeeping every 100 steps.
    - `matryoshka_widths` (matryoshka_batchtopk): the nested prefixes of the dictionary, increasing, the
      last one `n_features`; each prefix is trained to reconstruct on its own (Bussmann et al. 2025).
      None = `default_matryoshka_widths(n_features)`.
    - `step_path`: `cpu` (sorted sparse products in cache-sized chunks, fast on a CPU), `gpu` (fixed-shape
      pair products and dense AuxK over the latents that can be dead: few large kernels, no host sync
      between log steps), `auto` = `gpu` on a CUDA device. Both compute the same step.
    - `matmul`: `fp32` (the paper's recipe), `tf32` (CUDA's TensorFloat-32 for the float32 matrix
      products) or `bf16` (the encoder's product in bfloat16 under autocast, as sparsify trains): faster,
      less exact; see the held-out FVU. Parameters, optimizer and the sparse products stay float32.
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
    matryoshka_widths: tuple[int, ...] | None = None
    step_path: str = "auto"
    matmul: str = "fp32"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {self.architecture!r}")
        if self.step_path not in STEP_PATHS:
            raise ValueError(f"step_path must be one of {', '.join(STEP_PATHS)}, not {self.step_path!r}")
        if self.matmul not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul must be one of {', '.join(MATMUL_PRECISIONS)}, not {self.matmul!r}")
        if self.batch_size < 1 or self.k < 1 or self.k > self.n_features:
            raise ValueError(f"need batch_size >= 1 and 1 <= k <= n_features "
                             f"(got {self.batch_size}, {self.k}, {self.n_features})")
        if self.architecture == "matryoshka_batchtopk":
            widths = tuple(int(w) for w in (self.matryoshka_widths or default_matryoshka_widths(self.n_features)))
            if (not widths or widths[-1] != self.n_features or widths[0] < 1
                    or any(a >= b for a, b in zip(widths, widths[1:]))):
                raise ValueError(f"matryoshka_widths must increase strictly from >= 1 up to n_features="
                                 f"{self.n_features}, got {list(widths)}")
            self.matryoshka_widths = widths
        elif self.matryoshka_widths is not None:
            raise ValueError("matryoshka_widths is an option of the matryoshka_batchtopk architecture only")
