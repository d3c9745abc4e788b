"""The transformer blocks of the SDXL UNet, under the three names people use for them.

Short names follow the paper (`down.2.1` is the second transformer of the third down block);
`comfy` is the module path inside ComfyUI's UNetModel; `diffusers` is the name in a diffusers UNet.
`index` is the block's position in call order (ComfyUI's `transformer_index` at the block's first layer),
`scale` the downsampling of the block's grid relative to the latent (a 512x512 image has a 64x64 latent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    short: str
    comfy: str
    diffusers: str
    channels: int
    scale: int
    index: int

    def grid(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        """Height and width of this block's feature map for a latent of the given size."""
        h, w = latent_h, latent_w
        for _ in range({2: 1, 4: 2}[self.scale]):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w


SDXL_BLOCKS: tuple[Block, ...] = (
    Block("down.1.0", "input_blocks.4.1", "down_blocks.1.attentions.0", 640, 2, 0),
    Block("down.1.1", "input_blocks.5.1", "down_blocks.1.attentions.1", 640, 2, 1),
    Block("down.2.0", "input_blocks.7.1", "down_blocks.2.attentions.0", 1280, 4, 2),
    Block("down.2.1", "input_blocks.8.1", "down_blocks.2.attentions.1", 1280, 4, 3),
    Block("mid.0", "middle_block.1", "mid_block.attentions.0", 1280, 4, 4),
    Block("up.0.0", "output_blocks.0.1", "up_blocks.0.attentions.0", 1280, 4, 5),
    Block("up.0.1", "output_blocks.1.1", "up_blocks.0.attentions.1", 1280, 4, 6),
    Block("up.0.2", "output_blocks.2.1", "up_blocks.0.attentions.2", 1280, 4, 7),
    Block("up.1.0", "output_blocks.3.1", "up_blocks.1.attentions.0", 640, 2, 8),
    Block("up.1.1", "output_blocks.4.1", "up_blocks.1.attentions.1", 640, 2, 9),
    Block("up.1.2", "output_blocks.5.1", "up_blocks.1.attentions.2", 640, 2, 10),
)

PAPER_BLOCKS = ("down.2.1", "mid.0", "up.0.0", "up.0.1")
SHORT_NAMES = tuple(b.short for b in SDXL_BLOCKS)

_BY_NAME: dict[str, Block] = {}
for _b in SDXL_BLOCKS:
    for _name in (_b.short, _b.comfy, _b.diffusers, "unet." + _b.diffusers, "diffusion_model." + _b.comfy):
        _BY_NAME[_name] = _b


def find_block(name: str) -> Block | None:
    """The block called `name` in any of the naming schemes (short, ComfyUI, diffusers), or None."""
    return _BY_NAME.get(name.strip()) if name else None


def get_block(name: str) -> Block:
    """Like `find_block`, but raises ValueError listing the known names."""
    block = find_block(name)
    if block is None:
        raise ValueError(f"unknown SDXL transformer block {name!r}; known blocks: {', '.join(SHORT_NAMES)}")
    return block


_DIFFUSERS_IN_TEXT = re.compile(r"((?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)")
_COMFY_IN_TEXT = re.compile(r"((?:input|output)_blocks\.\d+\.1|middle_block\.1)(?![\d])")


def block_from_text(text: str) -> Block | None:
    """Find a block named inside a longer string, e.g. a release folder name
    `unet.down_blocks.2.attentions.1_k10_hidden5120_...` or a hookpoint `diffusion_model.input_blocks.8.1`."""
    for pattern in (_DIFFUSERS_IN_TEXT, _COMFY_IN_TEXT):
        m = pattern.search(text)
        if m and find_block(m.group(1)):
            return find_block(m.group(1))
    return None
