"""Paths that a workflow names, confined to ComfyUI's own folders.

A workflow is untrusted input: people queue workflows that others shared. So every path a widget holds is
relative, and is resolved under one root: ComfyUI's output folder, its input folder, `models/sae`
(`sae_folder`), or a dump folder that the server's owner registered (a workflow cannot register one). A path is refused, with
an error naming the node and the input, when it is absolute, starts with `~`, holds `..`, a backslash, a
`%` escape or a character outside letters, digits, space and `_ . , + - ( ) [ ] @ =`, when it is longer
than MAX_PATH_CHARS or a name in it longer than MAX_NAME_BYTES, or when it resolves, through a symbolic link,
outside its root. The checks create nothing on disk.

Extra dump folders (a big disk, say) are registered by the server's owner, in either way:
- the environment variable `SAE_UNBOX_DUMP_FOLDERS`, `name=/path` entries separated by `os.pathsep`
  (`:` on Linux and macOS, `;` on Windows), read by the server process;
- ComfyUI's `extra_model_paths.yaml`, key `sae_dumps`; each folder is named by its last component.
A dump folder `<name>/<relative path>` then lies in the registered folder `<name>`.
"""

from __future__ import annotations

import logging
import os
import re

import folder_paths

from .errors import NodeInputError, excerpt

log = logging.getLogger(__name__)

DUMP_FOLDERS_ENV = "SAE_UNBOX_DUMP_FOLDERS"
DUMP_FOLDERS_KEY = "sae_dumps"

MAX_PATH_CHARS = 1024  # a path typed into a widget
MAX_NAME_BYTES = 150  # one file or folder name in it: file systems take 255 bytes, the pack adds suffixes to some
_PART = re.compile(r"[\w .,+\-()\[\]@=]+")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
# What ComfyUI's get_save_image_path itself expands in a filename prefix.
_PREFIX_VARS = re.compile(r"%(width|height|year|month|day|hour|minute|second)%")


def relative_parts(node: str, input_name: str, text: str) -> list[str]:
    """The components of a relative path typed into `input_name`, or a NodeInputError saying why not."""
    text = (text if isinstance(text, str) else "").strip()
    shown = excerpt(text)

    def refuse(why: str):
        raise NodeInputError(node, f"{input_name} {shown} {why}")

    if not text:
        raise NodeInputError(node, f"{input_name} is empty")
    if len(text) > MAX_PATH_CHARS:
        refuse(f"is {len(text):,} characters long, more than {MAX_PATH_CHARS:,}")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        refuse("is an absolute path; give a path relative to the folder this input names")
    if text.startswith("~"):
        refuse("starts with '~'; give a path relative to the folder this input names")
    if "\\" in text:
        refuse("holds a backslash; separate folders with '/'")
    parts = [p.strip() for p in text.split("/") if p.strip() not in ("", ".")]
    if ".." in parts:
        refuse("holds '..'; it may not leave the folder this input names")
    if not parts:
        refuse("names no file or folder")
    for p in parts:
        if "%" in p:
            refuse("holds '%'; escapes such as %2e are not decoded, write the path as it is")
        if not _PART.fullmatch(p):
            refuse("holds a character other than letters, digits, space and _ . , + - ( ) [ ] @ =")
        if len(p.encode("utf-8")) > MAX_NAME_BYTES:
            refuse(f"has a file or folder name of {len(p.encode('utf-8')):,} bytes, more than {MAX_NAME_BYTES} (the "
                   "pack adds suffixes, and file systems allow 255)")
    return parts


