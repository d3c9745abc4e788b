"""The training step's sparse products for a GPU: fixed-shape tensors, a few large kernels, no host sync.

`sparse_ops` is tuned for the CPU (sorted CSR products in cache-sized chunks, sizes read back to the host);
on a GPU those are hundreds of small launches and several host syncs per step. Here the same gradients are
computed from flat (row, latent, pre-activation) pairs whose count is fixed by the selection (`k * batch`),
with `index_add_` (atomic adds) and one `[pairs, d_in]` gather per product, and the AuxK term as dense
products over the few latents that can be dead (`dense_subset_decode`). Pairs whose pre-activation is not
positive may be present: they add nothing and get no gradient (the ReLU's), as if they were left out.

Both functions take the pre-activations already computed without grad and give the gradients of the
encoder (`W_enc`, `b_enc`, `b_dec` through `x - b_dec`) and of the decoder in their backward.
"""

from __future__ import annotations

import torch


class _PairDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, x, W_enc, b_enc, b_dec, W_dec, rows, idx, level, n_levels: int, n_rows: int):
        act = pre.relu()
        slot = rows if n_levels == 1 else level * n_rows + rows
        out = W_dec.new_zeros(n_levels * n_rows, W_dec.shape[1])
        out.index_add_(0, slot, W_dec.index_select(0, idx).mul_(act[:, None]))
        ctx.save_for_backward(pre, x, W_enc, b_dec, W_dec, rows, idx, slot)
        ctx.n_levels, ctx.n_rows = n_levels, n_rows
        return out.view(n_levels, n_rows, -1)

    @staticmethod
    def backward(ctx, grad_out):
        pre, x, W_enc, b_dec, W_dec, rows, idx, slot = ctx.saved_tensors
        n, L = W_dec.shape[0], ctx.n_levels
        g = grad_out.reshape(L * ctx.n_rows, -1).index_select(0, slot)  # [pairs, d_in]
        act = pre.relu()
        grad_pre = (g * W_dec.index_select(0, idx)).sum(-1).mul_(pre > 0)
        grad_W_dec = torch.zeros_like(W_dec).index_add_(0, idx, g.mul_(act[:, None]))
        grad_W_enc = torch.zeros_like(W_enc).index_add_(0, idx, (x - b_dec).index_select(0, rows).mul_(grad_pre[:, None]))
        grad_b_enc = W_enc.new_zeros(n).index_add_(0, idx, grad_pre)
        # pre = W_enc (x - b_dec) + b_enc, so d b_dec = -sum over latents of d b_enc[f] * W_enc[f]
        return None, None, grad_W_enc, grad_b_enc, -(grad_b_enc @ W_enc), grad_W_dec, None, None, None, None, None


def pair_decode(pre, x, W_enc, b_enc, b_dec, W_dec, rows, idx, n_rows: int, level=None, n_levels: int = 1):
    """`out[l, b] = sum of ReLU(pre_p) * W_dec[idx_p]` over the pairs p of row b at level l (without `b_dec`),
    `[n_levels, n_rows, d_in]`. `pre_p = W_enc[idx_p] . (x[rows_p] - b_dec) + b_enc[idx_p]`, given; the
    backward gives `W_enc`, `b_enc`, `b_dec` and `W_dec` their gradients. `level` (one per pair) splits
    the decode into the groups of a Matryoshka SAE (prefix l = the sum of groups 0..l, by the caller)."""
    return _PairDecode.apply(pre, x, W_enc, b_enc, b_dec, W_dec, rows, idx, level, n_levels, n_rows)


class _DenseSubsetDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, x, W_enc, b_enc, b_dec, W_dec, latents):
        Wd = W_dec.index_select(0, latents)
        ctx.save_for_backward(codes, x, W_enc, b_dec, W_dec, latents)
        return codes @ Wd

    @staticmethod
    def backward(ctx, g):
        codes, x, W_enc, b_dec, W_dec, latents = ctx.saved_tensors
        grad_pre = (g @ W_dec.index_select(0, latents).T).mul_(codes > 0)
        grad_W_dec = torch.zeros_like(W_dec).index_copy_(0, latents, codes.T @ g)
        grad_W_enc = torch.zeros_like(W_enc).index_copy_(0, latents, grad_pre.T @ (x - b_dec))
        grad_b_enc = W_enc.new_zeros(W_enc.shape[0]).index_copy_(0, latents, grad_pre.sum(0))
        return None, None, grad_W_enc, grad_b_enc, -(grad_b_enc @ W_enc), grad_W_dec, None


def dense_subset_decode(codes, x, W_enc, b_enc, b_dec, W_dec, latents):
    """`codes @ W_dec[latents]` (without `b_dec`) for codes `[batch, len(latents)]` that are
    `ReLU(pre)` at the kept entries and 0 elsewhere, `latents` distinct; the backward gives the encoder
    and decoder rows of `latents` their gradients through the kept (positive) entries."""
    return _DenseSubsetDecode.apply(codes, x, W_enc, b_enc, b_dec, W_dec, latents)
