"""Every example workflow, executed through a real ComfyUI server's HTTP API.

The workflows are converted from their UI format with the server's /object_info; the checkpoint loader
is swapped for the tiny SDXL model of tests/support (SDXL Turbo's weights are not available here) and
the paper's four SAE folders are written, in the release's exact layout, at the tiny model's width.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from model_files import PAPER_SAE_FOLDERS  # noqa: E402
from workflow_api import ui_to_api  # noqa: E402

from paper_release import write_paper_release  # noqa: E402  (tests/support)

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def server(comfy_server):
    for i, folder in enumerate(PAPER_SAE_FOLDERS.values()):
        write_paper_release(comfy_server.sae_dir / folder, seed=i)
    return comfy_server


def swap_loader(api: dict) -> dict:
    for node in api.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = "TinySDXLCheckpointLoader"
            node["inputs"] = {"ckpt_name": "tiny", "seed": 0}
    return api


def to_api(server, path: Path, **text) -> dict:
    api = swap_loader(ui_to_api(json.loads(path.read_text()), server.object_info()))
    for node in api.values():
        if node["class_type"] == "CLIPTextEncode" and node["inputs"]["text"] and "prompt" in text:
            node["inputs"]["text"] = text["prompt"]
    return api


def saved(server, entry) -> dict[str, list[Path]]:
    """Files each node saved to the output folder, by node id."""
    out = {}
    for node_id, o in entry["outputs"].items():
        files = [server.output_dir / i["subfolder"] / i["filename"] for i in o.get("images", []) if i["type"] == "output"]
        if files:
            out[node_id] = files
    return out


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


NAMES = {"explore", "paint", "feature_icon", "ablate", "reconstruct", "dump", "train"}
DUMP = "sae_dumps/sdxl_turbo"  # the dump workflow's folder, under the output folder
PROMPTS = ["a red bicycle leaning on a wall", "a bowl of ramen, top view", "a snowy mountain at dusk"]


def test_every_example_workflow_is_covered():
    assert {p.stem for p in WORKFLOWS} == NAMES


def dump_records(server) -> list[dict]:
    return [json.loads(line) for f in sorted((server.output_dir / DUMP / "images").glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def queue_prompts(server, prompt_file: Path) -> subprocess.CompletedProcess:
    """scripts/queue_prompts.py over a prompt file, with the dump workflow (tiny model swapped in)."""
    wf = swap_loader(ui_to_api(json.loads((ROOT / "example_workflows" / "dump.json").read_text()),
                               server.object_info()))
    api_file = prompt_file.with_suffix(".api.json")
    api_file.write_text(json.dumps(wf))
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "queue_prompts.py"), str(prompt_file), "--workflow", str(api_file),
         "--server", server.url, "--dump-dir", str(server.output_dir / DUMP), "--seed-base", "100"],
        capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def dumped(server, tmp_path_factory):
    """The dump workflow queued over three prompts by scripts/queue_prompts.py."""
    prompt_file = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompt_file.write_text("# three prompts\n" + "\n".join(PROMPTS) + "\n")
    result = queue_prompts(server, prompt_file)
    assert result.returncode == 0, result.stdout + result.stderr
    return prompt_file, result


def test_sae_folders_are_listed_by_load_sae(server):
    options = server.object_info()["UnboxLoadSAE"]["input"]["required"]["sae_name"]
    names = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert set(PAPER_SAE_FOLDERS.values()) <= set(names)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs(server, path, request):
    if path.stem == "train":
        request.getfixturevalue("dumped")  # train on the dump workflow's output
    entry = server.run(to_api(server, path), timeout=600)
    if path.stem == "dump":  # writes shards and images into the dump folder, no SaveImage
        rec = [r for r in dump_records(server) if r["seed"] == 0]
        assert rec and rec[0]["prompt"] == "a photo of a cat sleeping on a sofa"
        assert (server.output_dir / DUMP / rec[0]["file"]).is_file()
        for block in PAPER_SAE_FOLDERS:
            assert list((server.output_dir / DUMP / block).glob("*.safetensors")), block
        return
    files = [f for fs in saved(server, entry).values() for f in fs]
    assert files and all(f.is_file() for f in files)
    by_prefix = {f.parent.name + "/" + f.name.split("_0")[0]: f for f in files}
    if path.stem == "explore":
        blocks = set(PAPER_SAE_FOLDERS)
        jsons = sorted((server.output_dir / "sae_explore").glob("top_features_*.json"))
        seen = {json.loads(p.read_text())["block"] for p in jsons}
        assert seen == blocks
        assert {f"sae_explore/top_{b}" for b in blocks} <= set(by_prefix)
        assert "sae_explore/heatmap" in by_prefix and "sae_explore/image" in by_prefix
        top = json.loads(jsons[-1].read_text())
        assert top["grid"] == [16, 16] and 1 <= len(top["features"]) <= 9
        means = [f["mean_activation"] for f in top["features"]]
        assert means == sorted(means, reverse=True) and means[0] > 0
    if path.stem == "train":
        top = json.loads(sorted((server.output_dir / "sae_train").glob("top_features_*.json"))[-1].read_text())
        assert top["block"] == "up.0.1" and top["features"]
    if path.stem in ("paint", "reconstruct", "train"):
        pre = f"sae_{path.stem}/"
        original = pixels(by_prefix[pre + "original"])
        other = pixels(by_prefix[pre + ("reconstructed" if path.stem == "reconstruct" else "steered")])
        assert np.abs(original - other).max() > 0
        if path.stem == "paint":  # painted inside the central square only: the far corners barely move
            corner = np.abs(original - other)[:64, :64].mean()
            centre = np.abs(original - other)[192:320, 192:320].mean()
            assert centre > corner


def test_queue_prompts_dumps_each_prompt_once_and_resumes(server, dumped):
    prompt_file, first = dumped
    mine = {r["prompt"]: r for r in dump_records(server) if r["prompt"] in PROMPTS}
    assert set(mine) == set(PROMPTS)
    assert [mine[p]["seed"] for p in PROMPTS] == [100, 101, 102]  # seed base + line index
    assert "0 already dumped, 3 to queue" in first.stdout
    again = queue_prompts(server, prompt_file)
    assert again.returncode == 0 and "3 already dumped, 0 to queue" in again.stdout
    assert len([r for r in dump_records(server) if r["prompt"] in PROMPTS]) == 3


def test_trained_sae_is_saved_and_listed(server, dumped):
    server.run(to_api(server, ROOT / "example_workflows" / "train.json"), timeout=900)
    assert (server.sae_dir / "my_sae_up.0.1.safetensors").is_file()
    assert (server.sae_dir / "my_sae_up.0.1.features.json").is_file()
    options = server.object_info()["UnboxLoadSAE"]["input"]["required"]["sae_name"]
    names = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert "my_sae_up.0.1.safetensors" in names


def test_caching_and_new_prompt(server):
    path = ROOT / "example_workflows" / "explore.json"
    first = server.run(to_api(server, path, prompt="a red apple"), timeout=600)
    again = server.run(to_api(server, path, prompt="a red apple"), timeout=600)
    (cached,) = [m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached"]
    assert set(cached) == set(to_api(server, path))  # an unchanged graph is served from the cache
    texts = lambda e: sorted(t for o in e["outputs"].values() for t in o.get("text", []) if t.startswith("{"))
    changed = server.run(to_api(server, path, prompt="a blue whale"), timeout=600)
    assert texts(first) and texts(changed) and texts(changed) != texts(first)


def test_templates_are_listed_and_served(server):
    import requests

    listing = requests.get(f"{server.url}/workflow_templates", timeout=30).json()
    (pack, names), = [(k, v) for k, v in listing.items() if set(v) >= {"explore"}]
    assert set(names) == NAMES
    wf = requests.get(f"{server.url}/api/workflow_templates/{pack}/explore.json", timeout=30).json()
    assert wf["nodes"] and wf["links"]
    # each has the thumbnail the Templates dialog shows (scripts/make_template_thumbnails.py)
    for name in NAMES:
        r = requests.get(f"{server.url}/api/workflow_templates/{pack}/{name}.jpg", timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg", name
        assert Image.open(io.BytesIO(r.content)).size == (640, 480), name


def test_quickstart_runs_the_explore_workflow(server, tmp_path):
    wf = json.loads((ROOT / "example_workflows" / "explore.json").read_text())
    for node in wf["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"], node["widgets_values"] = "TinySDXLCheckpointLoader", ["tiny", 0]
    swapped = tmp_path / "explore_tiny.json"
    swapped.write_text(json.dumps(wf))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--server", server.url, "--no-install",
         "--skip-model-check", "--workflow", str(swapped), "--prompt", "a lighthouse"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "sae_explore/image" in result.stdout.replace("\\", "/") and "top features of down.2.1" in result.stdout


def test_quickstart_reports_missing_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--no-install", "--models-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{tmp_path}/checkpoints/sd_xl_turbo_1.0_fp16.safetensors" in result.stderr
    assert "unet.mid_block.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001/final/state_dict.pth" in result.stderr
    assert "--download" in result.stderr
