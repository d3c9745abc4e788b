"""Find a ComfyUI checkout for the integration tests (imports nothing from ComfyUI).

Order: $COMFYUI_PATH; else the cache folder ${XDG_CACHE_HOME:-~/.cache}/comfyui-sae/ComfyUI; else a
`git clone` of $COMFYUI_GIT_URL at PINNED_COMMIT into that cache folder.
`python tests/support/comfyui_locate.py` prints the path (exit 0) or why there is none (stderr, exit 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PINNED_COMMIT = "fc0cb10bcbee6e73ed3caf34c27f7bde4559a07f"  # ComfyUI v0.8.0
DEFAULT_GIT_URL = "https://github.com/comfyanonymous/ComfyUI"
CLONE_TIMEOUT_S = 120


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-sae" / "ComfyUI"


def _git(*args: str, cwd: Path | None = None, timeout: float) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, timeout=timeout, capture_output=True, text=True,
                   env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})


def _clone(url: str, dest: Path) -> str | None:
    """Clone url at PINNED_COMMIT into dest; return None on success, else one line why not."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _git("clone", "--quiet", "--no-checkout", url, str(dest), timeout=CLONE_TIMEOUT_S)
        _git("checkout", "--quiet", PINNED_COMMIT, cwd=dest, timeout=60)
        return None
    except FileNotFoundError:
        why = "git is not installed"
    except subprocess.TimeoutExpired:
        why = f"git timed out after {CLONE_TIMEOUT_S} s"
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines()
        why = f"git {e.cmd[1]} failed: {lines[-1] if lines else f'exit {e.returncode}'}"
    shutil.rmtree(dest, ignore_errors=True)
    return why


def find_comfyui() -> tuple[Path | None, str]:
    """Return (checkout, how it was found) or (None, one line saying why there is none)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if (path / "main.py").is_file():
            return path, f"COMFYUI_PATH={path}"
        return None, f"COMFYUI_PATH={env} has no main.py"
    cache = cache_path()
    if (cache / "main.py").is_file():
        return cache, f"cached checkout {cache}"
    if cache.exists() and any(cache.iterdir()):
        return None, f"{cache} exists but has no main.py; remove it or set COMFYUI_PATH"
    url = os.environ.get("COMFYUI_GIT_URL", DEFAULT_GIT_URL)
    why = _clone(url, cache)
    if why:
        return None, f"no ComfyUI checkout: cloning {url} into {cache} failed ({why}); set COMFYUI_PATH"
    return cache, f"cloned {url} at {PINNED_COMMIT[:10]} into {cache}"


if __name__ == "__main__":
    found, reason = find_comfyui()
    if found is None:
        print(reason, file=sys.stderr)
        sys.exit(1)
    print(found)
