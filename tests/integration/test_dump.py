"""Training-data dumps and SAE training on real ComfyUI (in-process, tiny SDXL model).

The dumped rows are checked against the block's input and output captured by an independent forward
hook, and the shard files are read with `safetensors` directly, not with the pack's reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from test_patching import Capture, no_hooks_left, sample

FULL = "only when a shard is full"
EVERY = "after every prompt"


def dump_node(pk, m, folder, blocks="mid.0", steps="all", apply_to="cond", fields="update", dtype="float32",
              rows=256, writer_id=""):
    """The dump node on `folder`, a path inside ComfyUI's output folder (given to the node relative to it)."""
    import folder_paths

    node = pk.N["UnboxDumpActivations"]
    rel = os.path.relpath(folder, folder_paths.get_output_directory())
    return node.execute(m, rel, blocks, steps, apply_to, fields, dtype, rows, writer_id).args


@pytest.fixture
def dump_dir(output_dir):
    return output_dir / "dump"


def save_images(pk, images, dump, prompt="a cat", seed=1, commit=EVERY):
    return pk.N["UnboxDumpImages"].execute(images, dump, prompt=prompt, seed=seed, commit=commit)


def fake_images(n, size=128):
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(n))


def read_shards(folder: Path, block: str) -> dict[str, torch.Tensor]:
    """All complete shards of a block, concatenated in file-name order (safetensors, not the pack's reader)."""
    out: dict[str, list] = {}
    for f in sorted((folder / block).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out.setdefault(k, []).append(st.get_tensor(k))
    return {k: torch.cat(v) for k, v in out.items()}


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((folder / "images").glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_dump_writes_exactly_the_block_update_input_and_output(pk, tiny, model, dump_dir):
    m, dump = dump_node(pk, model, dump_dir, blocks="mid.0 up.0.1", fields="update, input, output")
    caps = {b: Capture(model, p, n) for b, p, n in
            (("mid.0", "middle_block.1", "middle_block.2"), ("up.0.1", "output_blocks.1.1", "output_blocks.2.0"))}
    try:
        sample(tiny, m, prompt="a lighthouse", seed=3)
    finally:
        for c in caps.values():
            c.close()
    save_images(pk, fake_images(1), dump, prompt="a lighthouse", seed=3)
    assert no_hooks_left(model)
    for block, cap in caps.items():
        (call,) = cap.calls
        x_in = call["x_in"][0].permute(1, 2, 0).reshape(-1, call["x_in"].shape[1])  # [H*W, C], row-major
        out = call["orig"][0].permute(1, 2, 0).reshape(-1, call["orig"].shape[1])
        assert torch.equal(call["final"], call["orig"])  # dumping changes nothing
        rows = read_shards(dump_dir, block)
        assert rows["update"].shape == (16, 128) and rows["update"].dtype == torch.float32
        assert torch.allclose(rows["update"], out - x_in, atol=1e-6)
        assert torch.allclose(rows["input"], x_in) and torch.allclose(rows["output"], out, atol=1e-6)
        assert rows["position"].tolist() == list(range(16))
        assert set(rows["cond"].tolist()) == {0} and set(rows["seed"].tolist()) == {3}
        assert set(rows["step"].tolist()) == {0} and set(rows["batch_index"].tolist()) == {0}
    (rec,) = records(dump_dir)
    assert rec["prompt"] == "a lighthouse" and rec["seed"] == 3 and (dump_dir / rec["file"]).is_file()
    manifest = json.loads((dump_dir / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["blocks"]["mid.0"]["d_in"] == 128


def test_batches_cfg_and_steps_give_one_record_per_image(pk, tiny, model, dump_dir):
    import comfy.sample

    m, dump = dump_node(pk, model, dump_dir, apply_to="both", dtype="float16")
    latent = torch.zeros(2, 4, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    pos, neg = tiny.tiny_conditioning("two cats"), tiny.tiny_conditioning("")
    comfy.sample.sample(m, noise, 2, 3.0, "euler", "normal", pos, neg, latent, denoise=1.0, disable_pbar=True, seed=0)
    save_images(pk, fake_images(2), dump, prompt="two cats", seed=0)
    rows = read_shards(dump_dir, "mid.0")
    # 2 images x 2 steps x (cond + uncond) x 16 positions
    assert rows["update"].shape == (128, 128) and rows["update"].dtype == torch.float16
    for image in (0, 1):
        mine = rows["batch_index"] == image
        assert int(mine.sum()) == 64
        assert sorted(set(rows["step"][mine].tolist())) == [0, 1]
        assert sorted(set(rows["cond"][mine].tolist())) == [0, 1]
        assert len(set(rows["image"][mine].tolist())) == 1
    assert [r["batch_index"] for r in records(dump_dir)] == [0, 1]
    assert len(set(rows["image"].tolist())) == 2


def test_rows_accumulate_across_prompts_into_fixed_size_shards(pk, tiny, model, dump_dir):
    m, dump = dump_node(pk, model, dump_dir, rows=256)  # 16 rows per image: a shard every 16 images
    for i in range(20):
        sample(tiny, m, prompt=f"prompt {i}", seed=i)
        save_images(pk, fake_images(1), dump, prompt=f"prompt {i}", seed=i, commit=FULL)
    dump.wait()  # the writer thread has written every full shard
    shards = sorted((dump_dir / "mid.0").glob("*.safetensors"))
    assert len(shards) == 1 and read_shards(dump_dir, "mid.0")["update"].shape[0] == 256
    assert len(records(dump_dir)) == 16  # only images whose rows are all on disk count as done
    dump.flush()
    assert read_shards(dump_dir, "mid.0")["update"].shape[0] == 320 and len(records(dump_dir)) == 20
    assert sorted(r["seed"] for r in records(dump_dir)) == list(range(20))


def test_an_interrupted_run_writes_nothing_and_the_next_run_is_clean(pk, tiny, model, comfy_pack, dump_dir):
    import comfy.model_management as mm

    class Interrupt(pk.patch.Edit):
        def apply(self, update, info):
            mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()

    m, dump = dump_node(pk, model, dump_dir, blocks="mid.0 up.0.1")
    stopped = pk.patch.attach_edit(m, Interrupt(block=pk.sm.get_block("up.0.0")))  # after mid.0, before up.0.1
    pos, neg = tiny.tiny_conditioning("x"), tiny.tiny_conditioning("")
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy_pack.node("KSampler")().sample(stopped, 1, 1, 1.0, "euler", "normal", pos, neg,
                                                 {"samples": torch.zeros(1, 4, 16, 16)})
    finally:
        mm.interrupt_current_processing(False)
    assert not list(dump_dir.rglob("*.safetensors")) and not list(dump_dir.rglob("*.tmp*"))
    sample(tiny, m, prompt="y", seed=5)
    save_images(pk, fake_images(1), dump, prompt="y", seed=5)
    for block in ("mid.0", "up.0.1"):
        assert read_shards(dump_dir, block)["update"].shape[0] == 16  # the interrupted run's rows are gone
    assert [r["prompt"] for r in records(dump_dir)] == ["y"]


def test_two_writers_share_a_folder_without_clashing(pk, tiny, model, dump_dir):
    for writer in ("machine-a", "machine-b"):
        m, dump = dump_node(pk, model, dump_dir, writer_id=writer)
        sample(tiny, m, prompt=writer, seed=1)
        save_images(pk, fake_images(1), dump, prompt=writer, seed=1)
    names = sorted(p.name for p in (dump_dir / "mid.0").glob("*.safetensors"))
    assert [n.split("-")[0] + "-" + n.split("-")[1] for n in names] == ["machine-a", "machine-b"]
    assert sorted(r["prompt"] for r in records(dump_dir)) == ["machine-a", "machine-b"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(blocks="mid.7"), "unknown block 'mid.7'"),
    (dict(steps="two"), "cannot read steps"),
    (dict(writer_id="a b"), "writer_id 'a b'"),
])
def test_bad_dump_input_is_refused_before_sampling(pk, model, dump_dir, kwargs, message):
    with pytest.raises(ValueError, match=f"SAE Dump Activations: .*{message}"):
        dump_node(pk, model, dump_dir, **kwargs)


def test_unwritable_folder_full_disk_and_mismatched_dump_are_refused(pk, tiny, model, dump_dir, monkeypatch):
    dump_dir.mkdir()
    blocker = dump_dir / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="SAE Dump Activations: cannot write to the dump folder"):
        dump_node(pk, model, blocker / "dump")
    dump_mod = pk.sm.__name__.rsplit(".", 1)[0] + ".nodes.dump"
    import sys

    usage = sys.modules[dump_mod].shutil.disk_usage
    with monkeypatch.context() as small_disk:
        small_disk.setattr(sys.modules[dump_mod].shutil, "disk_usage", lambda p: usage(p)._replace(free=1 << 20))
        with pytest.raises(ValueError, match="MiB free"):
            dump_node(pk, model, dump_dir / "small-disk", rows=16384)
    m, dump = dump_node(pk, model, dump_dir / "d", dtype="float16")
    sample(tiny, m)
    save_images(pk, fake_images(1), dump)
    with pytest.raises(ValueError, match="holds a float16 dump; this node writes float32"):
        dump_node(pk, model, dump_dir / "d", dtype="float32")
    with pytest.raises(ValueError, match="shards of 256 rows"):
        dump_node(pk, model, dump_dir / "d", dtype="float16", rows=512)


def test_images_node_refuses_a_run_that_recorded_nothing_or_other_images(pk, tiny, model, dump_dir):
    m, dump = dump_node(pk, model, dump_dir, steps="3")  # a 1-step sampler never reaches step 3
    sample(tiny, m)
    with pytest.raises(ValueError, match="SAE Dump Images: nothing was recorded on mid.0"):
        save_images(pk, fake_images(1), dump)
    m, dump = dump_node(pk, model, dump_dir / "b")
    sample(tiny, m)
    with pytest.raises(ValueError, match="recorded 1 images per batch but 2 images came in"):
        save_images(pk, fake_images(2), dump)
    assert not list(dump_dir.rglob("*.safetensors"))


def test_prompt_list_reads_text_or_a_file_of_the_input_folder(pk, input_dir):
    node = pk.N["UnboxPromptList"]
    out = node.execute("# comment\na cat\n\na dog\n", "", 1, seed_base=100).args
    assert out == ("a dog", 101, 1, 2)
    (input_dir / "lists").mkdir()
    (input_dir / "lists" / "prompts.txt").write_text("one\ntwo\nthree\n")
    assert node.execute("ignored", "lists/prompts.txt", 2).args[:2] == ("three", 2)
    with pytest.raises(ValueError, match="SAE Prompt List: index 3 is past the end of the list \\(3 prompts\\)"):
        node.execute("", "lists/prompts.txt", 3)
    with pytest.raises(ValueError, match="SAE Prompt List: file 'missing.txt' is not a file in ComfyUI's input folder"):
        node.execute("", "missing.txt", 0)


@pytest.mark.parametrize("arch", ["topk", "matryoshka_batchtopk"])
def test_dump_train_load_and_steer(pk, tiny, model, tmp_path, output_dir, monkeypatch, arch):
    """Dump from sampling, train on the dump with the Train node, load the saved SAE, steer and probe with it
    (the paper's TopK, and Matryoshka BatchTopK: a threshold at inference, so every node's other path)."""
    import folder_paths

    sae_dir = tmp_path / "models_sae"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sae", ([str(sae_dir)], {".safetensors"}))
    dump_dir = output_dir / "dump"
    m, dump = dump_node(pk, model, dump_dir, blocks="up.0.1", rows=256)
    for i in range(40):
        sample(tiny, m, prompt=f"prompt number {i}", seed=i)
        save_images(pk, fake_images(1), dump, prompt=f"prompt number {i}", seed=i, commit=FULL)
    dump.flush()
    train = pk.N["UnboxTrainSAE"]
    with torch.inference_mode():  # as ComfyUI runs every node
        out = train.execute("dump", "the dump's only block", 64, 4, arch, 0, 128, 1e-3, 0.1, 0, "trained",
                            False)
    handle = out.args[0]
    sae = handle.sae
    assert (sae.config.block, sae.n_features, sae.config.k, sae.d_in) == ("up.0.1", 64, 4, 128)
    assert sae.architecture == arch
    if arch == "matryoshka_batchtopk":
        assert sae.config.hyperparameters["matryoshka_widths"] == [4, 8, 16, 32, 64] and float(sae.threshold) > 0
    assert sae.stats.mean is not None and float(sae.stats.frequency.sum()) > 0
    saved = sae_dir / "trained.safetensors"
    assert saved.is_file() and (sae_dir / "trained.features.json").is_file()
    assert "FVU" in out.ui["text"][0]
    with pytest.raises(ValueError, match="already holds .*; choose another save_name"):
        train.execute("dump", "up.0.1", 64, 4, "topk", 0, 128, 1e-3, 0.1, 0, "trained", False)

    loaded = pk.N["UnboxLoadSAE"].execute("trained.safetensors").args[0]
    assert torch.equal(loaded.sae.W_dec, sae.W_dec) and loaded.sae.architecture == arch
    feature = int(sae.stats.frequency.argmax())
    steered = pk.N["UnboxSteerFeatures"].execute(model, loaded, str(feature), 4.0, "add", "auto (the SAE's block)",
                                                 "mean activation", 0.0, 1.0, "cond").args[0]
    assert not torch.equal(sample(tiny, steered, seed=7), sample(tiny, model, seed=7))
    index = json.loads((sae_dir / "trained.features.json").read_text())
    top = index["features"][feature]
    assert top and all(e["prompt"].startswith("prompt number") for e in top)
    assert index["dump"] == str(dump_dir)

    # the visualisation nodes show, for each top feature, where it fired most in the training data
    probed, probes = pk.N["UnboxProbeBlock"].execute(model, loaded, "auto (the SAE's block)", "all", "cond").args
    sample(tiny, probed, seed=7)
    ranking = json.loads(pk.N["UnboxTopFeatures"].execute(probes, fake_images(1), 3, "first probed block", -1, 0, 3,
                                                          "inferno", 0.6, "").args[1])
    assert ranking["dataset"] == str(dump_dir)
    for entry in ranking["features"]:
        examples = entry["top_dataset_images"]
        assert examples == [{k: e[k] for k in ("prompt", "file", "value", "position")}
                            for e in index["features"][entry["feature"]][:3]]
        assert all((dump_dir / e["file"]).is_file() for e in examples)


def test_train_refuses_bad_input(pk, tmp_path, output_dir, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sae", ([str(tmp_path / "sae")], {".safetensors"}))
    train = pk.N["UnboxTrainSAE"]
    args = ["the dump's only block", 64, 4, "topk", 0, 128, 1e-3, 0.1, 0, "x", False]
    with pytest.raises(ValueError, match="SAE Train: .*nothing-here: not an activation dump folder"):
        train.execute("nothing-here", *args)
    with pytest.raises(ValueError, match="save_name '../x' holds '..'"):
        train.execute("nothing-here", "the dump's only block", 64, 4, "topk", 0, 128, 1e-3, 0.1, 0, "../x", False)
    assert not os.path.exists(tmp_path / "sae")


def test_values_beyond_float16_are_refused_not_written_as_inf(pk, tiny, model, dump_dir):
    class Amplify(pk.patch.Edit):  # some earlier edit (or model) makes mid.0's update huge
        def apply(self, update, info):
            return update * 1e6

    loud = pk.patch.attach_edit(model, Amplify(block=pk.sm.get_block("mid.0")))
    m, dump = dump_node(pk, loud, dump_dir, dtype="float16")
    sample(tiny, m)
    with pytest.raises(ValueError, match=r"^SAE Dump Images: the run's values of mid.0 \(\|x\| up to .*\) do not fit "
                                         r"the dump's float16 \(largest float16: 65504\), so nothing was written; "
                                         r"dump in float32"):
        save_images(pk, fake_images(1), dump)
    assert not list(dump_dir.rglob("*.safetensors")) and not records(dump_dir)
    m, dump = dump_node(pk, loud, dump_dir / "wide", dtype="float32")  # float32 holds them
    sample(tiny, m)
    save_images(pk, fake_images(1), dump)
    assert torch.isfinite(read_shards(dump_dir / "wide", "mid.0")["update"]).all()


def test_images_and_shards_are_written_by_the_sessions_writer_thread(pk, tiny, model, dump_dir, monkeypatch):
    """With more prompts queued (here: commit only full shards), SAE Dump Images hands the writing to the
    session's thread and returns; the writes happen there, in order, and `wait` (or the next flush) finishes
    them. A failed write is raised to the next caller, naming what failed."""
    import threading

    m, dump = dump_node(pk, model, dump_dir, rows=256)  # 16 rows per image
    gate, writers = threading.Event(), set()
    real = pk.sm.shards.ShardWriter.add_image

    def slow_add_image(self, record, rows):
        writers.add(threading.current_thread().name)
        gate.wait(30)
        return real(self, record, rows)

    monkeypatch.setattr(pk.sm.shards.ShardWriter, "add_image", slow_add_image)
    for i in range(16):
        sample(tiny, m, prompt=f"p{i}", seed=i)
        save_images(pk, fake_images(1), dump, prompt=f"p{i}", seed=i, commit=FULL)  # returns: the writer waits
    assert not list(dump_dir.rglob("*.safetensors")) and not records(dump_dir)
    gate.set()
    dump.wait()
    assert writers == {n for n in writers if n.startswith("sae-dump-writer")} and len(writers) == 1
    assert read_shards(dump_dir, "mid.0")["update"].shape[0] == 256
    assert [r["prompt"] for r in records(dump_dir)] == [f"p{i}" for i in range(16)]  # in order

    def no_space(self, record, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pk.sm.shards.ShardWriter, "add_image", no_space)
    sample(tiny, m, prompt="late", seed=99)
    save_images(pk, fake_images(1), dump, prompt="late", seed=99, commit=FULL)
    sample(tiny, m, prompt="later", seed=100)
    with pytest.raises(ValueError, match="^SAE Dump Images: writing to the dump folder failed: .*No space left"):
        save_images(pk, fake_images(1), dump, prompt="later", seed=100, commit=EVERY)  # waits for the writes
