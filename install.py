"""Run by ComfyUI Manager after it clones the pack (and safe to run by hand any number of times).

Installs requirements.txt with the interpreter that runs ComfyUI. torch is never installed, upgraded
or downgraded: ComfyUI's own torch (CUDA, ROCm, MPS or CPU build) is kept as it is.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    reqs = [ln.split("#")[0].strip() for ln in lines]
    return [r for r in reqs if r and _name(r) not in TORCH_PACKAGES]


def _name(req: str) -> str:
    for sep in "<>=!~;[ ":
        req = req.split(sep)[0]
    return req.strip().lower()


def main() -> int:
    if importlib.util.find_spec("torch") is None:
        print(
            "[comfyui-sae-unbox] torch is not installed in this Python "
            f"({sys.executable}); install ComfyUI's requirements first. Nothing was installed.",
            file=sys.stderr,
        )
        return 1
    reqs = requirements()
    import torch  # noqa: F401  (only to record the version we must keep)

    keep = f"torch=={torch.__version__.split('+')[0]}"
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *reqs]
    # A constraint pins torch at the version already installed, so no requirement can move it.
    with tempfile.TemporaryDirectory() as tmp:
        constraint = Path(tmp) / "keep-torch.txt"
        constraint.write_text(f"{keep}\n")
        result = subprocess.run(cmd + ["-c", str(constraint)])
    if result.returncode != 0:
        print(
            f"[comfyui-sae-unbox] installing {', '.join(reqs)} failed (pip exit code {result.returncode}); "
            "see pip's output above.",
            file=sys.stderr,
        )
        return result.returncode
    print("[comfyui-sae-unbox] requirements are installed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
