"""Quality measures of an SAE: fraction of variance unexplained, L0, dead features, and `evaluate`.

FVU is per-dimension centred: `sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`, the mean taken per input
dimension over the vectors, so FVU = 1 for the reconstruction that always outputs the data mean, and
`1 - FVU` is the explained variance.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .moments import RunningMoments

__all__ = ["dead_fraction", "evaluate", "fvu", "l0"]


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained of `x_hat` for `x` (`[..., d]`; all leading dims are vectors)."""
    x = x.reshape(-1, x.shape[-1]).double()
    x_hat = x_hat.reshape(-1, x_hat.shape[-1]).double()
    err = (x - x_hat).pow(2).sum()
    var = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return err / var


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of active (non-zero) features per vector of dense codes `[..., n_features]`."""
    return (codes != 0).reshape(-1, codes.shape[-1]).sum(-1).double().mean()


def dead_fraction(codes: torch.Tensor) -> torch.Tensor:
    """Fraction of features that are zero on every vector of dense codes `[..., n_features]`."""
    fired = (codes != 0).reshape(-1, codes.shape[-1]).any(0)
    return 1.0 - fired.double().mean()


@torch.no_grad()
def evaluate(sae, batches: Iterable[torch.Tensor], max_tokens: int | None = None) -> dict:
    """Reconstruction quality of `sae` on `batches` (an iterable of `[batch, d_in]` tensors, or a tensor).

    Returns `fvu` (sum of squared errors over all vectors divided by the sum of squared deviations from the
    per-dimension mean of all vectors, both accumulated exactly over the batches), `mse` (mean squared error
    per element), `l0` (mean active features per vector), `dead_fraction` (features active on no vector)
    and `n_tokens`. At most `max_tokens` vectors are used.
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    moments = RunningMoments(sae.d_in, sae.device)
    sq_err = 0.0
    active = 0
    fired = torch.zeros(sae.n_features, dtype=torch.bool, device=sae.device)
    n = 0
    for x in batches:
        x = x.reshape(-1, sae.d_in)
        if max_tokens is not None:
            if n >= max_tokens:
                break
            x = x[: max_tokens - n]
        if x.shape[0] == 0:
            continue
        x = x.to(sae.device)
        if sae.config.normalize == "none":
            codes = sae.encode_sparse(x.to(sae.dtype))
            x_hat = sae.decode_sparse(codes)
            values, indices = codes
            on = values != 0
            active += int(on.sum())
            fired[indices[on]] = True
        else:  # the normalisation has to be undone, which the dense path does
            dense = sae.encode(x)
            x_hat = sae(x)
            active += int((dense != 0).sum())
            fired |= (dense != 0).any(0)
        sq_err += float((x.double() - x_hat.double()).pow(2).sum())
        moments.add_rows(x)
        n += x.shape[0]
    if n == 0:
        raise ValueError("evaluate: no vectors in batches")
    var = float(moments.m2.sum())
    return {
        "fvu": sq_err / var if var > 0 else float("nan"),
        "mse": sq_err / (n * sae.d_in),
        "l0": active / n,
        "dead_fraction": 1.0 - float(fired.double().mean()),
        "n_tokens": n,
    }
