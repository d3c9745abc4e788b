"""SAE Painted Mask: a MASK painted in the workbench panel, held in the workflow itself (as a PNG in a widget),
so a saved workflow reopens with the painted region intact and runs headless through the API."""

from __future__ import annotations

import base64
import binascii
import io as _io

import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, UnidentifiedImageError

from .errors import NodeInputError, validation_answer
from .schema import CATEGORY, checked_numbers

NODE = "SAE Painted Mask"
MAX_SIDE = 4096  # of the MASK made
MAX_PAINTED_PIXELS = 2048 * 2048  # of the painted PNG, read from its header before it is decoded
MAX_PNG_BYTES = 8 * 2**20


def _png(node: str, data: str) -> bytes:
    """The PNG bytes a mask widget holds (base64, or a data URL of a PNG)."""
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if head != "data:image/png;base64":
            raise NodeInputError(node, "mask holds a data URL that is not a base64 PNG")
    if len(data) > MAX_PNG_BYTES * 4 // 3 + 4:
        raise NodeInputError(node, f"mask holds more than {MAX_PNG_BYTES // 2**20} MB")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise NodeInputError(node, "mask is not base64 text") from None


def decode_mask(node: str, data: str, width: int, height: int) -> torch.Tensor:
    """The MASK `[1, height, width]` in [0, 1] a painted PNG holds (its gray levels; white = painted). An empty
    string is an empty mask. The PNG is scaled to width x height when it was painted at another size. Its
    format, size and pixel count are read from its header and checked before any pixel is decoded."""
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise NodeInputError(node, f"width and height must be between 1 and {MAX_SIDE}, got {width} x {height}")
    data = (data or "").strip()
    if not data:
        return torch.zeros(1, height, width)
    raw = _png(node, data)
    try:  # reads the header and the chunks before the pixels, not the pixels
        img = Image.open(_io.BytesIO(raw))
    except UnidentifiedImageError:
        raise NodeInputError(node, "mask is not a readable PNG (nor any image format Pillow reads)") from None
    except Image.DecompressionBombError as e:
        raise NodeInputError(node, f"mask is not a readable PNG ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for a broken or oversized chunk
        raise NodeInputError(node, f"the painted PNG cannot be read ({str(e)[:120]})") from None
    with img:
        if img.format != "PNG":
            raise NodeInputError(node, f"mask holds a {img.format} image; the painted mask is a PNG")
        w, h = img.size
        if w * h > MAX_PAINTED_PIXELS:
            raise NodeInputError(node, f"the painted PNG is {w} x {h} pixels, more than {MAX_PAINTED_PIXELS:,} in all")
        try:
            gray = img.convert("L")
        except (OSError, SyntaxError, ValueError) as e:
            raise NodeInputError(node, f"the painted PNG cannot be read ({str(e)[:120]})") from None
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0).unsqueeze(0)


class PaintedMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxPaintedMask",
            display_name=NODE,
            category=CATEGORY,
            description="A mask painted in the SAE workbench panel (white = painted), kept in the workflow. The "
            "panel sets it when you paint a feature into an image and apply it.",
            inputs=[
                io.Int.Input("width", default=512, min=1, max=MAX_SIDE, tooltip="Width of the mask (the image's)."),
                io.Int.Input("height", default=512, min=1, max=MAX_SIDE, tooltip="Height of the mask."),
                io.String.Input("mask", default="", multiline=False,
                                tooltip="The painted PNG, base64 (set by the workbench panel): at most "
                                f"{MAX_PNG_BYTES // 2**20} MB and {MAX_PAINTED_PIXELS:,} pixels "
                                "(2048 x 2048); it is scaled to width x height."),
            ],
            outputs=[io.Mask.Output(display_name="MASK")],
        )

    @classmethod
    def validate_inputs(cls, mask):
        return validation_answer(lambda: decode_mask(NODE, mask, 8, 8), mask)

    @classmethod
    @checked_numbers
    def execute(cls, width, height, mask) -> io.NodeOutput:
        return io.NodeOutput(decode_mask(NODE, mask, width, height))
