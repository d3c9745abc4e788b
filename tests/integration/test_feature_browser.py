"""The feature browser on a real ComfyUI server: its HTTP API against statistics computed here from the shard
files directly (safetensors, not the pack's reader), its refusals, and its page in Debian's Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sae_models import SAEConfig, ShardWriter, build, iter_vectors, save, write_features_index
from sae_models.stats import features_index_path, summarize_features

D, F, K, GRID = 16, 60, 4, (4, 4)
NAME = "browse/tiny.safetensors"
PROMPTS = ["a red barn at dawn", "a blue car", "a red fox in snow", "a lighthouse", "a cat on a sofa",
           "a bowl of red apples", "a mountain lake", "a city at night", "a dog running", "an owl"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browsable(comfy_server_with_frontend, tmp_path_factory):
    """A dump (shards + PNGs + records) written by the library, and an SAE with statistics and a features index
    in the server's models/sae."""
    server = comfy_server_with_frontend
    # where a dump node writes: the browser serves images only from ComfyUI's output folder or a registered one
    dump = server.output_dir / tmp_path_factory.mktemp("browse").name / "dump"
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(dump, writer_id="w0", rows_per_shard=48, dtype=torch.float32)
    (dump / "images").mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(PROMPTS):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(dump / "images" / f"{i}.png")
        n = GRID[0] * GRID[1]
        rows = {"update": torch.randn(n, D, generator=g), "position": torch.arange(n), "grid": GRID}
        writer.add_image({"prompt": prompt, "seed": i, "file": f"images/{i}.png"}, {"mid.0": rows})
    writer.close()
    sae = build(SAEConfig(architecture="topk", d_in=D, n_features=F, k=K, block="mid.0", base_model="sdxl-turbo"))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    stream = iter_vectors(dump, "mid.0", batch_size=64, shuffle=False, with_meta=True)
    sae.stats, index = summarize_features(sae, stream, top_n=5)
    path = server.sae_dir / NAME
    save(sae, path)
    write_features_index(index, features_index_path(path))
    return server, sae, dump


