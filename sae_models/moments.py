"""Running per-slot moments (count, mean, sum of squared deviations) in float64, for statistics gathered
batch by batch: per input dimension (`metrics.evaluate`) or per feature (`stats.feature_stats`)."""

from __future__ import annotations

import torch


class RunningMoments:
    """Count, mean and M2 (sum of squared deviations from the mean) of the values seen in each of `size`
    slots. Each batch's moments are merged with Chan et al.'s pairwise update, so the variance does not
    suffer from the cancellation of a sum of squares."""

    def __init__(self, size: int, device=None):
        self.size = size
        self.count = torch.zeros(size, dtype=torch.float64, device=device)
        self.mean = torch.zeros(size, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(size, dtype=torch.float64, device=device)

    def add_rows(self, x: torch.Tensor) -> None:
        """Rows `[n, size]`: each row gives one value to every slot."""
        x = x.double()
        if x.shape[0] == 0:
            return
        mean = x.mean(0)
        self._merge(torch.full_like(mean, x.shape[0]), mean, (x - mean).pow(2).sum(0))

    def add_values(self, values: torch.Tensor, slots: torch.Tensor) -> None:
        """`values[i]` goes to slot `slots[i]` (1-D, same length)."""
        v = values.double()
        count = torch.bincount(slots, minlength=self.size).double()
        mean = torch.zeros_like(self.mean).index_add_(0, slots, v) / count.clamp_min(1)
        m2 = torch.zeros_like(self.m2).index_add_(0, slots, (v - mean[slots]) ** 2)
        self._merge(count, mean, m2)

    def _merge(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total.clamp_min(1))
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * count / total.clamp_min(1))
        self.count = total

    def std(self) -> torch.Tensor:
        """Population standard deviation per slot (0 where nothing was seen)."""
        return (self.m2 / self.count.clamp_min(1)).clamp_min(0).sqrt()
