"""install.py, as ComfyUI Manager runs it: idempotent, never moves torch, clear failure."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def run_install(folder: Path):
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # offline: nothing new
    return subprocess.run([sys.executable, str(folder / "install.py")], capture_output=True, text=True, env=env,
                          timeout=300)


def test_requirements_are_the_runtime_set_and_exclude_torch():
    sys.path.insert(0, str(ROOT))
    try:
        import install
    finally:
        sys.path.pop(0)
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert sorted(lines) == ["einops", "numpy", "pillow", "safetensors"]  # torch comes with ComfyUI
    assert sorted(install.requirements()) == ["einops", "numpy", "pillow", "safetensors"]


def test_install_is_idempotent_and_keeps_torch():
    before = torch.__version__
    for _ in range(2):
        result = run_install(ROOT)
        assert result.returncode == 0, result.stderr
        assert "requirements are installed" in result.stdout
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                         text=True)
    assert out.stdout.strip() == before


def test_install_failure_is_reported(tmp_path):
    shutil.copy(ROOT / "install.py", tmp_path / "install.py")
    (tmp_path / "requirements.txt").write_text("torch\nno-such-package-for-sae-unbox-tests\n")
    result = run_install(tmp_path)
    assert result.returncode != 0
    assert "installing no-such-package-for-sae-unbox-tests failed" in result.stderr
