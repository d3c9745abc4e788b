"""The nodes' pure helpers, one by one: rendering (colormaps, overlays, grids), the widget parsers and the
mask weights. Expected values are written out by hand."""

from __future__ import annotations

import re
import sys

import pytest
import torch


def test_colorize_hits_the_anchors_and_interpolates_between_them(pk):
    r = pk.render
    anchors = torch.tensor(r.COLORMAPS["inferno"], dtype=torch.float32) / 255.0  # 5 anchors: at 0, 1/4, ... 1
    got = r.colorize(torch.tensor([0.0, 0.25, 0.5, 1.0, -3.0, 7.0, 0.125]), "inferno")
    assert torch.allclose(got[:4], anchors[[0, 1, 2, 4]])
    assert torch.allclose(got[4], anchors[0]) and torch.allclose(got[5], anchors[4])  # clamped
    assert torch.allclose(got[6], (anchors[0] + anchors[1]) / 2)
    assert r.colorize(torch.zeros(2, 3), "gray").shape == (2, 3, 3)


def test_upsample_nearest_repeats_each_cell(pk):
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    up = pk.render.upsample(maps, 4, 6)
    assert up.shape == (1, 4, 6)
    assert up[0].tolist() == [[1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2], [3, 3, 3, 4, 4, 4], [3, 3, 3, 4, 4, 4]]


def test_overlay_blends_by_alpha_and_normalises_by_scale(pk):
    r = pk.render
    images = torch.rand(2, 4, 4, 3, generator=torch.Generator().manual_seed(0))
    maps = torch.tensor([[[0.0, 2.0], [4.0, 8.0]]])  # one map for both images
    same, heat = r.overlay(images, maps, torch.tensor(4.0), "gray", 0.0)
    assert torch.equal(same, images.clamp(0, 1))
    assert heat.shape == (2, 4, 4)
    assert heat[0, :2, :2].unique().tolist() == [0.0] and heat[0, :2, 2:].unique().tolist() == [0.5]
    assert heat[0, 2:, 2:].unique().tolist() == [1.0]  # 8 / 4, clamped to 1
    colour, _ = r.overlay(images, maps, torch.tensor(4.0), "gray", 1.0)
    assert torch.allclose(colour[1], heat[1].unsqueeze(-1).expand(4, 4, 3))  # gray: the heat itself
    with pytest.raises(ValueError, match="3 activation maps for 2 images"):
        r.overlay(images, torch.zeros(3, 2, 2), 1.0, "gray", 0.5)


def test_labelled_grid_places_tiles_row_by_row(pk):
    tiles = [torch.full((8, 10, 3), v) for v in (0.2, 0.4, 0.6)]
    grid = pk.render.labelled_grid(tiles, ["a", "b", "c"], columns=2, pad=4, label_height=14)
    # 2 columns x (10 + 4) + 4 wide; 2 rows x (8 + 14 + 4) + 4 high
    assert grid.shape == (1, 2 * 26 + 4, 2 * 14 + 4, 3)
    def tile_at(row, col):
        y, x = 4 + row * 26 + 14, 4 + col * 14
        return grid[0, y:y + 8, x:x + 10]
    for (row, col), v in {(0, 0): 0.2, (0, 1): 0.4, (1, 0): 0.6}.items():
        assert torch.allclose(tile_at(row, col), torch.tensor(v), atol=1 / 255)
    with pytest.raises(ValueError, match="no tiles"):
        pk.render.labelled_grid([], [], 3)


def test_parse_features(pk):
    parse = pk.inputs.parse_features
    assert parse("N", "12, 345:2.5", 1000, 1.0) == ((12, 345), (1.0, 2.5))
    assert parse("N", " 7 : -3 ;8\n9:1e2", 1000, 0.5) == ((7, 8, 9), (-3.0, 0.5, 100.0))
    for text, message in [("", "N: no feature given"), ("x", "N: cannot read feature 'x'"),
                          ("5:1:2", "N: cannot read feature '5:1:2'"), ("1000", "N: feature 1000 is out of range"),
                          ("3, 3:2", "N: feature 3 is listed twice"), ("1:1001", "N: the strength of feature 1")]:
        with pytest.raises(ValueError, match=message):
            parse("N", text, 1000, 1.0)


