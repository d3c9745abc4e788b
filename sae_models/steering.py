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


def _directions(sae: SparseAutoencoder, features) -> torch.Tensor:
    return sae.feature_directions(list(features))  # [F, d]


def _amounts(amounts, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(amounts, dtype=like.dtype, device=like.device).reshape(-1)


def feature_codes(sae: SparseAutoencoder, u: torch.Tensor, features) -> torch.Tensor:
    """Activations `[N, F]` of the given features at each position (0 where inactive)."""
    values, indices = sae.encode_sparse(u)
    feats = torch.as_tensor(list(features), device=indices.device)
    hit = indices.unsqueeze(-1) == feats  # [N, width, F]
    return (values.unsqueeze(-1) * hit).sum(-2)


def add(u, sae, features, amounts, w) -> torch.Tensor:
    """The paper's Paint: add `amount_f * d_f` at every weighted position. Needs no encoding."""
    delta = _amounts(amounts, u) @ _directions(sae, features).to(u.dtype)  # [d]
    return u + w.to(u.dtype).unsqueeze(-1) * delta


def ablate(u, sae, features, w, fractions=None) -> torch.Tensor:
    """Remove each feature's own contribution `c_f * d_f` where it is active (`fractions` of it, default all)."""
    codes = feature_codes(sae, u, features).to(u.dtype)  # [N, F]
    if fractions is not None:
        codes = codes * _amounts(fractions, u)
    return u - w.to(u.dtype).unsqueeze(-1) * (codes @ _directions(sae, features).to(u.dtype))


def clamp(u, sae, features, amounts, w) -> torch.Tensor:
    """Set each feature's code to `amount_f` and re-decode, keeping the error: `u + (a_f - c_f) d_f`."""
    codes = feature_codes(sae, u, features).to(u.dtype)
    target = _amounts(amounts, u).expand_as(codes)
    return u + w.to(u.dtype).unsqueeze(-1) * ((target - codes) @ _directions(sae, features).to(u.dtype))


def replace(u, sae, features, amounts, w) -> torch.Tensor:
    """The paper's feature icon: replace the whole update by `sum_f amount_f * d_f` (no bias, no error)."""
    new = (_amounts(amounts, u) @ _directions(sae, features).to(u.dtype)).expand_as(u)
    w = w.to(u.dtype).unsqueeze(-1)
    return u * (1 - w) + new * w


def reconstruct(u, sae, w, keep_error: bool = False) -> torch.Tensor:
    """Replace the update by the SAE's reconstruction `x_hat` (with `keep_error`, by `x_hat + (u - x_hat)`,
    which is `u` itself up to rounding: a check that the patch path changes nothing)."""
    x_hat = sae(u).to(u.dtype)
    new = x_hat + (u - x_hat) if keep_error else x_hat
    w = w.to(u.dtype).unsqueeze(-1)
    return u * (1 - w) + new * w


MODES = ("add", "ablate", "set", "replace")


def apply(mode: str, u, sae, features, amounts, w) -> torch.Tensor:
    """Dispatch on the steering mode name used by the nodes."""
    if mode == "add":
        return add(u, sae, features, amounts, w)
    if mode == "ablate":  # amounts are the fractions of each contribution to remove
        return ablate(u, sae, features, w, amounts)
    if mode == "set":
        return clamp(u, sae, features, amounts, w)
    if mode == "replace":
        return replace(u, sae, features, amounts, w)
    raise ValueError(f"unknown steering mode {mode!r}; known: {', '.join(MODES)}")
