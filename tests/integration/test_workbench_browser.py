"""The workbench panel in ComfyUI's real web frontend (Debian's Chromium, headless, Playwright) on a real server
with the tiny SDXL model: explore, click a feature (the overlay's pixels checked against the SAE codes of the
block's update, dumped in a run of its own and encoded here), paint and apply (the graph holds the steer node
wired to the painted mask; the image changes where it was painted), labels that survive a restart and can be
searched, a published label set imported, the feature icon, and a concept search that finds a planted feature.
Screenshots go to tests/artifacts/ (kept by CI as artefacts; git ignores them)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from model_files import PAPER_SAE_FOLDERS  # noqa: E402
from paper_release import write_paper_release  # noqa: E402
from example_names import example_path  # noqa: E402
from workflow_api import ui_to_api  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts"
INFERNO = [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)]  # matplotlib's, at 0..1
PLANTED, PLANTED_FEATURE = "planted_mid.safetensors", 17
SAMPLER = ("euler_ancestral", "sgm_uniform", 512)  # the explore workflow's sampler, scheduler, image side


def inferno(v: float) -> np.ndarray:
    """The colour of a heat value in [0, 1], as nodes/render.py defines inferno (linear between the anchors)."""
    x = min(max(v, 0.0), 1.0) * 4
    lo = min(int(x), 3)
    f = x - lo
    return np.array([a * (1 - f) + b * f for a, b in zip(INFERNO[lo], INFERNO[lo + 1])])


def planted_sae(tiny, comfy_pack, folder: Path):
    """An SAE on mid.0 whose feature 17 points along the update difference of 'a red car' minus 'a car' (seeds
    0 and 1, the explore workflow's sampler and size), so that it fires more for the red car."""
    import comfy.sample

    import sae_models

    model = tiny.tiny_model(0)
    block = model.model.diffusion_model.get_submodule("middle_block.1")
    means = []
    for prompt in ("a red car", "a car"):
        seen = []
        handle = block.register_forward_hook(lambda m, a, o: seen.append((o - a[0])[0].mean((1, 2))))
        try:
            for seed in (0, 1):
                latent = torch.zeros(1, 4, SAMPLER[2] // 8, SAMPLER[2] // 8)
                with torch.inference_mode():
                    comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 1, 1.0, SAMPLER[0],
                                        SAMPLER[1], tiny.tiny_conditioning(prompt), tiny.tiny_conditioning(""), latent,
                                        disable_pbar=True, seed=seed)
        finally:
            handle.remove()
        means.append(torch.stack(seen).mean(0))
    direction = means[0] - means[1]
    g = torch.Generator().manual_seed(3)
    sae = sae_models.build(sae_models.SAEConfig(architecture="topk", d_in=128, n_features=64, k=4, block="mid.0"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 128, generator=g) * 0.01)
        sae.W_dec.copy_(torch.randn(64, 128, generator=g) / 128 ** 0.5)
        sae.W_enc[PLANTED_FEATURE] = 10 * direction / direction.norm()
        sae.b_enc[PLANTED_FEATURE] = 100.0
    sae.stats = sae_models.FeatureStats(mean=torch.rand(64, generator=g) + 0.5, frequency=torch.rand(64, generator=g))
    sae_models.save(sae, folder / PLANTED)


def explore_workflow() -> dict:
    wf = json.loads(example_path("explore").read_text())
    for node in wf["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"], node["widgets_values"] = "TinySDXLCheckpointLoader", ["tiny", 0]
        if node["type"] == "UnboxLoadSAE" and "mid_block" in node["widgets_values"][0]:
            node["widgets_values"] = [PLANTED]
    return wf


@pytest.fixture(scope="module")
def served(start_comfy_server, tmp_path_factory, tiny, comfy_pack):
    """A server with the frontend, on a folder of its own so that the test can restart it."""
    root = tmp_path_factory.mktemp("workbench_server")
    sae_dir = root / "sae"
    sae_dir.mkdir()
    for i, folder in enumerate(PAPER_SAE_FOLDERS.values()):
        write_paper_release(sae_dir / folder, seed=i)
    planted_sae(tiny, comfy_pack, sae_dir)
    write_dataset_index(root / "output" / "wb_dataset", sae_dir / PAPER_SAE_FOLDERS["down.2.1"])
    return root


def write_dataset_index(dump: Path, sae_folder: Path, n_features: int = 512):
    """A features index for the down.2.1 SAE, as training writes one: every feature's top dataset images are
    two images of a dump folder (a red and a blue one, named by the dump's records), so the panel can show them
    for any feature."""
    import torch

    import sae_models
    from sae_models.stats import features_index_path

    writer = sae_models.ShardWriter(dump, writer_id="w", rows_per_shard=16, dtype=torch.float32)
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        Image.new("RGB", (64, 64), colour).save(dump / "images" / f"{name}.png")
        writer.add_image({"prompt": f"a {name} square", "file": f"images/{name}.png"},
                         {"down.2.1": {"update": torch.zeros(16, 8), "grid": (4, 4)}})
    writer.close()
    top = [{"writer": "w", "image": i, "position": [3, 4], "value": 2.0 - i, "prompt": f"a {name} square",
            "file": f"images/{name}.png"} for i, name in enumerate(("red", "blue"))]
    sae_models.write_features_index({"block": "down.2.1", "n_features": n_features, "top_n": 2,
                                     "dump": str(dump), "features": [top] * n_features},
                                    features_index_path(sae_folder))


class Browser:
    def __init__(self, p, url):
        self.browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        self.page = self.browser.new_page(viewport={"width": 1600, "height": 1100})
        self.errors = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url, wait_until="domcontentloaded")
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=120_000)

    def shot(self, name: str):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"workbench_{name}.png"))

    def load(self, workflow: dict):
        """Open a workflow. The tiny checkpoint loader's weight seed is a `seed` widget, which the frontend gives
        a 'randomize' control; fixed, every run samples the same model (CheckpointLoaderSimple has no seed)."""
        self.page.evaluate("""async (wf) => {
            await window.app.loadGraphData(wf);
            for (const n of window.app.graph.nodes)
                for (const w of n.widgets || []) if (w.name === 'control_after_generate') w.value = 'fixed';
        }""", workflow)

    def wait_for(self, locator, what: str, timeout: float = 60_000):
        """Wait for `locator`; on a timeout, keep a screenshot and say what the panel's status line showed."""
        try:
            locator.wait_for(timeout=timeout)
        except Exception as e:
            self.shot(f"failed_{what}")
            status = self.page.get_by_test_id("sae-status").text_content()
            raise AssertionError(f"waiting for {what}: {e}; the panel says {status!r}; page errors {self.errors}")

    def open_panel(self):
        self.page.get_by_role("button", name="SAE Unbox workbench").first.click()
        self.page.get_by_test_id("sae-workbench").wait_for(timeout=30_000)


