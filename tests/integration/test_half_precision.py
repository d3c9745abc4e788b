"""Half-precision UNets: servers started with --fp16-unet, --force-fp16 and --bf16-unet (the tiny model's
UNet takes its dtype from those flags, as a real checkpoint's does). On a CPU ComfyUI computes such a
UNet in float32 (manual cast); the loader's `compute: in the weight dtype` computes in float16/bfloat16,
as ComfyUI does on a GPU. Every node runs without a dtype error, probes and strength 0 stay bit-identical,
results agree with the float32 server's within the tolerances below, and a float16 overflow in an edit is
reported, not returned as a black image.

Tolerances (max |latent - float32 latent| / max |float32 latent|, 2 steps at cfg 2), set from measured
differences with about 2x room: fp16 weights 2e-3, bf16 weights 1e-2, fp16 compute 5e-3, bf16 compute
5e-2; SAE Reconstruct Block (which drops the SAE's error, so it amplifies rounding) 5e-2 everywhere. And
each edit's effect (edited minus plain latent) matches its float32 effect within EFFECT_MISMATCH.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_bad_input_server import write_sae

AUTO = "auto (the SAE's block)"
SAE = "half_test.safetensors"
NATIVE = "in the weight dtype"
CHOOSES = "as ComfyUI chooses"
TOLERANCE = {("--fp16-unet", CHOOSES): 2e-3, ("--force-fp16", CHOOSES): 2e-3, ("--bf16-unet", CHOOSES): 1e-2,
             ("--fp16-unet", NATIVE): 5e-3, ("--force-fp16", NATIVE): 5e-3, ("--bf16-unet", NATIVE): 5e-2}
RECONSTRUCT_TOLERANCE = 5e-2
# |half effect - float32 effect| / |float32 effect| of add, set and replace (measured: <= 0.019 with the
# flags' float32 compute, 0.062 computing in float16, 0.36 computing in bfloat16)
EFFECT_MISMATCH = {CHOOSES: 0.05, ("--fp16-unet", NATIVE): 0.15, ("--force-fp16", NATIVE): 0.15,
                   ("--bf16-unet", NATIVE): 0.75}
VARIANTS = ("plain", "probe", "zero", "add", "ablate", "set", "replace", "reconstruct", "dump")


def graph(compute: str, tag: str) -> dict:
    """One prompt: the same sampling (2 steps, cfg 2) on the plain MODEL and on each patched one, each
    latent saved as output/<tag>/<variant>."""
    g = {
        "1": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"ckpt_name": "tiny", "seed": 0,
                                                                    "compute": compute}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": SAE}},
    }
    models = {"plain": ["1", 0]}

    def steer(nid, features, strength, mode):
        g[nid] = {"class_type": "UnboxSteerFeatures", "inputs": {
            "model": ["1", 0], "sae": ["5", 0], "features": features, "strength": strength, "mode": mode,
            "block": AUTO, "units": "mean activation", "start_percent": 0.0, "end_percent": 1.0, "apply_to": "both"}}
        return [nid, 0]

    g["10"] = {"class_type": "UnboxProbeBlock", "inputs": {"model": ["1", 0], "sae": ["5", 0], "block": AUTO,
                                                          "steps": "all", "apply_to": "both"}}
    models["probe"] = ["10", 0]
    models["zero"] = steer("11", "3", 0.0, "add")
    models["add"] = steer("12", "3, 7", 20.0, "add")
    models["ablate"] = steer("13", "0, 1, 2, 3, 4, 5", 1.0, "ablate")
    models["set"] = steer("14", "3", 10.0, "set")
    models["replace"] = steer("15", "3", 8.0, "replace")
    g["16"] = {"class_type": "UnboxReconstructBlock", "inputs": {
        "model": ["1", 0], "sae": ["5", 0], "block": AUTO, "keep_error": False, "start_percent": 0.0,
        "end_percent": 1.0, "apply_to": "both"}}
    models["reconstruct"] = ["16", 0]
    g["17"] = {"class_type": "UnboxDumpActivations", "inputs": {
        "model": ["1", 0], "folder": f"{tag}/dump", "blocks": "mid.0", "steps": "all", "apply_to": "both",
        "fields": "update", "dtype": "float32", "rows_per_shard": 256}}
    models["dump"] = ["17", 0]
    for i, (name, model) in enumerate(models.items()):
        k, d = str(100 + i), str(200 + i)
        g[k] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 5,
            "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
        g[d] = {"class_type": "SaveLatent", "inputs": {"samples": [k, 0], "filename_prefix": f"{tag}/{name}"}}
        if name == "dump":
            g["300"] = {"class_type": "VAEDecode", "inputs": {"samples": [k, 0], "vae": ["1", 2]}}
            g["301"] = {"class_type": "UnboxDumpImages", "inputs": {
                "images": ["300", 0], "dump": ["17", 1], "prompt": "a lighthouse", "seed": 5,
                "commit": "after every prompt"}}
    return g


def latents(server, tag: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in VARIANTS:
        (path,) = sorted((server.output_dir / tag).glob(f"{name}_*.latent"))[-1:]
        out[name] = load_file(str(path))["latent_tensor"].float()
    return out


def run(server, compute: str, tag: str) -> dict[str, torch.Tensor]:
    import sae_models

    write_sae(sae_models, server.sae_dir / SAE)
    server.run(graph(compute, tag), timeout=600)
    return latents(server, tag)


@pytest.fixture(scope="module")
def reference(comfy_server):
    """The float32 server's latents."""
    return run(comfy_server, CHOOSES, "half_reference")


