"""Sparse autoencoders for diffusion-model activations: architectures, file formats, training and metrics.

Pure PyTorch; nothing here imports ComfyUI.

    import sae_models
    sae = sae_models.load("path/to/sae")          # any supported format, detected from the files
    codes = sae.encode(x)                          # [..., n_features]
    sae_models.save(sae, "converted.safetensors")  # the native format
"""

from .architectures import (
    ARCHITECTURES,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    SparseAutoencoder,
    SparseCodes,
    TopKSAE,
    build,
)
from .blocks import PAPER_BLOCKS, SDXL_BLOCKS, Block, block_from_text, find_block, get_block
from .errors import SAEError, SAEFormatError, UnsafePickleError
from .formats import detect
from .formats import load
from .formats.native import save
from .metadata import FeatureStats, SAEConfig

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "BatchTopKSAE", "Block", "FeatureStats", "JumpReLUSAE", "PAPER_BLOCKS", "ReLUSAE",
    "SAEConfig", "SAEError", "SAEFormatError", "SDXL_BLOCKS", "SparseAutoencoder", "SparseCodes", "TopKSAE",
    "UnsafePickleError", "block_from_text", "build", "detect", "find_block", "get_block", "load", "save",
]
