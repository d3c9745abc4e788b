"""Fixed-size training batches from any iterable of `[n, d_in]` tensors, with a state to resume from."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Rebatcher:
    """Hands out `batch_size`-row batches of the rows of `source` (any `n` per item). Remembers the rows
    pulled from `source` and those pulled but not handed out yet, so that `state()` resumes exactly: through
    `source.state_dict()` when it has one, else by skipping the rows already pulled."""

    def __init__(self, source: Iterable, device, dtype):
        self.source = source
        self.stateful = hasattr(source, "state_dict") and hasattr(source, "load_state_dict")
        self.device, self.dtype = torch.device(device), dtype
        self.d_in: int | None = None  # set by `start` (from the data) or `resume`
        self.rows_consumed = 0
        self.exhausted = False
        self._it = None
        self._pending: list[torch.Tensor] = []
        self._n_pending = 0

    # -- starting ----------------------------------------------------------------------------------
    def start(self) -> int:
        """Begin at the start of `source`; returns `d_in`, read from its first non-empty item."""
        self._it = iter(self.source)
        first = next((t for t in map(torch.as_tensor, self._it) if t.numel()), None)
        if first is None:
            raise ValueError("train: batches yielded no data")
        self.d_in = first.shape[-1]
        self._push(self._counted(self._rows(first)))
        return self.d_in

    def resume(self, state: dict, d_in: int) -> None:
        """Continue from `state()` of an earlier run: its pending rows first, then `source` where it was."""
        self.d_in = d_in
        self._push(state["pending"])
        if self.stateful:
            if state.get("batches_state") is not None:
                self.source.load_state_dict(state["batches_state"])
            self.rows_consumed = state["rows_consumed"]
            self._it = iter(self.source)
            return
        self._it = iter(self.source)
        skip = state["rows_consumed"]
        while skip > 0:
            t = self._pull()
            if t is None:
                return
            if t.shape[0] > skip:
                self._push(t[skip:])
            skip -= t.shape[0]

    def state(self) -> dict:
        """What `resume` needs (CPU tensors, numbers and the source's own state)."""
        return {
            "batches_state": self.source.state_dict() if self.stateful else None,
            "pending": torch.cat(self._pending, 0).cpu() if self._pending else torch.zeros(0, self.d_in),
            "rows_consumed": self.rows_consumed,
        }

    # -- batches -----------------------------------------------------------------------------------
    def fill(self, n: int) -> bool:
        """Pull until at least `n` rows are pending; False when the source ended first."""
        while self._n_pending < n and not self.exhausted:
            t = self._pull()
            if t is not None:
                self._push(t)
        return self._n_pending >= n

    def peek(self, n: int) -> torch.Tensor:
        """Up to `n` next rows, without handing them out."""
        self.fill(n)
        rows = torch.cat(self._pending, 0)[:n] if self._pending else torch.zeros(0, self.d_in)
        return rows.to(self.device, self.dtype)

    def take(self, n: int) -> torch.Tensor:
        """The next `n` rows (after a successful `fill(n)`)."""
        rows = torch.cat(self._pending, 0) if len(self._pending) > 1 else self._pending[0]
        out, rest = rows[:n], rows[n:]
        self._pending = [rest] if rest.shape[0] else []
        self._n_pending = rest.shape[0]
        if out.device.type == "cpu" and self.device.type == "cuda":
            # from pageable memory a copy to the GPU waits for the GPU's queue; from pinned memory it does not
            out = out.to(dtype=self.dtype).pin_memory()
        return out.to(self.device, self.dtype, non_blocking=True)

    # -- internals ---------------------------------------------------------------------------------
    def _pull(self) -> torch.Tensor | None:
        """The source's next item as rows (counted as consumed); None once it has ended."""
        try:
            t = self._rows(next(self._it))
        except StopIteration:
            self.exhausted = True
            return None
        return self._counted(t)

    def _rows(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.shape[-1] != self.d_in:
            raise ValueError(f"training batches must be [n, {self.d_in}], got shape {tuple(t.shape)}")
        return t.reshape(-1, self.d_in)

    def _counted(self, t: torch.Tensor) -> torch.Tensor:
        self.rows_consumed += t.shape[0]
        return t

    def _push(self, t: torch.Tensor) -> None:
        if t.shape[0]:
            self._pending.append(t)
            self._n_pending += t.shape[0]
