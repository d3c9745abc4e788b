"""Run by ComfyUI Manager after it clones the pack (and safe to run by hand any number of times).

Installs what requirements.txt lists and is missing, with the interpreter that runs ComfyUI. torch,
torchvision and torchaudio are never installed, upgraded or downgraded: ComfyUI's own builds are kept
(they are pinned at their installed versions for the one pip call, so no dependency can move them).
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")


def _name(req: str) -> str:
    for sep in "<>=!~;[ @":
        req = req.split(sep)[0]
    return req.strip().lower().replace("_", "-")


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    reqs = [ln.split("#")[0].strip() for ln in lines]
    return [r for r in reqs if r and _name(r) not in TORCH_PACKAGES]


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _missing(reqs: list[str]) -> list[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: treat a requirement as met when its distribution is installed
        return [r for r in reqs if _installed(_name(r)) is None]
    out = []
    for r in reqs:
        req = Requirement(r)
        have = _installed(req.name)
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            out.append(r)
    return out


def main() -> int:
    if _installed("torch") is None:
        print(f"[comfyui-sae-unbox] torch is not installed in this Python ({sys.executable}); "
              "install ComfyUI's requirements first. Nothing was installed.", file=sys.stderr)
        return 1
    todo = _missing(requirements())
    if not todo:
        print("[comfyui-sae-unbox] requirements are installed.")
        return 0
    keep = [f"{p}=={v}" for p in TORCH_PACKAGES if (v := _installed(p))]
    with tempfile.TemporaryDirectory() as tmp:
        constraint = Path(tmp) / "keep-torch.txt"
        constraint.write_text("\n".join(keep) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *todo, "-c", str(constraint)]
        result = subprocess.run(cmd)
    if result.returncode != 0:
        print(f"[comfyui-sae-unbox] installing {', '.join(todo)} failed (pip exit code {result.returncode}); "
              "see pip's output above.", file=sys.stderr)
        return result.returncode
    print("[comfyui-sae-unbox] requirements are installed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
