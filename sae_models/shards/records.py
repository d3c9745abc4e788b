"""The images' records: `images/<writer>.jsonl`, one JSON line per image whose rows are all in complete
shards. Readers take only the rows of images with a record."""

from __future__ import annotations

import json
from pathlib import Path

from .. import files
from .layout import IMAGES_DIR
from .manifest import read_manifest


def records_path(folder: Path, writer: str) -> Path:
    return folder / IMAGES_DIR / f"{writer}.jsonl"


def read_records(path: Path) -> list[dict]:
    """The records of one writer's file (none if it is absent); a line cut short by a crash is skipped."""
    out = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("image"), int):
            out.append(rec)
    return out


def append_records(path: Path, records: list[dict]) -> None:
    """Append records to one writer's file, flushed to disk."""
    files.append_lines(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def done_images(folder) -> list[dict]:
    """Records of all completed images of all writers (writer by writer, in order of completion)."""
    folder = Path(folder)
    read_manifest(folder)
    out = []
    images = folder / IMAGES_DIR
    if not images.is_dir():
        return out
    for path in sorted(images.glob("*.jsonl")):
        for rec in read_records(path):
            rec.setdefault("writer", path.stem)
            out.append(rec)
    return out
