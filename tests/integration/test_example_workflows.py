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
from example_names import TITLES, example_path  # noqa: E402
from workflow_api import ui_to_api  # noqa: E402

from model_files import FLUX_SAE_FOLDER  # noqa: E402
from paper_release import write_flux_release, write_paper_release  # noqa: E402  (tests/support)

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def server(comfy_server):
    for i, folder in enumerate(PAPER_SAE_FOLDERS.values()):
        write_paper_release(comfy_server.sae_dir / folder, seed=i)
    write_flux_release(comfy_server.sae_dir / FLUX_SAE_FOLDER, seed=7)
    return comfy_server


# The model loaders, swapped for the tiny models of tests/support (same outputs, no weights on disk).
TINY_LOADERS = {
    "CheckpointLoaderSimple": ("TinySDXLCheckpointLoader", {"ckpt_name": "tiny", "seed": 0}),
    "UNETLoader": ("TinyFluxUNETLoader", {"unet_name": "tiny", "seed": 0, "variant": "schnell"}),
    "DualCLIPLoader": ("TinyFluxDualCLIPLoader", {"seed": 0}),
    "VAELoader": ("TinyFluxVAELoader", {"seed": 0}),
}
MAX_SIDE = 256  # the 1024x1024 workflows (SDXL base, FLUX) run at 256x256 here: the CPU has 2 cores
SIZES = {"EmptyLatentImage": ("width", "height"), "EmptySD3LatentImage": ("width", "height"),
         "SolidMask": ("width", "height"), "MaskComposite": ("x", "y")}


def swap_loader(api: dict) -> dict:
    """The tiny models in place of the real loaders, and a workflow larger than MAX_SIDE scaled down whole
    (latent, painted canvas and brush alike)."""
    widest = max((n["inputs"]["width"] for n in api.values() if n["class_type"] in ("EmptyLatentImage",
                                                                                   "EmptySD3LatentImage")), default=0)
    shrink = widest // MAX_SIDE if widest > 512 else 1  # the 512x512 (SDXL Turbo) workflows run as they are
    for node in api.values():
        if node["class_type"] in TINY_LOADERS:
            node["class_type"], inputs = TINY_LOADERS[node["class_type"]]
            node["inputs"] = dict(inputs)
        for key in SIZES.get(node["class_type"], ()):
            node["inputs"][key] //= shrink
    return api


def to_api(server, path: Path, **text) -> dict:
    api = swap_loader(ui_to_api(json.loads(path.read_text()), server.object_info()))
    for node in api.values():
        if "prompt" not in text:
            break
        if node["class_type"] == "CLIPTextEncode" and node["inputs"]["text"]:
            node["inputs"]["text"] = text["prompt"]
        if node["class_type"] == "CLIPTextEncodeFlux" and node["inputs"]["t5xxl"]:
            node["inputs"]["t5xxl"] = text["prompt"]
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


NAMES = set(TITLES)  # the workflows by their keys (scripts/example_names.py names their files)
DUMP = "sae_dumps/sdxl_turbo"  # the dump workflow's folder, under the output folder
PROMPTS = ["a red bicycle leaning on a wall", "a bowl of ramen, top view", "a snowy mountain at dusk"]


def test_every_example_workflow_is_covered():
    assert {p.name for p in WORKFLOWS} == {example_path(key).name for key in NAMES}
    # each has its thumbnail for the Templates dialog
    assert all(example_path(key, ".jpg").is_file() for key in NAMES)


def dump_records(server) -> list[dict]:
    return [json.loads(line) for f in sorted((server.output_dir / DUMP / "images").glob("*.jsonl"))
            for line in f.read_text().splitlines()]


