"""Autograd functions of the training step whose gradients touch only the selected (vector, latent) pairs:
the encoder pre-activations at those pairs and the decode from them, with sparse-dense matmuls in backward
instead of dense `[batch, n_features]` ones."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


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
    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, b_dec, rows, idx):
        ctx.save_for_backward(x, W_enc, b_dec, rows, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        x, W_enc, b_dec, rows, idx = ctx.saved_tensors
        keep = g != 0
        g, rows, idx = g[keep], rows[keep], idx[keep]
        n = W_enc.shape[0]
        grad_b_enc = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, idx, g)
        if g.numel():
            grad_W = _csr(idx, rows, g, n, x.shape[0]) @ (x - b_dec)
        else:
            grad_W = torch.zeros_like(W_enc)
        grad_b_dec = -(grad_b_enc @ W_enc)
        return None, None, grad_W, grad_b_enc, grad_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
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


def encoder_values(values, x, W_enc, b_enc, b_dec, rows, idx) -> torch.Tensor:
    """The pre-activations `W_enc[idx] . (x[rows] - b_dec) + b_enc[idx]`, already computed without grad as
    `values`, made differentiable: backward gives W_enc, b_enc and b_dec gradients from those pairs only."""
    return _EncoderValues.apply(values, x, W_enc, b_enc, b_dec, rows, idx)


def sparse_decode(vals, W_dec, rows, idx, n_rows: int) -> torch.Tensor:
    """`out[b] = sum over the pairs (b, f, v) of v * W_dec[f]`, `[n_rows, d_in]`; `rows` ascending."""
    return _SparseDecode.apply(vals, W_dec, rows, idx, n_rows)
