"""The workbench's server side, in process on real ComfyUI: the painted mask node, the concept search node
(with a feature the test plants to fire on one prompt), and the bounded store of runs the panel reads."""

from __future__ import annotations

import base64
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_patching import Capture, make_sae, sample

AUTO = "auto (the SAE's block)"


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_painted_mask_node_reads_the_panels_png(pk):
    node = pk.N["UnboxPaintedMask"]
    painted = np.zeros((32, 48), np.uint8)
    painted[8:16, 24:40] = 255
    (mask,) = node.execute(48, 32, png_b64(painted)).args
    assert mask.shape == (1, 32, 48) and mask.dtype == torch.float32
    assert mask[0, 8:16, 24:40].eq(1).all() and mask.sum() == 8 * 16
    (same,) = node.execute(48, 32, "data:image/png;base64," + png_b64(painted)).args
    assert torch.equal(same, mask)
    (bigger,) = node.execute(96, 64, png_b64(painted)).args  # painted at another size: scaled
    assert bigger.shape == (1, 64, 96) and float(bigger[0, 24, 64]) == 1.0 and float(bigger[0, 2, 2]) == 0.0
    (empty,) = node.execute(16, 16, "").args
    assert empty.shape == (1, 16, 16) and empty.sum() == 0


@pytest.mark.parametrize("data, message", [
    ("not base64 !!", "mask is not base64 text"),
    (base64.b64encode(b"GIF89a......").decode(), "mask is not a readable PNG"),
    ("data:image/jpeg;base64,AAAA", "mask holds a data URL that is not a base64 PNG"),
])
def test_a_bad_painted_mask_is_refused(pk, data, message):
    with pytest.raises(ValueError, match=f"^SAE Painted Mask: {message}"):
        pk.N["UnboxPaintedMask"].execute(8, 8, data)
    assert pk.N["UnboxPaintedMask"].validate_inputs(mask=data).startswith("SAE Painted Mask: ")


def concept_direction(tiny, model, concept, neutral, seeds=2):
    """The mean of mid.0's update over positions and seeds, concept minus neutral, seen by an independent hook."""
    means = []
    for prompt in (concept, neutral):
        total = torch.zeros(128)
        for seed in range(seeds):
            cap = Capture(model, "middle_block.1", "middle_block.2")
            try:
                sample(tiny, model, prompt=prompt, seed=seed, size=16)
            finally:
                cap.close()
            (call,) = cap.calls
            total += (call["orig"] - call["x_in"])[0].mean((1, 2))
        means.append(total / seeds)
    return means[0] - means[1]


def test_concept_search_ranks_a_planted_feature_first(pk, tiny, model):
    direction = concept_direction(tiny, model, "a red car", "a car")
    h = make_sae(pk, "mid.0", d=128, n=64, k=4, seed=11)
    with torch.no_grad():
        h.sae.W_enc.mul_(0.1)
        h.sae.b_enc.zero_()
        h.sae.W_enc[17] = 10 * direction / direction.norm()  # fires more, the more the update leans to the concept
        h.sae.b_enc[17] = 100.0  # always among the top k, so only its value tells the prompts apart
    find = pk.N["UnboxFindFeatures"]
    with torch.inference_mode():
        out = find.execute(model, tiny.TinyCLIP(), tiny.tiny_vae(), h, "a red car", "a car", AUTO, 2, 1, 1.0,
                           "euler", "normal", 128, 128, 5)
    text, grid, heatmaps = out.args
    ranking = json.loads(text)
    assert ranking["block"] == "mid.0" and ranking["concept"] == "a red car" and ranking["neutral"] == ["a car"]
    top = ranking["features"][0]
    assert top["feature"] == 17 and top["score"] > 0
    assert top["score"] == pytest.approx(top["concept_mean"] - top["neutral_mean"])
    assert heatmaps.shape == (5, 128, 128, 3) and grid.shape[0] == 1
    with pytest.raises(ValueError, match="^SAE Find Features: neutral is empty"):
        find.execute(model, tiny.TinyCLIP(), tiny.tiny_vae(), h, "a red car", "  ", AUTO, 1, 1, 1.0, "euler",
                     "normal", 128, 128, 5)


def record(pk, rows=1, grid=4, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    StepRecord = pk.patch.StepRecord
    return StepRecord(0, 1.0, torch.rand(rows, grid, grid, width, generator=g),
                      torch.randint(0, 32, (rows, grid, grid, width), generator=g), [0] * rows, list(range(rows)),
                      n_features=32)


def test_the_run_store_keeps_the_newest_runs_within_its_bounds(pk):
    wb = sys.modules[pk.patch.__name__.rsplit(".", 1)[0] + ".workbench"]
    store = wb.RunStore(max_runs=3, max_bytes=10**9)
    h = make_sae(pk)
    image = torch.rand(1, 32, 32, 3)
    for i in range(5):
        view = wb.BlockView(h.name, 32, 8, record(pk, seed=i), "cond", 1.0, [], {})
        store.add(f"run{i}", image, "mid.0", view)
    assert [r["run"] for r in store.list()] == ["run4", "run3", "run2"]
    with pytest.raises(wb.Refused, match="no run 'run0' is kept"):
        store.get("run0")
    one = store.get("run4").nbytes
    small = wb.RunStore(max_runs=10, max_bytes=int(one * 2.5))  # room for two runs' codes and images
    for i in range(5):
        small.add(f"run{i}", image, "mid.0", wb.BlockView(h.name, 32, 8, record(pk, seed=i), "cond", 1.0, [], {}))
    assert [r["run"] for r in small.list()] == ["run4", "run3"] and small.nbytes <= one * 2.5
    # a second block of a run joins it rather than making another run
    small.add("run4", image, "up.0.1", wb.BlockView(h.name, 32, 8, record(pk, seed=9), "cond", 1.0, [], {}))
    assert [b["block"] for b in small.list()[0]["blocks"]] == ["mid.0", "up.0.1"]


@pytest.mark.parametrize("heatmap_first", [True, False])
def test_a_heatmap_of_a_block_keeps_the_ranking_top_features_gave_it(pk, heatmap_first):
    """Top Features and Feature Heatmap of one block run in either order: the block keeps its ranking."""
    wb = sys.modules[pk.patch.__name__.rsplit(".", 1)[0] + ".workbench"]
    store, h, image = wb.RunStore(), make_sae(pk), torch.rand(1, 32, 32, 3)
    ranked = wb.BlockView(h.name, 32, 8, record(pk), "cond", 1.0, [{"feature": 5, "mean_activation": 1.0}], {})
    heat = wb.BlockView(h.name, 32, 8, record(pk), "cond", 1.0, [], {})
    for view in ((heat, ranked) if heatmap_first else (ranked, heat)):
        store.add("run", image, "mid.0", view)
    (block,) = store.list()[0]["blocks"]
    assert block["ranking"] == [{"feature": 5, "mean_activation": 1.0}]
