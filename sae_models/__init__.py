"""Sparse autoencoders for diffusion-model activations: architectures, file formats, activation dumps,
training, statistics and metrics.

Pure PyTorch; nothing here imports ComfyUI.

    import sae_models
    sae = sae_models.load("path/to/sae")          # any supported format, detected from the files
    codes = sae.encode(x)                          # [..., n_features]
    sae_models.save(sae, "converted.safetensors")  # the native format

    stream = sae_models.iter_vectors("dump", "down.2.1")   # shuffled [4096, d_in] batches of a dump
    sae = sae_models.train(stream, n_features=5120, k=10)  # the paper's TopK training
"""

from .architectures import (
    ARCHITECTURES,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    ReLUSAE,
    SparseAutoencoder,
    SparseCodes,
    TopKSAE,
    build,
)
from .blocks import (
    ARCHS, FLUX, FLUX_BLOCKS, PAPER_BLOCKS, SDXL, SDXL_BLOCKS, Block, ModelArch, arch_of, block_from_text, find_block,
    get_block,
)
from .errors import SAEError, SAEFormatError, UnsafePickleError
from .formats import detect
from .formats import load
from .formats.native import save
from .features_table import FeatureTable
from .metadata import FeatureStats, SAEConfig
from . import metrics, shards, stats, training
from .metrics import evaluate, fvu
from .pipeline import train_on_dump
from .shards import ShardWriter, done_images, iter_vectors, read_manifest
from .stats import feature_stats, features_index, read_features_index, write_features_index
from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "ARCHS", "FLUX", "FLUX_BLOCKS", "ModelArch", "SDXL", "arch_of", "BatchTopKSAE", "Block", "FeatureStats", "FeatureTable", "JumpReLUSAE", "PAPER_BLOCKS", "ReLUSAE",
    "SAEConfig", "SAEError", "SAEFormatError", "SDXL_BLOCKS", "SparseAutoencoder", "SparseCodes", "TopKSAE",
    "UnsafePickleError", "block_from_text", "build", "detect", "find_block", "get_block", "load", "save",
    "ShardWriter", "done_images", "evaluate", "feature_stats", "features_index", "fvu", "iter_vectors", "metrics",
    "read_features_index", "read_manifest", "shards", "stats", "train", "TrainConfig", "train_on_dump", "training", "write_features_index",
]