@pytest.fixture(scope="module", params=["--fp16-unet", "--force-fp16", "--bf16-unet"])
def half_server(request, start_comfy_server):
    with start_comfy_server(request.param) as server:
        server.flag = request.param
        yield server


@pytest.mark.parametrize("compute", [CHOOSES, NATIVE])
def test_every_node_runs_and_agrees_with_float32(half_server, reference, compute):
    tag = "native" if compute == NATIVE else "chosen"
    got = run(half_server, compute, tag)
    for name, latent in got.items():
        assert torch.isfinite(latent).all(), name
    # a probe, a dump and strength 0 change nothing, to the bit
    for name in ("probe", "zero", "dump"):
        assert torch.equal(got[name], got["plain"]), name
    scale = float(reference["plain"].abs().max())
    for name in VARIANTS:
        tol = RECONSTRUCT_TOLERANCE if name == "reconstruct" else TOLERANCE[(half_server.flag, compute)]
        err = float((got[name] - reference[name]).abs().max()) / scale
        assert err <= tol, (name, err, tol)
    # each edit does the same thing at half precision as in float32: its effect on the latent (edited minus
    # plain, which cancels the UNet's own rounding) is large, and matches the float32 effect
    for name in ("add", "set", "replace"):
        effect, ref_effect = got[name] - got["plain"], reference[name] - reference["plain"]
        mismatch = float((effect - ref_effect).abs().max()) / float(ref_effect.abs().max())
        bound = EFFECT_MISMATCH.get(compute) or EFFECT_MISMATCH[(half_server.flag, compute)]
        assert float(ref_effect.abs().max()) > 0.02 * scale and mismatch < bound, (name, mismatch)
    shards = list((half_server.output_dir / tag / "dump" / "mid.0").glob("*.safetensors"))
    assert shards and all(torch.isfinite(load_file(str(p))["update"]).all() for p in shards)


def test_a_float16_overflow_in_an_edit_is_reported(start_comfy_server):
    import sae_models

    with start_comfy_server("--fp16-unet") as server:
        write_sae(sae_models, server.sae_dir / "wide.safetensors", scale=1e3)
        g = graph(NATIVE, "overflow")
        g["5"]["inputs"]["sae_name"] = "wide.safetensors"
        g["12"]["inputs"].update(features="3", strength=1000.0, units="absolute")
        g = {k: v for k, v in g.items() if k in ("1", "2", "3", "4", "5", "12", "103", "203")}
        with pytest.raises(server.Error) as e:
            server.run(g, timeout=600)
        first = str(e.value).splitlines()[0]
        assert first.startswith("KSampler (node 103): SAE Steer Features: the edit of block mid.0 (middle_block.1) "
                                "made the block's output non-finite (inf or NaN) in the UNet's float16 (the largest "
                                "float16 is 6.55e+04)"), first
        assert not (server.output_dir / "overflow").exists()  # no latent saved
