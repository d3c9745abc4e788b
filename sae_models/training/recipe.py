"""Training the paper's TopK SAE (and BatchTopK, Matryoshka BatchTopK) on activation vectors.

The recipe is the one of the paper's training code (Surkov et al., "Unpacking SDXL Turbo", github
surkovv/sdxl-unbox, `scripts/train_sae.py` and `SAE/sae.py`), which is adapted from OpenAI's
sparse_autoencoder `train.py` (Gao et al. 2024). Facts of that code followed here:

* Inputs are not normalised (the paper trains on raw block updates; no layer norm, no scaling).
* Init: the encoder is an `nn.Linear(d_in, n_features)` with PyTorch's default init, i.e. entries uniform
  in `[-1/sqrt(d_in), 1/sqrt(d_in)]`; the decoder is tied to it (`W_dec = W_enc` row for row) and then its
  rows are scaled to unit norm, the encoder keeping its unnormalised scale. `b_enc` (`latent_bias`) = 0.
  `b_dec` (`pre_bias`) = geometric median of a sample of the data: the first 32768 vectors, Weiszfeld
  iterations started at the mean, weights `1 / max(||p - m||, 1e-6)`, at most 100 iterations, stop when
  the objective improves by no more than `1e-20` times its value (`geometric_median`). The paper's
  script does not rescale the encoder from data (OpenAI's `init_from_data_` does; the paper's only sets
  `pre_bias`).
* Loss: `mse_scale * mean((x_hat - x)^2) + auxk_coef * normalized_mse(aux_hat, x - x_hat.detach() +
  b_dec.detach())`. `mse_scale` = 1 / mean squared deviation of a data sample from its per-dimension
  mean, computed ONCE before training from 10 batches (`10 * batch_size` vectors); the per-batch
  `normalized_mse(r, t) = mean((r - t)^2) / mean((t - mean_over_batch(t))^2)` is used only for the AuxK
  term ("only used for auxk" in both codes), with `nan_to_num(0)`. `aux_hat` is the sparse decode of the
  AuxK latents PLUS `b_dec` (not detached), so `b_dec` also gets a gradient from the AuxK term, as there.
* AuxK: the top `auxk` (256) entries of the pre-activations multiplied by the dead mask (live latents
  become 0), then ReLU; only dead latents with a positive pre-activation contribute. A latent is dead
  when it has not fired for more than `dead_toks_threshold // batch_size` steps (10M tokens = 2441 steps
  at batch 4096); it fires in a step when it is among a vector's top k with pre-activation > 1e-3. The
  counters are updated before the AuxK selection of the same step.
* Step order: backward; decoder rows scaled to unit norm (in place, on the weights the gradient was
  computed at); the gradient component parallel to each (now unit) decoder row projected out; Adam
  (lr 1e-4, eps 6.25e-10, no weight decay) step. So the returned decoder rows are unit-norm up to the
  last Adam step (|norm - 1| <= about lr * sqrt(d_in)). No gradient clipping, no EMA, no LR schedule,
  fp32 (OpenAI's defaults `clip_grad=None`, `ema_multiplier=None`; the paper's script has neither).
* Data: fixed-size batches of `batch_size`, the last incomplete one dropped (OpenAI's `batch_tensors`,
  `drop_last=True`). Difference: the paper's script takes its 10 statistics batches from the stream and
  does not train on them; here the sample vectors are trained on as well.

BatchTopK (Bussmann, Leask & Nanda 2024, arXiv 2412.06410): the same loop with the batch-level top
`k * batch` of `ReLU(pre)` (`BatchTopKSAE.batch_activation`) instead of per-vector top k. As in that paper,
the inference threshold is the average over batches of the minimum positive activation kept by the batch
top-k: here the mean over the last `threshold_batches` training steps, written into `sae.threshold`
after each step and at the end.

Matryoshka BatchTopK (Bussmann et al. 2025, arXiv 2503.17547; Nabeshima 2024): BatchTopK whose nested
prefixes of the dictionary (`widths`, the last = n_features) each reconstruct on their own: the loss adds,
for every inner width w, `mse_scale * mean((z[:, :w] @ W_dec[:w] + b_dec - x)^2)` (the same terms SAELens's
`MatryoshkaBatchTopKTrainingSAE` adds, in this recipe's MSE scale); AuxK as BatchTopK's.

Distributed (`torch.distributed` initialised, e.g. under torchrun): the model is wrapped in
`DistributedDataParallel` (gradients averaged); each rank reads its own rank-disjoint `batches` with
`batch_size` rows per step, so a step sees `batch_size * world_size` vectors. The fired-latent counts are
all-reduced before the dead-latent counters are updated, so every rank holds the dead set of the global
batch; the AuxK normalized-MSE denominator uses the global batch mean and variance; the geometric median
and `mse_scale` are computed on the samples gathered from all ranks. With these, 2 ranks with batch B
follow the same trajectory as 1 process with batch 2B (up to float rounding). All ranks stop when any
rank runs out of data. BatchTopK selects within each rank's batch. Only rank 0 writes checkpoints (with
every rank's data-iterator state) and calls `callback`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .pair_ops import dense_subset_decode, pair_decode
from .sparse_ops import encoder_values, sparse_decode

FIRE_THRESHOLD = 1e-3  # a top-k pre-activation above this counts as firing (paper's `vals > 1e-3`)


@torch.no_grad()
def geometric_median(points: torch.Tensor, eps: float = 1e-6, maxiter: int = 100, ftol: float = 1e-20):
    """Weiszfeld's algorithm as in the paper's `compute_geometric_median` (unit weights): start at the mean;
    repeat `m <- sum_i w_i p_i / sum_i w_i` with `w_i = 1 / max(||p_i - m||, eps)`; stop after `maxiter`
    iterations or when the objective `sum_i ||p_i - m||` improves by no more than `ftol` times its value."""
    points = points.float()
    median = points.mean(0)
    objective = (points - median).norm(dim=1).sum()
    for _ in range(maxiter):
        prev = objective
        w = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        median = (points * (w / w.sum())[:, None]).sum(0)
        objective = (points - median).norm(dim=1).sum()
        if abs(float(prev - objective)) <= ftol * float(objective):
            break
    return median


def data_mse_scale(sample: torch.Tensor) -> float:
    """`1 / mean squared deviation of the sample from its per-dimension mean`: the fixed MSE scale."""
    return 1.0 / float((sample - sample.mean(0)).pow(2).mean())


@torch.no_grad()
def init_tied_(sae, b_pre: torch.Tensor, seed: int) -> None:
    """The paper's init, in place: encoder uniform in `[-1/sqrt(d_in), 1/sqrt(d_in)]` (nn.Linear's default,
    drawn from a generator seeded with `seed`), decoder tied to it then unit-norm rows, `b_enc` 0,
    `b_dec = b_pre`."""
    n, d = sae.W_enc.shape
    gen = torch.Generator().manual_seed(seed)
    W = (torch.rand(n, d, generator=gen, dtype=torch.float32) * 2 - 1) * (1.0 / math.sqrt(d))
    sae.W_enc.copy_(W)
    sae.W_dec.copy_(W)
    unit_norm_decoder_(sae.W_dec)
    sae.b_enc.zero_()
    sae.b_dec.copy_(b_pre)


@torch.no_grad()
def unit_norm_decoder_(W_dec: torch.Tensor) -> None:
    """Scale each decoder row (feature direction) to unit norm, in place."""
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True))


@torch.no_grad()
def project_decoder_grad_(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    """Remove from `grad` its component parallel to each (unit-norm) row of `W_dec`, in place:
    `g_f <- g_f - <W_f, g_f> W_f`."""
    grad.sub_((W_dec * grad).sum(-1, keepdim=True) * W_dec)


class TrainingLoss(nn.Module):
    """The forward half of a training step: the latent selection (top k per vector, or the batch top k of
    BatchTopK and Matryoshka), the dead-latent counters and the AuxK selection, and the loss. A module so
    that DistributedDataParallel can wrap it.

    `stats_last_nonzero[f]` counts the steps since latent f last fired (updated in place by each forward);
    after a BatchTopK forward, `batch_min` is the smallest positive activation the batch top k kept (0 if
    none). `widths`: Matryoshka's nested prefixes (the last = n_features), each adding its own MSE term.

    Two paths compute the same step: `gpu` (fixed-shape pair products, `pair_ops`; no value is read back
    to the host except when `refresh_candidates` renews the latents that can be dead) and `cpu` (sorted
    sparse products, `sparse_ops`)."""

    def __init__(self, sae, *, auxk: int | None, auxk_coef: float, mse_scale: float, dead_steps_threshold: int,
                 stats_last_nonzero: torch.Tensor, widths: tuple[int, ...] | None = None, path: str = "cpu",
                 refresh_every: int = 100, bf16_encoder: bool = False):
        super().__init__()
        self.sae = sae
        self.auxk, self.auxk_coef, self.mse_scale = auxk, auxk_coef, mse_scale
        self.dead_steps_threshold = dead_steps_threshold
        self.stats_last_nonzero = stats_last_nonzero
        self.widths = tuple(widths) if widths and len(widths) > 1 else None
        self.path, self.refresh_every = path, max(1, refresh_every)
        self.bf16_encoder = bf16_encoder
        self.batch_min = None
        self.candidates: torch.Tensor | None = None
        self._candidate_steps_left = 0
        self._rows: dict = {}
        # Matryoshka: the inner widths, a latent's level being how many of them are <= it
        self._bounds = torch.tensor(self.widths[:-1], device=sae.W_enc.device) if self.widths else None

    # -- selection (both paths) --------------------------------------------------------------------
    @torch.no_grad()
    def _dead(self, latents: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Count this step's firing latents (over all ranks) into the counters; the dead mask after it."""
        fired = torch.zeros(self.sae.n_features, dtype=torch.long, device=values.device)
        fired.index_add_(0, latents, (values > FIRE_THRESHOLD).long())
        distributed.all_reduce(fired)
        self.stats_last_nonzero.mul_((fired == 0).long()).add_(1)
        return self.stats_last_nonzero > self.dead_steps_threshold

    @torch.no_grad()
    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-activations `W_enc (x - b_dec) + b_enc`, float32; with `bf16_encoder` the product runs in
        bfloat16 (as sparsify's autocast), so the selection sees bfloat16-rounded values."""
        sae = self.sae
        if not self.bf16_encoder:
            return F.linear(x - sae.b_dec, sae.W_enc, sae.b_enc)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return F.linear(x - sae.b_dec, sae.W_enc, sae.b_enc).float()

    def forward(self, x: torch.Tensor):
        return self._forward_gpu(x) if self.path == "gpu" else self._forward_cpu(x)

    def _loss(self, x, x_hat, inner, aux_hat, values, dead):
        """The loss from the reconstructions either path made: `mse_scale * MSE`, plus Matryoshka's inner
        prefixes' MSEs (`inner`, same scale), plus the AuxK term on `aux_hat` (None without AuxK)."""
        mse = (x_hat - x).pow(2).mean()
        loss = self.mse_scale * mse
        if inner:
            loss = loss + sum((r - x).pow(2).mean() for r in inner) * self.mse_scale
        aux_loss = x.new_zeros(())
        if aux_hat is not None:
            target = x - x_hat.detach() + self.sae.b_dec.detach()
            ss, count = distributed.global_centered_sq(target)
            denom = ss / (count * x.shape[1])
            aux_loss = self.auxk_coef * ((aux_hat - target).pow(2).mean() / denom).nan_to_num(0)
            loss = loss + aux_loss
        return loss, {"mse": mse.detach(), "aux_loss": aux_loss.detach(), "x_hat": x_hat.detach(),
                      "n_active": (values > 0).sum(), "dead": dead}

    # -- the CPU path ------------------------------------------------------------------------------
    @torch.no_grad()
    def _select(self, pre: torch.Tensor):
        """The kept (row, latent, pre-activation) triples, rows ascending."""
        sae, B = self.sae, pre.shape[0]
        if sae.architecture == "topk":
            v, i = pre.topk(sae.config.k, dim=-1)
            rows = torch.arange(B, device=pre.device).repeat_interleave(sae.config.k)
            return rows, i.reshape(-1), v.reshape(-1)
        flat, v = sae.batch_activation(pre, sparse=True)
        self.batch_min = v.min() if v.numel() else v.new_zeros(())
        return flat // sae.n_features, flat % sae.n_features, v

    @torch.no_grad()
    def _select_auxk(self, pre: torch.Tensor, dead: torch.Tensor):
        """The top `auxk` pre-activations of the dead latents per vector, positive ones only (the ReLU)."""
        if not self.auxk or not bool(dead.any()):
            none = torch.zeros(0, dtype=torch.long, device=pre.device)
            return none, none, pre.new_zeros(0)
        av, ai = (pre * dead).topk(min(self.auxk, self.sae.n_features), dim=-1)
        arows = torch.arange(pre.shape[0], device=pre.device)[:, None].expand_as(ai)
        keep = av > 0  # the zeros (live latents, negative dead ones) contribute nothing
        return arows[keep], ai[keep], av[keep]

    def _forward_cpu(self, x: torch.Tensor):
        sae, B = self.sae, x.shape[0]
        with torch.no_grad():
            pre = self._pre(x)
            rows, i, v = self._select(pre)
            dead = self._dead(i, v)
            arows, ai, av = self._select_auxk(pre, dead)
            del pre
        vals = encoder_values(torch.cat([v, av]), x, sae.W_enc, sae.b_enc, sae.b_dec,
                              torch.cat([rows, arows]), torch.cat([i, ai]))
        main_v, aux_v = vals[: v.numel()].relu(), vals[v.numel() :].relu()
        x_hat = sparse_decode(main_v, sae.W_dec, rows, i, B) + sae.b_dec
        inner = [sparse_decode(main_v[i < w], sae.W_dec, rows[i < w], i[i < w], B) + sae.b_dec
                 for w in (self.widths or ())[:-1]]
        aux_hat = sparse_decode(aux_v, sae.W_dec, arows, ai, B) + sae.b_dec if self.auxk else None
        return self._loss(x, x_hat, inner, aux_hat, v, dead)

    # -- the GPU path ------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_candidates(self, horizon: int | None = None) -> None:
        """The latents that can be dead in the next `horizon` forwards: a counter grows by at most one a
        step, so only those with `counter + horizon > threshold` can pass the threshold before the next
        refresh. AuxK then looks at these columns only, exactly as at all of them. One host read."""
        horizon = horizon or self.refresh_every
        can = torch.nonzero(self.stats_last_nonzero + horizon > self.dead_steps_threshold).flatten()
        self.candidates = can if can.numel() else None
        self._candidate_steps_left = horizon

    @torch.no_grad()
    def _select_pairs(self, pre: torch.Tensor):
        """(row, latent, pre-activation) of the selection, `k * batch` of them in any order (BatchTopK's
        non-positive ones included, valued 0: they add nothing and get no gradient)."""
        sae, (B, n) = self.sae, pre.shape
        if sae.architecture == "topk":
            k = sae.config.k
            v, i = pre.topk(k, dim=-1, sorted=False)
            key = (B, k, pre.device)
            if key not in self._rows:
                self._rows = {key: torch.arange(B, device=pre.device).repeat_interleave(k)}
            return self._rows[key], i.reshape(-1), v.reshape(-1)
        flat = pre.relu().flatten()
        v, f = flat.topk(min(sae.config.k * B, flat.numel()), sorted=False)
        positive_min = torch.where(v > 0, v, torch.full_like(v, float("inf"))).min()
        self.batch_min = torch.where(torch.isinf(positive_min), torch.zeros_like(positive_min), positive_min)
        return f // n, f % n, v

    @torch.no_grad()
    def _aux_codes(self, pre: torch.Tensor, dead: torch.Tensor) -> torch.Tensor | None:
        """AuxK's codes over the candidate latents `[batch, candidates]`: the top `auxk` of the dead ones'
        pre-activations, ReLU'd, 0 elsewhere; None when no latent can be dead."""
        cand = self.candidates
        if not self.auxk or cand is None:
            return None
        sub = pre.index_select(1, cand).mul_(dead.index_select(0, cand))
        av, ai = sub.topk(min(self.auxk, cand.numel()), dim=-1, sorted=False)
        return torch.zeros_like(sub).scatter_(1, ai, av.relu_())

    def _forward_gpu(self, x: torch.Tensor):
        sae, B = self.sae, x.shape[0]
        if self._candidate_steps_left <= 0:
            self.refresh_candidates()
        self._candidate_steps_left -= 1
        with torch.no_grad():
            pre = self._pre(x)
            rows, i, v = self._select_pairs(pre)
            dead = self._dead(i, v)
            aux_codes = self._aux_codes(pre, dead)
            del pre
        params = (sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec)
        if self.widths:
            level = torch.bucketize(i, self._bounds, right=True)
            recon = pair_decode(v, x, *params, rows, i, B, level, len(self.widths)).cumsum(0) + sae.b_dec
        else:
            recon = pair_decode(v, x, *params, rows, i, B) + sae.b_dec
        aux_hat = None
        if self.auxk:
            aux_hat = sae.b_dec if aux_codes is None else (
                dense_subset_decode(aux_codes, x, *params, self.candidates) + sae.b_dec)
        return self._loss(x, recon[-1], list(recon[:-1]), aux_hat, v, dead)
