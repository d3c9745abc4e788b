"""A shared workflow is untrusted input: through a real server's HTTP API, no widget value makes the pack
read or write outside ComfyUI's own folders, and every refusal is one clear error naming the node and the
input, given before anything runs (POST /prompt answers 400) and leaving nothing on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from paper_release import write_paper_release

AUTO = "auto (the SAE's block)"


def loader():
    return {"class_type": "TinySDXLCheckpointLoader", "inputs": {"ckpt_name": "tiny", "seed": 0}}


def txt2img(model_ref, extra: dict, prompt="a cat", seed=1) -> dict:
    """API graph: tiny loader (node 1), sampler on `model_ref`, decode (node 6), plus `extra` nodes."""
    graph = {
        "1": loader(),
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }
    graph.update(extra)
    return graph


def dump_graph(folder: str) -> dict:
    return txt2img(["10", 0], {
        "10": {"class_type": "UnboxDumpActivations", "inputs": {
            "model": ["1", 0], "folder": folder, "blocks": "mid.0", "steps": "all", "apply_to": "cond",
            "fields": "update", "dtype": "float16", "rows_per_shard": 256}},
        "11": {"class_type": "UnboxDumpImages", "inputs": {
            "images": ["6", 0], "dump": ["10", 1], "prompt": "a cat", "seed": 1, "commit": "after every prompt"}},
    })


def train_graph(dump_folder: str, save_name: str) -> dict:
    return {"1": {"class_type": "UnboxTrainSAE", "inputs": {
        "dump_folder": dump_folder, "block": "the dump's only block", "n_features": 32, "k": 4,
        "architecture": "topk", "max_tokens": 0, "batch_size": 64, "lr": 1e-3, "eval_fraction": 0.0, "seed": 0,
        "save_name": save_name, "overwrite": True}}}


def prompt_list_graph(file: str) -> dict:
    return {
        "1": {"class_type": "UnboxPromptList", "inputs": {"prompts": "a cat", "file": file, "index": 0,
                                                         "seed_base": 0}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def top_features_graph(prefix: str, sae: str) -> dict:
    return txt2img(["11", 0], {
        "10": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": sae}},
        "11": {"class_type": "UnboxProbeBlock", "inputs": {
            "model": ["1", 0], "sae": ["10", 0], "block": AUTO, "steps": "all", "apply_to": "cond"}},
        "12": {"class_type": "UnboxTopFeatures", "inputs": {
            "probe": ["11", 1], "image": ["6", 0], "top_n": 3, "block": "first probed block", "step": -1,
            "image_index": 0, "columns": 3, "colormap": "inferno", "alpha": 0.6, "filename_prefix": prefix}},
    })


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture(scope="module")
def server(comfy_server, tmp_path_factory):
    """The server, a folder outside all of its folders, and symbolic links into it from each of its folders."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("the server's secret\n")
    for folder in (comfy_server.output_dir, comfy_server.sae_dir, comfy_server.input_dir):
        link = folder / "escape"
        if not link.exists():
            link.symlink_to(outside, target_is_directory=True)
    link = comfy_server.input_dir / "leak.txt"
    if not link.exists():
        link.symlink_to(outside / "secret.txt")
    write_paper_release(comfy_server.sae_dir / "unet.mid_block.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001",
                        seed=0)
    comfy_server.outside = outside
    return comfy_server


def refused(server, graph: dict, *words: str) -> str:
    """Queue `graph`, expect POST /prompt to refuse it (400) with all `words` in the error; return the error."""
    before = files_under(server.outside), files_under(server.root)
    with pytest.raises(server.Error) as e:
        server.run(graph)
    text = str(e.value)
    assert "400" in text.split(":")[0], text
    for w in words:
        assert w in text, (w, text)
    assert (files_under(server.outside), files_under(server.root)) == before  # nothing created anywhere
    return text


# Values a hostile workflow could hold, with the reason each must be refused for.
ESCAPES = [
    ("{outside}/dump", "is an absolute path"),
    ("~/sae-dump", "starts with '~'"),
    ("../dump", "holds '..'"),
    ("a/../../dump", "holds '..'"),
    ("%2e%2e/dump", "holds '%'"),
    ("..%2f..%2fdump", "holds '%'"),
    ("%2Ftmp%2Fdump", "holds '%'"),
    ("a\\..\\..\\dump", "holds a backslash"),
    ("escape/dump", "resolves, through a symbolic link, outside"),
]


