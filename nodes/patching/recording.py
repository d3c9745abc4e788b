"""Edits that record what a block does during sampling, without changing it: the probe's SAE codes and the
dump's rows (the dump's session is in `nodes/dump.py`). Both keep the latest sampling run only, and both
record chosen steps of chosen rows: that part is here, once. What they record stays on the sampling device
while the model samples; it moves to the host once, when a node reads it."""

from __future__ import annotations

import math
import threading
import uuid
import weakref
from dataclasses import dataclass, field, replace

import torch

from ..sae_handle import SAEHandle
from .call import BlockView, CallInfo, Edit, runs


# One id per sampling run, for every record of it (the probes of several blocks): ComfyUI makes one schedule
# tensor per run, so the run is known by that object while it lives (the entry goes when the tensor does).
_RUN_IDS: dict[int, str] = {}


def run_id_of(schedule) -> str:
    """The id of the sampling run whose schedule tensor is `schedule` (a new id when there is none)."""
    if schedule is None:
        return uuid.uuid4().hex
    key = id(schedule)
    run = _RUN_IDS.get(key)
    if run is None:
        run = _RUN_IDS[key] = uuid.uuid4().hex
        try:
            weakref.finalize(schedule, _RUN_IDS.pop, key, None)
        except TypeError:  # its lifetime cannot be watched: do not keep the id
            _RUN_IDS.pop(key, None)
    return run


@dataclass(eq=False)
class RunRecord:
    """What edits record during the latest sampling run. ComfyUI makes a new schedule object for each
    sampling run: a call with another one starts a new run (`_new_run` drops the last run's data). An
    unchanged graph is served from ComfyUI's cache and keeps its record."""

    steps: frozenset | None = None  # the steps to record; None: every step
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the sampling run recorded (`run_id_of`)
    _schedule: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _new_run(self) -> None:
        raise NotImplementedError

    def _enter(self, info: CallInfo) -> None:
        """Call with `_lock` held, before adding what `info`'s call recorded."""
        if info.schedule is not self._schedule:
            self._schedule = info.schedule
            self.run_id = run_id_of(info.schedule)
            self._new_run()


@dataclass(frozen=True, eq=False)
class RecordingEdit(Edit):
    """An edit that records (never changes) the update of its rows at its record's steps."""

    record: RunRecord = None

    def rows_to_record(self, info: CallInfo) -> list[int]:
        """The batch rows to record in this call: none when the step is not one of the record's."""
        steps = self.record.steps
        if steps is not None and info.step not in steps:
            return []
        return info.rows(self.target)

    def apply_view(self, view: BlockView, info: CallInfo) -> bool:
        rows = self.rows_to_record(info)
        if rows:
            self.record_rows(view, info, rows, _select(view.update(), rows))
        return False

    def record_rows(self, view: BlockView, info: CallInfo, rows: list[int], update: torch.Tensor) -> None:
        """Record the update `[len(rows), h, w, C]` of `rows`."""
        raise NotImplementedError


def _select(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`t[rows]` through slices of consecutive rows (no index tensor to copy to the device)."""
    pieces = [t[r] for r in runs(rows)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


ROW_VIEWS = ["cond", "uncond", "cfg combined"]


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

    def rows_of(self, kind: int) -> list[int]:
        """The rows of one kind (0 cond, 1 uncond), in image order."""
        return sorted((r for r, k in enumerate(self.row_kind) if k == kind), key=lambda r: self.row_image[r])

    def by_image(self, per_row: torch.Tensor, view: str, cfg: float) -> torch.Tensor:
        """`per_row` (indexed by this record's rows) for one view, one entry per image in batch order: the cond
        rows, the uncond rows, or their CFG combination `uncond + cfg * (cond - uncond)` (codes whose decoding
        is the CFG combination of the two reconstructions; negative where a feature fires more without the
        prompt). ValueError for a view the record cannot give."""
        if view not in ROW_VIEWS:
            raise ValueError(f"rows must be one of {', '.join(ROW_VIEWS)}, got {str(view)[:40]!r}")
        cond, uncond = self.rows_of(0), self.rows_of(1)
        if view != "uncond" and not cond:
            raise ValueError("the probe recorded no cond rows; set the probe's apply_to to cond or both")
        if view != "cond" and not uncond:
            raise ValueError("the probe recorded no uncond rows (at cfg 1 ComfyUI runs none); set the probe's "
                             "apply_to to uncond or both and sample with cfg > 1")
        if view == "cond":
            return per_row[cond]
        if view == "uncond":
            return per_row[uncond]
        if [self.row_image[r] for r in cond] != [self.row_image[r] for r in uncond]:
            raise ValueError("the probe's cond and uncond rows are of different images")
        if not math.isfinite(cfg):
            raise ValueError(f"cfg must be a finite number, got {cfg!r}")
        return per_row[uncond] + cfg * (per_row[cond] - per_row[uncond])

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
class ProbeRecorder(RunRecord):
    """The codes of one block during the latest sampling run, by step (the `SAE_PROBE` socket type)."""

    handle: SAEHandle = None
    block_name: str = ""
    records: dict = field(default_factory=dict)

    def _new_run(self) -> None:
        self.records = {}

    def add(self, info: CallInfo, rows: list[int], values: torch.Tensor, indices: torch.Tensor):
        with self._lock:
            self._enter(info)
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
        """The record of `step` (negative counts from the last recorded step), on the host: the codes move there
        from the sampling device when first read."""
        with self._lock:
            for key, rec in self.records.items():
                if rec.values.device.type != "cpu" or rec.values.dtype != torch.float32:
                    self.records[key] = replace(rec, values=rec.values.float().cpu(), indices=rec.indices.cpu())
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
class ProbeEdit(RecordingEdit):
    """Encodes the update of its rows with the SAE and hands the codes (on the device) to its ProbeRecorder."""

    handle: SAEHandle = None

    def sae_handles(self):
        return (self.handle,)

    def record_rows(self, view, info, rows, update):
        sae = self.handle.sae
        with torch.no_grad():
            values, indices = sae.encode_sparse(update.to(sae.device, sae.dtype))
        self.record.add(info, rows, values, indices)


@dataclass(frozen=True, eq=False)
class DumpEdit(RecordingEdit):
    """Hands the block's update (and optionally its input and output) of the selected rows to the dump's
    session (`record.add(block, info, rows, tensors)`)."""

    def record_rows(self, view, info, rows, update):
        tensors = {"update": update}
        if "input" in self.record.fields:
            x = _select(view.x_in, rows).to(update.dtype)
            tensors["input"], tensors["output"] = x, x + update
        self.record.add(self.block, info, rows, tensors)
