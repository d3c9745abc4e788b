"""What a ComfyUI MODEL is made of: its architecture (`sae_models.blocks.ARCHS`), its transformer blocks'
modules and widths, and which block an SAE goes on."""

from __future__ import annotations

from ..sae_models.blocks import ARCHS, Block, ModelArch, arch_of, find_block
from .errors import NodeInputError, excerpt
from .inputs import check_length
from .sae_handle import SAEHandle
from .schema import AUTO

MAX_BLOCKS_TEXT = 1000  # characters in a block list (all 57 FLUX blocks by name take about 500)

# The class of the diffusion model inside ComfyUI's BaseModel, for each architecture.
_MODEL_CLASSES = {"UNetModel": "sdxl", "Flux": "flux"}


def model_arch(model) -> ModelArch | None:
    """The architecture of a ModelPatcher's diffusion model (SDXL's UNet, FLUX's transformer), or None."""
    try:
        diffusion_model = model.get_model_object("diffusion_model")
    except AttributeError:
        return None
    name = _MODEL_CLASSES.get(type(diffusion_model).__name__)
    return ARCHS[name] if name else None


def require_arch(node: str, model) -> ModelArch:
    arch = model_arch(model)
    if arch is None:
        kinds = ", ".join(a.title for a in ARCHS.values())
        try:
            what = type(model.get_model_object("diffusion_model")).__name__
        except AttributeError:
            what = type(model).__name__
        raise NodeInputError(node, f"the MODEL is a {what}; this pack knows {kinds}")
    return arch


def block_module(model, block: Block):
    """The transformer block's module inside a ModelPatcher's diffusion model (None if absent)."""
    try:
        return model.get_model_object("diffusion_model").get_submodule(block.comfy)
    except AttributeError:
        return None


def block_channels(model, block: Block) -> int | None:
    """Width of the block in this model (SDXL's paper blocks 1280, FLUX.1's 3072), read from its weights."""
    module = block_module(model, block)
    if module is None:
        return None
    for path in ("proj_in", "img_attn.qkv", "linear1"):  # SDXL, FLUX double-stream, FLUX single-stream
        try:
            return int(module.get_submodule(path).weight.shape[1])
        except AttributeError:
            continue
    norm = getattr(module, "norm", None)
    return int(norm.weight.shape[0]) if norm is not None and getattr(norm, "weight", None) is not None else None


def _block_in(node: str, arch: ModelArch, name: str) -> Block:
    block = find_block(name)
    if block is None:
        raise NodeInputError(node, f"unknown block {excerpt(name)}; {arch.title} has {_names(arch)}")
    if block.arch != arch.name:
        raise NodeInputError(node, f"block {block.short} is a block of {ARCHS[block.arch].title}, but the MODEL is "
                                   f"{arch.title} (its blocks: {_names(arch)})")
    return block


def _names(arch: ModelArch) -> str:
    names = arch.short_names
    return ", ".join(names) if len(names) <= 12 else f"{names[0]} ... {names[-1]}"


def resolve_block(node: str, handle: SAEHandle, choice: str, model) -> Block:
    """The block an SAE is attached to in `model`: the node's choice, or the block recorded in the SAE;
    checked against the MODEL's architecture, the stream and hook the SAE reads, and its d_in against the
    block's width in that model."""
    arch = require_arch(node, model)
    config = handle.sae.config
    if choice and choice != AUTO:
        block = _block_in(node, arch, choice)
    elif config.block:
        sae_arch = arch_of(config.block)
        if sae_arch is not None and sae_arch is not arch:
            raise NodeInputError(node, f"SAE {handle.name} was trained on {sae_arch.title} block {config.block}, "
                                       f"but the MODEL is {arch.title}")
        block = _block_in(node, arch, config.block)
    else:
        raise NodeInputError(
            node, f"SAE {handle.name} does not record which block it was trained on; choose the block on the node")
    if config.hook != "update":
        raise NodeInputError(
            node,
            f"SAE {handle.name} was trained on the block's {config.hook}; this pack's patches read "
            "the block's update (output minus input), as the paper's SAEs do",
        )
    if config.stream != "image":
        raise NodeInputError(node, f"SAE {handle.name} reads the {config.stream} stream; this pack's patches read "
                                   "the image tokens (the positions of the picture)")
    channels = block_channels(model, block)
    if channels is None:
        raise NodeInputError(node, f"the MODEL has no transformer block {block.comfy} ({block.short})")
    if channels != handle.sae.d_in:
        raise NodeInputError(
            node,
            f"SAE {handle.name} has d_in={handle.sae.d_in} but block {block.short} ({block.comfy}) of this "
            f"MODEL has {channels} channels",
        )
    return block


def parse_blocks(node: str, text: str, model) -> tuple[Block, ...]:
    """'paper' -> the paper's blocks of the MODEL's architecture (SDXL's four, FLUX's double.18); else block
    names separated by commas or spaces."""
    arch = require_arch(node, model)
    names = [t for t in (check_length(node, "blocks", text, MAX_BLOCKS_TEXT) or "").replace(",", " ").split() if t]
    if not names:
        raise NodeInputError(node, "no block given")
    if [n.lower() for n in names] == ["paper"]:
        names = list(arch.paper_blocks)
    blocks = []
    for n in names:
        b = _block_in(node, arch, n)
        if b not in blocks:
            blocks.append(b)
    return tuple(blocks)