def confine(node: str, input_name: str, root: str, parts: list[str], where: str) -> str:
    """`root/parts...` with symbolic links resolved, refused when that lies outside `root` (`where` names the
    root in the error). The path need not exist."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, *parts))
    if os.path.commonpath([base, path]) != base:
        raise NodeInputError(node, f"{input_name} {excerpt('/'.join(parts))} resolves, through a symbolic link, "
                                   f"outside {where}")
    return path


def dump_roots() -> dict[str, str]:
    """The dump folders the server's owner registered: {name: folder} (see the module docstring)."""
    roots: dict[str, str] = {}
    for entry in os.environ.get(DUMP_FOLDERS_ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not _NAME.fullmatch(name) or not os.path.isabs(os.path.expanduser(path)):
            log.warning("%s: ignoring %r (write name=/absolute/path)", DUMP_FOLDERS_ENV, entry)
            continue
        roots[name] = os.path.expanduser(path)
    registered = folder_paths.folder_names_and_paths.get(DUMP_FOLDERS_KEY)
    for path in registered[0] if registered else ():
        name = os.path.basename(os.path.normpath(path))
        if _NAME.fullmatch(name) and name not in roots:
            roots[name] = path
    return roots


def dump_folder(node: str, input_name: str, text: str) -> str:
    """A dump folder: `<registered name>/<path>` in a registered dump folder, else `<path>` under ComfyUI's
    output folder. Returns the absolute folder (not created)."""
    parts = relative_parts(node, input_name, text)
    roots = dump_roots()
    if parts[0] in roots:
        return confine(node, input_name, roots[parts[0]], parts[1:], f"the registered dump folder {parts[0]!r}")
    return confine(node, input_name, folder_paths.get_output_directory(), parts, "ComfyUI's output folder")


def in_dump_roots(folder) -> bool:
    """Whether `folder` (an absolute path from a file, e.g. a features index's dump) lies, with links resolved,
    inside ComfyUI's output folder or a dump folder the server's owner registered: the folders a dump node
    may write to, and so the only ones the pack reads a dump's images from."""
    if not isinstance(folder, str) or not os.path.isabs(folder) or "\0" in folder:
        return False
    real = os.path.realpath(folder)
    for root in (folder_paths.get_output_directory(), *dump_roots().values()):
        base = os.path.realpath(root)
        if os.path.commonpath([base, real]) == base:
            return True
    return False


def input_file(node: str, input_name: str, text: str, suffixes: tuple[str, ...]) -> str:
    """An existing file under ComfyUI's input folder, with one of `suffixes`."""
    path = confine(node, input_name, folder_paths.get_input_directory(), relative_parts(node, input_name, text),
                   "ComfyUI's input folder")
    if not path.lower().endswith(suffixes):
        raise NodeInputError(node, f"{input_name} {excerpt(text)} is not a {' or '.join(suffixes)} file")
    if not os.path.isfile(path):
        raise NodeInputError(node, f"{input_name} {excerpt(text)} is not a file in ComfyUI's input folder")
    return path


def input_files(suffixes: tuple[str, ...], limit: int = 2000) -> list[str]:
    """Files under ComfyUI's input folder with one of `suffixes`, as relative '/' paths (for a file chooser)."""
    root = os.path.realpath(folder_paths.get_input_directory())
    found: list[str] = []
    for dirpath, dirnames, files in os.walk(root):  # links to folders are not followed
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            if not f.lower().endswith(suffixes) or f.startswith("."):
                continue
            if os.path.commonpath([root, os.path.realpath(path)]) != root:
                continue  # a link out of the folder would be refused when read: do not offer it
            found.append(os.path.relpath(path, root).replace(os.sep, "/"))
            if len(found) >= limit:
                return found
    return found


def output_prefix(node: str, input_name: str, prefix: str, create: bool = True) -> tuple[str, str, int] | None:
    """A file name prefix under ComfyUI's output folder, as SaveImage takes it (subfolders, and ComfyUI's
    `%year%`-style variables in the file name): (folder, file name, next free counter). The folder is
    confined before ComfyUI's get_save_image_path creates it; with `create=False` only checked."""
    text = (prefix or "").strip()
    head, _, tail = text.rpartition("/")
    parts = relative_parts(node, input_name, f"{head}/{_PREFIX_VARS.sub('0', tail)}" if head else
                           _PREFIX_VARS.sub("0", tail))
    out = os.path.realpath(folder_paths.get_output_directory())
    confine(node, input_name, out, parts[:-1], "ComfyUI's output folder")
    if not create:
        return None
    folder, name, counter, _, _ = folder_paths.get_save_image_path("/".join([*parts[:-1], tail.strip()]), out)
    return folder, name, counter
