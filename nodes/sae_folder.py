"""The `sae` model folder (`ComfyUI/models/sae/`) and the SAEs found in it."""

from __future__ import annotations

import os

import folder_paths

FOLDER = "sae"
EXTENSIONS = {".safetensors", ".pth", ".pt", ".json"}


def register_sae_folder() -> None:
    """Add `models/sae` to ComfyUI's model folders, keeping paths an extra_model_paths.yaml already set."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    paths, exts = entry
    if default not in paths:
        paths.append(default)
    exts.update(EXTENSIONS)
