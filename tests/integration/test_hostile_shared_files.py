"""Shared files as a hostile author writes them, through the HTTP API of a real server: an SAE's features index
that points outside the server's folders, values that reach a node through a link instead of its widget,
megabyte inputs and image bombs, a killed writer's leftovers, and requests the pack's routes must refuse with a
400 rather than fail with a 500."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image, PngImagePlugin

from test_bad_input_server import AUTO, SAE_NAME, cfg_graph, steer_graph, wait, write_sae
from test_shared_workflows import dump_graph, train_graph, txt2img

REPO = Path(__file__).resolve().parents[2]
AUDIT = REPO / "tests" / "support" / "open_audit"
MB = 2**20


@pytest.fixture(scope="module")
def server(comfy_server, comfyui_path):
    import sae_models

    write_sae(sae_models, comfy_server.sae_dir / SAE_NAME)
    return comfy_server


# -- a features index that names a dump folder outside the server's folders ------------------------------


def png_bytes(colour=(200, 30, 30), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_dump(sae_models, folder: Path, named: list[str]) -> None:
    """A real dump (manifest, shard, records) whose image records name the files `named`."""
    writer = sae_models.ShardWriter(folder, writer_id="w", rows_per_shard=16, dtype=torch.float32)
    for i, name in enumerate(named):
        writer.add_image({"prompt": f"image {i}", "file": name},
                         {"mid.0": {"update": torch.zeros(16, 8), "grid": (4, 4)}})
    writer.close()


def write_index(sae_models, sae_path: Path, dump: str, files: list[str]) -> None:
    from sae_models.stats import features_index_path

    top = [{"writer": "w", "image": i, "position": [0, 0], "value": 1.0, "file": f} for i, f in enumerate(files)]
    sae_models.write_features_index({"block": "mid.0", "n_features": 256, "top_n": len(top), "dump": dump,
                                     "features": [top] * 256}, features_index_path(sae_path))


@pytest.fixture(scope="module")
def traced(start_comfy_server, tmp_path_factory):
    """A server whose every open and listing under a folder outside all of its folders is logged (Python's
    audit hook, tests/support/open_audit), with SAEs shared together with hostile features indexes."""
    import sae_models

    outside = tmp_path_factory.mktemp("outside_every_folder")
    (outside / "secret.png").write_bytes(png_bytes())
    write_dump(sae_models, outside / "dump", ["images/x.png", "../secret.png"])
    (outside / "dump" / "images" / "x.png").write_bytes(png_bytes((1, 2, 3)))
    log = tmp_path_factory.mktemp("open_log") / "opens.log"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(AUDIT), os.environ.get("PYTHONPATH")])),
           "SAE_TEST_OPEN_WATCH": str(outside), "SAE_TEST_OPEN_LOG": str(log)}
    with start_comfy_server(env=env) as s:
        s.outside, s.open_log = outside, log
        write_sae(sae_models, s.sae_dir / "root.safetensors")
        write_index(sae_models, s.sae_dir / "root.safetensors", "/", [str(outside / "secret.png")[1:]])
        write_sae(sae_models, s.sae_dir / "elsewhere.safetensors")
        write_index(sae_models, s.sae_dir / "elsewhere.safetensors", str(outside / "dump"),
                    ["images/x.png", "../secret.png"])
        good = s.output_dir / "shared_dump"
        write_dump(sae_models, good, ["images/a.png", "../../outside.png"])
        (good / "images" / "a.png").write_bytes(png_bytes((0, 200, 0)))
        (good / "images" / "b.png").write_bytes(png_bytes((0, 0, 200)))  # in the folder, named by no record
        (good / "images" / "link.png").symlink_to(outside / "secret.png")
        write_dump(sae_models, s.output_dir / "linked_dump", ["images/link.png"])
        (s.output_dir / "linked_dump" / "images" / "link.png").symlink_to(outside / "secret.png")
        write_sae(sae_models, s.sae_dir / "good.safetensors")
        write_index(sae_models, s.sae_dir / "good.safetensors", str(good), ["images/a.png", "images/b.png"])
        write_sae(sae_models, s.sae_dir / "linked.safetensors")
        write_index(sae_models, s.sae_dir / "linked.safetensors", str(s.output_dir / "linked_dump"),
                    ["images/link.png"])
        yield s


def opened_outside(server) -> list[str]:
    return server.open_log.read_text().splitlines() if server.open_log.exists() else []


def image(server, sae: str, file: str) -> requests.Response:
    return requests.get(f"{server.url}/sae_unbox/image", params={"sae": sae, "file": file}, timeout=60)


@pytest.mark.parametrize("sae, file", [
    ("root.safetensors", "OUTSIDE/secret.png"),  # index dump '/', the file named without its leading slash
    ("elsewhere.safetensors", "images/x.png"),  # a real dump, outside every folder of the server
    ("elsewhere.safetensors", "../secret.png"),
])
def test_an_index_naming_a_dump_outside_the_servers_folders_serves_nothing_and_opens_nothing(traced, sae, file):
    file = file.replace("OUTSIDE", str(traced.outside)[1:])
    r = image(traced, sae, file)
    assert r.status_code == 404 and r.headers["Content-Type"].startswith("application/json")
    assert "names no dump folder in ComfyUI's output folder or a registered dump folder" in r.json()["error"]
    listed = requests.get(f"{traced.url}/sae_unbox/features", params={"sae": sae, "limit": 1}, timeout=60)
    assert listed.status_code == 200 and listed.json()["sae"]["images"] is False
    assert opened_outside(traced) == []


def test_a_dump_in_the_output_folder_serves_only_the_images_its_records_name(traced):
    r = image(traced, "good.safetensors", "images/a.png")
    assert r.status_code == 200 and r.content == (traced.output_dir / "shared_dump" / "images" / "a.png").read_bytes()
    for file in ("images/b.png", "images/link.png", "manifest.json", f"{traced.outside}/secret.png"[1:]):
        r = image(traced, "good.safetensors", file)
        assert r.status_code == 404 and "not an image that the dump's records name" in r.json()["error"], file
    # its records may name a path out of the folder, or a link out of it: refused, and not opened
    r = image(traced, "good.safetensors", "../../outside.png")
    assert r.status_code == 403 and "not a file inside the dump folder" in r.json()["error"]
    r = image(traced, "linked.safetensors", "images/link.png")
    assert r.status_code == 403 and "not a file inside the dump folder" in r.json()["error"]
    assert opened_outside(traced) == []


@pytest.mark.parametrize("params", [{"sae": "good.safetensors", "file": "images/a.png\0.txt"},
                                    {"file": "images/x.png\0.txt"}, {"sae": "good.safetensors"},
                                    {"sae": "good.safetensors", "file": "a" * 5000}])
def test_a_bad_file_parameter_is_a_400(traced, params):
    r = requests.get(f"{traced.url}/sae_unbox/image", params=params, timeout=60)
    assert r.status_code == 400 and r.json()["error"].startswith("file is the image's path in the dump folder")


def test_the_audit_sees_what_the_server_opens(traced):
    """The trace the tests above rely on logs an open under the watched folder, also through a link (an image
    of the input folder that links there, loaded by ComfyUI's LoadImage)."""
    (traced.input_dir / "linked_secret.png").symlink_to(traced.outside / "secret.png")
    try:
        r = requests.post(f"{traced.url}/prompt", timeout=60, json={"prompt": {
            "1": {"class_type": "LoadImage", "inputs": {"image": "linked_secret.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}})
        assert r.status_code == 200, r.text
        wait(traced, r.json()["prompt_id"])
        assert f"open {traced.outside / 'secret.png'}" in opened_outside(traced)
    finally:
        (traced.input_dir / "linked_secret.png").unlink()
        traced.open_log.unlink(missing_ok=True)


# -- numbers that arrive through a link --------------------------------------------------------------------


def linked(graph: dict, node: str, name: str, value, kind: str = "PrimitiveInt") -> dict:
    """`graph` with input `name` of `node` fed by a primitive node holding `value`."""
    pid = str(90 + sum(1 for k in graph if k.startswith("9")))
    graph[pid] = {"class_type": kind, "inputs": {"value": value}}
    graph[node]["inputs"][name] = [pid, 0]
    return graph


def find_graph() -> dict:
    graph = txt2img(["1", 0], {
        "10": {"class_type": "UnboxLoadSAE", "inputs": {"sae_name": SAE_NAME}},
        "20": {"class_type": "UnboxFindFeatures", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "sae": ["10", 0], "concept": "a red car",
            "neutral": "a car", "block": AUTO, "seeds": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "width": 64, "height": 64, "top_n": 3}}})
    for n in ("2", "3", "4", "5", "6"):
        del graph[n]
    return graph


def prompt_list_graph() -> dict:
    graph = txt2img(["1", 0], {"30": {"class_type": "UnboxPromptList", "inputs": {
        "prompts": "a cat\na dog", "file": "", "index": 0, "seed_base": 0}}})
    graph["2"]["inputs"]["text"] = ["30", 0]
    graph["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "hostile/plist"}}
    return graph


def probe_graph() -> dict:
    graph = cfg_graph()
    graph["5"]["inputs"].update(steps=1, cfg=1.0)
    return graph


def heatmap_only() -> dict:
    graph = probe_graph()
    del graph["13"]
    return graph


def top_only() -> dict:
    graph = probe_graph()
    del graph["12"]
    return graph


def dump_with(folder: str) -> dict:
    return dump_graph(folder)


NAN = float("nan")
HEATMAP, TOP, FIND = "SAE Feature Heatmap", "SAE Top Features", "SAE Find Features"
LINKED = [
    # (graph, node, input, value, primitive, message, node upstream of the sampler)
    (heatmap_only, "12", "feature", -5, "PrimitiveInt", f"{HEATMAP}: feature must be a whole number between 0 and 1048576, got -5", False),
    (heatmap_only, "12", "alpha", NAN, "PrimitiveFloat", f"{HEATMAP}: alpha must be a finite number between 0 and 1, got nan", False),
    (top_only, "13", "top_n", 10**9, "PrimitiveInt", f"{TOP}: top_n must be a whole number between 1 and 256, got 1000000000", False),
    (top_only, "13", "top_n", -1, "PrimitiveInt", f"{TOP}: top_n must be a whole number between 1 and 256, got -1", False),
    (top_only, "13", "image_index", -1, "PrimitiveInt", f"{TOP}: image_index must be a whole number between 0 and 4096, got -1", False),
    (top_only, "13", "columns", -3, "PrimitiveInt", f"{TOP}: columns must be a whole number between 1 and 16, got -3", False),
    (top_only, "13", "alpha", NAN, "PrimitiveFloat", f"{TOP}: alpha must be a finite number between 0 and 1, got nan", False),
    (find_graph, "20", "top_n", -1, "PrimitiveInt", f"{FIND}: top_n must be a whole number between 1 and 64, got -1", True),
    (find_graph, "20", "top_n", 10**9, "PrimitiveInt", f"{FIND}: top_n must be a whole number between 1 and 64, got 1000000000", True),
    (find_graph, "20", "width", 20000, "PrimitiveInt", f"{FIND}: width must be a whole number between 64 and 4096, got 20000", True),
    (find_graph, "20", "height", 10**6, "PrimitiveInt", f"{FIND}: height must be a whole number between 64 and 4096, got 1000000", True),
    (find_graph, "20", "seeds", 10**6, "PrimitiveInt", f"{FIND}: seeds must be a whole number between 1 and 16, got 1000000", True),
    (find_graph, "20", "steps", 10**6, "PrimitiveInt", f"{FIND}: steps must be a whole number between 1 and 100, got 1000000", True),
    (find_graph, "20", "cfg", NAN, "PrimitiveFloat", f"{FIND}: cfg must be a finite number between 0 and 100, got nan", True),
    (prompt_list_graph, "30", "index", -1, "PrimitiveInt", "SAE Prompt List: index must be a whole number between 0 and 2147483648, got -1", True),
    (lambda: dump_with("hostile/linked_rows"), "10", "rows_per_shard", 0, "PrimitiveInt", "SAE Dump Activations: rows_per_shard must be a whole number between 256 and 4194304, got 0", True),
    (lambda: dump_with("hostile/linked_rows"), "10", "rows_per_shard", -256, "PrimitiveInt", "SAE Dump Activations: rows_per_shard must be a whole number between 256 and 4194304, got -256", True),
    (lambda: steer_graph(), "11", "strength", NAN, "PrimitiveFloat", "SAE Steer Features: strength must be a finite number between -1000 and 1000, got nan", True),
]


def failed(server, graph: dict) -> dict:
    """Queue `graph` (accepted by validation: the bad value is not known before the run) and return its
    execution_error message."""
    body = json.dumps({"prompt": graph})  # NaN as JavaScript writes it, which Python's json (and ComfyUI) reads
    r = requests.post(f"{server.url}/prompt", data=body, timeout=60)
    assert r.status_code == 200 and not r.json()["node_errors"], r.text
    entry = wait(server, r.json()["prompt_id"])
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1, entry["status"]
    return errors[0]


@pytest.mark.parametrize("make, node, name, value, kind, message, before_sampler", LINKED,
                         ids=[f"{c[1]}-{c[2]}={c[3]}" for c in LINKED])
def test_a_linked_out_of_range_or_non_finite_value_is_refused_by_the_node(server, make, node, name, value, kind,
                                                                          message, before_sampler):
    outputs_before = sorted(p for p in server.output_dir.rglob("*") if p.is_file())
    error = failed(server, linked(make(), node, name, value, kind))
    assert error["node_id"] == node and error["exception_message"].strip() == message
    assert error["exception_type"] == "sae_unbox.NodeInputError"  # no server folder in the type's name
    if before_sampler:  # the sampler never started: the error came first
        assert "5" not in error["executed"] and not any(n in error["executed"] for n in ("6", "7"))
    assert sorted(p for p in server.output_dir.rglob("*") if p.is_file()) == outputs_before


def test_a_linked_negative_max_tokens_trains_nothing(server):
    graph = linked(train_graph("sae_dumps/none_here", "never_saved"), "1", "max_tokens", -1)
    error = failed(server, graph)
    assert error["exception_message"].strip() == ("SAE Train: max_tokens must be a whole number between 0 and "
                                                  "1099511627776, got -1")
    assert not list(server.sae_dir.glob("never_saved*"))


def test_a_linked_megabyte_step_list_is_refused_before_sampling(server):
    graph = linked(probe_graph(), "11", "steps", "0-10000," * 120_000, "PrimitiveString")
    error = failed(server, graph)
    assert error["exception_message"].startswith("SAE Probe Block: steps holds 960,000 characters, more than 1,000: ")
    assert len(error["exception_message"]) < 300 and "5" not in error["executed"]


# -- megabyte inputs and image bombs, refused by validation ---------------------------------------------------


def rss(server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def watched_files(server) -> list[Path]:
    return sorted(p for d in (server.output_dir, server.sae_dir, server.input_dir) for p in d.rglob("*"))


def refused(server, graph: dict, node: str) -> tuple[str, float]:
    """POST `graph`, which validation must refuse at `node`: (the node's message, seconds taken). Nothing may
    have been created in the output, input or SAE folders."""
    before = watched_files(server)
    start = time.monotonic()
    r = requests.post(f"{server.url}/prompt", json={"prompt": graph}, timeout=120)
    took = time.monotonic() - start
    assert r.status_code == 400, r.text[:500]
    assert len(r.content) < 10_000  # the refusal quotes an excerpt, not the input
    errors = r.json()["node_errors"][node]["errors"]
    # ComfyUI reports a node's own validation once for every input it checks, as '<input> - <message>'
    messages = {e["details"].partition(" - ")[2] for e in errors}
    assert len(messages) == 1, messages
    assert watched_files(server) == before
    print(f"refused in {took:.3f} s")  # seen with pytest -s; the closing note reports them
    return messages.pop(), took


def painted(mask: str) -> dict:
    graph = steer_graph()
    graph["13"] = {"class_type": "UnboxPaintedMask", "inputs": {"width": 128, "height": 128, "mask": mask}}
    graph["11"]["inputs"]["mask"] = ["13", 0]
    return graph


def train_named(dump_folder="sae_dumps/x", save_name="ok") -> dict:
    return train_graph(dump_folder, save_name)


def top_prefixed(prefix: str) -> dict:
    graph = top_only()
    graph["13"]["inputs"]["filename_prefix"] = prefix
    return graph


def dump_typed(**inputs) -> dict:
    graph = dump_graph("hostile/typed")
    graph["10"]["inputs"].update(inputs)
    return graph


def probe_steps(steps: str) -> dict:
    graph = probe_graph()
    graph["11"]["inputs"]["steps"] = steps
    return graph


def prompts(text: str) -> dict:
    graph = prompt_list_graph()
    graph["30"]["inputs"]["prompts"] = text
    return graph


MEGA = "a" * MB
STEPS_MB = "0-10000," * 120_000
TYPED = [
    (lambda: probe_steps(STEPS_MB), "11", "steps", "SAE Probe Block: steps holds 960,000 characters, more than 1,000"),
    (lambda: dump_typed(steps=STEPS_MB), "10", "steps", "SAE Dump Activations: steps holds 960,000 characters"),
    (lambda: dump_typed(folder=MEGA), "10", "folder", "SAE Dump Activations: folder 'aaaa"),
    (lambda: dump_typed(blocks=MEGA), "10", "blocks", "SAE Dump Activations: blocks holds 1,048,576 characters, more than 1,000"),
    (lambda: dump_typed(writer_id=MEGA), "10", "writer_id", "SAE Dump Activations: writer_id holds 1,048,576 characters, more than 64"),
    (lambda: train_named(dump_folder=MEGA), "1", "dump_folder", "SAE Train: dump_folder 'aaaa"),
    (lambda: train_named(save_name=MEGA), "1", "save_name", "SAE Train: save_name 'aaaa"),
    (lambda: train_named(save_name="b" * 300), "1", "save_name", "SAE Train: save_name 'bbbb"),
    (lambda: top_prefixed(MEGA), "13", "filename_prefix", "SAE Top Features: filename_prefix 'aaaa"),
    (lambda: top_prefixed("c" * 300), "13", "filename_prefix", "SAE Top Features: filename_prefix 'cccc"),
    (lambda: prompts("a prompt\n" * 100_000), "30", "prompts", "SAE Prompt List: the list holds 100,000 prompts, more than 10,000"),
    (lambda: prompts(MEGA + "b"), "30", "prompts", "SAE Prompt List: prompts holds 1,048,577 characters, more than 1,048,576"),
]


@pytest.mark.parametrize("make, node, name, start", TYPED, ids=[f"{c[1]}-{c[2]}-{i}" for i, c in enumerate(TYPED)])
def test_a_huge_widget_value_is_refused_at_validation_naming_the_input(server, make, node, name, start):
    message, _ = refused(server, make(), node)
    assert message.startswith(start) and len(message) < 300, message[:400]
    assert name in message


def png_header_bomb(side: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG `side` x `side` of zero pixels: its IDAT is tiny compared with what it decodes to."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + side * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("bit_depth, colour_type", [(8, 0), (16, 6)], ids=["gray8", "rgba16"])
def test_a_mask_bomb_is_refused_before_it_is_decoded(server, bit_depth, colour_type):
    data = png_header_bomb(8192, bit_depth, colour_type)
    assert len(data) < 2 * MB
    rss_before = rss(server)
    message, _ = refused(server, painted(base64.b64encode(data).decode()), "13")
    assert message == "SAE Painted Mask: the painted PNG is 8192 x 8192 pixels, more than 4,194,304 in all"
    assert rss(server) - rss_before < 100 * MB


def test_a_bmp_is_named_as_a_bmp(server):
    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, format="BMP")
    message, _ = refused(server, painted(base64.b64encode(buf.getvalue()).decode()), "13")
    assert message == "SAE Painted Mask: mask holds a BMP image; the painted mask is a PNG"


def test_a_png_with_a_huge_text_chunk_says_so(server):
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (64 * MB), zip=True)
    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, format="PNG", pnginfo=info)
    assert len(buf.getvalue()) < MB
    message, _ = refused(server, painted(base64.b64encode(buf.getvalue()).decode()), "13")
    assert message.startswith("SAE Painted Mask: the painted PNG cannot be read (") and "too large" in message.lower()


# -- a killed writer's temporaries ---------------------------------------------------------------------------


def test_a_killed_writers_temporaries_are_removed_when_the_next_writer_opens_the_folder(server):
    folder = server.output_dir / "hostile" / "killed"
    server.run(dump_graph("hostile/killed"))  # a dump to resume
    places = [folder, folder / "images", folder / "mid.0"]
    # a writer of this machine that died while writing, leaving a temporary in each place (its own names)
    script = ("import os, sys\nfrom sae_models import files\n"
              "for place, name in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              "    open(files.temporary_name(os.path.join(place, name)), 'wb').write(b'partial')\n"
              "os._exit(9)\n")
    args = [str(folder), "manifest.json", str(folder / "images"), "0123456789abcdef0123.png",
            str(folder / "mid.0"), "w-000003.safetensors"]
    r = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                       timeout=120)
    assert r.returncode == 9
    dead = sorted(p for place in places for p in place.glob(".*.tmp"))
    assert len(dead) == 3
    # one a live process is writing now (this test's own), and a foreign file: both stay
    from sae_models import files

    live = files.temporary_name(folder / "mid.0" / "x.safetensors")
    live.write_bytes(b"in progress")
    (folder / "notes.tmp").write_text("not a temporary of the pack")
    graph = dump_graph("hostile/killed")
    graph["10"]["inputs"]["writer_id"] = "next"  # a new writer (the first run's node is cached, its writer open)
    server.run(graph)
    assert [p for p in dead if p.exists()] == []
    assert live.exists() and (folder / "notes.tmp").exists()
    live.unlink()


# -- routes: 400 with JSON, never 500 ----------------------------------------------------------------------------


def post(server, path, body: str) -> requests.Response:
    return requests.post(server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("depth", [10_000, 20_000])
def test_a_deeply_nested_label_body_is_a_400(server, depth):
    r = post(server, "/sae_unbox/labels", '{"sae": ' + "[" * depth + "]" * depth + "}")
    assert r.status_code == 400 and r.json()["error"] == "the body is JSON nested too deeply"


def test_a_deeply_nested_label_set_is_a_400(server):
    text = "[" * 50_000 + "]" * 50_000
    r = post(server, "/sae_unbox/labels/import", json.dumps({"sae": SAE_NAME, "text": text}))
    assert r.status_code == 400 and r.json()["error"] == "text: JSON nested too deeply"


@pytest.mark.parametrize("block", [["mid.0"], {"a": 1}, 3, "no.such.block"])
def test_a_label_import_with_a_bad_block_is_a_400(server, block):
    body = json.dumps({"sae": SAE_NAME, "text": "feature,label\n1,x\n", "block": block})
    r = post(server, "/sae_unbox/labels/import", body)
    assert r.status_code == 400 and r.json()["error"].startswith("block names one block")
