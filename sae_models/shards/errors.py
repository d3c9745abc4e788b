"""Errors of the activation dumps."""

from __future__ import annotations

from ..errors import SAEError


class DumpFormatError(SAEError, ValueError):
    """A folder is not an activation dump, or does not agree with what a writer wants to put in it."""

    def __init__(self, path, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


class DumpWriteError(SAEError, OSError):
    """Writing to a dump folder failed (folder not writable, disk full, ...). `errno` is the cause's."""

    def __init__(self, path, message: str, errno: int | None = None):
        OSError.__init__(self, errno if errno is not None else 0, f"{path}: {message}")
        self.path = str(path)
        self.reason = message

    def __str__(self):
        return f"{self.path}: {self.reason}"
