"""Fixtures that run the pack inside a REAL ComfyUI checkout (found by tests/support/comfyui_locate.py).

- `comfyui_path`: the checkout, importable in this process (CPU only); skips when there is none.
- `tiny`: the `tiny_sdxl` module (tiny SDXL-architecture model, stand-in CLIP, small VAE).
- `comfy_pack`: the pack loaded by ComfyUI's own custom-node loader, plus ComfyUI's built-in extra nodes.
- `comfy_server`: a headless `main.py` server on a free port with the pack and tests/support/tiny_nodes.

Nothing from ComfyUI is imported at module level, so unit tests run without a checkout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from comfyui_locate import find_comfyui  # noqa: E402

PACK_FOLDER_NAME = "comfyui-sae-unbox"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """Tests that use the ComfyUI fixtures get the `comfyui` / `server` markers (for `-m "not server"`)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "comfy_server" in names or "comfy_server_with_frontend" in names:
            item.add_marker(pytest.mark.server)
        if "comfyui_path" in names:
            item.add_marker(pytest.mark.comfyui)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    """The ComfyUI checkout, put first on sys.path and set up for a CPU-only import."""
    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    if "comfy.model_management" in sys.modules:
        if not sys.modules["comfy.model_management"].__file__.startswith(str(path)):
            pytest.fail(f"ComfyUI was already imported from elsewhere, not from {path}")
        return path
    sys.path.insert(0, str(path))
    # The repo root is on sys.path too (pyproject's pythonpath) and its `nodes` package would shadow
    # ComfyUI's `nodes` module.
    for name in [m for m in sys.modules if m == "nodes" or m.startswith("nodes.")]:
        if not str(getattr(sys.modules[name], "__file__", "")).startswith(str(path)):
            del sys.modules[name]
    os.environ["COMFYUI_PATH"] = str(path)  # a server started later uses the same checkout
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
    # Import ComfyUI's `utils` package as main.py does: importing `nodes` puts ComfyUI/comfy/ first on
    # sys.path, after which `utils` would resolve to comfy/utils.py and some comfy_extras fail to load.
    import utils.extra_config  # noqa: F401

    return path


@pytest.fixture(scope="session")
def tiny(comfyui_path):
    """The `tiny_sdxl` module (tests/support/tiny_sdxl.py), imported once ComfyUI is importable."""
    import tiny_sdxl

    return tiny_sdxl


@dataclass
class ComfyPack:
    """The pack as ComfyUI's loader imported it, and ComfyUI's `nodes` module."""

    path: Path
    module: object  # the pack's module (sys.modules[<path-based name>])
    nodes: object  # ComfyUI's `nodes` module
    extra_nodes_failed: list = field(default_factory=list)  # comfy_extras files that did not import

    @property
    def node_class_mappings(self) -> dict:
        """All loaded nodes: core, built-in extras and the pack's."""
        return self.nodes.NODE_CLASS_MAPPINGS

    @property
    def pack_node_names(self) -> set:
        """Ids of the nodes the pack registered (through its comfy_entrypoint)."""
        prefix = self.module.__name__ + "."
        return {name for name, cls in self.nodes.NODE_CLASS_MAPPINGS.items() if cls.__module__.startswith(prefix)}

    def node(self, name: str):
        """A node class by its type name, e.g. `pack.node("KSampler")().sample(...)`."""
        return self.node_class_mappings[name]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session")
def comfy_pack(comfyui_path) -> ComfyPack:
    """Load ComfyUI's built-in extra nodes, then the pack with `nodes.load_custom_node` (as main.py does)."""
    import nodes

    extras_failed = asyncio.run(nodes.init_builtin_extra_nodes()) or []
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        ok = asyncio.run(nodes.load_custom_node(str(REPO_ROOT), ignore=set(nodes.NODE_CLASS_MAPPINGS)))
    finally:
        logging.getLogger().removeHandler(records)
    if not ok:
        pytest.fail("ComfyUI could not load the pack:\n" + "\n".join(records.lines), pytrace=False)
    module = sys.modules[str(REPO_ROOT).replace(".", "_x_")]  # the loader's module name for a folder
    return ComfyPack(REPO_ROOT, module, nodes, list(extras_failed))


class ComfyError(RuntimeError):
    """A prompt that ComfyUI rejected or that failed while executing."""


