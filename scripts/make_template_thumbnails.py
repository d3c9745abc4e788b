"""Thumbnails of the example workflows for ComfyUI's Templates dialog (`example_workflows/<title>.jpg`): a card
that a user can tell from the others at a glance: the workflow's title, its key nodes drawn large in the
order they act, and the result it makes named. (Screenshots of the graphs were near-identical pictures of
nodes too small to read at the dialog's size.)

    python scripts/make_template_thumbnails.py [keys ...]

Needs Pillow and a TrueType font (DejaVu Sans, Debian's fonts-dejavu-core, or --font).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_names import TITLES, example_path  # noqa: E402

SIZE = (640, 480)
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
SDXL, FLUX, DATA = (66, 133, 244), (171, 71, 188), (67, 160, 71)
# key -> (accent, the key nodes in the order they act, what the workflow makes)
CARDS = {
    "explore": (SDXL, ["Load SAE ×4", "Probe Block ×4", "Top Features"], "ranked features + heatmaps of 4 blocks"),
    "paint": (SDXL, ["Painted Mask", "Steer: add", "KSampler"], "original and painted image"),
    "feature_icon": (SDXL, ["empty prompt", "Steer: replace", "KSampler"], "the feature drawn on its own"),
    "ablate": (SDXL, ["Load SAE", "Steer: ablate", "KSampler"], "image without the features"),
    "reconstruct": (SDXL, ["Load SAE", "Reconstruct Block", "KSampler"], "image through the SAE + its error"),
    "dump": (DATA, ["Prompt List", "Dump Activations", "Dump Images"], "training shards of 4 blocks"),
    "train": (DATA, ["dump folder", "SAE Train", "Steer"], "a new SAE file, steered image"),
    "flux_explore": (FLUX, ["Load SAE (FLUX)", "Probe double.18", "Top Features"], "ranked features + heatmap"),
    "flux_paint": (FLUX, ["Painted Mask", "Steer: add", "KSampler"], "FLUX image, painted"),
    "sdxl_base_paint": (SDXL, ["Painted Mask", "Steer: cond +, uncond −", "KSampler cfg 8"], "SDXL base image, painted"),
    "workbench": (SDXL, ["Probe Block", "SAE tab", "Apply"], "click, paint, find features"),
}


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def card(key: str, font_path: str = FONT) -> bytes:
    """The JPEG thumbnail of example workflow `key`."""
    accent, nodes, result = CARDS[key]
    img = Image.new("RGB", SIZE, (30, 32, 38))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, SIZE[0], 10), fill=accent)
    title = _font(font_path.replace("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"), 36)
    y = 30
    for line in _wrap(d, TITLES[key], title, SIZE[0] - 60)[:3]:
        d.text((30, y), line, font=title, fill=(240, 240, 240))
        y += 44
    node_font = _font(font_path, 24)
    y = max(y + 20, 190)
    for i, name in enumerate(nodes):
        box = (60, y, SIZE[0] - 60, y + 46)
        d.rounded_rectangle(box, radius=10, fill=(53, 56, 66), outline=accent, width=3)
        d.text((box[0] + 18, y + 9), name, font=node_font, fill=(235, 235, 235))
        y += 46
        if i < len(nodes) - 1:
            d.polygon(((SIZE[0] // 2 - 9, y + 3), (SIZE[0] // 2 + 9, y + 3), (SIZE[0] // 2, y + 13)), fill=accent)
            y += 16
    makes = _font(font_path, 22)
    d.text((30, SIZE[1] - 42), "→ " + result, font=makes, fill=accent)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=88, optimize=True)
    return out.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("keys", nargs="*", help=f"workflows (default: all): {', '.join(TITLES)}")
    ap.add_argument("--font", default=FONT, help="a TrueType font (its -Bold variant beside it for titles)")
    args = ap.parse_args(argv)
    for key in args.keys or TITLES:
        dst = example_path(key, ".jpg")
        tmp = dst.with_suffix(".jpg.tmp")
        tmp.write_bytes(card(key, args.font))
        tmp.replace(dst)
        print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
