"""What a ComfyUI MODEL is made of: its transformer blocks, their modules and widths, and which block an
SAE goes on."""

from __future__ import annotations

from ..sae_models.blocks import PAPER_BLOCKS, SHORT_NAMES, Block, find_block
from .errors import NodeInputError, excerpt
from .sae_handle import SAEHandle
from .schema import AUTO


def block_module(model, block: Block):
    """The transformer block's module inside a ModelPatcher's diffusion model (None if absent)."""
    try:
        return model.get_model_object("diffusion_model").get_submodule(block.comfy)
    except AttributeError:
        return None


def block_channels(model, block: Block) -> int | None:
    """Channels of the block in this model (1280 for SDXL's paper blocks), read from its weights."""
    module = block_module(model, block)
    if module is None:
        return None
    proj = getattr(module, "proj_in", None)
    if proj is not None and hasattr(proj, "weight"):
        return int(proj.weight.shape[1])
    norm = getattr(module, "norm", None)
    return int(norm.weight.shape[0]) if norm is not None and getattr(norm, "weight", None) is not None else None


def resolve_block(node: str, handle: SAEHandle, choice: str, model=None) -> Block:
    """The block an SAE is attached to: the node's choice, or the block recorded in the SAE; checked
    against the SAE's d_in and, when a model is given, against the block's channels in that model."""
    if choice and choice != AUTO:
        block = find_block(choice)
        if block is None:
            raise NodeInputError(node, f"unknown block {excerpt(choice)}; choose one of {', '.join(SHORT_NAMES)}")
    else:
        block = find_block(handle.sae.config.block) if handle.sae.config.block else None
        if block is None:
            raise NodeInputError(
                node, f"SAE {handle.name} does not record which block it was trained on; choose the block on the node"
            )
    if handle.sae.config.hook != "update":
        raise NodeInputError(
            node,
            f"SAE {handle.name} was trained on the block's {handle.sae.config.hook}; this pack's patches read "
            "the block's update (output minus input), as the paper's SAEs do",
        )
    if model is not None:
        channels = block_channels(model, block)
        if channels is None:
            raise NodeInputError(node, f"the MODEL has no transformer block {block.comfy} ({block.short}); is it SDXL?")
        if channels != handle.sae.d_in:
            raise NodeInputError(
                node,
                f"SAE {handle.name} has d_in={handle.sae.d_in} but block {block.short} ({block.comfy}) of this "
                f"MODEL has {channels} channels",
            )
    return block


def parse_blocks(node: str, text: str) -> tuple[Block, ...]:
    """'paper' -> the paper's four blocks; else block names separated by commas or spaces."""
    names = [t for t in text.replace(",", " ").split() if t]
    if not names:
        raise NodeInputError(node, "no block given")
    if [n.lower() for n in names] == ["paper"]:
        names = list(PAPER_BLOCKS)
    blocks = []
    for n in names:
        b = find_block(n)
        if b is None:
            raise NodeInputError(node, f"unknown block {n!r}; use 'paper' or names from {', '.join(SHORT_NAMES)}")
        if b not in blocks:
            blocks.append(b)
    return tuple(blocks)
