"""The `sae` model folder (`ComfyUI/models/sae/`): registering it, the SAEs found in it, and where nodes read
and write SAE files in it."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import folder_paths

from ..sae_models.errors import SAEError
from ..sae_models.formats import list_saes, load
from ..sae_models.formats.native import read_summary
from .errors import NodeInputError, excerpt
from .paths import confine, relative_parts
from .routes import Refused

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


def available_saes() -> list[str]:
    """Every SAE file or folder in the SAE folders, as names relative to them."""
    names: list[str] = []
    for root in folder_paths.get_folder_paths(FOLDER):
        names.extend(list_saes(root))
    return sorted(set(names))


def sae_root() -> str:
    """The first `models/sae` folder: where nodes write SAEs."""
    return folder_paths.get_folder_paths(FOLDER)[0]


def sae_file(node: str, input_name: str, name: str, suffix: str = ".safetensors") -> str:
    """A file to write under `models/sae`: `name` plus `suffix` unless it already ends so."""
    parts = relative_parts(node, input_name, name)
    if not parts[-1].endswith(suffix):
        parts[-1] += suffix
    return confine(node, input_name, sae_root(), parts, "models/sae")


def find_sae(node: str, name: str) -> str:
    """The file or folder called `name` in one of the SAE folders. Only the name is checked (relative, no
    '..'): links the server's owner put into `models/sae` are followed, as ComfyUI does for model files."""
    parts = relative_parts(node, "sae_name", name)
    roots = folder_paths.get_folder_paths(FOLDER)
    for root in roots:
        path = os.path.join(root, *parts)
        if os.path.exists(path):
            return path
    raise NodeInputError(node, f"{excerpt(name)} is not in models/sae (nor in an SAE folder of "
                               "extra_model_paths.yaml)")


def file_version(path: str) -> tuple:
    """What changes when an SAE changes: size and modification time of a file, or of every file in a folder
    (a folder's own time does not change when a file in it is rewritten)."""
    if not os.path.isdir(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    found = []
    for folder, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(folder, f))
            found.append((os.path.relpath(os.path.join(folder, f), path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


_HEADERS: OrderedDict = OrderedDict()  # (path, file_version) -> (config, stats); the newest few
_HEADERS_KEPT = 16
_HEADERS_LOCK = threading.Lock()  # routes read headers in executor threads


def sae_header(path: str):
    """An SAE's config and statistics; native files are read without their weights. Kept per file version:
    a folder SAE (e.g. the paper's release) is otherwise loaded whole each time a route asks for its size."""
    key = (path, file_version(path))
    with _HEADERS_LOCK:
        if key in _HEADERS:
            _HEADERS.move_to_end(key)
            return _HEADERS[key]
    if path.endswith(".safetensors"):
        header = read_summary(path)
    else:
        sae = load(path)
        header = sae.config, sae.stats
    with _HEADERS_LOCK:
        _HEADERS[key] = header
        while len(_HEADERS) > _HEADERS_KEPT:
            _HEADERS.popitem(last=False)
    return header


def listed_sae(name, node: str = "SAE workbench"):
    """(path, config) of the SAE called `name` in the SAE folders, for a route: a Refused 400 for a name that
    is not text, 404 for one that is not listed."""
    if not isinstance(name, str) or not name:
        raise Refused(400, "name the SAE (a name from models/sae)")
    if name not in available_saes():
        raise Refused(404, f"no SAE named {name[:80]!r} in models/sae")
    try:
        path = find_sae(node, name)
        config, _ = sae_header(path)
    except (NodeInputError, SAEError) as e:
        raise Refused(404, str(e)) from None
    return path, config
