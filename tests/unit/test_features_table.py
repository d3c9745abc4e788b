"""The feature browser's table: statistics read without the weights, the index read back with checks,
filtering, sorting and paging (expected orders written out by hand)."""

from __future__ import annotations

import json

import pytest
import torch

import sae_models
from sae_models import FeatureStats, FeatureTable, SAEFormatError, read_features_index
from sae_models.formats.native import read_summary


def entry(value, prompt):
    return {"writer": "w", "image": 0, "position": [1, 2], "value": value, "prompt": prompt, "file": "a.png"}


INDEX = {"block": "mid.0", "n_features": 5, "top_n": 2, "features": [
    [entry(3.0, "a red barn"), entry(1.0, "blue sky")],   # 0
    [],                                                   # 1: never fired
    [entry(9.0, "Red car at night")],                     # 2
    [entry(5.0, "a dog"), entry(4.0, "red dog")],         # 3
    [entry(2.0, "a cat")],                                # 4
]}
STATS = FeatureStats(mean=torch.tensor([1.0, 0.0, 4.0, 2.0, 2.0]),
                     frequency=torch.tensor([0.2, 0.0, 0.01, 0.5, 0.3]),
                     std=torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4]))


def ids(result):
    return [r["feature"] for r in result["features"]]


def test_sorting_ties_and_paging():
    t = FeatureTable(INDEX, STATS)
    assert ids(t.query()) == [3, 4, 0, 2, 1]                                # frequency, descending
    assert ids(t.query(descending=False)) == [1, 2, 0, 4, 3]
    assert ids(t.query(sort="mean")) == [2, 3, 4, 0, 1]                     # 3 and 4 tie: lower id first
    assert ids(t.query(sort="mean", descending=False)) == [1, 0, 3, 4, 2]
    assert ids(t.query(sort="max")) == [2, 3, 0, 4, 1]                      # 1 has no images: last
    assert ids(t.query(sort="max", descending=False)) == [4, 0, 3, 2, 1]
    assert ids(t.query(sort="feature")) == [4, 3, 2, 1, 0]
    page = t.query(sort="feature", descending=False, offset=2, limit=2)
    assert ids(page) == [2, 3] and page["total"] == 5 and page["offset"] == 2
    assert ids(t.query(offset=10)) == []


def test_filters():
    t = FeatureTable(INDEX, STATS)
    assert ids(t.query(text="red")) == [3, 0, 2]            # any case, in any of the top prompts
    assert ids(t.query(text="RED dog")) == [3]              # every word must occur
    assert ids(t.query(text="#2")) == [2] and ids(t.query(text=" 4 ")) == [4]
    assert ids(t.query(text="7")) == [] and t.query(text="7")["total"] == 0
    assert ids(t.query(hide_dead=True)) == [3, 4, 0, 2]


def test_labels_are_searched_and_shown():
    t = FeatureTable(INDEX, STATS, labels={1: "Lighthouse at dusk", 4: "red roofs"})
    assert ids(t.query(text="lighthouse")) == [1]            # a label alone matches (1 has no images)
    assert ids(t.query(text="red")) == [3, 4, 0, 2]          # labels and prompts alike
    assert ids(t.query(text="red roofs")) == [4]
    rows = {r["feature"]: r for r in t.query()["features"]}
    assert rows[1]["label"] == "Lighthouse at dusk" and rows[0]["label"] is None


def test_rows_carry_statistics_and_images():
    row = FeatureTable(INDEX, STATS).query(text="2")["features"][0]
    assert row["feature"] == 2 and row["max"] == 9.0 and row["top"] == INDEX["features"][2]
    assert row["mean"] == pytest.approx(4.0) and row["frequency"] == pytest.approx(0.01) and row["std"] == pytest.approx(0.2)
    bare = FeatureTable(INDEX, FeatureStats()).query(sort="mean")
    assert ids(bare) == [0, 1, 2, 3, 4] and bare["features"][0]["mean"] is None  # no statistics: id order


def test_bad_queries():
    t = FeatureTable(INDEX, STATS)
    with pytest.raises(ValueError, match="sort must be one of"):
        t.query(sort="loudness")
    with pytest.raises(ValueError, match="limit"):
        t.query(limit=0)


def test_summary_reads_config_and_statistics_without_weights(tmp_path):
    sae = sae_models.build(sae_models.SAEConfig(architecture="topk", d_in=8, n_features=5, k=2, block="mid.0"),
                           STATS)
    path = sae_models.save(sae, tmp_path / "s.safetensors")
    config, stats = read_summary(path)
    full = sae_models.load(path)
    assert config.to_dict() == full.config.to_dict()
    for name in ("mean", "frequency", "std"):
        assert torch.equal(getattr(stats, name), getattr(full.stats, name))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SAEFormatError, match="junk.safetensors"):
        read_summary(tmp_path / "junk.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({**tensors, "stats.mean": torch.ones(4)}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(SAEFormatError, match=r"'stats.mean' has shape \[4\], expected \[5\]"):
        read_summary(tmp_path / "bad.safetensors")


def test_index_read_back_with_checks(tmp_path):
    path = sae_models.write_features_index(INDEX, tmp_path / "s.features.json")
    assert read_features_index(path, n_features=5) == INDEX
    with pytest.raises(SAEFormatError, match="indexes 5 features but the SAE has 6"):
        read_features_index(path, n_features=6)
    bad = tmp_path / "bad.features.json"
    for text, match in (("{", "not a readable JSON"), ('{"features": 3}', "holds"),
                        (json.dumps({"features": [[{"value": "x", "position": [0, 0]}]]}), "feature 0")):
        bad.write_text(text)
        with pytest.raises(SAEFormatError, match=match):
            read_features_index(bad)
    with pytest.raises(SAEFormatError, match="file not found"):
        read_features_index(tmp_path / "none.json")
