"""Feature labels: a short text per feature of an SAE, kept in a small file beside it (`<sae>.labels.json`),
and readers of published label sets.

    labels = read_labels(path_of_sae)              # {feature: text}
    categories = read_categories(path_of_sae)      # {feature: category}, where an imported set gave one
    write_labels(path_of_sae, {12: "red cars"})    # checked, written atomically
    imported = parse_label_set(text, n_features, block="down.2.1")
    found, total = import_label_set(path_of_sae, text, n_features, block="down.2.1")  # merged into the file

The file: `{"format": "sae-unbox-labels", "version": 1, "n_features": N, "labels": {"12": "red cars", ...},
"categories": {"12": "object", ...}}` (`categories` optional). A label or category is at most `MAX_LABEL`
characters of printable text (no control characters); a file holds at most one label per feature, and a
category only beside a label.

Published label sets come in several shapes; `parse_label_set` reads them all, picking the rows of one block
when the set covers several SAEs:
- JSON: a list of rows, or an object holding one under `labels`/`explanations`/`features`/`data`, or an
  object `{"<feature>": "<label>"}`; JSON Lines (one row a line); CSV with a header.
- A row names its feature as `feature`, `feature_id`, `index`, `latent`, `neuron` or `id`, its text as
  `label`, `description`, `explanation`, `caption` or `text`, and optionally its block as `block`, `layer`,
  `hookpoint`, `sae` or `sae_id` (any naming `sae_models.blocks` reads), and a `category`. Neuronpedia's
  and SAELens's explanation exports (`index` + `description` + `layer`) are rows of this kind, and so is the
  published set for the paper's SAEs (`feature_id`, `label`, `category`, `confidence`, one array per block).
"""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from pathlib import Path

from .blocks import block_from_text, find_block
from .errors import SAEFormatError
from .files import atomic_write_text

FORMAT = "sae-unbox-labels"
VERSION = 1
MAX_LABEL = 200
FEATURE_KEYS = ("feature", "feature_id", "index", "latent", "neuron", "id")
TEXT_KEYS = ("label", "description", "explanation", "caption", "text")
BLOCK_KEYS = ("block", "layer", "hookpoint", "sae", "sae_id")
CATEGORY_KEYS = ("category",)
ROW_LISTS = ("labels", "explanations", "features", "data")


class LabelError(SAEFormatError):
    """A label, or a label file, that is not acceptable."""


def labels_path(sae_path) -> str:
    """Where the labels of the SAE file or folder `sae_path` live: beside it, `<name>.labels.json`."""
    path = os.fspath(sae_path).rstrip("/\\")
    return path.removesuffix(".safetensors") + ".labels.json"


_UNPRINTABLE = ("Cc", "Cf", "Cs", "Co", "Cn")


def clean_label(text, where="label", lenient: bool = False) -> str:
    """A label as stored: stripped, one line, printable, at most MAX_LABEL characters. A label typed by a
    user that breaks a rule is refused (LabelError); `lenient` (imports) drops unprintable characters and
    shortens a long label instead."""
    if not isinstance(text, str):
        raise LabelError(where, f"a label is text, not {type(text).__name__}")
    text = " ".join(text.split())
    bad = [c for c in text if unicodedata.category(c) in _UNPRINTABLE]
    if bad and not lenient:
        raise LabelError(where, f"a label may not hold control or unassigned characters ({bad[0]!r})")
    if bad:
        text = "".join(c for c in text if unicodedata.category(c) not in _UNPRINTABLE)
    if len(text) > MAX_LABEL:
        if not lenient:
            raise LabelError(where, f"a label has at most {MAX_LABEL} characters, this one {len(text)}")
        text = text[: MAX_LABEL - 1].rstrip() + "…"
    return text


def _feature(value, n_features: int | None, where) -> int:
    try:
        f = int(str(value).strip())
    except (TypeError, ValueError):
        raise LabelError(where, f"feature {str(value)[:40]!r} is not a whole number") from None
    if f < 0 or (n_features is not None and f >= n_features):
        raise LabelError(where, f"feature {f} is out of range (the SAE has {n_features} features)")
    return f


