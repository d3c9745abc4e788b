"""The transformer blocks of the diffusion models the pack knows: one table per architecture.

Adding a model is adding one `ModelArch` to `ARCHS`. A block has a short name (the paper's: `down.2.1`
is the second transformer of SDXL's third down block; FLUX's `double.18`, `single.3`), its module path
inside ComfyUI's diffusion model (`comfy`) and in diffusers (`diffusers`), its width in the full-size
model, and its `kind`, which says how its update (output minus input) is read:

- `spatial`: an SDXL SpatialTransformer, `[B, C, H, W]` in and out;
- `double`: a FLUX double-stream block, `(img, txt) -> (img, txt)`: the image stream's update, image
  tokens `[B, N, C]` (the paper's FLUX SAE reads this one);
- `single`: a FLUX single-stream block over the text tokens followed by the image tokens: the image
  tokens' update (the text length is the call's own).

Every block's update is laid out on a grid of positions per image: `scale` is the side of a grid cell in
latent pixels (SDXL 2 or 4, FLUX 2: its 2x2 patches), so a 512x512 image (64x64 latent) gives down.2.1 a
16x16 grid and a FLUX block 32x32. `index` is the block's position in call order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("spatial", "double", "single")


@dataclass(frozen=True)
class Block:
    short: str
    comfy: str
    diffusers: str
    channels: int
    scale: int
    index: int
    arch: str = "sdxl"
    kind: str = "spatial"

    def grid(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        """Height and width of this block's grid for a latent of the given size (cells cover `scale` latent
        pixels; a partial cell at the edge counts, as ComfyUI pads)."""
        h, w = latent_h, latent_w
        step = 1
        while step < self.scale:
            h, w, step = (h + 1) // 2, (w + 1) // 2, step * 2
        return h, w


@dataclass(frozen=True)
class ModelArch:
    """One architecture: its blocks, the blocks the paper's SAEs sit on (`paper` in the nodes), and the size
    of the paper's SAEs for it (the Train node's defaults)."""

    name: str
    title: str
    blocks: tuple[Block, ...]
    paper_blocks: tuple[str, ...]
    n_features: int
    k: int

    @property
    def short_names(self) -> tuple[str, ...]:
        return tuple(b.short for b in self.blocks)


def _sdxl(short, comfy, diffusers, channels, scale, index):
    return Block(short, comfy, diffusers, channels, scale, index, "sdxl", "spatial")


SDXL_BLOCKS: tuple[Block, ...] = (
    _sdxl("down.1.0", "input_blocks.4.1", "down_blocks.1.attentions.0", 640, 2, 0),
    _sdxl("down.1.1", "input_blocks.5.1", "down_blocks.1.attentions.1", 640, 2, 1),
    _sdxl("down.2.0", "input_blocks.7.1", "down_blocks.2.attentions.0", 1280, 4, 2),
    _sdxl("down.2.1", "input_blocks.8.1", "down_blocks.2.attentions.1", 1280, 4, 3),
    _sdxl("mid.0", "middle_block.1", "mid_block.attentions.0", 1280, 4, 4),
    _sdxl("up.0.0", "output_blocks.0.1", "up_blocks.0.attentions.0", 1280, 4, 5),
    _sdxl("up.0.1", "output_blocks.1.1", "up_blocks.0.attentions.1", 1280, 4, 6),
    _sdxl("up.0.2", "output_blocks.2.1", "up_blocks.0.attentions.2", 1280, 4, 7),
    _sdxl("up.1.0", "output_blocks.3.1", "up_blocks.1.attentions.0", 640, 2, 8),
    _sdxl("up.1.1", "output_blocks.4.1", "up_blocks.1.attentions.1", 640, 2, 9),
    _sdxl("up.1.2", "output_blocks.5.1", "up_blocks.1.attentions.2", 640, 2, 10),
)

FLUX_DOUBLE, FLUX_SINGLE, FLUX_WIDTH = 19, 38, 3072  # FLUX.1-schnell and -dev
FLUX_BLOCKS: tuple[Block, ...] = (
    *(Block(f"double.{i}", f"double_blocks.{i}", f"transformer_blocks.{i}", FLUX_WIDTH, 2, i, "flux", "double")
      for i in range(FLUX_DOUBLE)),
    *(Block(f"single.{i}", f"single_blocks.{i}", f"single_transformer_blocks.{i}", FLUX_WIDTH, 2, FLUX_DOUBLE + i,
            "flux", "single") for i in range(FLUX_SINGLE)),
)

SDXL = ModelArch("sdxl", "SDXL", SDXL_BLOCKS, ("down.2.1", "mid.0", "up.0.0", "up.0.1"), n_features=5120, k=10)
FLUX = ModelArch("flux", "FLUX.1", FLUX_BLOCKS, ("double.18",), n_features=12288, k=20)
ARCHS: dict[str, ModelArch] = {a.name: a for a in (SDXL, FLUX)}

PAPER_BLOCKS = SDXL.paper_blocks
SHORT_NAMES = tuple(b.short for a in ARCHS.values() for b in a.blocks)

# Module prefixes seen in hookpoints and state dicts: ComfyUI's `diffusion_model.`, diffusers' `unet.` and
# `transformer.`.
_BY_NAME: dict[str, Block] = {}
for _a in ARCHS.values():
    for _b in _a.blocks:
        for _name in (_b.short, _b.comfy, _b.diffusers, "diffusion_model." + _b.comfy,
                      ("unet." if _a.name == "sdxl" else "transformer.") + _b.diffusers):
            _BY_NAME[_name] = _b


def find_block(name: str) -> Block | None:
    """The block called `name` in any of the naming schemes (short, ComfyUI, diffusers), or None."""
    return _BY_NAME.get(name.strip()) if name else None


def get_block(name: str) -> Block:
    """Like `find_block`, but raises ValueError listing the known names."""
    block = find_block(name)
    if block is None:
        known = "; ".join(f"{a.title}: {_ranges(a)}" for a in ARCHS.values())
        raise ValueError(f"unknown transformer block {name!r}; known blocks: {known}")
    return block


def arch_of(block: str | Block | None) -> ModelArch | None:
    """The architecture a block (or a block name) belongs to."""
    b = find_block(block) if isinstance(block, str) else block
    return ARCHS[b.arch] if b is not None else None


def _ranges(arch: ModelArch) -> str:
    if arch.name == "flux":
        return f"double.0 ... double.{FLUX_DOUBLE - 1}, single.0 ... single.{FLUX_SINGLE - 1}"
    return ", ".join(arch.short_names)


# Block names inside longer strings (release folder names, hookpoints), most specific first.
_IN_TEXT = (
    re.compile(r"((?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"),
    re.compile(r"((?:input|output)_blocks\.\d+\.1|middle_block\.1)(?![\d])"),
    re.compile(r"(single_transformer_blocks\.\d+)(?![\d])"),
    re.compile(r"(?<!single_)(transformer_blocks\.\d+)(?![\d])"),
    re.compile(r"((?:double|single)_blocks\.\d+)(?![\d])"),
)
# The paper's demo names its FLUX SAE's block `flux_18` (double-stream block 18): `SAE_flux_18`.
_FLUX_RELEASE = re.compile(r"flux_(\d+)(?![\d])", re.IGNORECASE)


def block_from_text(text: str) -> Block | None:
    """Find a block named inside a longer string, e.g. a release folder name
    `unet.down_blocks.2.attentions.1_k10_hidden5120_...`, a hookpoint `diffusion_model.input_blocks.8.1` or
    `transformer.transformer_blocks.18`, or the paper's FLUX release `SAE_flux_18` (double.18)."""
    for pattern in _IN_TEXT:
        m = pattern.search(text)
        if m and find_block(m.group(1)):
            return find_block(m.group(1))
    m = _FLUX_RELEASE.search(text)
    return find_block(f"double.{m.group(1)}") if m else None
