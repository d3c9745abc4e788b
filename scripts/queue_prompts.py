"""Queue a dump workflow once per prompt of a text file on one or more running ComfyUI servers.

    python scripts/queue_prompts.py prompts.txt [--workflow a dump workflow, default: the dump example] \
        --server http://127.0.0.1:8188 [--server http://other:8188 ...] --dump-dir ComfyUI/output/sae_dumps/sdxl_turbo

Line i of the file (blank lines and '#' lines skipped) becomes one prompt with seed `--seed-base + i`: the
workflow's SAE Prompt List node is set to that prompt and seed, so each queued job carries only its own
prompt. With `--dump-dir`, prompts whose image is already recorded in the dump (same prompt and seed) are
skipped, so an interrupted job resumes where it stopped. Each server keeps at most `--max-pending` jobs in
its queue; when all are done the last rows are committed by the dump node (its default commits when the
queue runs empty). Several servers (or machines sharing the dump folder) each write their own shards.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import uuid
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from example_names import example_path  # noqa: E402
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from workflow_api import ui_to_api  # noqa: E402

from sae_models.shards import done_images  # noqa: E402


def read_prompt_file(path: str) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def load_api_workflow(path: str, server: str) -> dict:
    """The workflow in API format (UI-format files are converted with the server's /object_info)."""
    wf = json.loads(Path(path).read_text())
    if "nodes" in wf:
        info = requests.get(f"{server}/object_info", timeout=60)
        info.raise_for_status()
        wf = ui_to_api(wf, info.json())
    if not any(n.get("class_type") == "UnboxPromptList" for n in wf.values()):
        raise SystemExit(f"{path}: the workflow has no SAE Prompt List node to set the prompt on")
    return wf


def job(workflow: dict, prompt: str, seed: int) -> dict:
    wf = copy.deepcopy(workflow)
    for node in wf.values():
        if node.get("class_type") == "UnboxPromptList":
            node["inputs"].update(prompts=prompt, file="", index=0, seed_base=seed)
    return wf


class Server:
    def __init__(self, url: str, max_pending: int):
        self.url = url.rstrip("/")
        self.max_pending = max_pending
        self.pending: dict[str, tuple[int, str]] = {}  # prompt_id -> (line, prompt)

    def submit(self, wf: dict, line: int, prompt: str) -> None:
        r = requests.post(f"{self.url}/prompt", json={"prompt": wf, "client_id": uuid.uuid4().hex}, timeout=60)
        if r.status_code != 200:
            raise SystemExit(f"{self.url} refused the workflow for line {line + 1}: {r.text}")
        self.pending[r.json()["prompt_id"]] = (line, prompt)

    def poll(self) -> list[tuple[int, str, str | None]]:
        """Finished jobs as (line, prompt, error or None)."""
        done = []
        for pid in list(self.pending):
            entry = requests.get(f"{self.url}/history/{pid}", timeout=60).json().get(pid)
            if entry is None:
                continue
            line, prompt = self.pending.pop(pid)
            status = entry.get("status", {})
            error = None
            if status.get("status_str") == "error":
                msgs = [d for e, d in status.get("messages", []) if e == "execution_error"]
                error = msgs[0].get("exception_message", "failed") if msgs else "failed"
            done.append((line, prompt, error))
        return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", help="text file, one prompt a line")
    ap.add_argument("--workflow", default=str(example_path("dump")))
    ap.add_argument("--server", action="append", help="ComfyUI server URL (repeat for several)")
    ap.add_argument("--dump-dir", help="the dump folder, to skip prompts already dumped")
    ap.add_argument("--seed-base", type=int, default=0)
    ap.add_argument("--max-pending", type=int, default=2, help="jobs queued per server at once")
    ap.add_argument("--keep-going", action="store_true", help="go on after a failed job")
    args = ap.parse_args(argv)
    servers = [Server(u, args.max_pending) for u in (args.server or ["http://127.0.0.1:8188"])]

    prompts = read_prompt_file(args.prompts)
    todo = list(enumerate(prompts))
    if args.dump_dir and Path(args.dump_dir, "manifest.json").exists():
        done = {(r.get("prompt"), r.get("seed")) for r in done_images(args.dump_dir)}
        todo = [(i, p) for i, p in todo if (p, args.seed_base + i) not in done]
    print(f"{len(prompts)} prompts, {len(prompts) - len(todo)} already dumped, {len(todo)} to queue "
          f"on {len(servers)} server(s)", flush=True)
    if not todo:
        return 0
    workflow = load_api_workflow(args.workflow, servers[0].url)
    failed, finished = 0, 0
    queue = list(todo)
    while queue or any(s.pending for s in servers):
        for s in servers:
            while queue and len(s.pending) < s.max_pending:
                line, prompt = queue.pop(0)
                s.submit(job(workflow, prompt, args.seed_base + line), line, prompt)
        time.sleep(0.2)
        for s in servers:
            for line, prompt, error in s.poll():
                finished += 1
                if error:
                    failed += 1
                    print(f"[{finished}/{len(todo)}] line {line + 1} FAILED on {s.url}: {error}", flush=True)
                    if not args.keep_going:
                        queue.clear()
                else:
                    print(f"[{finished}/{len(todo)}] line {line + 1} done on {s.url}: {prompt[:60]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