def codes_from_shards(sae, dump: Path):
    """Every dumped vector's codes, reading the shard files with safetensors; and each row's image."""
    xs, images = [], []
    for f in sorted((dump / "mid.0").glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            xs.append(st.get_tensor("update"))
            images.append(st.get_tensor("image"))
    with torch.no_grad():
        return sae.encode(torch.cat(xs)), torch.cat(images)


def get(server, path, **params):
    import requests

    return requests.get(f"{server.url}{path}", params=params, timeout=60)


def test_lists_the_saes_that_have_an_index(browsable):
    server, _, _ = browsable
    for prefix in ("", "/api"):
        r = get(server, f"{prefix}/sae_unbox/saes")
        assert r.status_code == 200
        listed = {s["name"]: s for s in r.json()}
        assert listed[NAME] == {"name": NAME, "block": "mid.0", "architecture": "topk", "d_in": D, "n_features": F,
                                "k": K, "base_model": "sdxl-turbo", "statistics": ["mean", "frequency", "std"]}
        assert all(s.get("error") is None for s in listed.values())
    sae = get(server, "/sae_unbox/features", sae=NAME, limit=1).json()["sae"]
    assert sae == {**listed[NAME], "top_n": 5, "images": True}


def test_features_agree_with_codes_computed_from_the_shards(browsable):
    server, sae, dump = browsable
    codes, images = codes_from_shards(sae, dump)
    freq = (codes > 0).double().mean(0)
    top = codes.max(0).values
    r = get(server, "/sae_unbox/features", sae=NAME, sort="frequency", order="desc", limit=F)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == F and body["sae"]["name"] == NAME
    expect = sorted(range(F), key=lambda f: (-float(freq[f]), f))
    got = [row["feature"] for row in body["features"]]
    assert [round(float(freq[f]), 6) for f in got] == [round(float(freq[f]), 6) for f in expect]
    for row in body["features"]:
        f = row["feature"]
        assert row["frequency"] == pytest.approx(float(freq[f]), abs=1e-6)
        if freq[f] > 0:
            assert row["max"] == pytest.approx(float(top[f]), rel=1e-5)
            best_image = int(images[codes[:, f].argmax()])
            assert row["top"][0]["file"] == f"images/{best_image}.png"
            assert row["top"][0]["prompt"] == PROMPTS[best_image] and row["top"][0]["grid"] == list(GRID)
        else:
            assert row["top"] == [] and row["max"] is None
    by_max = get(server, "/sae_unbox/features", sae=NAME, sort="max", limit=3).json()
    assert [row["feature"] for row in by_max["features"]] == top.argsort(descending=True)[:3].tolist()


def test_search_and_paging(browsable):
    server, sae, dump = browsable
    codes, images = codes_from_shards(sae, dump)
    body = get(server, "/sae_unbox/features", sae=NAME, q="#7").json()
    assert [row["feature"] for row in body["features"]] == [7]
    red = get(server, "/sae_unbox/features", sae=NAME, q="RED", limit=F).json()
    assert red["total"] == len(red["features"]) > 0
    assert all(any("red" in e["prompt"] for e in row["top"]) for row in red["features"])
    page2 = get(server, "/sae_unbox/features", sae=NAME, sort="feature", order="asc", offset=10, limit=10).json()
    assert [row["feature"] for row in page2["features"]] == list(range(10, 20))


def test_only_images_that_the_dumps_records_name_are_served(browsable):
    server, _, dump = browsable
    r = get(server, "/sae_unbox/image", sae=NAME, file="images/3.png")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    assert r.content == (dump / "images" / "3.png").read_bytes()
    (dump.parent / "secret.png").write_bytes(b"not yours")
    (dump / "images" / "unnamed.png").write_bytes((dump / "images" / "3.png").read_bytes())
    for bad in ("../secret.png", str(dump.parent / "secret.png"), "images/../../secret.png", "manifest.json",
                "images/unnamed.png", "images/99.png", "images/3.png/"):
        r = get(server, "/sae_unbox/image", sae=NAME, file=bad)
        assert r.status_code == 404 and "not an image that the dump's records name" in r.json()["error"], bad
    gone = dump / "images" / "9.png"
    gone.rename(gone.with_suffix(".bak"))
    try:
        r = get(server, "/sae_unbox/image", sae=NAME, file="images/9.png")
        assert r.status_code == 404 and "moved or deleted" in r.json()["error"]
    finally:
        gone.with_suffix(".bak").rename(gone)


def test_bad_requests_get_clear_errors(browsable):
    server, _, _ = browsable
    cases = [({"sae": "nope.safetensors"}, 404, "no SAE named 'nope.safetensors'"),
             ({}, 400, "?sae=NAME"),
             ({"sae": NAME, "sort": "loudness"}, 400, "sort must be one of"),
             ({"sae": NAME, "limit": "many"}, 400, "integers"),
             ({"sae": NAME, "limit": "0"}, 400, "limit between 1 and")]
    for params, status, words in cases:
        r = get(server, "/sae_unbox/features", **params)
        assert r.status_code == status and words in r.json()["error"], (params, r.text)
    # an SAE without an index is named with what to do about it
    plain = server.sae_dir / "browse" / "no_index.safetensors"
    shutil.copy(server.sae_dir / NAME, plain)
    try:
        r = get(server, "/sae_unbox/features", sae="browse/no_index.safetensors")
        assert r.status_code == 404 and "has no features index" in r.json()["error"]
    finally:
        plain.unlink()


def test_a_rewritten_index_is_read_again(browsable):
    server, _, _ = browsable
    path = features_index_path(server.sae_dir / NAME)
    before = Path(path).read_bytes()
    first = get(server, "/sae_unbox/features", sae=NAME, q="3").json()["features"][0]
    assert first["top"]
    import json

    index = json.loads(before)
    index["features"][3] = []
    write_features_index(index, path)
    try:
        assert get(server, "/sae_unbox/features", sae=NAME, q="3").json()["features"][0]["top"] == []
    finally:
        Path(path).write_bytes(before)


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def test_the_page_shows_searches_and_opens_features(browsable, chromium, tmp_path):
    server, sae, dump = browsable
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/sae_unbox/browser?sae={NAME}&sort=max", wait_until="domcontentloaded")
    cards = page.get_by_test_id("feature")
    cards.first.wait_for(timeout=30_000)
    api = get(server, "/sae_unbox/features", sae=NAME, sort="max", limit=48).json()
    assert cards.count() == len(api["features"])
    shown = [int(x) for x in cards.evaluate_all("cs => cs.map(c => c.dataset.feature)")]
    assert shown == [row["feature"] for row in api["features"]]
    # the first card's thumbnails are real images from the dump, each with the cell where the feature fired
    page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('[data-testid=feature]')[0]
        .querySelectorAll('img')]; return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth === 32); }""",
                           timeout=30_000)
    assert cards.first.locator(".cell").count() == cards.first.locator("img").count()
    # search by id, then by prompt words
    page.get_by_test_id("search").fill("#5")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=feature]').length === 1", timeout=30_000)
    assert cards.first.get_attribute("data-feature") == "5"
    assert "q=%235" in page.url
    page.get_by_test_id("search").fill("lighthouse")
    n = get(server, "/sae_unbox/features", sae=NAME, q="lighthouse", limit=48).json()["total"]
    page.wait_for_function(f"() => document.querySelectorAll('[data-testid=feature]').length === {n}", timeout=30_000)
    assert f"of {n}" in page.get_by_test_id("info").inner_text()
    # a card opens to every top image with its prompt
    first = cards.first
    first.click()
    captions = first.locator("figcaption")
    captions.first.wait_for(state="visible", timeout=10_000)
    row = get(server, "/sae_unbox/features", sae=NAME, q=first.get_attribute("data-feature")).json()["features"][0]
    assert captions.count() == len(row["top"])
    assert row["top"][0]["prompt"] in captions.first.inner_text()
    page.screenshot(path=str(tmp_path / "feature_browser.png"))
    # an unknown SAE is an error on the page, not a blank one
    page.goto(f"{server.url}/sae_unbox/browser?sae=missing.safetensors", wait_until="domcontentloaded")
    page.get_by_test_id("error").filter(has_text="no SAE named").wait_for(timeout=30_000)
    assert not errors, errors
    page.close()


def test_load_sae_node_opens_the_browser(browsable, chromium):
    server, _, _ = browsable
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager !== undefined",
                           timeout=120_000)
    page.evaluate("""async (name) => {
        await window.app.graph.clear();
        const node = window.LiteGraph.createNode('UnboxLoadSAE');
        window.app.graph.add(node);
        node.widgets.find(w => w.name === 'sae_name').value = name;
        window.__saeNode = node;
    }""", NAME)
    with page.expect_popup() as popup_info:
        page.evaluate("() => window.__saeNode.widgets.find(w => w.name === 'browse features').callback()")
    popup = popup_info.value
    popup.get_by_test_id("feature").first.wait_for(timeout=30_000)
    assert "/sae_unbox/browser?sae=browse%2Ftiny.safetensors" in popup.url
    assert popup.get_by_test_id("sae").input_value() == NAME
    # the button is not a node input: the prompt sent to the server has only sae_name
    api = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    (load,) = [v for v in api.values() if v["class_type"] == "UnboxLoadSAE"]
    assert load["inputs"] == {"sae_name": NAME}

    # label a feature on its card: saved beside the SAE, then found by the label
    card = popup.locator("[data-testid=feature][data-feature='3']")
    popup.get_by_test_id("search").fill("#3")
    card.wait_for(timeout=30_000)
    card.get_by_test_id("label").fill("browser label words")
    card.get_by_test_id("save-label").click()
    popup.wait_for_function("() => document.querySelector('[data-feature=\"3\"] [data-testid=label]').dataset.saved"
                            " === 'browser label words'", timeout=30_000)
    assert get(server, "/sae_unbox/labels", sae=NAME).json()["labels"]["3"] == "browser label words"
    popup.get_by_test_id("search").fill("label words")
    popup.wait_for_function("() => [...document.querySelectorAll('[data-testid=feature]')].map(c => c.dataset.feature)"
                            ".join() === '3'", timeout=30_000)

    # send to graph: a new SAE Steer Features node wired to this SAE's Load SAE node; a selected one is updated
    card.get_by_test_id("send").click()
    steer = page.evaluate("""() => { const s = window.app.graph.nodes.filter(n => n.type === 'UnboxSteerFeatures');
        return s.map(n => ({features: n.widgets.find(w => w.name === 'features').value,
                            sae: n.getInputNode(n.findInputSlot('sae'))?.type})); }""")
    assert steer == [{"features": "3", "sae": "UnboxLoadSAE"}]
    page.evaluate("""() => window.app.canvas.selectNode(
        window.app.graph.nodes.find(n => n.type === 'UnboxSteerFeatures'))""")
    popup.get_by_test_id("search").fill("#5")
    popup.locator("[data-testid=feature][data-feature='5']").get_by_test_id("send").click()
    features = page.evaluate("""() => window.app.graph.nodes.filter(n => n.type === 'UnboxSteerFeatures')
        .map(n => n.widgets.find(w => w.name === 'features').value)""")
    assert features == ["5"]
    popup.close()
    page.close()
