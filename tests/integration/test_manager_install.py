"""Installing the pack the way ComfyUI-Manager does never moves torch, torchvision or torchaudio.

Runs the REAL `cm-cli install <git URL>` of comfyui-manager (and `comfy node install` where comfy-cli is
there) on a copy of the ComfyUI checkout, in a throw-away virtual environment that sees this
interpreter's packages (torch included) through a .pth file instead of installing its own torch
(a venv with torch is ~5.5 GB and minutes). Then checks that torch/torchvision/torchaudio are the same
distributions (version, location, RECORD hash, size and mtime of every file they own), that the
environment did not get a torch of its own, and that ComfyUI's custom-node loader loads the installed pack.

The ComfyUI checkout is found like the other integration tests' (tests/support/comfyui_locate.py).
`comfyui-manager` and `comfy-cli` are taken from this interpreter when it has them, else installed
($SAE_TEST_MANAGER_SPEC, default comfyui-manager==4.3; $SAE_TEST_COMFY_CLI_SPEC, default comfy-cli==1.23.0)
into the throw-away venv from the package index; the test skips only when that index cannot be reached. The install itself runs offline (PIP_NO_INDEX=1): every requirement of
the pack is already there, so nothing is downloaded, and a regression cannot start a multi-GB download.
Note: cm-cli exits 0 even when an install fails (its --exit-on-fail is not wired up in 4.3), so the
assertions read its output and the file system instead of its exit status.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from comfyui_locate import find_comfyui

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

PACK = "comfyui-sae-unbox"
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")
INSTALL_FILES = ("requirements.txt", "install.py", "pyproject.toml")
MANAGER_SPEC = os.environ.get("SAE_TEST_MANAGER_SPEC", "comfyui-manager==4.3")
COMFY_CLI_SPEC = os.environ.get("SAE_TEST_COMFY_CLI_SPEC", "comfy-cli==1.23.0")

# Run in the throw-away venv's interpreter: what the pack's installers see of the torch family.
FINGERPRINT = textwrap.dedent(
    """
    import hashlib, importlib.metadata as md, json, os, sys
    out = {}
    for name in sys.argv[1:]:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            out[name] = None
            continue
        base = dist.locate_file("")
        h = hashlib.sha256()
        for f in sorted(dist.files or [], key=str):
            if "__pycache__" in f.parts:
                continue
            p = dist.locate_file(f)
            try:
                st = os.stat(p)
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\\n".encode())
            except FileNotFoundError:
                h.update(f"{f}|missing\\n".encode())
        record = dist.read_text("RECORD") or ""
        out[name] = {"version": dist.version, "location": os.path.realpath(str(base)),
                     "record_sha256": hashlib.sha256(record.encode()).hexdigest(), "files_sha256": h.hexdigest()}
    print(json.dumps(out))
    """
)

LOAD_PACK = textwrap.dedent(
    """
    import asyncio, os, sys
    comfy, pack = sys.argv[1], sys.argv[2]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy)
    os.chdir(comfy)
    import comfy.options
    comfy.options.enable_args_parsing()
    import utils.extra_config  # noqa: F401  (as main.py does, before `nodes`)
    import nodes
    ok = asyncio.run(nodes.load_custom_node(pack))
    mine = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                  if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(os.path.basename(pack)))
    print("LOADED" if ok else "FAILED", ",".join(mine))
    sys.exit(0 if ok and mine else 1)
    """
)

# ComfyUI-Manager's startup batch resolver (config `use_unified_resolver = True`) collects node-pack
# requirements with an EMPTY blacklist (prestartup_script.py) and then `uv pip install`s the latest
# versions: a torch line in requirements.txt would replace torch there. Collect only (offline).
UNIFIED_COLLECT = textwrap.dedent(
    """
    import json, os, sys
    from comfyui_manager.common.unified_dep_resolver import UnifiedDepResolver, collect_base_requirements
    r = UnifiedDepResolver(node_pack_paths=[sys.argv[1]], base_requirements=collect_base_requirements(os.environ["COMFYUI_PATH"]),
                           blacklist=set(), overrides={}, downgrade_blacklist=[])
    print(json.dumps([q.name for q in r.collect_requirements().requirements]))
    """
)


def _run(cmd, env=None, timeout=600, cwd=None):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def _clean(output: str) -> str:
    """cm-cli's output without git's progress bars."""
    return "\n".join(ln for ln in output.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln)


def _offline_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1", GIT_TERMINAL_PROMPT="0",
               DO_NOT_TRACK="1", COLUMNS="10000")  # COLUMNS: rich (cm-cli's print) wraps lines at 80 otherwise
    env.update(extra)
    return env


def _fingerprint(python: Path) -> dict:
    out = _run([python, "-c", FINGERPRINT, *TORCH_FAMILY], env=_offline_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def comfy_checkout() -> Path:
    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """A throw-away venv that sees this interpreter's site-packages (torch, ComfyUI's requirements) via a .pth."""
    try:
        md.version("torch")
    except md.PackageNotFoundError:
        pytest.skip("torch is not installed in this interpreter")
    root = tmp_path_factory.mktemp("mgr-venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    child_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    parent_sites = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                              *site.getsitepackages()]) if Path(p).is_dir()]
    # After the venv's own site-packages: the venv's pip wins, everything else comes from here.
    (child_site / "_sae_parent_env.pth").write_text("".join(f"{p}\n" for p in parent_sites))
    for module, spec in (("cm_cli", MANAGER_SPEC), ("comfy_cli", COMFY_CLI_SPEC)):
        if _run([python, "-c", f"import {module}"], env=_offline_env()).returncode != 0:
            env = {k: v for k, v in os.environ.items() if k != "PIP_NO_INDEX"}
            got = _run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", spec], env=env,
                       timeout=600)
            if got.returncode != 0:  # no package index reachable: the one thing that may skip this test
                pytest.skip(f"could not install {spec}: {got.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture
def comfy_copy(comfy_checkout, tmp_path) -> Path:
    """cm-cli writes into custom_nodes/ and user/__manager/: never into the shared checkout."""
    dest = tmp_path / "ComfyUI"
    shutil.copytree(comfy_checkout, dest, symlinks=True)
    shutil.rmtree(dest / "custom_nodes" / PACK, ignore_errors=True)
    return dest


@pytest.fixture
def pack_url(tmp_path) -> str:
    """A git repository of the pack (HEAD plus the working tree's install files), as a URL cm-cli accepts.

    cm-cli only takes URLs with a host (urlparse netloc), so file:///path is refused as an unknown node
    name while file://localhost/path is cloned by git like any remote."""
    src = tmp_path / "src" / PACK
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(src)], check=True, timeout=120)
    for name in INSTALL_FILES:
        shutil.copy2(REPO_ROOT / name, src / name)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "--quiet",
                    "--allow-empty", "-am", "working tree install files"], cwd=src, check=True, timeout=60)
    return f"file://localhost{src}"