def _read_file(sae_path, n_features: int | None) -> tuple[dict[int, str], dict[int, str]]:
    path = Path(labels_path(sae_path))
    if not path.is_file():
        return {}, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabelError(path, f"not a readable labels file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("labels"), dict):
        raise LabelError(path, f"not a {FORMAT} file")
    categories = data.get("categories", {})
    if not isinstance(categories, dict):
        raise LabelError(path, "categories is not an object of feature: category")
    labels = {_feature(k, n_features, path): clean_label(v, path) for k, v in data["labels"].items()}
    kinds = {_feature(k, n_features, path): clean_label(v, path) for k, v in categories.items()}
    return labels, {f: c for f, c in kinds.items() if c and f in labels}


def read_labels(sae_path, n_features: int | None = None) -> dict[int, str]:
    """The labels kept beside an SAE ({} when there is no file)."""
    return _read_file(sae_path, n_features)[0]


def read_categories(sae_path, n_features: int | None = None) -> dict[int, str]:
    """The categories of the labelled features, where an imported label set gave them ({} when none)."""
    return _read_file(sae_path, n_features)[1]


def write_labels(sae_path, labels: dict[int, str], n_features: int, categories: dict[int, str] | None = None) -> Path:
    """Replace the labels (and their categories) kept beside an SAE, atomically. Empty labels are dropped,
    and with them their categories."""
    path = Path(labels_path(sae_path))
    clean, kinds = {}, {}
    for f, text in labels.items():
        f = _feature(f, n_features, path)
        text = clean_label(text, path)
        if text:
            clean[f] = text
    for f, text in (categories or {}).items():
        f = _feature(f, n_features, path)
        text = clean_label(text, path)
        if text and f in clean:
            kinds[f] = text
    body = {"format": FORMAT, "version": VERSION, "n_features": n_features,
            "labels": {str(f): clean[f] for f in sorted(clean)}}
    if kinds:
        body["categories"] = {str(f): kinds[f] for f in sorted(kinds)}
    return atomic_write_text(path, json.dumps(body, ensure_ascii=False, indent=0))


def set_label(sae_path, feature: int, text: str, n_features: int) -> dict[int, str]:
    """Set (or, with an empty text, remove) one feature's label, keeping the others' categories; returns all
    labels."""
    labels, categories = _read_file(sae_path, n_features)
    labels[_feature(feature, n_features, labels_path(sae_path))] = clean_label(text)
    write_labels(sae_path, labels, n_features, categories)
    return {f: t for f, t in labels.items() if t}


def _rows(text: str) -> list:
    try:
        return _parse_rows(text)
    except RecursionError:  # Python's JSON decoder recurses once per level of nesting
        raise LabelError("label set", "JSON nested too deeply") from None


def _parse_rows(text: str) -> list:
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if data is not None:
            if isinstance(data, dict):
                for key in ROW_LISTS:
                    if isinstance(data.get(key), (list, dict)):
                        data = data[key]
                        break
            if isinstance(data, dict):  # {"12": "red cars", ...}
                return [{"feature": k, "label": v} for k, v in data.items()]
            if isinstance(data, list):
                return data
        try:  # JSON Lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise LabelError("label set", f"not JSON, JSON Lines or CSV ({e})") from None
    return list(csv.DictReader(io.StringIO(text)))


def _pick(row: dict, keys) -> object:
    lowered = {str(k).strip().lower(): v for k, v in row.items()}
    return next((lowered[k] for k in keys if lowered.get(k) not in (None, "")), None)


def parse_label_set(text: str, n_features: int, block: str | None = None) -> dict[int, str]:
    """The labels of one SAE in a published label set (see the module docstring for the shapes read).
    When rows name their block, only those of `block` are kept (an error if `block` is None and the set
    covers several blocks)."""
    return parse_label_set_with_categories(text, n_features, block)[0]


def parse_label_set_with_categories(text: str, n_features: int,
                                    block: str | None = None) -> tuple[dict[int, str], dict[int, str]]:
    """As `parse_label_set`, with the categories the rows give: (labels, categories)."""
    want = find_block(block) if block else None
    rows = _rows(text)
    out: dict[int, str] = {}
    kinds: dict[int, str] = {}
    blocks_seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LabelError("label set", f"row {i} is not an object with a feature and a label")
        feature, label = _pick(row, FEATURE_KEYS), _pick(row, TEXT_KEYS)
        if feature is None or label is None:
            raise LabelError("label set", f"row {i} has no feature ({'/'.join(FEATURE_KEYS)}) or no label "
                                          f"({'/'.join(TEXT_KEYS)})")
        where = _pick(row, BLOCK_KEYS)
        if where is not None:
            named = find_block(str(where)) or block_from_text(str(where))
            blocks_seen.add(named.short if named else str(where))
            if want is not None and named is not want:
                continue
        label = clean_label(str(label), f"label set row {i}", lenient=True)
        if label:
            f = _feature(feature, n_features, f"label set row {i}")
            out[f] = label
            kind = _pick(row, CATEGORY_KEYS)
            kind = clean_label(str(kind), f"label set row {i}", lenient=True) if kind is not None else ""
            if kind:
                kinds[f] = kind
            else:
                kinds.pop(f, None)
    if want is None and len(blocks_seen) > 1:
        raise LabelError("label set", f"the set labels several blocks ({', '.join(sorted(blocks_seen))}); "
                                      "say which one")
    if want is not None and blocks_seen and want.short not in blocks_seen:
        raise LabelError("label set", f"the set has no labels of block {want.short} (it has: "
                                      f"{', '.join(sorted(blocks_seen))})")
    return out, kinds


def import_label_set(sae_path, text: str, n_features: int, block: str | None = None) -> tuple[int, int]:
    """Merge a published label set (its rows of `block`) into the labels beside an SAE; an imported label
    replaces one the file had for the same feature. Returns (labels imported, labels in the file now)."""
    found, kinds = parse_label_set_with_categories(text, n_features, block=block)
    labels, categories = _read_file(sae_path, n_features)
    for f in found:  # an imported label brings its own category (or none)
        categories.pop(f, None)
    merged = {**labels, **found}
    write_labels(sae_path, merged, n_features, {**categories, **kinds})
    return len(found), len(merged)
