"""An SAE's features as a table to browse: per-feature statistics and top dataset images (from the features
index), filtered, sorted and paged. The data behind the pack's feature browser page."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .metadata import FeatureStats

SORT_KEYS = ("frequency", "mean", "max", "feature")
_FEATURE_ID = re.compile(r"#?(\d+)")


@dataclass
class FeatureTable:
    """`index`: a features index (`stats.read_features_index`); `stats`: the SAE's statistics (may be empty);
    `labels`: the features' labels (`labels.read_labels`), searched and shown with them."""

    index: dict
    stats: FeatureStats
    labels: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.index["features"])

    def row(self, f: int) -> dict:
        """One feature: its statistics (None where unknown), best value in the index, and top images."""
        return {"feature": f, **{name: self._stat(name, f) for name in ("frequency", "mean", "std")},
                "max": self._max(f), "label": self.labels.get(f), "top": self.index["features"][f]}

    def _stat(self, name: str, f: int) -> float | None:
        t = getattr(self.stats, name)
        v = float(t[f]) if t is not None else None
        return v if v is None or math.isfinite(v) else None

    def _max(self, f: int) -> float | None:
        top = self.index["features"][f]
        return float(top[0]["value"]) if top else None

    def _dead(self, f: int) -> bool:
        freq = self.stats.frequency
        return not self.index["features"][f] and (freq is None or float(freq[f]) == 0.0)

    def query(self, *, sort: str = "frequency", descending: bool = True, text: str = "", hide_dead: bool = False,
              offset: int = 0, limit: int = 50) -> dict:
        """Features matching `text`, sorted by `sort` (features without that value last), `limit` from `offset`.

        `text`: a feature id (`123` or `#123`), or words that must all occur (any case) in the feature's label
        or the prompts of its top images. `hide_dead`: leave out features that never fired in the data.
        Returns `{"total": matches, "offset", "limit", "features": [row, ...]}`.
        """
        if sort not in SORT_KEYS:
            raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
        if offset < 0 or limit < 1:
            raise ValueError(f"offset must be >= 0 and limit >= 1, got offset={offset}, limit={limit}")
        text = text.strip()
        m = _FEATURE_ID.fullmatch(text)
        if m:
            f = int(m.group(1))
            ids = [f] if f < self.n_features else []
        else:
            words = text.lower().split()
            ids = [f for f in range(self.n_features)
                   if _words_match(self.index["features"][f], self.labels.get(f, ""), words)]
        if hide_dead:
            ids = [f for f in ids if not self._dead(f)]
        key = {f: self._key(f, sort) for f in ids}
        # ids ascend and sorted() is stable (also with reverse), so ties keep the lower id first
        known = sorted((f for f in ids if key[f] is not None), key=key.__getitem__, reverse=descending)
        ordered = known + [f for f in ids if key[f] is None]
        page = ordered[offset: offset + limit]
        return {"total": len(ordered), "offset": offset, "limit": limit, "features": [self.row(f) for f in page]}

    def _key(self, f: int, sort: str) -> float | None:
        if sort == "feature":
            return f
        if sort == "max":
            return self._max(f)
        return self._stat(sort, f)


def _words_match(entries: list, label: str, words: list[str]) -> bool:
    if not words:
        return True
    text = "\n".join([label, *(str(e.get("prompt", "")) for e in entries)]).lower()
    return all(w in text for w in words)
