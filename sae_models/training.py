"""Training the paper's TopK SAE (and BatchTopK) on activation vectors.

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

import inspect
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .architectures import SparseAutoencoder, build
from .metadata import SAEConfig

__all__ = ["train", "geometric_median", "unit_norm_decoder_", "project_decoder_grad_", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
FIRE_THRESHOLD = 1e-3  # a top-k pre-activation above this counts as firing (paper's `vals > 1e-3`)


# ----------------------------------------------------------------------------------------------------
# paper-exact pieces
# ----------------------------------------------------------------------------------------------------


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


@torch.no_grad()
def unit_norm_decoder_(W_dec: torch.Tensor) -> None:
    """Scale each decoder row (feature direction) to unit norm, in place."""
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True))


@torch.no_grad()
def project_decoder_grad_(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    """Remove from `grad` its component parallel to each (unit-norm) row of `W_dec`, in place:
    `g_f <- g_f - <W_f, g_f> W_f`."""
    grad.sub_((W_dec * grad).sum(-1, keepdim=True) * W_dec)


# ----------------------------------------------------------------------------------------------------
# sparse autograd pieces: gradients touch only the selected (vector, latent) pairs
# ----------------------------------------------------------------------------------------------------


def _argsort(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":  # numpy's sort is much faster than torch's on CPU for these sizes
        return torch.from_numpy(np.argsort(t.numpy(), kind="stable"))
    return torch.argsort(t, stable=True)


def _csr(feat: torch.Tensor, vec: torch.Tensor, values: torch.Tensor, n: int, n_vec: int) -> torch.Tensor:
    """The `[n, n_vec]` sparse matrix with `values` at `(feat, vec)` (no duplicate pairs), in CSR form."""
    perm = _argsort(feat)
    crow = torch.zeros(n + 1, dtype=torch.long, device=feat.device)
    crow[1:] = torch.bincount(feat, minlength=n).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, vec[perm], values[perm], (n, n_vec))


def _pair_dots(a: torch.Tensor, ia: torch.Tensor, b: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """`out[e] = a[ia[e]] . b[ib[e]]`, in cache-sized chunks (no [entries, d] temporaries)."""
    out = a.new_empty(ia.numel())
    chunk = max(1, (1 << 21) // max(a.shape[1], 1))
    buf_a = a.new_empty(min(chunk, ia.numel()), a.shape[1])
    buf_b = b.new_empty(min(chunk, ia.numel()), b.shape[1])
    for s in range(0, ia.numel(), chunk):
        c = min(chunk, ia.numel() - s)
        torch.index_select(a, 0, ia[s : s + c], out=buf_a[:c])
        torch.index_select(b, 0, ib[s : s + c], out=buf_b[:c])
        out[s : s + c] = torch.bmm(buf_a[:c].unsqueeze(1), buf_b[:c].unsqueeze(2)).view(-1)
    return out


class _EncoderValues(torch.autograd.Function):
    """Pre-activations `W_enc[f] . (x[b] - b_dec) + b_enc[f]` at the given pairs (already computed without
    grad). Backward: gradients of W_enc, b_enc and b_dec from those pairs only (sparse-dense matmul)."""

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, b_dec, rows, idx):
        ctx.save_for_backward(x, W_enc, b_dec, rows, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        x, W_enc, b_dec, rows, idx = ctx.saved_tensors
        keep = g != 0
        g, rows, idx = g[keep], rows[keep], idx[keep]
        n, d = W_enc.shape
        grad_b_enc = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, idx, g)
        if g.numel():
            grad_W = _csr(idx, rows, g, n, x.shape[0]) @ (x - b_dec)
        else:
            grad_W = torch.zeros_like(W_enc)
        grad_b_dec = -(grad_b_enc @ W_enc)
        return None, None, grad_W, grad_b_enc, grad_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
    """`out[b] = sum over pairs (b, f, v) of v * W_dec[f]` for `n_rows` vectors; `rows` ascending."""

    @staticmethod
    def forward(ctx, vals, W_dec, rows, idx, n_rows):
        ctx.save_for_backward(vals, W_dec, rows, idx)
        ctx.n_rows = n_rows
        if vals.numel() == 0:
            return W_dec.new_zeros(n_rows, W_dec.shape[1])
        counts = torch.bincount(rows, minlength=n_rows)
        offsets = counts.cumsum(0) - counts
        return F.embedding_bag(idx, W_dec, offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, grad_out):
        vals, W_dec, rows, idx = ctx.saved_tensors
        if vals.numel() == 0:
            return torch.zeros_like(vals), torch.zeros_like(W_dec), None, None, None
        grad_out = grad_out.contiguous()
        grad_vals = _pair_dots(grad_out, rows, W_dec, idx) if ctx.needs_input_grad[0] else None
        grad_W = _csr(idx, rows, vals, W_dec.shape[0], ctx.n_rows) @ grad_out
        return grad_vals, grad_W, None, None, None


def _sparse_decode(vals, W_dec, rows, idx, n_rows):
    return _SparseDecode.apply(vals, W_dec, rows, idx, n_rows)


# ----------------------------------------------------------------------------------------------------
# distributed helpers (no-ops in a single process)
# ----------------------------------------------------------------------------------------------------


# The only buffer (BatchTopK's threshold) is set from all-reduced values, identical on every rank, so DDP
# need not broadcast it each forward; torch >= 2.14 names that option `forward_sync_buffers`.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world() -> int:
    return dist.get_world_size() if _dist_on() else 1


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _dist_on():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (rank order)."""
    if not _dist_on():
        return x
    parts = [None] * _world()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts, 0).to(x.device)


