"""The pack in ComfyUI's real web frontend, driven headless in Debian's Chromium by Playwright:
the extension loads, an example workflow opens from the UI, runs, and the ranking appears on the node."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from example_names import TITLES, example_path  # noqa: E402
from model_files import PAPER_SAE_FOLDERS  # noqa: E402
from paper_release import write_paper_release  # noqa: E402

ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots (git ignores them)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(comfy_server_with_frontend):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium')")
    server = comfy_server_with_frontend
    for i, folder in enumerate(PAPER_SAE_FOLDERS.values()):
        write_paper_release(server.sae_dir / folder, seed=i)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server.url, wait_until="domcontentloaded")
        pg.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager !== undefined",
                             timeout=120_000)
        pg.errors = errors
        pg.server = server
        yield pg
        browser.close()


def test_extension_is_served_and_registered(page):
    js = page.evaluate("() => fetch('/extensions/comfyui-sae-unbox/sae_unbox.js').then(r => r.status)")
    assert js == 200
    names = page.evaluate("() => (window.app.extensions || []).map(e => e.name)")
    assert "sae_unbox.show_text" in names
    assert not [e for e in page.errors if "sae_unbox" in e]


def test_templates_dialog_opens_the_packs_example(page):
    """The pack's examples are offered in the frontend's Templates dialog and open as a graph."""
    page.evaluate("async () => { await window.app.graph.clear(); }")
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text("comfyui-sae-unbox", exact=True).first.click()
    cards = {key: page.get_by_test_id(f"template-workflow-{title}") for key, title in TITLES.items()}
    for card in cards.values():
        card.wait_for(timeout=30_000)
    # each card shows its title (the file name: what the workflow does) and its thumbnail
    for key, card in cards.items():
        assert TITLES[key] in card.text_content()
    for name, card in cards.items():
        card.scroll_into_view_if_needed()
        card.locator("img").first.wait_for(timeout=30_000)
        page.wait_for_function("(el) => el.complete && el.naturalWidth === 640",
                               arg=card.locator("img").first.element_handle(), timeout=30_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    next(iter(cards.values())).scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "templates.png"))
    cards["explore"].click()
    page.wait_for_function("() => window.app.graph._nodes.some(n => n.type === 'UnboxTopFeatures')", timeout=30_000)
    types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    assert types.count("UnboxProbeBlock") == 4 and "CheckpointLoaderSimple" in types
    page.keyboard.press("Escape")


def test_workflow_runs_from_the_ui_and_shows_the_ranking(page, tmp_path):
    wf = json.loads(example_path("explore").read_text())
    for node in wf["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":  # SDXL Turbo's weights are not available here
            node["type"], node["widgets_values"] = "TinySDXLCheckpointLoader", ["tiny", 0]
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    assert types.count("UnboxTopFeatures") == 4 and types.count("UnboxProbeBlock") == 4
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    text = page.wait_for_function(
        """() => {
            const n = window.app.graph._nodes.find(n => n.type === 'UnboxTopFeatures' && n.title.includes('down.2.1'));
            const w = n && n.widgets && n.widgets.find(w => w.name === 'sae_unbox_text');
            return w && w.value && w.value.length > 0 ? w.value : null;
        }""",
        timeout=300_000,
    ).json_value()
    assert text.startswith("down.2.1 step 0 (image)")
    lines = text.splitlines()[1:]
    assert 1 <= len(lines) <= 9 and all(" #" in ln and "mean" in ln for ln in lines)
    # the ranking widget is display-only: it is not sent to the server with the workflow
    api = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    top = next(v for v in api.values() if v["class_type"] == "UnboxTopFeatures")
    assert "sae_unbox_text" not in top["inputs"]
    page.screenshot(path=str(tmp_path / "explore.png"))