def _value(server, template: str) -> str:
    return template.format(outside=server.outside)


@pytest.mark.parametrize("value, why", ESCAPES, ids=[v for v, _ in ESCAPES])
def test_dump_folder_stays_in_the_output_folder(server, value, why):
    refused(server, dump_graph(_value(server, value)), "SAE Dump Activations: folder", why)


@pytest.mark.parametrize("value, why", ESCAPES, ids=[v for v, _ in ESCAPES])
def test_train_dump_folder_stays_in_the_output_folder(server, value, why):
    refused(server, train_graph(_value(server, value), "trained"), "SAE Train: dump_folder", why)


@pytest.mark.parametrize("value, why", ESCAPES, ids=[v for v, _ in ESCAPES])
def test_train_save_name_stays_in_models_sae(server, value, why):
    refused(server, train_graph("sae_dumps/nothing", _value(server, value)), "SAE Train: save_name", why)


@pytest.mark.parametrize("value, why", [*ESCAPES, ("leak.txt", "resolves, through a symbolic link, outside")],
                         ids=[v for v, _ in ESCAPES] + ["leak.txt"])
def test_prompt_file_stays_in_the_input_folder(server, value, why):
    value = _value(server, value).replace("/dump", "/secret.txt")
    text = refused(server, prompt_list_graph(value), "SAE Prompt List: file", why)
    assert "the server's secret" not in text


@pytest.mark.parametrize("value, why", ESCAPES, ids=[v for v, _ in ESCAPES])
def test_top_features_prefix_stays_in_the_output_folder(server, value, why):
    refused(server, top_features_graph(_value(server, value), "unet.mid_block.attentions.0_k10_hidden5120_auxk256"
                                       "_bs4096_lr0.0001"), "SAE Top Features: filename_prefix", why)


def test_a_linked_path_is_checked_when_the_node_runs(server):
    """A path that comes from another node is unknown at validation; the node refuses it before sampling."""
    graph = dump_graph("ignored")
    graph["20"] = {"class_type": "PrimitiveString", "inputs": {"value": "../linked"}}
    graph["10"]["inputs"]["folder"] = ["20", 0]
    before = files_under(server.root)
    with pytest.raises(server.Error, match=r"UnboxDumpActivations \(node 10\): SAE Dump Activations: folder "
                                           r"'../linked' holds '..'"):
        server.run(graph)
    assert files_under(server.root) == before and not (server.output_dir.parent / "linked").exists()


def test_prompt_files_of_the_input_folder_are_offered_and_read(server):
    (server.input_dir / "lists").mkdir(exist_ok=True)
    (server.input_dir / "lists" / "mine.txt").write_text("a red kite\na blue boat\n")
    options = server.object_info()["UnboxPromptList"]["input"]["required"]["file"]
    names = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert "lists/mine.txt" in names and "" in names
    assert "leak.txt" not in names and not any(n.startswith("escape/") for n in names)  # links out: not offered
    entry = server.run(prompt_list_graph("lists/mine.txt"))
    assert "1/2: a red kite" in json.dumps(entry["outputs"])


@pytest.mark.parametrize("name", ["bigdisk", "yamldisk"])
def test_registered_dump_folders_take_dumps_and_training(server, name):
    """A server's owner registers extra dump folders (environment variable, extra_model_paths.yaml); a
    workflow names them as '<name>/<path>'."""
    root = server.registered_dumps[name]
    server.run(dump_graph(f"{name}/run"))
    shards = list((root / "run" / "mid.0").glob("*.safetensors"))
    assert len(shards) == 1
    with safe_open(str(shards[0]), "pt") as f:
        assert f.get_tensor("update").shape == (16, 128)
    assert not (server.output_dir / name).exists()
    server.run(train_graph(f"{name}/run", f"from_{name}"))
    assert (server.sae_dir / f"from_{name}.safetensors").is_file()
    index = json.loads((server.sae_dir / f"from_{name}.features.json").read_text())
    assert index["dump"] == os.path.realpath(root / "run")


def test_an_unregistered_name_is_a_folder_of_the_output_folder(server):
    server.run(dump_graph("notregistered/run"))
    assert list((server.output_dir / "notregistered" / "run" / "mid.0").glob("*.safetensors"))