def _global_centered_sq(t: torch.Tensor) -> torch.Tensor:
    """Sum over the global batch of `||t_b - mean_b(t)||^2` (mean over all ranks' rows). No grad."""
    with torch.no_grad():
        s = torch.cat([t.sum(0), t.new_tensor([t.shape[0]])])
        _all_reduce(s)
        mu = s[:-1] / s[-1]
        ss = (t - mu).pow(2).sum().reshape(1)
        _all_reduce(ss)
        return ss[0], s[-1]


# ----------------------------------------------------------------------------------------------------
# data: rebatching with resumable state
# ----------------------------------------------------------------------------------------------------


class _Rebatcher:
    """Pulls `[n, d_in]` tensors from an iterator and hands out `batch_size`-row batches. Remembers the
    rows pulled (for resuming iterables without state) and the rows pulled but not yet handed out."""

    def __init__(self, batches, d_in, device, dtype):
        self.source = batches
        self.it = None
        self.d_in, self.device, self.dtype = d_in, device, dtype
        self.pending: list[torch.Tensor] = []
        self.n_pending = 0
        self.rows_consumed = 0
        self.exhausted = False

    def start(self, skip_rows: int = 0):
        """Begin iterating `source`, dropping its first `skip_rows` rows (already trained on or pending)."""
        self.it = iter(self.source)
        while skip_rows > 0:
            t = self._pull()
            if t is None:
                return
            if t.shape[0] > skip_rows:
                self._push(t[skip_rows:])
            skip_rows -= t.shape[0]

    def _pull(self) -> torch.Tensor | None:
        """The source's next batch as rows (counted as consumed); None once it has ended."""
        try:
            t = self._as_rows(next(self.it))
        except StopIteration:
            self.exhausted = True
            return None
        self.rows_consumed += t.shape[0]
        return t

    def _as_rows(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.shape[-1] != self.d_in:
            raise ValueError(f"training batches must be [n, {self.d_in}], got shape {tuple(t.shape)}")
        return t.reshape(-1, self.d_in)

    def _push(self, t):
        if t.shape[0]:
            self.pending.append(t)
            self.n_pending += t.shape[0]

    def fill(self, n: int) -> bool:
        """Pull until at least `n` rows are pending; False when the source ended first."""
        while self.n_pending < n and not self.exhausted:
            t = self._pull()
            if t is not None:
                self._push(t)
        return self.n_pending >= n

    def peek(self, n: int) -> torch.Tensor:
        self.fill(n)
        rows = torch.cat(self.pending, 0)[:n] if self.pending else torch.zeros(0, self.d_in)
        return rows.to(self.device, self.dtype)

    def take(self, n: int) -> torch.Tensor:
        rows = torch.cat(self.pending, 0) if len(self.pending) > 1 else self.pending[0]
        out, rest = rows[:n], rows[n:]
        self.pending = [rest] if rest.shape[0] else []
        self.n_pending = rest.shape[0]
        return out.to(self.device, self.dtype, non_blocking=True)

    def pending_tensor(self) -> torch.Tensor:
        if not self.pending:
            return torch.zeros(0, self.d_in)
        return torch.cat(self.pending, 0).cpu()


# ----------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------


class _TrainStep(nn.Module):
    """Forward of one training step; a module so that DistributedDataParallel can wrap it."""

    def __init__(self, sae: SparseAutoencoder, trainer: "_Trainer"):
        super().__init__()
        self.sae = sae
        self.__dict__["trainer"] = trainer  # not a submodule

    def forward(self, x: torch.Tensor):
        tr, sae = self.trainer, self.sae
        B, n = x.shape[0], sae.n_features
        with torch.no_grad():
            pre = F.linear(x - sae.b_dec, sae.W_enc, sae.b_enc)
            if tr.architecture == "topk":
                v, i = pre.topk(tr.k, dim=-1)
                rows = torch.arange(B, device=x.device).repeat_interleave(tr.k)
                v, i = v.reshape(-1), i.reshape(-1)
            else:
                flat = pre.relu().flatten()
                _, fi = flat.topk(min(tr.k * B, flat.numel()), sorted=False)
                fi = fi.sort().values
                v = pre.flatten()[fi]
                keep = v > 0
                fi, v = fi[keep], v[keep]
                rows, i = fi // n, fi % n
                tr.batch_min = v.min() if v.numel() else v.new_zeros(())
            fired = torch.zeros(n, dtype=torch.long, device=x.device)
            fired.index_add_(0, i, (v > FIRE_THRESHOLD).long())
            _all_reduce(fired)
            tr.stats_last_nonzero.mul_((fired == 0).long()).add_(1)
            dead = tr.stats_last_nonzero > tr.dead_steps_threshold
            n_main = v.numel()
            if tr.auxk and bool(dead.any()):
                av, ai = (pre * dead).topk(min(tr.auxk, n), dim=-1)
                arows = torch.arange(B, device=x.device)[:, None].expand_as(ai)
                keep = av > 0  # ReLU: the zeros (live latents, negative dead ones) contribute nothing
                av, ai, arows = av[keep], ai[keep], arows[keep]
            else:
                av = pre.new_zeros(0)
                ai = arows = torch.zeros(0, dtype=torch.long, device=x.device)
            del pre
            all_v = torch.cat([v, av])
            all_rows = torch.cat([rows, arows])
            all_idx = torch.cat([i, ai])
        vals = _EncoderValues.apply(all_v, x, sae.W_enc, sae.b_enc, sae.b_dec, all_rows, all_idx)
        main_v, aux_v = vals[:n_main].relu(), vals[n_main:].relu()
        x_hat = _sparse_decode(main_v, sae.W_dec, rows, i, B) + sae.b_dec
        mse = (x_hat - x).pow(2).mean()
        loss = tr.mse_scale * mse
        aux_loss = x.new_zeros(())
        if tr.auxk:
            aux_hat = _sparse_decode(aux_v, sae.W_dec, arows, ai, B) + sae.b_dec
            target = x - x_hat.detach() + sae.b_dec.detach()
            ss, count = _global_centered_sq(target)
            denom = ss / (count * x.shape[1])
            aux_loss = tr.auxk_coef * ((aux_hat - target).pow(2).mean() / denom).nan_to_num(0)
            loss = loss + aux_loss
        return loss, {"mse": mse.detach(), "aux_loss": aux_loss.detach(), "x_hat": x_hat.detach(),
                      "n_active": n_main, "dead": dead}


# ----------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------


class _Trainer:
    pass


def _default_device(device):
    if device is not None:
        return torch.device(device)
    if _dist_on() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _atomic_save(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def train(
    batches: Iterable[torch.Tensor],
    *,
    n_features: int = 5120,
    k: int = 10,
    auxk: int | None = 256,
    auxk_coef: float = 1 / 32,
    dead_toks_threshold: int = 10_000_000,
    batch_size: int = 4096,
    lr: float = 1e-4,
    eps: float = 6.25e-10,
    architecture: str = "topk",
    max_tokens: int | None = None,
    geometric_median_samples: int = 32768,
    mse_scale_batches: int = 10,
    threshold_batches: int = 100,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
    block: str | None = None,
    base_model: str | None = None,
    hook: str = "update",
    checkpoint_dir=None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    eval_batches: Iterable[torch.Tensor] | None = None,
    eval_every: int | None = None,
    callback: Callable[[dict], Any] | None = None,
    log_every: int = 100,
) -> SparseAutoencoder:
    """Train a TopK (or BatchTopK) SAE on `batches`, any iterable of `[n, d_in]` float tensors (any `n`;
    rows are re-batched to `batch_size`, the incomplete last batch dropped). See the module docstring for
    the recipe. Defaults are the paper's (k=10, 5120 features, auxk 256, batch 4096, lr 1e-4).

    - `max_tokens`: stop once this many vectors (summed over ranks) have been trained on; None = until the
      data ends. The last step may go past it by less than one batch.
    - `geometric_median_samples`: vectors (over all ranks) for the geometric-median init of `b_dec`
      (paper: 32768); `mse_scale_batches`: batches for the fixed MSE scale (paper: 10).
    - `threshold_batches` (batchtopk): batches averaged for the inference threshold.
    - `checkpoint_dir`: write `checkpoint.pt` there every `checkpoint_every` steps and at the end; with
      `resume`, continue from it (model, optimizer, step, tokens, dead-latent counters, RNG state, rows
      pending re-batching, and `batches.state_dict()` when `batches` has `state_dict`/`load_state_dict`,
      else the rows already consumed are skipped on resume). Its contents must be loadable with
      `torch.load(weights_only=True)` (tensors, numbers, strings, lists, dicts).
    - `eval_batches`: re-iterable data evaluated with `metrics.evaluate` every `eval_every` steps and at the
      end; the final result is stored in `config.hyperparameters["final_eval"]`.
    - `callback(dict)`: every `log_every` steps with `step, tokens, loss, mse, auxk_loss, fvu, l0,
      dead_fraction, tokens_per_s`; after an evaluation with `step, tokens, eval` (the metrics dict).
    """
    from .metrics import evaluate

    if architecture not in ("topk", "batchtopk"):
        raise ValueError(f"architecture must be 'topk' or 'batchtopk', not {architecture!r}")
    if batch_size < 1 or k < 1 or k > n_features:
        raise ValueError(f"need batch_size >= 1 and 1 <= k <= n_features (got {batch_size}, {k}, {n_features})")
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    device = _default_device(device)
    world, rank = _world(), _rank()
    global_batch = batch_size * world

    tr = _Trainer()
    tr.architecture, tr.k, tr.auxk, tr.auxk_coef = architecture, k, auxk, auxk_coef
    tr.dead_steps_threshold = dead_toks_threshold // global_batch
    tr.batch_min = None

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    ckpt = None
    if ckpt_path is not None and resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["world_size"] != world:
            raise ValueError(f"{ckpt_path} was written by {ckpt['world_size']} ranks, this run has {world}")
        saved = json.loads(ckpt["config"])
        asked = {"architecture": architecture, "n_features": n_features, "k": k}
        differ = {key: (saved.get(key), v) for key, v in asked.items() if saved.get(key) != v}
        if differ:
            raise ValueError(f"{ckpt_path} is a checkpoint of another SAE ("
                             + ", ".join(f"{key} {a} there, {b} here" for key, (a, b) in differ.items())
                             + "); remove it or use another checkpoint folder")

    # -- the first rows: d_in, and the data statistics -------------------------------------------------
    has_state = hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict")
    my = ckpt["ranks"][rank] if ckpt is not None else None
    if my is not None and has_state and my.get("batches_state") is not None:
        batches.load_state_dict(my["batches_state"])
    if ckpt is not None:
        config = SAEConfig.from_dict(json.loads(ckpt["config"]))
        d_in = config.d_in
    else:
        d_in = None
    data = _Rebatcher(batches, d_in, device, dtype)
    if ckpt is not None:
        # rows pulled before the checkpoint but not trained on yet come first
        data._push(my["pending"])
        if has_state:
            data.rows_consumed = my["rows_consumed"]
            data.start()
        else:
            data.start(skip_rows=my["rows_consumed"])
    else:
        data.it = iter(batches)
        first = None
        for t in data.it:
            t = torch.as_tensor(t)
            if t.numel():
                first = t
                break
        if first is None:
            raise ValueError("train: batches yielded no data")
        d_in = first.shape[-1]
        data.d_in = d_in
        first = data._as_rows(first)
        data.rows_consumed += first.shape[0]
        data._push(first)

    sae_config = config if ckpt is not None else SAEConfig(
        architecture=architecture, d_in=d_in, n_features=n_features, k=k, block=block,
        base_model=base_model, hook=hook, source_format="native",
    )
    sae = build(sae_config, dtype=dtype).to(device)

    if ckpt is None:
        per_rank_gm = math.ceil(geometric_median_samples / world)
        per_rank_var = mse_scale_batches * batch_size
        sample = data.peek(max(per_rank_gm, per_rank_var))
        gm_sample = _gather_rows(sample[:per_rank_gm]).float()
        var_sample = _gather_rows(sample[:per_rank_var]).float()
        del sample
        b_pre = geometric_median(gm_sample.cpu()).to(device)
        var = (var_sample - var_sample.mean(0)).pow(2).mean()
        mse_scale = torch.tensor([1.0 / float(var)], dtype=torch.float64, device=device)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(d_in)
        W = (torch.rand(n_features, d_in, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        with torch.no_grad():
            sae.W_enc.copy_(W)
            sae.W_dec.copy_(W)
            unit_norm_decoder_(sae.W_dec)
            sae.b_enc.zero_()
            sae.b_dec.copy_(b_pre)
            if _dist_on():  # identical start on every rank (DDP also broadcasts rank 0's parameters)
                for p in (sae.W_enc, sae.W_dec, sae.b_dec):
                    dist.broadcast(p.data, 0)
                dist.broadcast(mse_scale, 0)
        tr.mse_scale = float(mse_scale)
        tr.stats_last_nonzero = torch.zeros(n_features, dtype=torch.long, device=device)
        step, tokens = 0, 0
        window = []
    else:
        with torch.no_grad():
            for name, t in ckpt["model"].items():
                getattr(sae, name).copy_(t)
        tr.mse_scale = ckpt["mse_scale"]
        tr.stats_last_nonzero = ckpt["stats_last_nonzero"].to(device)
        step, tokens = ckpt["step"], ckpt["tokens"]
        window = [float(w) for w in ckpt["threshold_window"]]
        torch.set_rng_state(my["rng"])

    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    opt = torch.optim.Adam(params, lr=lr, eps=eps, fused=device.type == "cuda")
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])

    module = _TrainStep(sae, tr)
    if _dist_on():
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(module, device_ids=ids, **_NO_BUFFER_SYNC)
    else:
        model = module

    hyper = {
        "trainer": "sae_models.training (Surkov et al. sdxl-unbox / OpenAI TopK recipe)",
        "architecture": architecture, "n_features": n_features, "k": k, "auxk": auxk, "auxk_coef": auxk_coef,
        "dead_toks_threshold": dead_toks_threshold, "dead_steps_threshold": tr.dead_steps_threshold,
        "batch_size": batch_size, "world_size": world, "global_batch_size": global_batch, "lr": lr, "eps": eps,
        "optimizer": "Adam", "geometric_median_samples": geometric_median_samples,
        "mse_scale_batches": mse_scale_batches, "mse_scale": tr.mse_scale, "seed": seed, "dtype": str(dtype),
        "max_tokens": max_tokens,
    }
    if architecture == "batchtopk":
        hyper["threshold_batches"] = threshold_batches

    def set_threshold():
        if architecture == "batchtopk" and window:
            with torch.no_grad():
                sae.threshold.fill_(sum(window) / len(window))

    def save_checkpoint():
        mine = {
            "batches_state": batches.state_dict() if has_state else None,
            "pending": data.pending_tensor(),
            "rows_consumed": data.rows_consumed,
            "rng": torch.get_rng_state(),
        }
        ranks = [None] * world
        if _dist_on():
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if rank == 0:
            state = {
                "format": "comfyui-sae-training-checkpoint",
                "version": 1,
                "config": json.dumps(sae.config.to_dict()),
                "model": {n: getattr(sae, n).detach().cpu() for n in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                                       *sae.extra_tensors)},
                "optimizer": opt.state_dict(),
                "step": step,
                "tokens": tokens,
                "mse_scale": tr.mse_scale,
                "stats_last_nonzero": tr.stats_last_nonzero.cpu(),
                "threshold_window": torch.tensor(window, dtype=torch.float64),
                "world_size": world,
                "ranks": ranks,
            }
            _atomic_save(state, ckpt_path)
        if _dist_on():
            dist.barrier()

    def run_eval():
        result = None
        if rank == 0:
            was = sae.training
            sae.eval()
            result = evaluate(sae, eval_batches)
            sae.train(was)
            if callback is not None:
                callback({"step": step, "tokens": tokens, "eval": result})
        return result

    t0, tokens0 = time.perf_counter(), tokens
    while True:
        if max_tokens is not None and tokens >= max_tokens:
            break
        ok = torch.tensor([1 if data.fill(batch_size) else 0], device=device)
        _all_reduce(ok, dist.ReduceOp.MIN if _dist_on() else None)
        if not int(ok):
            break
        x = data.take(batch_size)

        opt.zero_grad(set_to_none=True)
        loss, info = model(x)
        loss.backward()
        unit_norm_decoder_(sae.W_dec.data)
        project_decoder_grad_(sae.W_dec.data, sae.W_dec.grad)
        opt.step()
        step += 1
        tokens += global_batch

        if architecture == "batchtopk":
            bm = tr.batch_min.reshape(1).double()
            _all_reduce(bm)
            window.append(float(bm) / world)
            window = window[-threshold_batches:]
            set_threshold()

        if log_every and step % log_every == 0:
            with torch.no_grad():
                sq = (x - info["x_hat"]).double().pow(2).sum().reshape(1)
                ss, _ = _global_centered_sq(x.double())
                stats = torch.cat([sq, ss.reshape(1), loss.detach().double().reshape(1),
                                   info["mse"].double().reshape(1), info["aux_loss"].double().reshape(1),
                                   torch.tensor([float(info["n_active"])], dtype=torch.float64, device=device)])
                _all_reduce(stats)
            if rank == 0 and callback is not None:
                elapsed = time.perf_counter() - t0
                callback({
                    "step": step, "tokens": tokens,
                    "loss": float(stats[2]) / world, "mse": float(stats[3]) / world,
                    "auxk_loss": float(stats[4]) / world, "fvu": float(stats[0] / stats[1]),
                    "l0": float(stats[5]) / global_batch,
                    "dead_fraction": float(info["dead"].double().mean()),
                    "tokens_per_s": (tokens - tokens0) / elapsed if elapsed > 0 else float("nan"),
                })
        if eval_batches is not None and eval_every and step % eval_every == 0:
            run_eval()
        if ckpt_path is not None and checkpoint_every and step % checkpoint_every == 0:
            save_checkpoint()

    set_threshold()
    if ckpt_path is not None:
        save_checkpoint()
    hyper.update({"steps": step, "tokens": tokens,
                  "dead_fraction": float((tr.stats_last_nonzero > tr.dead_steps_threshold).double().mean())})
    if eval_batches is not None:
        result = run_eval()
        if _dist_on():
            box = [result]
            dist.broadcast_object_list(box, 0)
            result = box[0]
        hyper["final_eval"] = result
    sae.config.hyperparameters = hyper
    sae.train(False)
    return sae
