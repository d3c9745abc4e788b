"""Python imports this module at start-up when its folder is on PYTHONPATH (tests only). With
$SAE_TEST_OPEN_WATCH and $SAE_TEST_OPEN_LOG set, every file or folder the process opens or lists under the
watched folder (also through a symbolic link) is written to the log, one `event path` line each (Python's audit events, PEP 578)."""

import os
import sys

_WATCH = os.environ.get("SAE_TEST_OPEN_WATCH")
_LOG = os.environ.get("SAE_TEST_OPEN_LOG")
_EVENTS = ("open", "os.listdir", "os.scandir")

if _WATCH and _LOG:

    def _record(event, args):
        if event not in _EVENTS or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(args[0]))  # where a link leads (lstat and readlink are not audited)
        if path.startswith(_WATCH):
            fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # the log lies outside _WATCH
            try:
                os.write(fd, f"{event} {path}\n".encode("utf-8", "replace"))
            finally:
                os.close(fd)

    sys.addaudithook(_record)