def test_parse_steps(pk):
    parse = pk.inputs.parse_steps
    assert parse("N", "all") is None and parse("N", "") is None and parse("N", " * ") is None
    assert parse("N", "0, 2-4") == frozenset({0, 2, 3, 4})
    assert parse("N", "3 1") == frozenset({1, 3})
    with pytest.raises(ValueError, match="N: cannot read steps 'one'"):
        parse("N", "one")
    assert parse("N", ", ".join(f"{i}-{i + 1}" for i in range(0, 128, 2))) == frozenset(range(128))  # 64 parts
    with pytest.raises(ValueError, match="^N: steps lists 65 steps or ranges, more than 64: '0-10000, "):
        parse("N", ", ".join(["0-10000"] * 65))
    with pytest.raises(ValueError, match="^N: steps holds 1,001 characters, more than 1,000: '"):
        parse("N", "1" * 1001)


@pytest.mark.parametrize("value, whole, low, high, message", [
    (-5, True, 0, 10, "N: x must be a whole number between 0 and 10, got -5"),
    (11, True, 0, 10, "N: x must be a whole number between 0 and 10, got 11"),
    (2.0, True, 0, 10, "N: x must be a whole number between 0 and 10, got 2.0"),
    (True, True, 0, 10, "N: x must be a whole number between 0 and 10, got True"),
    (float("nan"), False, 0.0, 1.0, "N: x must be a finite number between 0 and 1, got nan"),
    (float("inf"), False, None, None, "N: x must be a finite number between -inf and inf, got inf"),
    (1.5, False, 0.0, 1.0, "N: x must be a finite number between 0 and 1, got 1.5"),
    ("3", False, 0.0, 10.0, "N: x must be a finite number between 0 and 10, got '3'"),
])
def test_check_number_refuses_what_the_widget_would(pk, value, whole, low, high, message):
    schema = sys.modules[pk.inputs.__name__.rsplit(".", 1)[0] + ".schema"]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        schema.check_number("N", "x", value, low, high, whole)
    assert schema.check_number("N", "x", 3, 0, 10, True) == 3
    assert schema.check_number("N", "x", 1, 0.0, 1.0, False) == 1.0 and schema.check_number("N", "x", 0, 0.0, 1.0, False) == 0.0


def test_every_pack_node_checks_its_numbers_when_it_runs(comfy_pack):
    """Values through links reach `execute` without ComfyUI's range check: each node with an INT or FLOAT input
    checks them itself, with the bounds its schema gives."""
    from comfy_api.latest import io

    numeric = []
    for name in sorted(comfy_pack.pack_node_names):
        cls = comfy_pack.node(name)
        if any(isinstance(i, (io.Int.Input, io.Float.Input)) for i in cls.define_schema().inputs):
            numeric.append(name)
            assert getattr(cls.execute, "checks_numbers", False), f"{name}.execute does not check its numbers"
    assert len(numeric) >= 8  # steer, reconstruct, heatmap, top features, find, dump x2, train, prompts, mask


def test_mask_weights_average_the_mask_over_the_grid_and_repeat_it_over_the_batch(pk):
    mask = torch.zeros(2, 8, 8)
    mask[0, :4, :4] = 1.0  # top-left quadrant of image 0
    mask[1, :, :2] = 1.0  # left quarter of image 1
    w = pk.edits.mask_weights(mask, [0, 1, 2, 3], 2, 2, "cpu")
    assert w.shape == (4, 2, 2)
    assert w[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert w[1].tolist() == [[0.5, 0.0], [0.5, 0.0]]
    assert torch.equal(w[2], w[0]) and torch.equal(w[3], w[1])  # image i takes mask i mod 2
    assert torch.equal(pk.edits.mask_weights(None, [0, 5], 3, 3, "cpu"), torch.ones(2, 3, 3))


def test_sigma_range_uses_the_models_schedule(pk, model):
    ms = model.get_model_object("model_sampling")
    start, end = pk.inputs.sigma_range("N", model, 0.0, 1.0)
    assert start == float("inf") and end == 0.0
    start, end = pk.inputs.sigma_range("N", model, 0.25, 0.75)
    assert start == pytest.approx(float(ms.percent_to_sigma(0.25))) and end == pytest.approx(float(ms.percent_to_sigma(0.75)))
    assert start > end
