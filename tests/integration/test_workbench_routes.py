"""The workbench's routes on a real server: runs and heatmaps (checked against the SAE codes of the block's
update, dumped in the same run and encoded here with the paper's formula), images, the bounded memory of
kept runs, and labels: validation, refusals, persistence, import."""

from __future__ import annotations

import io
import json

import pytest
import requests
import torch
from PIL import Image
from safetensors import safe_open

from test_bad_input_server import SAE_NAME, write_sae
from test_shared_workflows import txt2img

AUTO = "auto (the SAE's block)"
WB = "/sae_unbox/workbench"


@pytest.fixture(scope="module")
def server(comfy_server, comfyui_path):
    import sae_models

    write_sae(sae_models, comfy_server.sae_dir / SAE_NAME)
    comfy_server.sae = sae_models.load(comfy_server.sae_dir / SAE_NAME)
    return comfy_server


def run_graph(server, prompt: str, dump: str | None = None) -> dict:
    """Probe mid.0 (and dump its update in the same run), sample, rank its features: the ranking JSON."""
    extra = {
        "10": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": SAE_NAME}},
        "11": {"class_type": "UnboxProbeBlock", "inputs": {"model": ["1", 0], "sae": ["10", 0], "block": AUTO,
                                                          "steps": "all", "apply_to": "cond"}},
        "13": {"class_type": "UnboxTopFeatures", "inputs": {
            "probe": ["11", 1], "image": ["6", 0], "top_n": 5, "block": "first probed block", "step": -1,
            "image_index": 0, "columns": 3, "colormap": "inferno", "alpha": 0.6, "filename_prefix": ""}},
    }
    model = ["11", 0]
    if dump:
        extra["14"] = {"class_type": "UnboxDumpActivations", "inputs": {
            "model": ["11", 0], "folder": dump, "blocks": "mid.0", "steps": "all", "apply_to": "cond",
            "fields": "update", "dtype": "float32", "rows_per_shard": 256}}
        extra["15"] = {"class_type": "UnboxDumpImages", "inputs": {
            "images": ["6", 0], "dump": ["14", 1], "prompt": prompt, "seed": 1, "commit": "after every prompt"}}
        model = ["14", 0]
    entry = server.run(txt2img(model, extra, prompt=prompt))
    (shown,) = entry["outputs"]["13"]["sae_workbench"]
    ranking = json.loads(entry["outputs"]["13"]["text"][0])
    assert shown == {"run": ranking["run"], "block": "mid.0", "sae": SAE_NAME}
    return ranking


def get(server, path, **params):
    return requests.get(server.url + path, params=params, timeout=60)