def runs(url) -> list:
    return requests.get(f"{url}/sae_unbox/workbench/runs", timeout=60).json()


def image(url, run) -> np.ndarray:
    r = requests.get(f"{url}/sae_unbox/workbench/image", params={"run": run}, timeout=60)
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)


def newest_run(b: Browser) -> str:
    return b.page.evaluate("() => document.querySelector('[data-testid=sae-run] option')?.value || ''")


def wait_for_new_run(b: Browser, before: str, blocks: int = 4):
    """Until the panel's newest run is another than `before`, with all the explore workflow's blocks."""
    b.page.wait_for_function(f"""() => {{
        const first = document.querySelector('[data-testid=sae-run] option');
        return first && first.value !== {json.dumps(before)}
            && document.querySelectorAll('[data-testid=sae-block] option').length >= {blocks}; }}""",
                             timeout=300_000)


def dump_unedited(server):
    """Run the explore workflow again (same seed, so the same update) with SAE Dump Activations of down.2.1
    before its probes, into output/wb_check."""
    wf = explore_workflow()
    api = ui_to_api(wf, requests.get(f"{server.url}/object_info", timeout=60).json())
    (loader,) = [k for k, v in api.items() if v["class_type"] == "TinySDXLCheckpointLoader"]
    first_probe = next(k for k, v in api.items() if v["class_type"] == "UnboxProbeBlock" and v["inputs"]["model"][0] == loader)
    api["900"] = {"class_type": "UnboxDumpActivations", "inputs": {
        "model": [loader, 0], "folder": "wb_check", "blocks": "down.2.1", "steps": "all", "apply_to": "cond",
        "fields": "update", "dtype": "float32", "rows_per_shard": 256}}
    api[first_probe]["inputs"]["model"] = ["900", 0]
    decode = next(k for k, v in api.items() if v["class_type"] == "VAEDecode")
    api["901"] = {"class_type": "UnboxDumpImages", "inputs": {"images": [decode, 0], "dump": ["900", 1],
                                                              "commit": "after every prompt"}}
    server.run(api, timeout=600)