def queue_prompts(server, prompt_file: Path) -> subprocess.CompletedProcess:
    """scripts/queue_prompts.py over a prompt file, with the dump workflow (tiny model swapped in)."""
    wf = swap_loader(ui_to_api(json.loads(example_path("dump").read_text()),
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


def run(server, name: str, **text) -> tuple[dict, dict[str, Path]]:
    """Run example workflow `name` through the server: its history entry and its saved images by prefix
    (`<subfolder>/<file prefix>`)."""
    entry = server.run(to_api(server, example_path(name), **text), timeout=600)
    files = [f for fs in saved(server, entry).values() for f in fs]
    assert files and all(f.is_file() for f in files)
    return entry, {f.parent.name + "/" + f.name.split("_0")[0]: f for f in files}


def test_every_example_workflow_has_its_own_test():
    assert all(callable(globals().get(f"test_{key}_workflow")) for key in NAMES)


def test_explore_workflow(server):
    _, images = run(server, "explore")
    blocks = set(PAPER_SAE_FOLDERS)
    jsons = sorted((server.output_dir / "sae_explore").glob("top_features_*.json"))
    assert {json.loads(p.read_text())["block"] for p in jsons} == blocks
    assert {f"sae_explore/top_{b}" for b in blocks} <= set(images)
    assert "sae_explore/heatmap" in images and "sae_explore/image" in images
    top = json.loads(jsons[-1].read_text())
    assert top["grid"] == [16, 16] and 1 <= len(top["features"]) <= 9 and top["rows"] == "cond"
    means = [f["mean_activation"] for f in top["features"]]
    assert means == sorted(means, reverse=True) and means[0] > 0


def test_paint_workflow(server):
    _, images = run(server, "paint")
    change = np.abs(pixels(images["sae_paint/original"]) - pixels(images["sae_paint/steered"]))
    assert change.max() > 0
    # painted inside the central square only: the far corners barely move
    assert change[192:320, 192:320].mean() > change[:64, :64].mean()


def test_feature_icon_workflow(server):
    _, icon = run(server, "feature_icon")
    api = to_api(server, example_path("feature_icon"))
    (steer,) = [n for n in api.values() if n["class_type"] == "UnboxSteerFeatures"]
    steer["inputs"]["features"] = "1"  # another feature: another icon
    other = server.run(api, timeout=600)
    (f,) = [f for fs in saved(server, other).values() for f in fs]
    assert np.abs(pixels(icon["sae_feature_icon/feature"]) - pixels(f)).max() > 0


def firing_features(server, block: str, prompt: str, n: int = 2) -> list[int]:
    """The top features of `block` for `prompt`, from the explore workflow's ranking."""
    entry = server.run(to_api(server, example_path("explore"), prompt=prompt), timeout=600)
    for out in entry["outputs"].values():
        for text in out.get("text", []):
            ranking = json.loads(text) if text.startswith("{") else {}
            if ranking.get("block") == block:
                return [f["feature"] for f in ranking["features"][:n]]
    raise AssertionError(f"no ranking of {block}")


def test_ablate_workflow(server):
    prompt = "a red sports car on a mountain road, dramatic sky"
    _, images = run(server, "ablate")  # as shipped: features 0 and 1
    api = to_api(server, example_path("ablate"))
    (steer,) = [n for n in api.values() if n["class_type"] == "UnboxSteerFeatures"]
    steer["inputs"]["features"] = ", ".join(map(str, firing_features(server, "up.0.1", prompt)))
    entry = server.run(api, timeout=600)
    files = {f.name.split("_0")[0]: f for fs in saved(server, entry).values() for f in fs}
    # removing features that fire on this image changes it
    assert np.abs(pixels(files["original"]) - pixels(files["steered"])).max() > 0
    assert np.array_equal(pixels(files["original"]), pixels(images["sae_ablate/original"]))


def test_reconstruct_workflow(server):
    _, images = run(server, "reconstruct")
    assert np.abs(pixels(images["sae_reconstruct/original"]) - pixels(images["sae_reconstruct/reconstructed"])).max() > 0


def test_flux_explore_workflow(server):
    entry, images = run(server, "flux_explore")
    (top,) = [json.loads(t) for o in entry["outputs"].values() for t in o.get("text", []) if t.startswith("{")]
    assert top["block"] == "double.18" and top["sae"] == FLUX_SAE_FOLDER
    assert top["grid"] == [MAX_SIDE // 16, MAX_SIDE // 16]  # one token per 2x2 latent patch = 16x16 pixels
    means = [f["mean_activation"] for f in top["features"]]
    assert 1 <= len(means) <= 9 and means == sorted(means, reverse=True) and means[0] > 0
    assert {"sae_flux_explore/image", "sae_flux_explore/heatmap", "sae_flux_explore/top_double.18"} <= set(images)


def test_flux_paint_workflow(server):
    _, images = run(server, "flux_paint")
    change = np.abs(pixels(images["sae_flux_paint/original"]) - pixels(images["sae_flux_paint/steered"]))
    assert change.max() > 0
    assert change[96:160, 96:160].mean() > change[:32, :32].mean()  # inside the painted square, not the corner


def test_sdxl_base_paint_workflow(server):
    entry, images = run(server, "sdxl_base_paint")
    api = to_api(server, example_path("sdxl_base_paint"))
    (steer,) = [n for n in api.values() if n["class_type"] == "UnboxSteerFeatures"]
    assert steer["inputs"]["apply_to"] == "cond +, uncond -"
    assert {n["inputs"]["steps"] for n in api.values() if n["class_type"] == "KSampler"} == {25}
    assert {n["inputs"]["cfg"] for n in api.values() if n["class_type"] == "KSampler"} == {8.0}
    change = np.abs(pixels(images["sae_base_paint/original"]) - pixels(images["sae_base_paint/steered"]))
    assert change.max() > 0
    assert change[96:160, 96:160].mean() > change[:32, :32].mean()


def test_workbench_workflow(server):
    entry, images = run(server, "workbench")
    assert {"sae_workbench/image", "sae_workbench/top_down.2.1", "sae_workbench/concept"} <= set(images)
    texts = [json.loads(t) for o in entry["outputs"].values() for t in o.get("text", []) if t.startswith("{")]
    (top,) = [t for t in texts if "grid" in t]
    (found,) = [t for t in texts if "concept" in t]
    assert top["block"] == "down.2.1" and top["run"] and 1 <= len(top["features"]) <= 9
    assert found["block"] == "down.2.1" and found["concept"] == "a red bird" and found["features"]
    scores = [f["score"] for f in found["features"]]
    assert scores == sorted(scores, reverse=True)
    # it starts clean: the user's first image is not steered (the panel adds steer nodes at Apply)
    api = to_api(server, example_path("workbench"))
    types = {n["class_type"] for n in api.values()}
    assert "UnboxSteerFeatures" not in types and "UnboxPaintedMask" not in types
    (sampler,) = [n for n in api.values() if n["class_type"] == "KSampler"]
    assert api[sampler["inputs"]["model"][0]]["class_type"] == "UnboxProbeBlock"


def test_dump_workflow(server):
    server.run(to_api(server, example_path("dump")), timeout=600)
    rec = [r for r in dump_records(server) if r["seed"] == 0]
    assert rec and rec[0]["prompt"] == "a photo of a cat sleeping on a sofa"
    assert (server.output_dir / DUMP / rec[0]["file"]).is_file()
    manifest = json.loads((server.output_dir / DUMP / "manifest.json").read_text())
    assert set(manifest["blocks"]) == set(PAPER_SAE_FOLDERS) and manifest["dtype"] == "float16"
    for block in PAPER_SAE_FOLDERS:
        assert list((server.output_dir / DUMP / block).glob("*.safetensors")), block


def test_train_workflow(server, dumped):
    _, images = run(server, "train")
    assert (server.sae_dir / "my_sae_up.0.1.safetensors").is_file()
    top = json.loads(sorted((server.output_dir / "sae_train").glob("top_features_*.json"))[-1].read_text())
    assert top["block"] == "up.0.1" and top["features"] and top["sae"] == "my_sae_up.0.1.safetensors"
    assert np.abs(pixels(images["sae_train/original"]) - pixels(images["sae_train/steered"])).max() > 0
    options = server.object_info()["UnboxLoadSAE"]["input"]["required"]["sae_name"]
    names = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert "my_sae_up.0.1.safetensors" in names  # listed for Load SAE at once


def test_queue_prompts_dumps_each_prompt_once_and_resumes(server, dumped):
    prompt_file, first = dumped
    mine = {r["prompt"]: r for r in dump_records(server) if r["prompt"] in PROMPTS}
    assert set(mine) == set(PROMPTS)
    assert [mine[p]["seed"] for p in PROMPTS] == [100, 101, 102]  # seed base + line index
    assert "0 already dumped, 3 to queue" in first.stdout
    again = queue_prompts(server, prompt_file)
    assert again.returncode == 0 and "3 already dumped, 0 to queue" in again.stdout
    assert len([r for r in dump_records(server) if r["prompt"] in PROMPTS]) == 3


def test_caching_and_new_prompt(server):
    path = example_path("explore")
    first = server.run(to_api(server, path, prompt="a red apple"), timeout=600)
    again = server.run(to_api(server, path, prompt="a red apple"), timeout=600)
    (cached,) = [m[1]["nodes"] for m in again["status"]["messages"] if m[0] == "execution_cached"]
    assert set(cached) == set(to_api(server, path))  # an unchanged graph is served from the cache
    texts = lambda e: sorted(t for o in e["outputs"].values() for t in o.get("text", []) if t.startswith("{"))
    changed = server.run(to_api(server, path, prompt="a blue whale"), timeout=600)
    assert texts(first) and texts(changed) and texts(changed) != texts(first)


def test_templates_are_listed_and_served(server):
    import requests

    from urllib.parse import quote

    listing = requests.get(f"{server.url}/workflow_templates", timeout=30).json()
    (pack, names), = [(k, v) for k, v in listing.items() if TITLES["explore"] in v]
    assert set(names) == set(TITLES.values())  # the dialog's titles: the files' names
    wf = requests.get(f"{server.url}/api/workflow_templates/{pack}/{quote(TITLES['explore'])}.json", timeout=30).json()
    assert wf["nodes"] and wf["links"]
    # each has the thumbnail the Templates dialog shows (scripts/make_template_thumbnails.py)
    for title in TITLES.values():
        r = requests.get(f"{server.url}/api/workflow_templates/{pack}/{quote(title)}.jpg", timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg", title
        assert Image.open(io.BytesIO(r.content)).size == (640, 480), title


def test_quickstart_runs_the_explore_workflow(server, tmp_path):
    wf = json.loads(example_path("explore").read_text())
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


def test_quickstart_runs_the_flux_workflow(server, tmp_path):
    wf = json.loads(example_path("flux_explore").read_text())
    widgets = {"UNETLoader": ["tiny", 0, "schnell"], "DualCLIPLoader": [0], "VAELoader": [0]}
    for node in wf["nodes"]:
        if node["type"] in widgets:
            node["type"], node["widgets_values"] = TINY_LOADERS[node["type"]][0], widgets[node["type"]]
        if node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [MAX_SIDE, MAX_SIDE]
    swapped = tmp_path / "flux_tiny.json"
    swapped.write_text(json.dumps(wf))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--model", "flux-schnell", "--server", server.url,
         "--no-install", "--skip-model-check", "--workflow", str(swapped), "--prompt", "a red fox in the snow"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "sae_flux_explore/image" in result.stdout and "top features of double.18" in result.stdout


def test_quickstart_reports_missing_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--no-install", "--models-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"{tmp_path}/checkpoints/sd_xl_turbo_1.0_fp16.safetensors" in result.stderr
    assert "unet.mid_block.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001/final/state_dict.pth" in result.stderr
    assert "--download" in result.stderr
