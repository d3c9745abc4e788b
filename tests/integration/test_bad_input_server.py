"""Bad input through a real server's HTTP API, as a shared workflow brings it: each case ends in one clear
error naming the pack's node (the sampler never returns a black image), and CFG probes work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch

from test_shared_workflows import txt2img

AUTO = "auto (the SAE's block)"
SAE_NAME = "cfg_test.safetensors"


@pytest.fixture(scope="module")
def server(comfy_server, comfyui_path):
    """The server with a native SAE for mid.0 of the tiny model (d_in 128), with statistics."""
    import sae_models  # the library needs no ComfyUI

    comfy_server.write_sae = lambda name, **kw: write_sae(sae_models, comfy_server.sae_dir / name, **kw)
    comfy_server.write_sae(SAE_NAME)
    return comfy_server


def write_sae(sae_models, path: Path, nan_in: str | None = None, scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    n, d = 256, 128
    sae = sae_models.build(sae_models.SAEConfig(architecture="topk", d_in=d, n_features=n, k=8, block="mid.0"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=g) / d ** 0.5)
        sae.W_dec.copy_(torch.randn(n, d, generator=g) / d ** 0.5 * scale)
    sae.stats = sae_models.FeatureStats(mean=torch.rand(n, generator=g) + 0.5, frequency=torch.rand(n, generator=g))
    if nan_in == "W_dec":
        with torch.no_grad():
            sae.W_dec[3, 3] = float("nan")
    elif nan_in == "mean":
        sae.stats.mean[9] = float("inf")
    sae_models.save(sae, path)


def steer_graph(strength=1.0, features="3", sae=SAE_NAME, units="mean activation", mask: str | None = None,
                save=True) -> dict:
    extra = {
        "10": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": sae}},
        "11": {"class_type": "UnboxSteerFeatures", "inputs": {
            "model": ["1", 0], "sae": ["10", 0], "features": features, "strength": strength, "mode": "add",
            "block": AUTO, "units": units, "start_percent": 0.0, "end_percent": 1.0, "apply_to": "cond"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bad_input/steered"}},
    }
    if mask is not None:
        extra["13"] = {"class_type": "TinyMaskOfShape", "inputs": {"shape": mask, "value": 1.0}}
        extra["11"]["inputs"]["mask"] = ["13", 0]
    return txt2img(["11", 0], extra)


def failed_at(server, graph: dict) -> tuple[str, str]:
    """Run `graph`, which must fail while executing: (class of the failing node, its message). Checks that
    no image was saved."""
    before = set((server.output_dir / "bad_input").glob("*.png")) if (server.output_dir / "bad_input").exists() else set()
    with pytest.raises(server.Error) as e:
        server.run(graph)
    head = str(e.value).splitlines()[0]
    node_type, _, message = head.partition(": ")
    after = set((server.output_dir / "bad_input").glob("*.png")) if (server.output_dir / "bad_input").exists() else set()
    assert after == before, "an image was saved"
    return node_type.split(" (node")[0], message


def test_a_nan_strength_in_the_workflow_json_is_refused_before_sampling(server):
    # JSON may hold NaN (Python's json module, and so ComfyUI's server, reads it), and NaN passes ComfyUI's own
    # range check (every comparison with NaN is false): the node refuses it when it runs, before the sampler.
    body = json.dumps({"prompt": steer_graph()}).replace('"strength": 1.0', '"strength": NaN')
    r = requests.post(f"{server.url}/prompt", data=body, timeout=60)
    assert r.status_code == 200 and not r.json()["node_errors"], r.text
    entry = wait(server, r.json()["prompt_id"])
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "UnboxSteerFeatures"
    assert error["exception_message"].strip() == ("SAE Steer Features: strength must be a finite number between "
                                                  "-1000 and 1000, got nan")
    assert "12" not in entry.get("outputs", {})


@pytest.mark.parametrize("strength, why", [("Infinity", "Value inf bigger than max of 1000.0"),
                                           ("-Infinity", "Value -inf smaller than min of -1000.0")])
def test_an_infinite_strength_is_refused_by_the_widget_range(server, strength, why):
    body = json.dumps({"prompt": steer_graph()}).replace('"strength": 1.0', f'"strength": {strength}')
    r = requests.post(f"{server.url}/prompt", data=body, timeout=60)
    assert r.status_code == 400
    (error,) = r.json()["node_errors"]["11"]["errors"]
    assert error["message"] == why and error["details"] == "strength"


def wait(server, prompt_id: str, timeout: float = 300) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = requests.get(f"{server.url}/history/{prompt_id}", timeout=60).json().get(prompt_id)
        if entry is not None:
            return entry
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} not done after {timeout} s")


@pytest.mark.parametrize("features, value", [("1:1e999", "inf"), ("1:-1e999", "-inf"), ("1:1e30", "1e+30")])
def test_a_non_finite_per_feature_strength_is_refused(server, features, value):
    node, message = failed_at(server, steer_graph(features=features))
    assert node == "UnboxSteerFeatures"
    assert message == (f"SAE Steer Features: the strength of feature 1 must be a finite number between -1000 and "
                       f"1000, got {value}")


@pytest.mark.parametrize("where, shown", [("W_dec", "tensor W_dec"), ("mean", "statistic 'mean'")])
def test_an_sae_with_non_finite_numbers_is_refused_naming_the_file(server, where, shown):
    name = f"nan_{where}.safetensors"
    server.write_sae(name, nan_in=where)
    node, message = failed_at(server, steer_graph(sae=name))
    assert node == "UnboxLoadSAE"
    assert message.startswith(f"Load SAE: {name}: {shown} holds 1 non-finite value(s)")
    assert str(server.root) not in message  # the server's folders are not shown to the workflow's user


def test_an_edit_that_overflows_fails_naming_the_node_and_block(server):
    server.write_sae("huge.safetensors", scale=1e38)
    node, message = failed_at(server, steer_graph(sae="huge.safetensors", strength=1000.0, units="absolute"))
    assert node == "KSampler"  # raised while sampling, by the pack's hook, instead of a black image
    assert message.startswith("SAE Steer Features: the edit of block mid.0 (middle_block.1) made the block's "
                              "output non-finite (inf or NaN)")


@pytest.mark.parametrize("shape", ["0, 64, 64", "64", "1, 0, 64", "1, 2, 3, 4, 5"])
def test_a_malformed_mask_is_refused_before_sampling(server, shape):
    node, message = failed_at(server, steer_graph(mask=shape))
    assert node == "UnboxSteerFeatures" and message.startswith(f"SAE Steer Features: mask has shape "
                                                               f"[{shape.replace(' ', '')}".replace(",", ", "))


@pytest.mark.parametrize("shape", ["64, 64", "1, 64, 64", "1, 1, 64, 64", "3, 64, 64"])
def test_every_mask_shape_comfyui_makes_runs(server, shape):
    entry = server.run(steer_graph(mask=shape))
    (saved,) = entry["outputs"]["12"]["images"]
    assert (server.output_dir / saved["subfolder"] / saved["filename"]).is_file()


def test_top_n_zero_is_refused(server):
    graph = cfg_graph()
    del graph["12"]  # Top Features is the graph's only output
    graph["13"]["inputs"]["top_n"] = 0
    r = requests.post(f"{server.url}/prompt", json={"prompt": graph}, timeout=60)
    assert r.status_code == 400
    (error,) = r.json()["node_errors"]["13"]["errors"]
    assert error["message"] == "Value 0 smaller than min of 1" and error["details"] == "top_n"


def test_a_long_input_is_quoted_only_in_part(server):
    features = ", ".join(str(i % 200) for i in range(100_000))
    node, message = failed_at(server, steer_graph(features=features))
    assert node == "UnboxSteerFeatures" and message.startswith("SAE Steer Features: feature 0 is listed twice")
    assert len(message) < 200


def cfg_graph(rows="cond", apply_to="both", cfg=3.0) -> dict:
    graph = txt2img(["11", 0], {
        "10": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": SAE_NAME}},
        "11": {"class_type": "UnboxProbeBlock", "inputs": {
            "model": ["1", 0], "sae": ["10", 0], "block": AUTO, "steps": "all", "apply_to": apply_to}},
        "12": {"class_type": "UnboxFeatureHeatmap", "inputs": {
            "probe": ["11", 1], "image": ["6", 0], "feature": 3, "block": "first probed block", "step": -1,
            "colormap": "inferno", "alpha": 0.6, "scale": "image max", "rows": rows, "cfg": cfg}},
        "13": {"class_type": "UnboxTopFeatures", "inputs": {
            "probe": ["11", 1], "image": ["6", 0], "top_n": 4, "block": "first probed block", "step": -1,
            "image_index": 0, "columns": 2, "colormap": "inferno", "alpha": 0.6, "filename_prefix": "cfg/top",
            "rows": rows, "cfg": cfg}},
    })
    graph["5"]["inputs"].update(steps=3, cfg=cfg)
    return graph


@pytest.mark.parametrize("rows", ["cond", "uncond", "cfg combined"])
def test_cfg_probes_show_cond_uncond_or_combined(server, rows):
    entry = server.run(cfg_graph(rows=rows))
    (text,) = entry["outputs"]["13"]["text"]
    ranking = json.loads(text)
    assert ranking["rows"] == rows and ranking["features"]
    assert entry["outputs"]["12"]["images"]


def test_the_default_view_of_a_cfg_probe_is_cond(server):
    graph = cfg_graph()
    for node in ("12", "13"):
        del graph[node]["inputs"]["rows"], graph[node]["inputs"]["cfg"]  # as a workflow saved before these inputs
    ranking = json.loads(server.run(graph)["outputs"]["13"]["text"][0])
    assert ranking["rows"] == "cond"