def wait_idle(server, timeout: float = 600):
    """Until the server's queue is empty (the panel's prompts are done and in /history)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = requests.get(f"{server.url}/queue", timeout=60).json()
        if not q["queue_running"] and not q["queue_pending"]:
            return
        time.sleep(0.5)
    raise AssertionError("the server's queue did not empty")


def dump_after_steer(server, folder: str) -> dict:
    """Run the newest queued prompt again with SAE Dump Activations of down.2.1 between the steer node and its
    sampler (so it records the edited update); return the ids of the steer node and of its mask node."""
    wait_idle(server)
    history = requests.get(f"{server.url}/history", params={"max_items": 1}, timeout=60).json()
    (entry,) = history.values()
    api = entry["prompt"][2]
    (steer,) = [k for k, v in api.items() if v["class_type"] == "UnboxSteerFeatures"]
    (sampler,) = [k for k, v in api.items() if v["inputs"].get("model") == [steer, 0]]
    api["910"] = {"class_type": "UnboxDumpActivations", "inputs": {
        "model": [steer, 0], "folder": folder, "blocks": "down.2.1", "steps": "all", "apply_to": "cond",
        "fields": "update", "dtype": "float32", "rows_per_shard": 256}}
    api[sampler]["inputs"]["model"] = ["910", 0]
    decode = next(k for k, v in api.items() if v["class_type"] == "VAEDecode" and v["inputs"]["samples"] == [sampler, 0])
    api["911"] = {"class_type": "UnboxDumpImages", "inputs": {"images": [decode, 0], "dump": ["910", 1],
                                                              "commit": "after every prompt"}}
    server.run(api, timeout=600)
    return {"steer": steer, "mask_node": api[steer]["inputs"]["mask"][0]}


def test_the_workbench_explores_paints_labels_and_finds(served, start_comfy_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium')")
    import sae_models

    with start_comfy_server(root=served, frontend=True) as server, sync_api.sync_playwright() as p:
        b = Browser(p, server.url)
        assert "sae_unbox.workbench" in b.page.evaluate("() => window.app.extensions.map(e => e.name)")
        b.load(explore_workflow())
        b.open_panel()
        b.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        wait_for_new_run(b, "")
        b.page.get_by_test_id("sae-block").select_option("down.2.1")
        first = b.page.locator("[data-testid=sae-ranking][data-block='down.2.1'] button").first
        b.wait_for(first, "ranking")
        feature = int(first.get_attribute("data-testid").rsplit("-", 1)[1])

        # -- click a feature: its heatmap, from the codes the server kept, over the image
        b.page.get_by_test_id(f"sae-feature-{feature}").click()
        b.page.wait_for_function(f"() => document.querySelector('[data-testid=sae-overlay]').dataset.feature === '{feature}'",
                                 timeout=60_000)
        pixels = np.array(b.page.evaluate("""() => {
            const c = document.querySelector('[data-testid=sae-overlay]');
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")).reshape(16, 16, 4)
        # its top dataset images, from the SAE's features index
        b.page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('[data-testid=sae-top-images] img')];
            return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth === 64); }""", timeout=30_000)
        assert b.page.locator("[data-testid=sae-top-images] img").first.get_attribute("title").startswith("a red square")
        b.shot("explore")
        dump_unedited(server)
        shard = next((server.output_dir / "wb_check" / "down.2.1").glob("*.safetensors"))
        with safe_open(str(shard), "pt") as f:
            update = f.get_tensor("update")  # [256, 1280]: down.2.1's 16x16 grid at 512x512, row-major
        sae = sae_models.load(server.sae_dir / PAPER_SAE_FOLDERS["down.2.1"])
        with torch.no_grad():
            pre = (update - sae.b_dec) @ sae.W_enc.T + sae.b_enc
            kth = pre.topk(sae.config.k, dim=-1).values[:, -1:]
            heat = torch.where(pre >= kth, pre, 0.0).clamp_min(0)[:, feature].reshape(16, 16)
        expected = np.stack([inferno(float(v)) for v in (heat / heat.max()).flatten()]).reshape(16, 16, 3)
        on = (heat > 0).numpy()
        assert on.any() and not on.all()  # the feature is off somewhere: there the image shows through
        assert (pixels[..., 3] == np.where(on, 255, 0)).all()
        assert np.abs(pixels[on][:, :3] - expected[on]).max() <= 1.0

        # -- an id the SAE does not have is refused in the panel, and the selection stays
        b.page.get_by_test_id("sae-feature-id").fill("9999")
        b.page.get_by_test_id("sae-show").click()
        b.wait_for(b.page.get_by_test_id("sae-status").filter(has_text="feature 9999 is out of range"), "refusal")
        assert b.page.get_by_test_id("sae-feature-id").input_value() == str(feature)
        assert b.page.evaluate("() => document.querySelector('[data-testid=sae-overlay]').dataset.feature") == str(feature)

        # -- paint the top-left quarter with the feature, apply: a steer node wired to the painted mask
        before = image(server.url, runs(server.url)[0]["run"])
        b.page.get_by_test_id("sae-strength").fill("4")
        b.page.get_by_test_id("sae-paint-mode").click()
        box = b.page.get_by_test_id("sae-paint").bounding_box()
        b.page.get_by_test_id("sae-brush").fill("120")
        b.page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
        b.page.mouse.down()
        for t in np.linspace(0.1, 0.4, 12):
            b.page.mouse.move(box["x"] + box["width"] * t, box["y"] + box["height"] * 0.1)
            b.page.mouse.move(box["x"] + box["width"] * t, box["y"] + box["height"] * 0.4)
        b.page.mouse.up()
        last = newest_run(b)
        b.page.get_by_test_id("sae-apply").click()
        wiring = b.page.evaluate("""() => {
            const g = window.app.graph;
            const steer = g.nodes.find(n => n.type === 'UnboxSteerFeatures');
            const maskNode = steer.getInputNode(steer.findInputSlot('mask'));
            const sampler = g.nodes.find(n => n.type === 'KSampler');
            return {props: steer.properties.sae_workbench, mask: maskNode.type,
                    png: maskNode.widgets.find(w => w.name === 'mask').value.slice(0, 22),
                    samplerModel: sampler.getInputNode(sampler.findInputSlot('model')).type,
                    steerModel: steer.getInputNode(steer.findInputSlot('model')).type,
                    sae: steer.getInputNode(steer.findInputSlot('sae')).widgets.find(w => w.name === 'sae_name').value,
                    features: steer.widgets.find(w => w.name === 'features').value}; }""")
        assert wiring["props"] == {"block": "down.2.1", "feature": feature, "sae": PAPER_SAE_FOLDERS["down.2.1"]}
        assert wiring["mask"] == "UnboxPaintedMask" and wiring["png"] == "data:image/png;base64,"
        assert wiring["samplerModel"] == "UnboxSteerFeatures" and wiring["steerModel"] == "UnboxProbeBlock"
        assert wiring["sae"] == PAPER_SAE_FOLDERS["down.2.1"] and wiring["features"] == str(feature)
        wait_for_new_run(b, last)
        after = image(server.url, runs(server.url)[0]["run"])
        assert after.shape == before.shape and (after != before).any()
        # Where the edit landed: the panel's own queued prompt run again with the block's update dumped behind
        # the steer node. (A random-weight model's GroupNorms and attention spread any change over the whole
        # image, so locality is checked at the block, where the paint acts.)
        edited = dump_after_steer(server, "wb_edited")
        with safe_open(str(next((server.output_dir / "wb_edited" / "down.2.1").glob("*.safetensors"))), "pt") as f:
            after_update = f.get_tensor("update")
        png = b.page.evaluate(f"() => window.app.graph.getNodeById({edited['mask_node']}).widgets"
                              ".find(w => w.name === 'mask').value")
        painted = np.asarray(Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1]))).convert("L"),
                             dtype=np.float64) / 255
        weights = torch.tensor(painted.reshape(16, 32, 16, 32).mean((1, 3)), dtype=torch.float32).reshape(256, 1)
        assert weights.reshape(16, 16)[1:7, 1:7].min() > 0.99 and weights.reshape(16, 16)[9:, :].max() == 0
        direction = 4 * float(sae.stats.mean[feature]) * sae.feature_directions([feature])[0]
        torch.testing.assert_close(after_update - update, weights * direction, atol=1e-4, rtol=1e-4)
        assert torch.equal(after_update[weights[:, 0] == 0], update[weights[:, 0] == 0])  # untouched off the paint
        b.shot("painted")
        # the painting is kept in the workflow: saved and opened again, the mask node holds the same PNG
        saved = b.page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).workflow)")
        b.load(json.loads(saved))
        assert b.page.evaluate(f"() => window.app.graph.getNodeById({edited['mask_node']}).widgets"
                               ".find(w => w.name === 'mask').value") == png

        # -- a second painted feature stacks: a steer node of its own between the first and the sampler
        second = int(b.page.locator("[data-testid=sae-ranking][data-block='down.2.1'] button").nth(1)
                     .get_attribute("data-testid").rsplit("-", 1)[1])
        b.page.get_by_test_id(f"sae-feature-{second}").click()
        last = newest_run(b)
        b.page.get_by_test_id("sae-apply").click()
        chain = b.page.evaluate("""() => {
            const g = window.app.graph, types = [];
            let node = g.nodes.find(n => n.type === 'KSampler');
            while (node && types.length < 8) {
                node = node.getInputNode(node.findInputSlot('model'));
                if (node) types.push([node.type, node.widgets?.find(w => w.name === 'features')?.value ?? null]);
            }
            return types; }""")
        assert chain[:3] == [["UnboxSteerFeatures", str(second)], ["UnboxSteerFeatures", str(feature)],
                             ["UnboxProbeBlock", None]]
        wait_for_new_run(b, last)
        wait_idle(server)

        # -- label the feature; import a published label set
        b.page.get_by_test_id(f"sae-feature-{feature}").click()
        b.page.wait_for_function(f"() => document.querySelector('[data-testid=sae-overlay]').dataset.feature === '{feature}'",
                                 timeout=60_000)
        b.page.get_by_test_id("sae-label-input").fill("a planted test label")
        b.page.get_by_test_id("sae-label-save").click()
        b.wait_for(b.page.get_by_test_id(f"sae-feature-{feature}").filter(has_text="a planted test label"), "label")
        b.page.wait_for_function(f"""() => window.app.graph.nodes.some(n => n.type === 'UnboxSteerFeatures'
            && n.widgets.find(w => w.name === 'features').tooltip.includes('#{feature}: a planted test label'))""",
                                 timeout=30_000)  # the steer node's feature list shows labels on hover
        label_file = served / "input" / "labels.csv"
        label_file.write_text(f"block,feature_id,caption\ndown.2.1,{(feature + 1) % 512},imported label\n"
                              "up.0.1,1,another block\n")
        b.page.get_by_test_id("sae-label-import").set_input_files(str(label_file))
        sae_name = PAPER_SAE_FOLDERS["down.2.1"]
        for _ in range(60):
            labels = requests.get(f"{server.url}/sae_unbox/labels", params={"sae": sae_name}, timeout=60).json()
            if str((feature + 1) % 512) in labels["labels"]:
                break
            time.sleep(0.5)
        assert labels["labels"] == {str(feature): "a planted test label", str((feature + 1) % 512): "imported label"}

        # -- feature icon of the selected feature: from the probed MODEL, without the two painted steers upstream
        b.page.get_by_test_id("sae-icon").click()
        b.page.get_by_test_id("sae-icon-image").wait_for(timeout=300_000)
        wait_idle(server)  # the image shows before the server files the prompt in /history
        history = requests.get(f"{server.url}/history", timeout=60).json()
        graph = next(e["prompt"][2] for e in history.values() if "sae_icon_steer" in e["prompt"][2])
        icon = graph["sae_icon_steer"]["inputs"]
        assert icon["apply_to"] == "cond, uncond zeroed" and icon["mode"] == "replace"
        upstream, node = [], icon["model"][0]
        while node is not None:
            upstream.append(graph[node]["class_type"])
            model = graph[node]["inputs"].get("model")
            node = model[0] if isinstance(model, list) else None
        assert upstream[0] == "UnboxProbeBlock" and "UnboxSteerFeatures" not in upstream, upstream

        # -- concept search, on mid.0 (the planted SAE)
        b.page.get_by_test_id("sae-block").select_option("mid.0")
        b.page.get_by_test_id("sae-concept").fill("a red car")
        b.page.get_by_test_id("sae-neutral").fill("a car")
        b.page.get_by_test_id("sae-find").click()
        found = b.page.get_by_test_id("sae-found").locator("button").first
        found.wait_for(timeout=300_000)
        assert found.get_attribute("data-testid") == f"sae-found-{PLANTED_FEATURE}"
        found.scroll_into_view_if_needed()
        b.shot("found")
        assert not [e for e in b.errors if "sae_unbox" in e or "workbench" in e]
        assert b.page.get_by_text("Invalid workflow").count() == 0  # the saved workflow reopened cleanly
        b.browser.close()

    # -- restart the server: the label is still there, and the panel's label search finds it
    with start_comfy_server(root=served, frontend=True) as server, sync_api.sync_playwright() as p:
        sae_name = PAPER_SAE_FOLDERS["down.2.1"]
        labels = requests.get(f"{server.url}/sae_unbox/labels", params={"sae": sae_name}, timeout=60).json()["labels"]
        assert labels[str(feature)] == "a planted test label" and labels[str((feature + 1) % 512)] == "imported label"
        b = Browser(p, server.url)
        b.load(explore_workflow())
        b.open_panel()
        b.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        wait_for_new_run(b, "")
        b.page.get_by_test_id("sae-block").select_option("down.2.1")
        b.wait_for(b.page.locator("[data-testid=sae-ranking][data-block='down.2.1'] button").first, "ranking")
        b.page.get_by_test_id("sae-label-search").fill("planted test")
        b.page.get_by_test_id(f"sae-label-hit-{feature}").wait_for(timeout=30_000)
        b.shot("labels")
        b.browser.close()


# -- the defects an artist met (issue 15): stacked nodes, lost choices, empty paint, noise; the paper's files --

sys.path.insert(0, str(ROOT / "tests" / "support"))
from fake_hub import serve as serve_hub  # noqa: E402

HUB_IMAGES = "/surokpro2/sdxl_sae_images/resolve/main/up.0.1"
HUB_LABELS = "/datasets/hammamiomar/sdxl-turbo-sae-labels/resolve/main/up.0.1.json"


def jpeg_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub():
    """Hugging Face's stand-in: the paper's top images of every up.0.1 feature and its label set."""
    files = {f"{HUB_IMAGES}/{f}.jpg": jpeg_bytes((f % 256, 80, 160)) for f in range(512)}
    files[HUB_LABELS] = json.dumps([{"feature_id": f, "label": f"paper label {f}", "category": "style",
                                     "confidence": 0.8} for f in range(512)]).encode()
    with serve_hub(files) as url:
        yield url


class Watched(Browser):
    """A browser page that records the pack's failed requests and every console error."""

    def __init__(self, p, url):
        self.failed, self.console = [], []
        super().__init__(p, url)

    def watch(self, page):
        self.asked = getattr(self, "asked", [])
        page.on("request", lambda r: self.asked.append(r.url) if "/sae_unbox/" in r.url else None)
        page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}")
                if r.status >= 400 and "/sae_unbox/" in r.url else None)
        page.on("requestfailed", lambda r: self.failed.append(f"failed {r.url}") if "/sae_unbox/" in r.url else None)
        page.on("console", lambda m: self.console.append(f"{m.text} ({m.location.get('url', '')})")
                if m.type == "error" and self.from_pack(f"{m.text} {m.location.get('url', '')}") else None)

    @staticmethod
    def from_pack(text: str) -> bool:
        """An error the pack caused: one of its routes, or its scripts (served under /extensions/<pack>/)."""
        return any(mark in text for mark in ("/sae_unbox/", "sae_unbox", "workbench.js", "/extensions/comfyui-sae-unbox/"))


