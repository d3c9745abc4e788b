"""Thumbnails of the example workflows for ComfyUI's Templates dialog (`example_workflows/<name>.jpg`):
each workflow opened in ComfyUI's own web frontend, fitted to the view, UI chrome hidden, and captured.

    python scripts/make_template_thumbnails.py --server http://127.0.0.1:8188 [--chromium /usr/bin/chromium]

The server must have this pack installed (its nodes draw the graph). Needs Playwright and a Chromium
(Debian's `chromium` package; no browser is downloaded). A workflow whose nodes the server lacks is refused.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK / "example_workflows"
SIZE = (640, 480)
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def capture(page, workflow: dict) -> bytes:
    """PNG of `workflow` as the frontend's canvas draws it (no menus, no minimap), fitted to the page."""
    missing = page.evaluate(
        "(types) => types.filter(t => !window.LiteGraph.registered_node_types[t])",
        sorted({n["type"] for n in workflow["nodes"]}))
    if missing:
        raise RuntimeError(f"the server does not know these node types: {', '.join(missing)}")
    page.evaluate("""async (wf) => {
        await window.app.loadGraphData(wf, true, false, null,
                                       { showMissingNodesDialog: false, showMissingModelsDialog: false });
    }""", workflow)
    page.wait_for_timeout(300)  # node sizes are known once the graph has been drawn
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(300)
    data_url = page.evaluate("""() => {
        const canvas = window.app.canvas;
        canvas.show_info = false;               // no FPS / node-count text
        canvas.low_quality_zoom_threshold = 0;  // titles and widgets drawn even when zoomed out
        canvas.min_font_size_for_lod = 0;
        canvas.deselectAll?.();
        canvas.draw(true, true);
        return canvas.canvas.toDataURL('image/png');
    }""")
    return base64.b64decode(data_url.split(",", 1)[1])


def to_thumbnail(png: bytes) -> bytes:
    from PIL import Image, ImageChops

    img = Image.open(io.BytesIO(png)).convert("RGB")
    # crop to the drawn graph (what differs from the background colour at the corner), with a margin
    background = Image.new("RGB", img.size, img.getpixel((0, 0)))
    box = ImageChops.difference(img, background).convert("L").point(lambda v: 255 if v > 24 else 0).getbbox()
    if box:
        m = max(box[2] - box[0], box[3] - box[1]) // 30
        img = img.crop((max(box[0] - m, 0), max(box[1] - m, 0), min(box[2] + m, img.width), min(box[3] + m, img.height)))
    framed = Image.new("RGB", _aspect(img.size), img.getpixel((0, 0)))
    framed.paste(img, ((framed.width - img.width) // 2, (framed.height - img.height) // 2))
    framed = framed.resize(SIZE, Image.Resampling.LANCZOS)  # the aspect is already SIZE's, up to a pixel
    out = io.BytesIO()
    framed.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()


def _aspect(size: tuple[int, int]) -> tuple[int, int]:
    """The smallest size of SIZE's aspect ratio that holds `size`."""
    w, h = size
    if w * SIZE[1] >= h * SIZE[0]:
        return w, -(-w * SIZE[1] // SIZE[0])
    return -(-h * SIZE[0] // SIZE[1]), h


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="a running ComfyUI with the pack")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--out", type=Path, default=WORKFLOWS, help="folder for the .jpg files")
    ap.add_argument("names", nargs="*", help="workflow names (default: all in example_workflows/)")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    paths = [WORKFLOWS / f"{n}.json" for n in args.names] or sorted(WORKFLOWS.glob("*.json"))
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": SIZE[0] * 2, "height": SIZE[1] * 2})
        page.goto(args.server, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager", timeout=120_000)
        for path in paths:
            jpg = to_thumbnail(capture(page, json.loads(path.read_text())))
            dst = args.out / f"{path.stem}.jpg"
            tmp = dst.with_suffix(".jpg.tmp")
            tmp.write_bytes(jpg)
            tmp.replace(dst)
            print(f"wrote {dst} ({len(jpg)} bytes)")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