@dataclass
class ComfyServer:
    url: str
    output_dir: Path
    input_dir: Path
    sae_dir: Path  # a `sae` model folder of the server: drop SAE files here
    checkpoints_dir: Path
    log_path: Path
    process: subprocess.Popen
    root: Path  # the folder holding all of the above
    registered_dumps: dict  # dump folders registered by the server's owner: {name: folder}
    Error = ComfyError  # raised by run()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def object_info(self) -> dict:
        import requests

        r = requests.get(f"{self.url}/object_info", timeout=60)
        r.raise_for_status()
        return r.json()

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format prompt, wait for it, return its /history entry; raise ComfyError on failure."""
        import requests

        body = {"prompt": prompt, "client_id": uuid.uuid4().hex}
        r = requests.post(f"{self.url}/prompt", json=body, timeout=60)
        if r.status_code != 200:
            raise ComfyError(f"POST /prompt answered {r.status_code}: {r.text}")
        prompt_id = r.json()["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"the server exited ({self.process.returncode}):\n{self.log_tail()}")
            entry = requests.get(f"{self.url}/history/{prompt_id}", timeout=60).json().get(prompt_id)
            if entry is not None:
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    raise ComfyError(_execution_error(status))
                return entry
            time.sleep(0.2)
        requests.post(f"{self.url}/interrupt", timeout=60)  # do not leave it running for the next test
        raise ComfyError(f"prompt {prompt_id} not done after {timeout} s:\n{self.log_tail()}")


def _execution_error(status: dict) -> str:
    for event, data in status.get("messages", []):
        if event == "execution_error":
            where = f"{data.get('node_type')} (node {data.get('node_id')})"
            return f"{where}: {data.get('exception_message')}\n{''.join(data.get('traceback', []))}"
        if event == "execution_interrupted":
            return f"execution interrupted at node {data.get('node_id')}"
    return f"execution failed: {status}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(server: ComfyServer, timeout: float = 120) -> str | None:
    """None once GET /system_stats answers, else why not."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"exited ({server.process.returncode}) while starting"
        try:
            if requests.get(f"{server.url}/system_stats", timeout=5).status_code == 200:
                return None
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    return f"did not answer /system_stats within {timeout} s"


def _die_with_parent() -> None:
    """In the server process: get SIGTERM when pytest dies, even if it is killed (Linux)."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


@contextlib.contextmanager
def _serve(comfyui_path: Path, root: Path, frontend: bool, extra_args: tuple = (), extra_env: dict | None = None):
    """A headless ComfyUI server (CPU) with the pack and the tiny test nodes under `root`; stopped after.
    `extra_args` go to main.py (e.g. `--fp16-unet`), `extra_env` to its environment. A `root` used before is
    used again as it is (a restart)."""
    names = ("custom_nodes", "checkpoints", "diffusion_models", "sae", "output", "input", "temp", "user", "frontend",
             "bigdisk", "yamldisk")
    dirs = {n: root / n for n in names}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    # the frontend's first-run Templates dialog would cover the page in browser tests
    settings = dirs["user"] / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text('{"Comfy.TutorialCompleted": true}')
    # Extra dump folders, registered both ways the README gives: an environment variable and the
    # `sae_dumps` key of extra_model_paths.yaml (named by the folder's last component).
    registered = {"bigdisk": dirs["bigdisk"], "yamldisk": dirs["yamldisk"]}
    for name, target in ((PACK_FOLDER_NAME, REPO_ROOT), ("tiny_nodes", SUPPORT / "tiny_nodes")):
        if not (dirs["custom_nodes"] / name).exists():
            (dirs["custom_nodes"] / name).symlink_to(target, target_is_directory=True)
    yaml_path = root / "extra_model_paths.yaml"
    yaml_path.write_text("comfyui_sae_tests:\n" + "".join(
        f"  {key}: {dirs[key]}\n" for key in ("custom_nodes", "checkpoints", "diffusion_models", "sae"))
        + f"  sae_dumps: {dirs['yamldisk']}\n")
    port = _free_port()
    cmd = [sys.executable, str(comfyui_path / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(yaml_path),
           "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
           "--output-directory", str(dirs["output"]), "--input-directory", str(dirs["input"]),
           "--temp-directory", str(dirs["temp"]), "--user-directory", str(dirs["user"])]
    if not frontend:  # the web frontend's files are not needed to run prompts
        cmd += ["--front-end-root", str(dirs["frontend"])]
    cmd += list(extra_args)
    env = {**os.environ, "COMFYUI_PATH": str(comfyui_path), "PYTHONUNBUFFERED": "1",
           "SAE_UNBOX_DUMP_FOLDERS": f"bigdisk={dirs['bigdisk']}", **(extra_env or {})}
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=comfyui_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    server = ComfyServer(f"http://127.0.0.1:{port}", dirs["output"], dirs["input"], dirs["sae"],
                         dirs["checkpoints"], log_path, process, root, registered)
    try:
        why = _wait_until_up(server)
        if why:
            pytest.fail(f"ComfyUI server {why}; log {log_path}:\n{server.log_tail()}", pytrace=False)
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, tmp_path_factory):
    """A headless ComfyUI server (CPU, no web frontend) with the pack and the tiny test nodes."""
    with _serve(comfyui_path, tmp_path_factory.mktemp("comfy_server"), frontend=False) as server:
        yield server


@pytest.fixture(scope="session")
def start_comfy_server(comfyui_path, tmp_path_factory):
    """Start another headless server: `with start_comfy_server("--fp16-unet") as s:`; `root=` a folder of an
    earlier one to restart it on the same folders, `frontend=True` to serve the web frontend too, `env=` more
    environment variables."""

    def start(*extra_args: str, root: Path | None = None, frontend: bool = False, env: dict | None = None):
        return _serve(comfyui_path, root or tmp_path_factory.mktemp("comfy_server_args"), frontend=frontend,
                      extra_args=extra_args, extra_env=env)

    return start


@pytest.fixture(scope="session")
def comfy_server_with_frontend(comfyui_path, tmp_path_factory):
    """The same, serving ComfyUI's web frontend (for browser tests)."""
    with _serve(comfyui_path, tmp_path_factory.mktemp("comfy_frontend"), frontend=True) as server:
        yield server
