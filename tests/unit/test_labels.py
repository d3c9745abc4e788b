"""Feature labels: the file beside an SAE, its checks, and the shapes of published label sets."""

import json

import pytest

from sae_models.labels import (
    MAX_LABEL, LabelError, clean_label, import_label_set, labels_path, parse_label_set, read_labels, set_label,
    write_labels,
)


def test_labels_live_beside_the_sae(tmp_path):
    assert labels_path(tmp_path / "a.safetensors") == str(tmp_path / "a.labels.json")
    assert labels_path(str(tmp_path / "unet.mid_block.attentions.0_k10") + "/") == str(tmp_path / "unet.mid_block.attentions.0_k10.labels.json")


def test_write_read_and_set(tmp_path):
    sae = tmp_path / "a.safetensors"
    assert read_labels(sae) == {}
    write_labels(sae, {3: "  red\n  cars ", 7: "sky"}, n_features=10)
    assert read_labels(sae, 10) == {3: "red cars", 7: "sky"}  # whitespace folded to one line
    assert set_label(sae, 7, "", 10) == {3: read_labels(sae)[3]}  # an empty label removes it
    assert set_label(sae, 9, "blue water", 10)[9] == "blue water"
    data = json.loads((tmp_path / "a.labels.json").read_text())
    assert data["format"] == "sae-unbox-labels" and set(data["labels"]) == {"3", "9"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.labels.json"]  # no temporary left


@pytest.mark.parametrize("text, message", [
    ("x" * (MAX_LABEL + 1), f"at most {MAX_LABEL} characters"),
    ("bell\x07", "control or unassigned"),
    ("zero\u200bwidth", "control or unassigned"),
    (12, "a label is text"),
])
def test_a_bad_label_is_refused(text, message):
    with pytest.raises(LabelError, match=message):
        clean_label(text)


def test_imports_shorten_and_clean_instead_of_refusing():
    assert clean_label("a\x07b " + "y" * 300, lenient=True).startswith("ab y")
    assert len(clean_label("z" * 500, lenient=True)) == MAX_LABEL


def test_features_out_of_range_are_refused(tmp_path):
    with pytest.raises(LabelError, match="feature 10 is out of range"):
        write_labels(tmp_path / "a.safetensors", {10: "x"}, n_features=10)
    with pytest.raises(LabelError, match="not a whole number"):
        parse_label_set('{"x1": "a"}', 10)


SHAPES = {
    "object": json.dumps({"3": "red cars", "5": "sky"}),
    "list": json.dumps([{"feature": 3, "label": "red cars"}, {"feature": 5, "label": "sky"}]),
    "neuronpedia": json.dumps({"explanations": [{"index": "3", "description": "red cars", "layer": "down.2.1"},
                                                 {"index": "5", "description": "sky", "layer": "down.2.1"},
                                                 {"index": "5", "description": "other block", "layer": "mid.0"}]}),
    "jsonl": '{"latent": 3, "explanation": "red cars", "hookpoint": "unet.down_blocks.2.attentions.1"}\n'
             '{"latent": 5, "explanation": "sky", "hookpoint": "unet.down_blocks.2.attentions.1"}\n'
             '{"latent": 5, "explanation": "else", "hookpoint": "unet.up_blocks.0.attentions.1"}\n',
    "csv": "block,feature_id,caption\ndown.2.1,3,red cars\ndown.2.1,5,sky\nup.0.1,3,not this one\n",
}


@pytest.mark.parametrize("shape", SHAPES)
def test_published_label_sets_of_every_shape(shape):
    assert parse_label_set(SHAPES[shape], 10, block="down.2.1") == {3: "red cars", 5: "sky"}


def test_a_set_of_several_blocks_needs_one_named():
    with pytest.raises(LabelError, match="labels several blocks .*down.2.1, up.0.1.*say which one"):
        parse_label_set(SHAPES["csv"], 10)
    with pytest.raises(LabelError, match="has no labels of block mid.0"):
        parse_label_set(SHAPES["csv"], 10, block="mid.0")
    with pytest.raises(LabelError, match="row 0 has no feature"):
        parse_label_set('[{"what": 1}]', 10)


@pytest.mark.parametrize("text", ["[" * 50_000 + "]" * 50_000, '{"labels": ' + "[" * 20_000 + "]" * 20_000 + "}",
                                  "[1]\n" + "[" * 30_000])
def test_a_deeply_nested_set_is_refused(text):
    with pytest.raises(LabelError, match="JSON nested too deeply|not JSON"):
        parse_label_set(text, 10)


def test_the_paper_label_set_brings_categories_that_stay_beside_their_labels(tmp_path):
    """The published set of the paper's SAEs: one JSON array per block of {feature_id, label, category,
    confidence}. Categories are kept beside the labels, follow a re-import, and go with a removed label."""
    from sae_models.labels import read_categories, set_label

    sae = tmp_path / "sae.safetensors"
    rows = [{"feature_id": 3, "label": "red cars", "category": "object", "confidence": 0.9},
            {"feature_id": 7, "label": "watercolour", "category": "style", "confidence": 0.7},
            {"feature_id": 9, "label": "no category"}]
    assert import_label_set(sae, json.dumps(rows), 16) == (3, 3)
    assert read_labels(sae) == {3: "red cars", 7: "watercolour", 9: "no category"}
    assert read_categories(sae) == {3: "object", 7: "style"}
    set_label(sae, 7, "a watercolour wash", 16)  # the user's own wording keeps the category
    assert read_categories(sae) == {3: "object", 7: "style"}
    set_label(sae, 3, "", 16)  # a removed label takes its category with it
    assert read_categories(sae) == {7: "style"}
    import_label_set(sae, json.dumps([{"feature_id": 7, "label": "paint"}]), 16)  # re-imported without one
    assert read_categories(sae) == {} and read_labels(sae)[7] == "paint"
