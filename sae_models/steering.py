"""Edits of a block's update through an SAE, as in the paper (Surkov et al. 2024, section 4 and app.py).

Every function takes updates `u [N, d_in]` (N positions), the SAE, the features and a per-position
weight `w [N]` in [0, 1] (a painted mask times "is this step/row edited"), and returns the edited
updates. Edits keep the SAE's reconstruction error: only the edited features' contributions change,
so with `w == 0` the update comes back unchanged.

`amounts` are activations in the SAE's own units (the nodes turn a strength into `strength * mean_f`);
for `ablate` they are the fractions of each feature's contribution to remove.
"""

from __future__ import annotations

import torch

from .architectures import SparseAutoencoder


def _directions(sae: SparseAutoencoder, features, directions=None) -> torch.Tensor:
    return sae.feature_directions(features if isinstance(features, torch.Tensor) else list(features)) \
        if directions is None else directions  # [F, d]


def _amounts(amounts, like: torch.Tensor) -> torch.Tensor:
    # a tensor already on the right device and dtype is used as it is (no copy)
    return torch.as_tensor(amounts, dtype=like.dtype, device=like.device).reshape(-1)


def _weighted(change: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return change if w is None else w.to(change.dtype).unsqueeze(-1) * change


def feature_codes(sae: SparseAutoencoder, u: torch.Tensor, features) -> torch.Tensor:
    """Activations `[N, F]` of the given features at each position (0 where inactive)."""
    values, indices = sae.encode_sparse(u)
    feats = torch.as_tensor(features, device=indices.device)
    hit = indices.unsqueeze(-1) == feats  # [N, width, F]
    return (values.unsqueeze(-1) * hit).sum(-2)


def add_vector(amounts: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """`sum_f amount_f * d_f` `[d]`: what the paper's Paint adds at a fully painted position."""
    return amounts @ directions


def delta(mode: str, u, sae, features, amounts, w=None, directions=None) -> torch.Tensor:
    """What an edit adds to the updates `u [N, d]`: the change at each position times its weight `w [N]` (None:
    all 1). `features` and `amounts` may be lists or tensors on u's device; `directions` `[F, d]` the features'
    decoder rows, when the caller has them."""
    d = _directions(sae, features, directions).to(u.dtype)
    if mode == "add":  # the paper's Paint: needs no encoding
        change = add_vector(_amounts(amounts, u), d).expand_as(u)
    elif mode == "ablate":  # remove each feature's contribution c_f * d_f where active (`amounts` of it)
        codes = feature_codes(sae, u, features).to(u.dtype)
        change = -((codes if amounts is None else codes * _amounts(amounts, u)) @ d)
    elif mode == "set":  # set each feature's code to amount_f, keeping the error: (a_f - c_f) d_f
        codes = feature_codes(sae, u, features).to(u.dtype)
        change = (_amounts(amounts, u).expand_as(codes) - codes) @ d
    elif mode == "replace":  # the paper's feature icon: the update becomes sum_f a_f d_f (no bias, no error)
        change = add_vector(_amounts(amounts, u), d).expand_as(u) - u
    else:
        raise ValueError(f"unknown steering mode {mode!r}; known: {', '.join(MODES)}")
    return _weighted(change, w)


def reconstruct_delta(u, sae, w=None, keep_error: bool = False) -> torch.Tensor:
    """What replacing the update by the SAE's reconstruction `x_hat` adds (with `keep_error`, by
    `x_hat + (u - x_hat)`, which is `u` itself up to rounding: a check that the patch path changes nothing)."""
    x_hat = sae(u).to(u.dtype)
    new = x_hat + (u - x_hat) if keep_error else x_hat
    return _weighted(new - u, w)


def add(u, sae, features, amounts, w) -> torch.Tensor:
    """The paper's Paint: add `amount_f * d_f` at every weighted position. Needs no encoding."""
    return u + delta("add", u, sae, features, amounts, w)


def ablate(u, sae, features, w, fractions=None) -> torch.Tensor:
    """Remove each feature's own contribution `c_f * d_f` where it is active (`fractions` of it, default all)."""
    return u + delta("ablate", u, sae, features, fractions, w)


def clamp(u, sae, features, amounts, w) -> torch.Tensor:
    """Set each feature's code to `amount_f` and re-decode, keeping the error: `u + (a_f - c_f) d_f`."""
    return u + delta("set", u, sae, features, amounts, w)


def replace(u, sae, features, amounts, w) -> torch.Tensor:
    """The paper's feature icon: replace the whole update by `sum_f amount_f * d_f` (no bias, no error)."""
    return u + delta("replace", u, sae, features, amounts, w)


def reconstruct(u, sae, w, keep_error: bool = False) -> torch.Tensor:
    """Replace the update by the SAE's reconstruction `x_hat` (with `keep_error`, by `x_hat + (u - x_hat)`)."""
    return u + reconstruct_delta(u, sae, w, keep_error)


MODES = ("add", "ablate", "set", "replace")


def apply(mode: str, u, sae, features, amounts, w) -> torch.Tensor:
    """Dispatch on the steering mode name used by the nodes (for `ablate`, amounts are the fractions of each
    contribution to remove)."""
    return u + delta(mode, u, sae, features, amounts, w)
