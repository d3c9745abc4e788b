"""The harness itself: the tiny SDXL model, CLIP stand-in and VAE run through REAL ComfyUI nodes,
in process and through a headless server."""

import pytest
import torch


def _sample(pack, model, positive, negative, steps=2, seed=0):
    latent = pack.node("EmptyLatentImage")().generate(64, 64, 1)[0]
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        ksampler = pack.node("KSampler")()
        return ksampler.sample(model, seed, steps, 7.0, "euler", "normal", positive, negative, latent)[0]


def test_comfyui_loads_the_pack(comfy_pack):
    import folder_paths

    assert comfy_pack.pack_node_names <= set(comfy_pack.node_class_mappings)
    assert {"KSampler", "CLIPTextEncode", "VAEDecode", "SDTurboScheduler"} <= set(comfy_pack.node_class_mappings)
    assert "sae" in folder_paths.folder_names_and_paths


def test_tiny_model_has_sdxl_block_paths(tiny):
    unet = tiny.tiny_model().model.diffusion_model
    assert type(unet).__name__ == "UNetModel"
    assert tiny.TINY_CHANNELS == {p: unet.get_submodule(p).norm.num_channels for p in tiny.TRANSFORMER_BLOCKS}
    assert set(tiny.TINY_CHANNELS.values()) == {64, 128}


def test_ksampler_on_tiny_model_depends_on_conditioning(comfy_pack, tiny):
    model, negative = tiny.tiny_model(), tiny.tiny_conditioning("")
    cat = _sample(comfy_pack, model, tiny.tiny_conditioning("a cat"), negative)["samples"]
    again = _sample(comfy_pack, model, tiny.tiny_conditioning("a cat"), negative)["samples"]
    dog = _sample(comfy_pack, model, tiny.tiny_conditioning("a dog"), negative)["samples"]
    assert cat.shape == (1, 4, 8, 8) and torch.isfinite(cat).all()
    assert torch.equal(cat, again)
    assert not torch.allclose(cat, dog)


def test_tiny_clip_through_clip_text_encode(comfy_pack, tiny):
    encode = comfy_pack.node("CLIPTextEncode")().encode
    (cond, extra), = encode(tiny.TinyCLIP(), "a cat")[0]
    assert cond.shape == (1, 77, 64) and extra["pooled_output"].shape == (1, 1280)
    assert torch.equal(cond, tiny.tiny_conditioning("a cat")[0][0])
    assert not torch.equal(cond, encode(tiny.TinyCLIP(), "a dog")[0][0][0])


def test_tiny_vae_decodes_and_encodes(comfy_pack, tiny):
    vae = tiny.tiny_vae()
    with torch.inference_mode():
        image = comfy_pack.node("VAEDecode")().decode(vae, {"samples": torch.randn(1, 4, 16, 16)})[0]
        latent = comfy_pack.node("VAEEncode")().encode(vae, image)[0]["samples"]
    assert image.shape == (1, 128, 128, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    assert latent.shape == (1, 4, 16, 16) and torch.isfinite(latent).all()


def _txt2img(text: str, seed: int = 0) -> dict:
    """API-format txt2img graph with TinySDXLCheckpointLoader in place of CheckpointLoaderSimple."""
    return {
        "1": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"ckpt_name": "tiny", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "harness/tiny"}},
    }


@pytest.mark.server
def test_server_lists_tiny_loader(comfy_server):
    info = comfy_server.object_info()
    assert info["TinySDXLCheckpointLoader"]["output"] == ["MODEL", "CLIP", "VAE"]
    assert "KSampler" in info


@pytest.mark.server
def test_server_runs_tiny_txt2img(comfy_server):
    entry = comfy_server.run(_txt2img("a cat"))
    (saved,) = entry["outputs"]["7"]["images"]
    png = comfy_server.output_dir / saved["subfolder"] / saved["filename"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size == (128, 128)


@pytest.mark.server
def test_server_reports_errors(comfy_server):
    invalid = _txt2img("a cat")
    invalid["5"]["inputs"]["steps"] = 0  # below the input's min: rejected by POST /prompt
    with pytest.raises(comfy_server.Error, match="400"):
        comfy_server.run(invalid)
    failing = _txt2img("a cat")
    # 16 latent channels: the 4-channel VAE fails while executing (KSampler would not: ComfyUI swaps an
    # all-zero latent with the wrong channel count for an empty one of the model's)
    failing["4"]["class_type"] = "EmptySD3LatentImage"
    failing["6"]["inputs"]["samples"] = ["4", 0]
    with pytest.raises(comfy_server.Error, match="VAEDecode"):
        comfy_server.run(failing)
