"""The registry of architectures and blocks: names in every scheme, grids, and blocks found in file names.
The expected names are ComfyUI's and diffusers' module paths, written out by hand."""

import pytest

import sae_models
from sae_models import FLUX, SDXL, arch_of, block_from_text, find_block, get_block


def test_two_architectures_with_their_blocks():
    assert set(sae_models.ARCHS) == {"sdxl", "flux"}
    assert len(SDXL.blocks) == 11 and SDXL.paper_blocks == ("down.2.1", "mid.0", "up.0.0", "up.0.1")
    assert len(FLUX.blocks) == 19 + 38 and FLUX.paper_blocks == ("double.18",)
    assert (SDXL.n_features, SDXL.k, FLUX.n_features, FLUX.k) == (5120, 10, 12288, 20)
    assert len({b.short for a in sae_models.ARCHS.values() for b in a.blocks}) == 11 + 57  # names are unique


@pytest.mark.parametrize("name, short, comfy, diffusers, kind", [
    ("double.18", "double.18", "double_blocks.18", "transformer_blocks.18", "double"),
    ("transformer.transformer_blocks.18", "double.18", "double_blocks.18", "transformer_blocks.18", "double"),
    ("diffusion_model.double_blocks.0", "double.0", "double_blocks.0", "transformer_blocks.0", "double"),
    ("single_transformer_blocks.37", "single.37", "single_blocks.37", "single_transformer_blocks.37", "single"),
    ("single_blocks.5", "single.5", "single_blocks.5", "single_transformer_blocks.5", "single"),
    ("unet.down_blocks.2.attentions.1", "down.2.1", "input_blocks.8.1", "down_blocks.2.attentions.1", "spatial"),
])
def test_every_naming_scheme_finds_the_block(name, short, comfy, diffusers, kind):
    b = get_block(name)
    assert (b.short, b.comfy, b.diffusers, b.kind) == (short, comfy, diffusers, kind)
    assert arch_of(name) is (FLUX if kind != "spatial" else SDXL)


def test_unknown_blocks():
    assert find_block("double.19") is None and find_block("single.38") is None and find_block("") is None
    with pytest.raises(ValueError, match=r"unknown transformer block 'double.19'; known blocks: SDXL: down.1.0, .*; "
                                         r"FLUX.1: double.0 ... double.18, single.0 ... single.37"):
        get_block("double.19")


@pytest.mark.parametrize("block, latent, grid", [
    ("down.2.1", (64, 64), (16, 16)), ("down.1.0", (64, 64), (32, 32)), ("mid.0", (128, 128), (32, 32)),
    ("double.18", (64, 64), (32, 32)), ("double.18", (128, 128), (64, 64)), ("single.3", (128, 96), (64, 48)),
    ("double.0", (9, 13), (5, 7)),  # FLUX pads an odd latent to whole 2x2 patches
])
def test_grids(block, latent, grid):
    assert get_block(block).grid(*latent) == grid


@pytest.mark.parametrize("text, short", [
    ("unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001", "down.2.1"),
    ("transformer.transformer_blocks.18_k20_hidden12288_auxk256_bs4096_lr0.0001", "double.18"),
    ("transformer.single_transformer_blocks.7_k20_hidden12288", "single.7"),
    ("/models/sae/SAE_flux_18", "double.18"),  # the paper's FLUX release (its demo calls the block flux_18)
    ("diffusion_model.double_blocks.3.img_attn", "double.3"),
    ("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1", "up.0.1"),  # SDXL's own transformer_blocks
])
def test_blocks_named_in_longer_strings(text, short):
    assert block_from_text(text).short == short


def test_an_sae_config_names_its_architecture_and_stream():
    c = sae_models.SAEConfig(architecture="topk", d_in=3072, n_features=12288, k=20, block="transformer_blocks.18")
    assert (c.block, c.block_arch, c.block_comfy, c.stream) == ("double.18", "flux", "double_blocks.18", "image")
    d = c.to_dict()
    assert d["block_arch"] == "flux" and d["stream"] == "image"
    assert sae_models.SAEConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="stream must be one of"):
        sae_models.SAEConfig(architecture="topk", d_in=4, n_features=8, k=2, stream="audio")