def overlapping(page) -> list:
    return page.evaluate("""() => {
        const t = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
        const boxes = window.app.graph.nodes.map(n => [n.id, n.type, n.pos[0], n.pos[1] - t, n.size[0], n.size[1] + t]);
        const out = [];
        for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
            const [, ta, ax, ay, aw, ah] = boxes[i], [, tb, bx, by, bw, bh] = boxes[j];
            if (ax < bx + bw && bx < ax + aw && ay < by + bh && by < ay + ah) out.push([boxes[i], boxes[j]]);
        }
        return out; }""")


def paint_square(b: Browser, x0=0.15, x1=0.45):
    if b.page.get_by_test_id("sae-paint-mode").text_content() != "brush (on)":
        b.page.get_by_test_id("sae-paint-mode").click()
    box = b.page.get_by_test_id("sae-paint").bounding_box()
    b.page.get_by_test_id("sae-brush").fill("100")
    b.page.mouse.move(box["x"] + box["width"] * x0, box["y"] + box["height"] * x0)
    b.page.mouse.down()
    for t in np.linspace(x0, x1, 8):
        b.page.mouse.move(box["x"] + box["width"] * t, box["y"] + box["height"] * x0)
        b.page.mouse.move(box["x"] + box["width"] * t, box["y"] + box["height"] * x1)
    b.page.mouse.up()


