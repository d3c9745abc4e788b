"""Quick start: install what is missing and run the explore workflow headlessly through ComfyUI.

Run it where ComfyUI Manager or `git clone` put the pack (`ComfyUI/custom_nodes/<pack>`):

    python scripts/quickstart.py                 # starts ComfyUI, runs the explore example workflow
    python scripts/quickstart.py --download      # first fetch the missing model files (resumable, verified)
    python scripts/quickstart.py --model flux-schnell --download   # FLUX.1-schnell and the paper's FLUX SAE
    python scripts/quickstart.py --server http://127.0.0.1:8188   # use a ComfyUI that is already running

The image, the heatmaps and the top-features JSON land in ComfyUI's output folder (sae_explore/,
sae_flux_explore/, sae_base_paint/).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK = HERE.parent
sys.path.insert(0, str(HERE))

from model_files import (  # noqa: E402
    CHECKPOINT_URL, HF, MODELS, SAE_BASE_URL, WORKFLOW_OF, DownloadError, download, missing_files, required_files,
)
from example_names import example_path  # noqa: E402
from workflow_api import ui_to_api  # noqa: E402


def find_comfyui(explicit: str | None) -> Path | None:
    for candidate in (explicit, os.environ.get("COMFYUI_PATH"), str(PACK.parent.parent)):
        if candidate and (Path(candidate) / "main.py").is_file():
            return Path(candidate).resolve()
    return None


def _get(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, payload: dict, timeout: float = 30):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        raise RuntimeError(f"ComfyUI refused the workflow (HTTP {e.code}): {body}") from None


def run_workflow(server: str, workflow: dict, timeout: float = 3600, prompt_text: str | None = None) -> dict:
    """Submit a UI-format workflow to a ComfyUI server and wait for it; returns its /history entry."""
    api = ui_to_api(workflow, _get(f"{server}/object_info"))
    if prompt_text is not None:
        for node in api.values():
            if node["class_type"] == "CLIPTextEncode" and node["inputs"].get("text"):
                node["inputs"]["text"] = prompt_text
                break
            if node["class_type"] == "CLIPTextEncodeFlux" and node["inputs"].get("t5xxl"):
                node["inputs"]["t5xxl"] = prompt_text
                break
    client_id = uuid.uuid4().hex
    prompt_id = _post(f"{server}/prompt", {"prompt": api, "client_id": client_id})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = _get(f"{server}/history/{prompt_id}")
        entry = history.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            status = entry["status"]
            if status.get("status_str") == "error":
                messages = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                detail = messages[0].get("exception_message", "") if messages else ""
                node = messages[0].get("node_type", "?") if messages else "?"
                raise RuntimeError(f"the workflow failed in {node}: {detail}")
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"the workflow did not finish within {timeout:.0f} s")


def output_files(entry: dict) -> list[str]:
    files = []
    for out in entry.get("outputs", {}).values():
        for img in out.get("images", []):
            if img.get("type") == "output":
                files.append(os.path.join(img.get("subfolder", ""), img["filename"]))
    return files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(comfyui: Path, extra_args: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch", *extra_args]
    print("starting ComfyUI:", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=comfyui)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {proc.returncode} while starting")
        try:
            _get(f"{url}/system_stats", timeout=2)
            return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    proc.terminate()
    raise RuntimeError("ComfyUI did not start within 300 s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH, else the folder holding custom_nodes/)")
    ap.add_argument("--server", help="URL of a running ComfyUI; default: start one")
    ap.add_argument("--download", action="store_true", help="download missing model files from Hugging Face")
    ap.add_argument("--models-dir", help="models folder to check (default: <ComfyUI>/models)")
    ap.add_argument("--model", choices=MODELS, default="sdxl-turbo",
                    help="which model's files to check and which example workflow to run (default sdxl-turbo)")
    ap.add_argument("--checkpoint-url", default=CHECKPOINT_URL)
    ap.add_argument("--sae-base-url", default=SAE_BASE_URL)
    ap.add_argument("--hf-url", default=HF, help="Hugging Face, or a mirror of the same repos (SDXL base, FLUX)")
    ap.add_argument("--workflow", help="UI-format workflow to run (default: the model's example workflow)")
    ap.add_argument("--prompt", help="replace the workflow's prompt")
    ap.add_argument("--no-install", action="store_true", help="skip installing the pack's requirements")
    ap.add_argument("--skip-model-check", action="store_true", help="do not look for the model files")
    ap.add_argument("--no-run", action="store_true", help="stop after checking (and downloading) the model files")
    ap.add_argument("comfy_args", nargs="*", help="extra arguments for ComfyUI's main.py (after --), e.g. --cpu")
    args = ap.parse_args(argv)

    comfyui = find_comfyui(args.comfyui)
    if not args.no_install:
        rc = subprocess.call([sys.executable, str(PACK / "install.py")])
        if rc:
            return rc
    if not args.skip_model_check:
        models = Path(args.models_dir) if args.models_dir else (comfyui / "models" if comfyui else None)
        if models is None:
            print("error: ComfyUI not found; pass --comfyui PATH or --models-dir PATH", file=sys.stderr)
            return 2
        missing = missing_files(required_files(models, args.checkpoint_url, args.sae_base_url, model=args.model,
                                               hf=args.hf_url.rstrip("/")))
        if missing and not args.download:
            print("These model files are missing (put each file where shown, or run again with --download):",
                  file=sys.stderr)
            for f in missing:
                print("  " + f.describe(), file=sys.stderr)
            return 2
        for f in missing:
            try:
                download(f.url, f.dest)
            except DownloadError as e:
                print(f"error: {e}", file=sys.stderr)
                return 3
    if args.no_run:
        print("the model files are in place")
        return 0
    proc = None
    server = args.server
    try:
        if server is None:
            if comfyui is None:
                print("error: ComfyUI not found; pass --comfyui PATH or --server URL", file=sys.stderr)
                return 2
            proc, server = start_server(comfyui, args.comfy_args)
        workflow = json.loads(Path(args.workflow or example_path(WORKFLOW_OF[args.model])).read_text())
        entry = run_workflow(server.rstrip("/"), workflow, prompt_text=args.prompt)
        files = output_files(entry)
        print(f"done: {len(files)} images in ComfyUI's output folder")
        for f in files:
            print("  " + f)
        for out in entry.get("outputs", {}).values():
            for text in out.get("text", []):
                if text.lstrip().startswith("{"):
                    top = json.loads(text)
                    best = ", ".join(f"#{x['feature']}" for x in top["features"][:5])
                    print(f"  top features of {top['block']}: {best}")
        return 0
    except (RuntimeError, TimeoutError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
