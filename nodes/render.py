"""Pictures of feature activations: colormaps, heatmap overlays and labelled grids (torch + Pillow only)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Colormaps as evenly spaced anchor colours (RGB 0-255), linearly interpolated. The anchors of viridis,
# inferno and magma are samples of matplotlib's maps at 0, 1/4, 1/2, 3/4, 1.
COLORMAPS = {
    "inferno": [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
    "viridis": [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
    "magma": [(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191)],
    "jet": [(0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128), (255, 255, 0),
            (255, 128, 0), (255, 0, 0), (128, 0, 0)],
    "hot": [(0, 0, 0), (170, 0, 0), (255, 85, 0), (255, 255, 0), (255, 255, 255)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}


def colorize(values: torch.Tensor, colormap: str) -> torch.Tensor:
    """Map values in [0, 1] of any shape `[...]` to RGB `[..., 3]` in [0, 1]."""
    anchors = torch.tensor(COLORMAPS[colormap], dtype=torch.float32, device=values.device) / 255.0
    pos = values.clamp(0, 1) * (len(anchors) - 1)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - lo).unsqueeze(-1)
    return anchors[lo] * (1 - frac) + anchors[lo + 1] * frac


def upsample(maps: torch.Tensor, height: int, width: int, smooth: bool = False) -> torch.Tensor:
    """Resize activation maps `[B, h, w]` to the image size (nearest keeps the grid visible)."""
    mode = "bilinear" if smooth else "nearest"
    kw = {"align_corners": False} if smooth else {}
    return F.interpolate(maps.unsqueeze(1).float(), size=(height, width), mode=mode, **kw)[:, 0]


def overlay(images: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor, colormap: str, alpha: float,
            smooth: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend coloured activation maps over ComfyUI IMAGEs `[B, H, W, 3]`.

    `maps [B, h, w]` are divided by `scale` (per image `[B]` or scalar) to land in [0, 1]. Returns the
    blended IMAGE and the normalised heat as a MASK `[B, H, W]`."""
    B, H, W, _ = images.shape
    if maps.shape[0] == 1 and B > 1:
        maps = maps.expand(B, -1, -1)
    if maps.shape[0] != B:
        raise ValueError(f"{maps.shape[0]} activation maps for {B} images")
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1, 1).clamp_min(1e-8)
    heat = upsample(maps.float() / scale, H, W, smooth).clamp(0, 1)
    colors = colorize(heat, colormap)
    blended = images[..., :3].float().cpu() * (1 - alpha) + colors * alpha
    return blended.clamp(0, 1), heat


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def labelled_grid(tiles: list[torch.Tensor], labels: list[str], columns: int, pad: int = 4,
                  label_height: int | None = None) -> torch.Tensor:
    """Arrange IMAGE tiles `[H, W, 3]` in a grid with a caption strip above each; returns `[1, H', W', 3]`."""
    if not tiles:
        raise ValueError("no tiles to draw")
    h, w = tiles[0].shape[:2]
    label_height = label_height or max(14, h // 12)
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    cell_h, cell_w = h + label_height + pad, w + pad
    canvas = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, label_height - 4))
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        r, c = divmod(i, columns)
        x, y = pad + c * cell_w, pad + r * cell_h
        draw.text((x + 2, y + 1), label, fill=(235, 235, 235), font=font)
        arr = (tile.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(arr), (x, y + label_height))
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0).unsqueeze(0)
