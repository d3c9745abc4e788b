"""Readers of SAE files. `detect(path)` names the format of a file or folder; `load(path)` reads it."""

from __future__ import annotations

from pathlib import Path

from ..blocks import find_block
from ..errors import SAEFormatError
from . import dictionary_learning, native, paper, saelens, sparsify
from .common import base_model_of, load_safetensors

# Folder layouts, tried in this order: (format name, module, marker files that must all exist).
_FOLDER_LAYOUTS = (
    ("paper", paper, ("config.json", "state_dict.pth")),
    ("saelens", saelens, ("cfg.json", "sae_weights.safetensors")),
    ("sparsify", sparsify, ("cfg.json", "sae.safetensors")),
    ("dictionary_learning", dictionary_learning, ("config.json", "ae.pt")),
)
_READERS = {name: module for name, module, _ in _FOLDER_LAYOUTS} | {"native": native}


def detect(path) -> tuple[str, Path]:
    """(format name, path to hand to its reader) for a file or folder; SAEFormatError if unknown."""
    path = Path(path)
    if not path.exists():
        raise SAEFormatError(path, "no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            # A native file says so in its metadata; otherwise it may be one file of a library's folder.
            folder_format = _detect_folder(path.parent)
            if folder_format and path.name in _markers(folder_format):
                return folder_format, path.parent
            return "native", path
        folder_format = _detect_folder(path.parent)
        if folder_format and path.name in _markers(folder_format):
            return folder_format, path.parent
        raise SAEFormatError(path, "unknown SAE file: expected a .safetensors file or a library's SAE folder")
    fmt = _detect_folder(path)
    if fmt is None and (path / "final").is_dir():
        fmt = _detect_folder(path / "final")
        path = path / "final" if fmt else path
    if fmt is None:
        natives = sorted(path.glob("*.safetensors"))
        if len(natives) == 1:
            return "native", natives[0]
        layouts = "; ".join(f"{n}: {' + '.join(m)}" for n, _, m in _FOLDER_LAYOUTS)
        raise SAEFormatError(path, f"unknown SAE folder layout (expected one of {layouts})")
    return fmt, path


def _markers(fmt: str) -> tuple[str, ...]:
    return next(m for n, _, m in _FOLDER_LAYOUTS if n == fmt)


def _detect_folder(folder: Path) -> str | None:
    for name, _, markers in _FOLDER_LAYOUTS:
        if all((folder / m).is_file() for m in markers):
            return name
    return None


def load(path, block: str | None = None):
    """Read an SAE in any supported format. `block` names the block it reads where its files do not (the
    paper's FLUX release names none), or overrides what they name."""
    fmt, target = detect(path)
    if fmt == "native":
        tensors, meta = load_safetensors(target)
        if not native.is_native(meta):
            raise SAEFormatError(
                target,
                "safetensors file without comfyui-sae metadata; SAELens and sparsify files are read from their "
                "folder together with cfg.json",
            )
        sae = native.from_loaded(target, tensors, meta)
    else:
        sae = _READERS[fmt].load(target)
    if block:
        found = find_block(block)
        if found is None:
            raise SAEFormatError(target, f"unknown block {block!r}")
        sae.config.block = found.short
        if sae.config.base_model is None:
            sae.config.base_model = base_model_of(found)
    return sae


def list_saes(root) -> list[str]:
    """Paths (relative to `root`, '/'-separated) of the SAEs under `root`: library folders (a paper
    release is listed by its block-named folder, not by `final/`) and native .safetensors files."""
    root = Path(root)
    found: list[str] = []
    if not root.is_dir():
        return found
    for folder in sorted(p for p in [root, *root.rglob("*")] if p.is_dir()):
        fmt = _detect_folder(folder)
        if fmt is not None:
            shown = folder.parent if folder.name == "final" and folder.parent != root else folder
            if shown != root:
                found.append(shown.relative_to(root).as_posix())
            continue
        if _detect_folder(folder.parent) is not None and folder.parent != root:
            continue
        for f in sorted(folder.glob("*.safetensors")):
            if f.is_file():
                found.append(f.relative_to(root).as_posix())
    return sorted(set(found))
