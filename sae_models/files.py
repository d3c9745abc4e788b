"""Writing files so that a crash, a full disk or an interrupt never leaves a half-written one.

Every file the library (and the pack) writes goes through `atomic_target`: the content is written to a
uniquely named temporary file in the destination folder, flushed to disk, then renamed over the
destination in one step; on any failure the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Iterator


def write_new(path, data: bytes) -> None:
    """Write `data` to `path`, which must not exist yet, and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path) -> None:
    """Flush a file or folder to disk (a folder after a rename in it, so the rename survives a power cut).
    Best effort: where a platform cannot, nothing happens."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode("utf-8", "replace"), digest_size=4).hexdigest()


def temporary_name(path) -> Path:
    """A fresh hidden name beside `path` for its temporary file: `.<name>.<host>-<pid>-<random>.tmp`, naming
    the machine (a tag of its host name) and the process that writes it, so that one left by a process that
    died can be told from one a live process is writing (`remove_stale_temporaries`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


_TEMPORARY = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary files in `folder` (not below it) that a process of this machine left when it died
    (killed while writing); returns them. Temporaries of live processes, of other machines (a shared disk) and
    files of other names are left alone. Nothing is removed where a process's life cannot be asked (Windows)."""
    if os.name != "posix":
        return []
    host, removed = _host_tag(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMPORARY.match(name)
        if m and m.group("host") == host and not _process_alive(int(m.group("pid"))):
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_target(path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer (torch.save, safetensors' save_file, ...) to fill.
    When the block ends normally the file is fsynced and renamed onto `path`; when it raises, the temporary
    file is removed and `path` is untouched. With `replace=False` an existing `path` is never overwritten
    (FileExistsError)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_path(tmp)
        if not replace and path.exists():
            raise FileExistsError(17, "exists, not overwritten", str(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path, data: bytes, *, replace: bool = True) -> Path:
    """Write `data` to `path` atomically (see `atomic_target`)."""
    with atomic_target(path, replace=replace) as tmp:
        write_new(tmp, data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def append_lines(path, text: str) -> None:
    """Append `text` (whole lines) to `path`, flush and fsync; start on a fresh line if the file does not end
    with one (a line cut short by a crash stays alone, for readers to skip)."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
            f.seek(0, os.SEEK_END)
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
