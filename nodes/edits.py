"""The edits the nodes attach through `patch.attach_edit`: steer, reconstruct and probe."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..sae_models import steering
from .patch import CallInfo, Edit
from .sae_handle import SAEHandle


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
        rows = info.rows(self.target)
        if not rows:
            return None
        B, H, W, C = update.shape
        sae = self.handle.sae
        w = mask_weights(self.mask, [info.row_image[r] for r in rows], H, W, sae.device)
        if not bool(w.any()):
            return None
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


@dataclass
class StepRecord:
    """Sparse SAE codes of one block at one sampling step: `values`/`indices` `[rows, H, W, width]`."""

    step: int | None
    sigma: float
    values: torch.Tensor
    indices: torch.Tensor
    row_kind: list[int]
    row_image: list[int]

    def feature_map(self, feature: int) -> torch.Tensor:
        """Activation of `feature` at every position, `[rows, H, W]`."""
        return (self.values * (self.indices == feature)).sum(-1)

    def mean_activation(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean activation of every feature over the positions of each row, `[rows, n_features]`;
        with `weights [rows, H, W]`, a weighted mean (e.g. over a painted mask)."""
        rows, H, W, width = self.values.shape
        wts = torch.ones(rows, H, W) if weights is None else weights
        per_pos = self.values * wts.unsqueeze(-1)
        out = torch.zeros(rows, self.n_features)
        out.scatter_add_(1, self.indices.reshape(rows, -1), per_pos.reshape(rows, -1))
        return out / wts.reshape(rows, -1).sum(-1, keepdim=True).clamp_min(1e-8)

    n_features: int = 0


@dataclass(eq=False)
class ProbeRecorder:
    """Collects the codes of one block during the latest sampling run (the `SAE_PROBE` socket type).

    A new run is recognised by a new schedule object (ComfyUI makes one per sampling), and replaces the
    previous run's record; an unchanged graph is served from ComfyUI's cache and keeps the record.
    """

    handle: SAEHandle
    block_name: str
    steps: frozenset | None = None  # None: every step
    records: dict = field(default_factory=dict)
    _schedule: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, info: CallInfo, rows: list[int], values: torch.Tensor, indices: torch.Tensor):
        with self._lock:
            if info.schedule is not self._schedule:
                self._schedule = info.schedule
                self.records = {}
            rec = StepRecord(
                info.step, info.sigma, values, indices,
                [info.row_kind[r] for r in rows], [info.row_image[r] for r in rows],
                n_features=self.handle.sae.n_features,
            )
            old = self.records.get(info.step)
            if old is not None and old.sigma == info.sigma:  # the batch came in several calls
                rec = StepRecord(
                    info.step, info.sigma, torch.cat([old.values, values]), torch.cat([old.indices, indices]),
                    old.row_kind + rec.row_kind, old.row_image + rec.row_image, n_features=rec.n_features,
                )
            self.records[info.step] = rec

    def get(self, step: int = -1) -> StepRecord:
        """The record of `step` (negative counts from the last recorded step)."""
        if not self.records:
            raise ValueError(
                f"SAE probe on {self.block_name}: nothing was recorded. Connect the probed MODEL to the sampler "
                "whose image you visualise, and make sure the probe's steps include a step that ran."
            )
        keys = sorted(self.records, key=lambda s: -1 if s is None else s)
        if step < 0:
            if -step > len(keys):
                raise ValueError(f"SAE probe on {self.block_name}: only {len(keys)} steps were recorded")
            return self.records[keys[step]]
        if step not in self.records:
            raise ValueError(f"SAE probe on {self.block_name}: step {step} was not recorded (recorded: {keys})")
        return self.records[step]


@dataclass(frozen=True, eq=False)
class ProbeEdit(Edit):
    handle: SAEHandle = None
    recorder: ProbeRecorder = None

    def sae_handles(self):
        return (self.handle,)

    def apply(self, update, info):
        steps = self.recorder.steps
        if steps is not None and info.step not in steps:
            return None
        rows = info.rows(self.target)
        if not rows:
            return None
        sae = self.handle.sae
        with torch.no_grad():
            values, indices = sae.encode_sparse(update[rows].to(sae.device, sae.dtype))
        self.recorder.add(info, rows, values.float().cpu(), indices.cpu())
        return None
