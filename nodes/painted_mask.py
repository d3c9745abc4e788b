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
from .schema import CATEGORY

NODE = "SAE Painted Mask"
MAX_SIDE = 8192
MAX_PNG_BYTES = 8 * 2**20


def decode_mask(node: str, data: str, width: int, height: int) -> torch.Tensor:
    """The MASK `[1, height, width]` in [0, 1] a painted PNG holds (its gray levels; white = painted). An empty
    string is an empty mask. The PNG is scaled to width x height when it was painted at another size."""
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise NodeInputError(node, f"width and height must be between 1 and {MAX_SIDE}, got {width} x {height}")
    data = (data or "").strip()
    if not data:
        return torch.zeros(1, height, width)
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if head != "data:image/png;base64":
            raise NodeInputError(node, "mask holds a data URL that is not a base64 PNG")
    if len(data) > MAX_PNG_BYTES * 4 // 3 + 4:
        raise NodeInputError(node, f"mask holds more than {MAX_PNG_BYTES // 2**20} MB")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(_io.BytesIO(raw)) as img:
            if img.format != "PNG":
                raise NodeInputError(node, f"mask holds a {img.format} image, not a PNG")
            if img.width > MAX_SIDE or img.height > MAX_SIDE:
                raise NodeInputError(node, f"the painted PNG is {img.width} x {img.height}, more than {MAX_SIDE}")
            gray = img.convert("L")
            if gray.size != (width, height):
                gray = gray.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(gray, dtype=np.float32) / 255.0
    except (binascii.Error, ValueError):
        raise NodeInputError(node, "mask is not base64 text") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise NodeInputError(node, f"mask is not a readable PNG ({e})") from None
    return torch.from_numpy(arr.copy()).unsqueeze(0)


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
                                tooltip="The painted PNG, base64 (set by the workbench panel)."),
            ],
            outputs=[io.Mask.Output(display_name="MASK")],
        )

    @classmethod
    def validate_inputs(cls, mask):
        return validation_answer(lambda: decode_mask(NODE, mask, 8, 8), mask)

    @classmethod
    def execute(cls, width, height, mask) -> io.NodeOutput:
        return io.NodeOutput(decode_mask(NODE, mask, width, height))