def _assert_installed_and_torch_kept(python, comfy, output, before):
    installed = comfy / "custom_nodes" / PACK
    assert "[INSTALLED] file://localhost" in output, output[-4000:]
    assert (installed / "requirements.txt").is_file(), output[-4000:]
    assert "[comfyui-sae-unbox] requirements are installed." in output, output[-4000:]  # install.py ran and passed
    assert "install script failed" not in output, output[-4000:]
    executed = [ln for ln in output.splitlines() if "EXECUTE =>" in ln]
    assert not any(f"'{name}" in ln for ln in executed for name in TORCH_FAMILY), executed
    after = _fingerprint(python)
    assert after == before, f"torch family changed:\nbefore {before}\nafter  {after}"
    assert before["torch"] is not None
    for name, info in after.items():  # no copy of its own in the throw-away venv shadows the real one
        if info is not None:
            assert not info["location"].startswith(str(Path(python).parents[1])), (name, info)
    return installed


def _assert_pack_loads_and_has_no_torch_requirement(python, comfy, installed):
    loaded = _run([python, "-c", LOAD_PACK, comfy, installed], env=_offline_env(), timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.startswith("LOADED"), loaded.stdout + loaded.stderr[-3000:]
    collected = _run([python, "-c", UNIFIED_COLLECT, installed], timeout=120,
                     env=_offline_env(COMFYUI_PATH=str(comfy), PYTHONPATH=str(comfy)))
    assert collected.returncode == 0, collected.stderr[-3000:]
    names = json.loads(collected.stdout.strip().splitlines()[-1])
    assert not set(names) & set(TORCH_FAMILY), names
    report = installed.parent.parent / "pip-report.json"
    dry = _run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", report, "-r",
                installed / "requirements.txt"], env=_offline_env(), timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert json.loads(report.read_text())["install"] == []


def test_cm_cli_git_url_install_keeps_torch(venv_python, comfy_copy, pack_url):
    before = _fingerprint(venv_python)
    result = _run([venv_python, "-m", "cm_cli", "install", pack_url], timeout=900,
                  env=_offline_env(COMFYUI_PATH=str(comfy_copy)))
    output = _clean(result.stdout + result.stderr)
    assert result.returncode == 0, output[-4000:]
    installed = _assert_installed_and_torch_kept(venv_python, comfy_copy, output, before)
    _assert_pack_loads_and_has_no_torch_requirement(venv_python, comfy_copy, installed)


def test_comfy_cli_node_install_keeps_torch(venv_python, comfy_copy, pack_url, tmp_path):
    comfy_bin = Path(venv_python).parent / "comfy"
    if not comfy_bin.exists():  # comfy-cli came through the .pth: its console script lives beside sys.executable
        comfy_bin = Path(sys.executable).parent / "comfy"
    home = tmp_path / "home"  # comfy-cli keeps its config in ~/.config/comfy-cli
    (home / ".config").mkdir(parents=True)
    pip_conf = Path.home() / ".config" / "pip"
    if pip_conf.is_dir():
        shutil.copytree(pip_conf, home / ".config" / "pip")
    before = _fingerprint(venv_python)
    env = _offline_env(HOME=str(home), VIRTUAL_ENV=str(Path(venv_python).parents[1]))
    env.pop("COMFYUI_PATH", None)
    result = _run([venv_python, comfy_bin, "--workspace", comfy_copy, "--skip-prompt", "--no-json", "node", "install",
                   pack_url], env=env, timeout=900)
    output = _clean(result.stdout + result.stderr)
    assert result.returncode == 0, output[-4000:]
    installed = _assert_installed_and_torch_kept(venv_python, comfy_copy, output, before)
    _assert_pack_loads_and_has_no_torch_requirement(venv_python, comfy_copy, installed)
