"""The edits that change a block's output, attached through `attach_edit`: steer and reconstruct.

Each writes into the block's output in place (`BlockView`), with what it needs made once per device, dtype and
grid and kept on the edit: the feature directions and amounts (for `add`, their sum `[C]`), and the mask's
weights on the block's grid. `add` and `replace` are one fused operation per block and need no encoding;
`ablate`, `set` and reconstruct read the update of their rows once and write once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...sae_models import steering
from ..sae_handle import SAEHandle
from ..schema import ICON_BASE, PAINT_BOTH
from .call import BlockView, CallInfo, Edit


def mask_weights(mask: torch.Tensor | None, images: list[int], h: int, w: int, device) -> torch.Tensor:
    """Per-position weights `[len(images), h, w]` for the given images of the batch: the painted MASK
    (`[B, H, W]`, as `inputs.check_mask` gives it; any size) averaged over each cell of the block's grid.
    Image i takes mask i; a shorter mask batch repeats (image i takes mask i mod B), as ComfyUI repeats
    masks to a batch. Ones without a mask."""
    if mask is None:
        return torch.ones(len(images), h, w, device=device)
    m = F.adaptive_avg_pool2d(mask.to(torch.float32).unsqueeze(1), (h, w))[:, 0].clamp(0, 1)
    return m[[i % m.shape[0] for i in images]].to(device)


ZEROED = "zeroed"
# The paper's two SDXL base targets, as (rows, how) parts: paint adds to cond and subtracts from uncond; the
# feature icon replaces on cond and zeroes the uncond rows' update.
_PARTS = {PAINT_BOTH: (("cond", 1.0), ("uncond", -1.0)), ICON_BASE: (("cond", 1.0), ("uncond", ZEROED))}


@dataclass(frozen=True, eq=False)
class SAEEdit(Edit):
    """An edit through one SAE on the selected rows of the batch, optionally inside a mask (a CPU tensor, as the
    node checked it)."""

    handle: SAEHandle = None
    mask: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)  # per device, dtype and grid

    def sae_handles(self):
        return (self.handle,)

    def _cached(self, key, make):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def weights(self, images: tuple[int, ...], h: int, w: int, device, dtype) -> torch.Tensor | None:
        """The mask's weights for these images on an h x w grid, `[n, h, w, 1]` (None without a mask)."""
        if self.mask is None:
            return None
        return self._cached(("w", images, h, w, device, dtype),
                            lambda: mask_weights(self.mask, list(images), h, w, "cpu").unsqueeze(-1).to(device, dtype))

    def painted(self, images: tuple[int, ...]) -> bool:
        """Whether the mask paints anything on these images (read from the CPU mask, once)."""
        if self.mask is None:
            return True
        return self._cached(("painted", images), lambda: bool(self.mask[[i % self.mask.shape[0] for i in images]]
                                                              .gt(0).any()))

    def apply_view(self, view: BlockView, info: CallInfo) -> bool:
        wrote = False
        for target, how in _PARTS.get(self.target, ((self.target, 1.0),)):
            for rows in info.row_runs(target):
                images = tuple(info.row_image[rows])
                if self.painted(images):
                    if how == ZEROED:
                        self.zero(view, rows, images)
                    else:
                        self.write(view, rows, images, how)
                    wrote = True
        return wrote

    def zero(self, view: BlockView, rows: slice, images: tuple[int, ...]) -> None:
        """Set the rows' update to zero (where painted): the block returns its input."""
        _, h, w, _ = view.out.shape
        weights = self.weights(images, h, w, view.out.device, view.out.dtype)
        if weights is None:
            view.copy_(rows, view.x_in[rows])
        else:
            view.lerp_(rows, view.x_in[rows], weights)

    def write(self, view: BlockView, rows: slice, images: tuple[int, ...], sign: float) -> None:
        """Edit the rows `rows` (of images `images`) of the block's output."""
        _, h, w, C = view.out.shape
        sae = self.handle.sae
        u = view.update()[rows]
        weights = self.weights(images, h, w, u.device, u.dtype)
        flat = None if weights is None else weights.reshape(-1)
        delta = self.delta(u.reshape(-1, C).to(sae.device, sae.dtype), flat)
        view.add_(rows, delta.reshape(u.shape), alpha=sign)

    def delta(self, u: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """What the edit adds to the updates `u [N, C]` with per-position weights `w [N]` (None: all 1)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class SteerEdit(SAEEdit):
    mode: str = "add"
    features: tuple[int, ...] = ()
    amounts: tuple[float, ...] = ()

    def active(self, info: CallInfo) -> bool:
        # strength 0 everywhere changes nothing: leave the block alone (bit-identical)
        return super().active(info) and any(a != 0 for a in self.amounts)

    def reads_input(self) -> bool:
        return self.mode != "add"  # the paper's paint adds a vector: it needs neither the input nor the update

    def _tensors(self, device, dtype):
        """(feature indices, amounts, directions `[F, C]`) on `device`, made once."""
        def make():
            sae = self.handle.sae
            feats = torch.tensor(self.features, dtype=torch.long).to(device)
            return feats, torch.tensor(self.amounts, dtype=dtype).to(device), \
                sae.feature_directions(feats).to(device, dtype)
        return self._cached(("tensors", device, dtype), make)

    def write(self, view, rows, images, sign):
        if self.mode not in ("add", "replace"):
            return super().write(view, rows, images, sign)
        out = view.out
        _, h, w, _ = out.shape
        vector = self._cached(("vector", out.device, out.dtype), lambda: steering.add_vector(
            *self._tensors(out.device, torch.float32)[1:]).to(out.dtype))  # sum_f a_f d_f, [C]
        weights = self.weights(images, h, w, out.device, out.dtype)
        if self.mode == "add":  # the paper's paint: out += w * vector
            if weights is None:
                view.add_(rows, vector, alpha=sign)
            else:
                view.addcmul_(rows, weights, vector, value=sign)
        elif weights is None:  # the paper's icon: the block returns its input plus the vector
            view.set_(rows, view.x_in[rows], vector)
        else:  # ... where painted: out moves to x_in + vector by w
            view.lerp_(rows, view.x_in[rows] + vector, weights)

    def delta(self, u, w):
        feats, amounts, directions = self._tensors(u.device, u.dtype)
        return steering.delta(self.mode, u, self.handle.sae, feats, amounts, w, directions)


@dataclass(frozen=True, eq=False)
class ReconstructEdit(SAEEdit):
    keep_error: bool = False

    def delta(self, u, w):
        return steering.reconstruct_delta(u, self.handle.sae, w, keep_error=self.keep_error)
