"""FLUX through a real server, loaded the way users load FLUX.1: a FLUX file in models/diffusion_models read by
ComfyUI's own UNETLoader (which detects FLUX only at FLUX.1's hidden size, 3072, so the file has one
double-stream and one single-stream block), conditioning in FLUX's layout (CLIP-L pooled + T5 tokens, from
a stand-in: T5-XXL alone is 4.7 B parameters) and a 16-channel VAE."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

AUTO = "auto (the SAE's block)"
WIDTH = 3072
T5_WIDTH = 4096  # the file's text width: v0.3.64 detects FLUX with T5-XXL's only


@pytest.fixture(scope="module")
def server(comfy_server, comfyui_path):
    import sae_models
    import tiny_flux

    path = comfy_server.root / "diffusion_models" / "flux_min.safetensors"
    if not path.exists():
        tiny_flux.write_loadable_flux(path)
    g = torch.Generator().manual_seed(0)
    for block in ("double.0", "single.0"):
        sae = sae_models.build(sae_models.SAEConfig(architecture="topk", d_in=WIDTH, n_features=64, k=4, block=block))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(64, WIDTH, generator=g) / WIDTH ** 0.5)
            sae.W_dec.copy_(torch.randn(64, WIDTH, generator=g) / WIDTH ** 0.5)
        sae.stats = sae_models.FeatureStats(mean=torch.rand(64, generator=g) + 0.5)
        sae_models.save(sae, comfy_server.sae_dir / f"flux_{block}.safetensors")
    return comfy_server


def graph(models: dict) -> dict:
    """UNETLoader -> each MODEL variant -> KSampler -> SaveLatent `flux_server/<name>`."""
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux_min.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "TinyFluxDualCLIPLoader", "inputs": {"seed": 0, "t5_width": T5_WIDTH}},
        "3": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "", "t5xxl": "a red fox",
                                                             "guidance": 3.5}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": "flux_double.0.safetensors"}},
        "6": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": "flux_single.0.safetensors"}},
    }
    for i, (name, node) in enumerate(models.items()):
        if node is not None:
            g[f"1{i}"] = node
        model = ["1", 0] if node is None else [f"1{i}", 0]
        g[f"2{i}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 3,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
        g[f"3{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"2{i}", 0],
                                                             "filename_prefix": f"flux_server/{name}"}}
    return g


def latent(server, name: str) -> torch.Tensor:
    path = sorted((server.output_dir / "flux_server").glob(f"{name}_*.latent"))[-1]
    return load_file(str(path))["latent_tensor"]


def test_a_flux_file_loaded_by_unet_loader_is_probed_and_steered(server):
    probe = {"class_type": "UnboxProbeBlock", "inputs": {"model": ["1", 0], "sae": ["5", 0], "block": AUTO,
                                                        "steps": "all", "apply_to": "cond"}}
    steer = {"class_type": "UnboxSteerFeatures", "inputs": {
        "model": ["1", 0], "sae": ["6", 0], "features": "3", "strength": 20.0, "mode": "add", "block": AUTO,
        "units": "mean activation", "start_percent": 0.0, "end_percent": 1.0, "apply_to": "cond"}}
    g = graph({"plain": None, "probed": probe, "steered": steer})  # the probe is node 11, its sampler 21
    g["40"] = {"class_type": "TinyFluxVAELoader", "inputs": {"seed": 0}}
    g["41"] = {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["40", 0]}}
    g["42"] = {"class_type": "UnboxTopFeatures", "inputs": {
        "probe": ["11", 1], "image": ["41", 0], "top_n": 3, "block": "first probed block", "step": -1,
        "image_index": 0, "columns": 3, "colormap": "inferno", "alpha": 0.6, "filename_prefix": ""}}
    entry = server.run(g, timeout=900)
    plain, probed, steered = latent(server, "plain"), latent(server, "probed"), latent(server, "steered")
    assert plain.shape == (1, 16, 16, 16) and torch.isfinite(steered).all()
    assert torch.equal(probed, plain) and not torch.equal(steered, plain)
    ranking = json.loads(entry["outputs"]["42"]["text"][0])
    assert ranking["block"] == "double.0" and ranking["grid"] == [8, 8] and ranking["features"]


def flux_txt2img(model_ref, prompt: str, extra: dict) -> dict:
    g = {
        "1": {"class_type": "TinyFluxUNETLoader", "inputs": {"unet_name": "tiny", "seed": 0, "variant": "schnell"}},
        "2": {"class_type": "TinyFluxDualCLIPLoader", "inputs": {"seed": 0}},
        "3": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "", "t5xxl": prompt,
                                                             "guidance": 3.5}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "TinyFluxVAELoader", "inputs": {"seed": 0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
    }
    g.update(extra)
    return g


def test_flux_dump_train_browse_and_steer_through_the_server(server):
    import requests

    for i in range(6):
        server.run(flux_txt2img(["10", 0], f"prompt number {i}", {
            "10": {"class_type": "UnboxDumpActivations", "inputs": {
                "model": ["1", 0], "folder": "flux_dump", "blocks": "paper", "steps": "all", "apply_to": "cond",
                "fields": "update", "dtype": "float16", "rows_per_shard": 256}},
            "11": {"class_type": "UnboxDumpImages", "inputs": {
                "images": ["7", 0], "dump": ["10", 1], "prompt": f"prompt number {i}", "seed": i,
                "commit": "after every prompt"}}}))
    assert json.loads((server.output_dir / "flux_dump" / "manifest.json").read_text())["blocks"] == {
        "double.18": {"d_in": 64, "fields": ["update"]}}  # 'paper' on FLUX: the paper's FLUX block
    server.run({"1": {"class_type": "UnboxTrainSAE", "inputs": {
        "dump_folder": "flux_dump", "block": "the dump's only block", "n_features": 256, "k": 8,
        "architecture": "topk", "max_tokens": 0, "batch_size": 128, "lr": 1e-3, "eval_fraction": 0.0, "seed": 0,
        "save_name": "flux_from_dump", "overwrite": True}}}, timeout=900)
    answer = requests.get(f"{server.url}/sae_unbox/features", params={"sae": "flux_from_dump.safetensors",
                                                                      "sort": "frequency", "limit": 5}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["sae"]["block"] == "double.18" and body["sae"]["n_features"] == 256
    best = body["features"][0]["top"][0]
    assert best["grid"] == [8, 8] and best["prompt"].startswith("prompt number")
    steer = {"20": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": "flux_from_dump.safetensors"}},
             "21": {"class_type": "UnboxSteerFeatures", "inputs": {
                 "model": ["1", 0], "sae": ["20", 0], "features": str(body["features"][0]["feature"]),
                 "strength": 8.0, "mode": "add", "block": AUTO, "units": "mean activation", "start_percent": 0.0,
                 "end_percent": 1.0, "apply_to": "cond"}},
             "22": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "flux_server/dsteer"}}}
    plain = {"22": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "flux_server/dplain"}}}
    server.run(flux_txt2img(["21", 0], "a red fox", steer))
    server.run(flux_txt2img(["1", 0], "a red fox", plain))
    assert not torch.equal(latent(server, "dsteer"), latent(server, "dplain"))
