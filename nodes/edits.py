"""The edits that change a block's update, attached through `patch.attach_edit`: steer and reconstruct."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sae_models import steering
from .patch import Edit
from .sae_handle import SAEHandle
from .schema import PAINT_BOTH


def mask_weights(mask: torch.Tensor | None, images: list[int], h: int, w: int, device) -> torch.Tensor:
    """Per-position weights `[len(images), h, w]` for the given images of the batch: the painted MASK
    (`[B, H, W]`, as `common.check_mask` gives it; any size) averaged over each cell of the block's grid.
    Image i takes mask i; a shorter mask batch repeats (image i takes mask i mod B), as ComfyUI repeats
    masks to a batch. Ones without a mask."""
    if mask is None:
        return torch.ones(len(images), h, w, device=device)
    m = mask.to(device=device, dtype=torch.float32).unsqueeze(1)
    m = F.adaptive_avg_pool2d(m, (h, w))[:, 0].clamp(0, 1)
    return m[torch.tensor([i % m.shape[0] for i in images], device=device)]


@dataclass(frozen=True, eq=False)
class SAEEdit(Edit):
    """An edit through one SAE on the selected rows of the batch, optionally inside a mask."""

    handle: SAEHandle = None
    mask: torch.Tensor | None = None

    def sae_handles(self):
        return (self.handle,)

    def edit_rows(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, update, info):
        signed = self.target == PAINT_BOTH
        rows = info.rows("both" if signed else self.target)
        if not rows:
            return None
        B, H, W, C = update.shape
        sae = self.handle.sae
        w = mask_weights(self.mask, [info.row_image[r] for r in rows], H, W, sae.device)
        if not bool(w.any()):
            return None
        if signed:  # the uncond rows get the edit with the opposite sign
            sign = torch.tensor([-1.0 if info.row_kind[r] == 1 else 1.0 for r in rows], device=w.device)
            w = w * sign[:, None, None]
        u = update[rows].to(sae.device, sae.dtype).reshape(-1, C)
        new = self.edit_rows(u, w.reshape(-1)).reshape(len(rows), H, W, C)
        out = update.clone()
        out[rows] = new.to(update.device, update.dtype)
        return out


@dataclass(frozen=True, eq=False)
class SteerEdit(SAEEdit):
    mode: str = "add"
    features: tuple[int, ...] = ()
    amounts: tuple[float, ...] = ()

    def edit_rows(self, u, w):
        return steering.apply(self.mode, u, self.handle.sae, self.features, self.amounts, w)


@dataclass(frozen=True, eq=False)
class ReconstructEdit(SAEEdit):
    keep_error: bool = False

    def edit_rows(self, u, w):
        return steering.reconstruct(u, self.handle.sae, w, keep_error=self.keep_error)