def test_a_runs_heatmap_is_the_sae_code_of_the_blocks_update(server):
    ranking = run_graph(server, "a lighthouse at night", dump="wb_dump")
    runs = get(server, f"{WB}/runs").json()
    (mine,) = [r for r in runs if r["run"] == ranking["run"]]
    (block,) = mine["blocks"]
    assert block["block"] == "mid.0" and block["grid"] == [4, 4] and block["sae"] == SAE_NAME
    assert [f["feature"] for f in block["ranking"]] == [f["feature"] for f in ranking["features"]]
    shard = next((server.output_dir / "wb_dump" / "mid.0").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        update = f.get_tensor("update")  # [16, 128]: the 4x4 grid, row-major
    sae = server.sae
    with torch.no_grad():
        pre = (update - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # the paper's TopK encoder, written out
        kth = pre.topk(sae.config.k, dim=-1).values[:, -1:]
        codes = torch.where(pre >= kth, pre, 0.0).clamp_min(0)
    for entry in ranking["features"][:3]:
        f = entry["feature"]
        heat = get(server, f"{WB}/heat", run=ranking["run"], block="mid.0", feature=f).json()
        assert heat["grid"] == [4, 4] and heat["stats"]["mean"] == pytest.approx(float(sae.stats.mean[f]))
        assert torch.allclose(torch.tensor(heat["values"]), codes[:, f], atol=1e-4)
        assert heat["max"] == pytest.approx(float(codes[:, f].max()), abs=1e-4)
    png = get(server, f"{WB}/image", run=ranking["run"])
    assert png.headers["Content-Type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (128, 128)


@pytest.fixture(scope="module")
def a_run(server):
    return run_graph(server, "a run to ask about")["run"]


@pytest.mark.parametrize("params, status, words", [
    ({"run": "nope", "block": "mid.0", "feature": 1}, 404, "no run 'nope' is kept"),
    ({"block": "mid.0", "feature": 1}, 404, "no run '' is kept"),
    ({"run": "RUN", "block": "up.0.1", "feature": 1}, 404, "block 'up.0.1' was not probed"),
    ({"run": "RUN", "block": "mid.0", "feature": 999}, 400, "feature 999 is out of range 0..255"),
    ({"run": "RUN", "block": "mid.0", "feature": "x"}, 400, "give feature as a whole number"),
    ({"run": "RUN", "block": "mid.0", "feature": -1}, 400, "feature must be >= 0"),
])
def test_bad_heat_requests_get_json_errors(server, a_run, params, status, words):
    params = {k: (a_run if v == "RUN" else v) for k, v in params.items()}
    r = get(server, f"{WB}/heat", **params)
    assert r.status_code == status and words in r.json()["error"], r.text


def test_only_the_newest_runs_are_kept(server):
    runs = [run_graph(server, f"prompt {i} of many")["run"] for i in range(5)]
    kept = [r["run"] for r in get(server, f"{WB}/runs").json()]
    assert kept == runs[::-1][:4]  # newest first, at most 4
    assert get(server, f"{WB}/image", run=runs[0]).status_code == 404


def post(server, path, body, **headers):
    return requests.post(server.url + path, data=json.dumps(body),
                         headers={"Content-Type": "application/json", **headers}, timeout=60)


def test_labels_are_set_kept_beside_the_sae_and_shown_in_the_ranking(server):
    r = post(server, "/sae_unbox/labels", {"sae": SAE_NAME, "feature": 7, "label": "  a red\n roof "},
             Origin=server.url)
    assert r.status_code == 200, r.text
    assert r.json()["labels"]["7"] == "a red roof"
    assert json.loads((server.sae_dir / "cfg_test.labels.json").read_text())["labels"] == {"7": "a red roof"}
    assert get(server, "/sae_unbox/labels", sae=SAE_NAME).json()["labels"] == {"7": "a red roof"}
    ranking = run_graph(server, "a house with a red roof")
    feature = ranking["features"][0]["feature"]
    post(server, "/sae_unbox/labels", {"sae": SAE_NAME, "feature": feature, "label": "the top one"})
    ranking = run_graph(server, "a house with a red roof, again")
    assert ranking["features"][0]["label"] == "the top one"


@pytest.mark.parametrize("body, headers, status, words", [
    ({"sae": SAE_NAME, "feature": 1, "label": "x" * 201}, {}, 400, "at most 200 characters"),
    ({"sae": SAE_NAME, "feature": 1, "label": "ding\u0007"}, {}, 400, "control or unassigned"),
    ({"sae": SAE_NAME, "feature": 256, "label": "x"}, {}, 400, "feature 256 is out of range"),
    ({"sae": SAE_NAME, "feature": "1", "label": "x"}, {}, 400, "feature is a whole number"),
    ({"sae": "../cfg_test.safetensors", "feature": 1, "label": "x"}, {}, 404, "no SAE named"),
    ({"sae": "missing.safetensors", "feature": 1, "label": "x"}, {}, 404, "no SAE named"),
    ({"sae": SAE_NAME, "feature": 1, "label": "x"}, {"Origin": "http://evil.example"}, 403, "not accepted"),
    ({"sae": SAE_NAME, "feature": 1, "label": "x" * 70000}, {}, 413, "larger than 65536 bytes"),
])
def test_bad_label_writes_are_refused(server, body, headers, status, words):
    before = (server.sae_dir / "cfg_test.labels.json").read_bytes() if (server.sae_dir / "cfg_test.labels.json").exists() \
        else None
    r = post(server, "/sae_unbox/labels", body, **headers)
    assert r.status_code == status, r.text
    if "Origin" not in headers:  # another origin: ComfyUI's own middleware refuses it first, as the pack would
        assert words in r.json()["error"], r.text
    after = (server.sae_dir / "cfg_test.labels.json").read_bytes() if (server.sae_dir / "cfg_test.labels.json").exists() \
        else None
    assert after == before
    assert not list(server.sae_dir.glob(".*.tmp"))


def test_labels_take_json_only(server):
    r = requests.post(server.url + "/sae_unbox/labels", data="sae=x&feature=1", timeout=60,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]


def test_a_published_label_set_is_imported(server):
    text = "block,feature_id,caption\nmid.0,3,bright sky\nmid.0,4,dark water\nup.0.1,3,not this block\n"
    r = post(server, "/sae_unbox/labels/import", {"sae": SAE_NAME, "text": text})
    assert r.status_code == 200, r.text
    assert r.json()["imported"] == 2
    labels = get(server, "/sae_unbox/labels", sae=SAE_NAME).json()["labels"]
    assert labels["3"] == "bright sky" and labels["4"] == "dark water"
    bad = post(server, "/sae_unbox/labels/import", {"sae": SAE_NAME, "text": "[{\"what\": 1}]"})
    assert bad.status_code == 400 and "row 0 has no feature" in bad.json()["error"]