def press_across_refresh(b: Browser, button):
    """Press the mouse on `button`, let the panel refresh its runs (its ↻ button, clicked from the page), and
    release it once the refresh has asked for the block's labels again and rendered."""
    box = button.bounding_box()
    b.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    b.page.mouse.down()
    with b.page.expect_response(lambda r: "/sae_unbox/labels?" in r.url, timeout=60_000):
        b.page.evaluate("() => document.querySelector('[data-testid=sae-refresh]').click()")
    time.sleep(0.5)
    assert button.bounding_box() == box, "the button moved under the pointer"
    b.page.mouse.up()


def top_height(b: Browser) -> float:
    return b.page.evaluate("() => document.querySelector('[data-testid=sae-top]').getBoundingClientRect().height")


def chosen(b: Browser) -> tuple:
    return (b.page.get_by_test_id("sae-block").input_value(), b.page.get_by_test_id("sae-feature-id").input_value())


def graph_state(b: Browser) -> str:
    return b.page.evaluate("() => JSON.stringify(window.app.graph.serialize().nodes.map(n => [n.id, n.type, n.widgets_values]))")


def test_the_workbench_places_keeps_refuses_and_fetches_as_an_artist_expects(served, start_comfy_server, hub):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium')")
    with start_comfy_server(root=served, frontend=True, env={"HF_ENDPOINT": hub}) as server, \
            sync_api.sync_playwright() as p:
        b = Watched(p, server.url)
        b.watch(b.page)
        b.page.set_viewport_size({"width": 1600, "height": 1000})
        b.load(explore_workflow())
        b.open_panel()
        b.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        wait_for_new_run(b, "")
        # blocks are named by their role (the paper's section 4)
        options = b.page.locator("[data-testid=sae-block] option").all_text_contents()
        assert any(o.startswith("up.0.1 — colour and style") for o in options), options
        assert any(o.startswith("down.2.1 — composition") for o in options), options
        b.page.get_by_test_id("sae-block").select_option("up.0.1")
        ranking = b.page.locator("[data-testid=sae-ranking][data-block='up.0.1'] button")
        b.wait_for(ranking.first, "ranking of up.0.1")
        assert "mean" in ranking.first.text_content()
        ids = [int(ranking.nth(i).get_attribute("data-testid").rsplit("-", 1)[1]) for i in range(4)]
        x = ids[1]
        # the click is pressed while the panel refreshes the run (as when a run's later nodes report): the
        # button under the pointer is kept, so the click is not lost
        press_across_refresh(b, b.page.get_by_test_id(f"sae-feature-{x}"))
        b.page.wait_for_function(f"() => document.querySelector('[data-testid=sae-overlay]').dataset.feature === '{x}'")
        tops = [top_height(b)]  # the top part's height, with messages of every length: lists do not move

        # -- the paper's top images of the feature (up.0.1 is a paper release without a features index)
        b.page.get_by_test_id("sae-released-image").wait_for(timeout=60_000)
        b.page.wait_for_function("() => document.querySelector('[data-testid=sae-released-image]').naturalWidth === 48")
        assert "surokpro2/sdxl_sae_images" in b.page.get_by_test_id("sae-top-note").text_content()
        assert (server.sae_dir / ".released" / "surokpro2" / "sdxl_sae_images" / "up.0.1" / f"{x}.jpg").is_file()

        # -- Apply with nothing painted: refused, and nothing changes or runs
        wait_idle(server)  # the first run shows in the panel before the server files it in /history
        before, history = graph_state(b), len(requests.get(f"{server.url}/history", timeout=60).json())
        b.page.get_by_test_id("sae-apply").click()
        b.wait_for(b.page.get_by_test_id("sae-status").filter(has_text="Nothing is painted"), "empty refusal")
        tops.append(top_height(b))
        time.sleep(1.0)
        assert graph_state(b) == before
        assert len(requests.get(f"{server.url}/history", timeout=60).json()) == history
        assert requests.get(f"{server.url}/queue", timeout=60).json()["queue_pending"] == []

        # -- paint and Apply: the chosen block and feature survive the run; input and output side by side
        paint_square(b)
        last = newest_run(b)
        b.page.get_by_test_id("sae-apply").click()
        wait_for_new_run(b, last)
        b.page.get_by_test_id("sae-compare-after").wait_for(timeout=60_000)
        assert b.page.get_by_test_id("sae-compare-before").get_attribute("src").startswith("data:image/png")
        b.page.wait_for_function(f"() => document.querySelector('[data-testid=sae-overlay]').dataset.feature === '{x}'")
        assert chosen(b) == ("up.0.1", str(x))
        # a new strength for the same feature updates its steer node, it adds none
        b.page.get_by_test_id("sae-strength").fill("6")
        last = newest_run(b)
        b.page.get_by_test_id("sae-apply").click()
        wait_for_new_run(b, last)
        steers = b.page.evaluate("""() => window.app.graph.nodes.filter(n => n.type === 'UnboxSteerFeatures')
            .map(n => [n.properties.sae_workbench.feature, n.widgets.find(w => w.name === 'strength').value])""")
        assert steers == [[x, 6]]

        # -- two more features stack; no node lies on another, and each painted mask shows its painting
        for f in (ids[2], ids[3]):
            b.page.get_by_test_id(f"sae-feature-{f}").click()
            b.page.wait_for_function(f"() => document.querySelector('[data-testid=sae-overlay]').dataset.feature === '{f}'")
            last = newest_run(b)
            b.page.get_by_test_id("sae-apply").click()
            wait_for_new_run(b, last)
        wait_idle(server)
        assert b.page.evaluate("() => window.app.graph.nodes.filter(n => n.type === 'UnboxSteerFeatures').length") == 3
        assert overlapping(b.page) == []
        previews = b.page.evaluate("""() => window.app.graph.nodes.filter(n => n.type === 'UnboxPaintedMask')
            .map(n => n.imgs?.[0]?.src === n.widgets.find(w => w.name === 'mask').value)""")
        assert previews == [True, True, True]
        b.shot("stacked")

        # -- a reload keeps the choice; the stored painting of a steered feature is shown again
        b.page.reload(wait_until="domcontentloaded")
        b.page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=120_000)
        b.open_panel()
        b.page.wait_for_function(f"() => document.querySelector('[data-testid=sae-overlay]').dataset.feature === '{ids[3]}'",
                                 timeout=60_000)
        assert chosen(b) == ("up.0.1", str(ids[3]))
        b.page.get_by_test_id(f"sae-feature-{x}").click()
        b.page.wait_for_function(f"() => document.querySelector('[data-testid=sae-paint]').dataset.shown === 'up.0.1#{x}'",
                                 timeout=30_000)
        assert b.page.evaluate("() => window.app.graph.nodes.length") > 25  # the workflow came back with the reload
        # cleared and applied: refused, and the stored painting stays
        stored = b.page.evaluate(f"""() => {{
            const s = window.app.graph.nodes.find(n => n.type === 'UnboxSteerFeatures' && n.properties.sae_workbench.feature === {x});
            return s.getInputNode(s.findInputSlot('mask')).widgets.find(w => w.name === 'mask').value; }}""")
        b.page.get_by_test_id("sae-clear").click()
        before = graph_state(b)
        b.page.get_by_test_id("sae-apply").click()
        b.wait_for(b.page.get_by_test_id("sae-status").filter(has_text="Nothing is painted"), "empty refusal")
        tops.append(top_height(b))
        assert graph_state(b) == before and stored and stored in before

        # -- the paper's label set in one click, with categories beside the labels
        b.page.get_by_test_id("sae-paper-labels").click()
        b.wait_for(b.page.get_by_test_id("sae-status").filter(has_text="imported 512 labels"), "paper labels")
        tops.append(top_height(b))
        b.wait_for(b.page.get_by_test_id(f"sae-feature-{x}").filter(has_text=f"paper label {x} [style]"), "category")
        b.page.get_by_test_id("sae-label-search").fill("no such words")
        b.page.get_by_test_id("sae-label-none").wait_for(timeout=10_000)

        # -- the image, the feature and Apply stay in view while the lists below are used (1600x1000)
        b.page.get_by_test_id("sae-paint-mode").click()
        y = ids[2]
        b.page.get_by_test_id("sae-label-search").fill(f"paper label {y}")
        hit = b.page.get_by_test_id(f"sae-label-hit-{y}")
        hit.scroll_into_view_if_needed()
        press_across_refresh(b, hit)  # the hits too are kept through a refresh that does not change them
        b.page.wait_for_function(f"() => document.querySelector('[data-testid=sae-overlay]').dataset.feature === '{y}'")
        for testid in ("sae-image", "sae-detail", "sae-apply", "sae-feature-id"):
            box = b.page.get_by_test_id(testid).bounding_box()
            assert box and box["y"] >= 0 and box["y"] + min(box["height"], 40) <= 1000, (testid, box)
        b.shot("layout")
        tops.append(top_height(b))
        assert len(set(tops)) == 1, tops
        ys = [b.page.get_by_test_id(t).bounding_box()["y"] for t in ("sae-feature-id", "sae-detail", "sae-paint-mode", "sae-apply", "sae-status")]
        assert ys == sorted(ys), ys  # in the panel's order (none of them taken out of the flow)
        assert b.failed == [], b.failed  # no 404/400 from the pack's routes all along
        b.browser.close()


def test_each_example_workflow_opens_without_errors_from_the_pack(served, start_comfy_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium')")
    with start_comfy_server(root=served, frontend=True) as server, sync_api.sync_playwright() as p:
        b = Watched(p, server.url)
        problems = {}
        for path in sorted((ROOT / "example_workflows").glob("*.json")):
            page = b.browser.new_page(viewport={"width": 1600, "height": 1000})
            b.failed, b.console = [], []
            b.watch(page)
            page.goto(server.url, wait_until="domcontentloaded")
            page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", json.loads(path.read_text()))
            page.wait_for_timeout(2500)  # the labels the steer nodes' tooltips read, and the like
            if b.failed or b.console:
                problems[path.name] = b.failed + b.console
            page.close()
        assert problems == {}
        # the pack was asked (the steer nodes' labels of SAEs this server does not have, among them)
        assert any("/sae_unbox/labels?sae=SAE_flux_18" in u for u in b.asked), b.asked
        b.browser.close()
