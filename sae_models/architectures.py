"""SAE architectures behind one interface.

Every SAE holds `W_enc [n_features, d_in]`, `b_enc [n_features]`, `W_dec [n_features, d_in]` (row f is the
direction of feature f) and `b_dec [d_in]`. Encoding computes the pre-activation

    pre = W_enc (x - b_dec) + b_enc        (x - b_dec only when `apply_b_dec_to_input`)

and each architecture turns `pre` into codes in its own way. Decoding is `x_hat = codes @ W_dec + b_dec`.
Inputs may have any leading shape `[..., d_in]` and dtype fp32/fp16/bf16; the arithmetic runs in the
SAE's own dtype and results come back in the input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .metadata import FeatureStats, SAEConfig


class SparseCodes(NamedTuple):
    """Active features per vector: `values[..., j]` is the activation of feature `indices[..., j]`.
    Rows with fewer active features than the width are padded with value 0 (index 0)."""

    values: torch.Tensor
    indices: torch.Tensor

    def to_dense(self, n_features: int) -> torch.Tensor:
        out = self.values.new_zeros(*self.values.shape[:-1], n_features)
        return out.scatter_add_(-1, self.indices, self.values)


class SparseAutoencoder(nn.Module):
    """Base class; subclasses define `activation(pre)` and may override `encode_sparse`."""

    architecture = "base"
    extra_tensors: tuple[str, ...] = ()

    def __init__(self, config: SAEConfig, stats: FeatureStats | None = None, dtype=torch.float32):
        super().__init__()
        if config.architecture != self.architecture:
            raise ValueError(f"config is for {config.architecture!r}, not {self.architecture!r}")
        self.config = config
        self.stats = stats or FeatureStats()
        n, d = config.n_features, config.d_in
        self.W_enc = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype))

    # -- shape ---------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # -- input normalisation -------------------------------------------------------------------
    def _normalize(self, x: torch.Tensor):
        how = self.config.normalize
        if how == "none":
            return x, None
        if how == "scale":
            return x * self.config.input_scale, None
        if how == "constant_norm_rescale":
            s = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            return x * s, s
        # layer_norm: centre and scale each vector, remember how to undo it
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        return xc / (std + 1e-5), (mu, std)

    def _denormalize(self, x_hat: torch.Tensor, info):
        how = self.config.normalize
        if how == "none":
            return x_hat
        if how == "scale":
            return x_hat / self.config.input_scale
        if how == "constant_norm_rescale":
            return x_hat / info
        mu, std = info
        return x_hat * std + mu  # as SAELens undoes it (the input was divided by std + 1e-5)

    def _check_input(self, x: torch.Tensor):
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"{self.architecture} SAE expects vectors of size d_in={self.d_in}, got shape {tuple(x.shape)}"
            )

    # -- encode --------------------------------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """`W_enc (x - b_dec) + b_enc` for an already normalised input in the SAE's dtype."""
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        return F.linear(x, self.W_enc, self.b_enc)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        xn, _ = self._normalize(x.to(self.dtype))
        return self.activation(self.pre_activation(xn))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes `[..., n_features]`, zero where a feature is inactive."""
        return self._codes(x).to(x.dtype)

    def encode_sparse(self, x: torch.Tensor) -> SparseCodes:
        """Values and indices of the active features of each vector (padded to the largest count)."""
        codes = self._codes(x)
        width = max(int((codes > 0).sum(-1).max()) if codes.numel() else 0, 1)
        values, indices = codes.topk(width, dim=-1, sorted=False)
        return SparseCodes(values.to(x.dtype), indices)

    # -- decode --------------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """`codes @ W_dec + b_dec`, in the normalised input space (identical to the input space for
        SAEs with `normalize="none"`, which is the paper's setting)."""
        if codes.shape[-1] != self.n_features:
            raise ValueError(f"codes must have {self.n_features} features, got shape {tuple(codes.shape)}")
        out = codes.to(self.dtype) @ self.W_dec + self.b_dec
        return out.to(codes.dtype)

    def decode_sparse(self, codes: SparseCodes) -> torch.Tensor:
        """Decode from active features only: sum of `value * W_dec[index]` plus `b_dec`."""
        values, indices = codes
        lead = values.shape[:-1]
        flat_v = values.reshape(-1, values.shape[-1]).to(self.dtype)
        flat_i = indices.reshape(-1, indices.shape[-1])
        out = F.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v, mode="sum") + self.b_dec
        return out.reshape(*lead, self.d_in).to(values.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction `x_hat` of `x` (normalisation applied and undone)."""
        self._check_input(x)
        xn, info = self._normalize(x.to(self.dtype))
        codes = self.activation(self.pre_activation(xn))
        x_hat = codes @ self.W_dec + self.b_dec
        return self._denormalize(x_hat, info).to(x.dtype)

    def feature_directions(self, features) -> torch.Tensor:
        """Decoder rows of the given features `[len(features), d_in]`, in input units."""
        d = self.W_dec[torch.as_tensor(features, dtype=torch.long, device=self.device)]
        return d / self.config.input_scale if self.config.normalize == "scale" else d

    def extra_repr(self) -> str:
        k = f", k={self.config.k}" if self.config.k is not None else ""
        return f"d_in={self.d_in}, n_features={self.n_features}{k}, block={self.config.block}"


class TopKSAE(SparseAutoencoder):
    """The paper's SAE: `z = ReLU(TopK(W_enc (x - b_pre) + b_latent))`, `x_hat = W_dec z + b_pre`
    (`b_pre` is `b_dec` here, `b_latent` is `b_enc`)."""

    architecture = "topk"

    def __init__(self, config: SAEConfig, stats=None, dtype=torch.float32):
        if not config.k or config.k < 1 or config.k > config.n_features:
            raise ValueError(f"topk SAE needs 1 <= k <= n_features, got k={config.k}")
        super().__init__(config, stats, dtype)

    @property
    def k(self) -> int:
        return self.config.k

    def _sparse_from_pre(self, pre):
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return SparseCodes(values.relu(), indices)

    def activation(self, pre):
        return self._sparse_from_pre(pre).to_dense(self.n_features)

    def encode_sparse(self, x):
        self._check_input(x)
        xn, _ = self._normalize(x.to(self.dtype))
        values, indices = self._sparse_from_pre(self.pre_activation(xn))
        return SparseCodes(values.to(x.dtype), indices)


class BatchTopKSAE(SparseAutoencoder):
    """BatchTopK (Bussmann et al. 2024). Training keeps the `k * batch` largest activations of a whole
    batch; at inference each feature fires where `ReLU(pre) > threshold`, one scalar learnt in training,
    so the number of active features varies per vector (k on average)."""

    architecture = "batchtopk"
    extra_tensors = ("threshold",)

    def __init__(self, config: SAEConfig, stats=None, dtype=torch.float32):
        super().__init__(config, stats, dtype)
        self.register_buffer("threshold", torch.zeros((), dtype=dtype))

    def activation(self, pre):
        post = pre.relu()
        return post * (post > self.threshold)

    def batch_activation(self, pre: torch.Tensor, sparse: bool = False):
        """Training-time activation: top `k * batch` of the flattened batch `[batch, n_features]` of `ReLU(pre)`,
        the rest 0. With `sparse`, `(flat_index, value)` of the kept positive entries instead, flat indices
        ascending (what the trainer's sparse step uses)."""
        post = pre.relu()
        flat = post.flatten()
        keep = min(self.config.k * pre.shape[0], flat.numel())
        values, idx = flat.topk(keep, sorted=False)
        if sparse:
            idx, order = idx.sort()
            values = values[order]
            positive = values > 0
            return idx[positive], values[positive]
        return torch.zeros_like(flat).scatter_(0, idx, values).view_as(post)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs";
    Nabeshima 2024): trained so that each nested prefix of the dictionary (`hyperparameters
    ["matryoshka_widths"]`) reconstructs on its own, the earlier latents taking the general concepts.
    At inference it is a BatchTopK SAE (one threshold); features are ordered from general to specific."""

    architecture = "matryoshka_batchtopk"


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU (Rajamanoharan et al. 2024): `z = ReLU(pre) * (pre > threshold_f)`, one threshold per feature."""

    architecture = "jumprelu"
    extra_tensors = ("threshold",)

    def __init__(self, config: SAEConfig, stats=None, dtype=torch.float32):
        super().__init__(config, stats, dtype)
        self.register_buffer("threshold", torch.zeros(config.n_features, dtype=dtype))

    def activation(self, pre):
        return pre.relu() * (pre > self.threshold)


class ReLUSAE(SparseAutoencoder):
    """Plain ReLU SAE trained with an L1 penalty: `z = ReLU(pre)`."""

    architecture = "relu"

    def activation(self, pre):
        return pre.relu()


ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReLUSAE, ReLUSAE)
}


def build(config: SAEConfig, stats: FeatureStats | None = None, dtype=torch.float32) -> SparseAutoencoder:
    """An SAE of `config.architecture`, with zero weights, to be filled by a reader or a trainer."""
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {config.architecture!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[config.architecture](config, stats, dtype)
