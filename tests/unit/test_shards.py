"""Activation dumps: writer/reader round trip, crash safety, concurrent writers, resumable shuffled reading."""

import errno
import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sae_models import files, shards
from sae_models.shards import (
    DumpFormatError,
    DumpWriteError,
    ShardWriter,
    iter_vectors,
    layout,
    reader,
)

REPO = Path(__file__).resolve().parents[2]
BLOCK = "down.2.1"
D = 8
GRID = (4, 4)


def rows_for(tag: int, n: int = 16, d: int = D, fields=("update",), step=0):
    """Rows whose column 0 of every field is a unique id (tag * 1000 + row), the rest random."""
    g = torch.Generator().manual_seed(tag)
    out = {}
    for j, f in enumerate(fields):
        x = torch.randn(n, d, generator=g)
        x[:, 0] = tag * 1000 + torch.arange(n) + j * 0.25
        out[f] = x
    out.update(step=step, sigma=torch.linspace(1.0, 0.5, n), cond=torch.arange(n) % 2,
               position=torch.arange(n) % 16, seed=tag, batch_index=torch.zeros(n, dtype=torch.int64), grid=GRID)
    return out


def ids(batches):
    x = torch.cat([b[0] if isinstance(b, tuple) else b for b in batches]) if batches else torch.zeros(0, D)
    return x[:, 0].tolist()


def write_dump(folder, writer_id="w", n_images=5, n=16, rows_per_shard=10, first_tag=0, dtype=torch.float32):
    with ShardWriter(folder, writer_id=writer_id, rows_per_shard=rows_per_shard, dtype=dtype) as w:
        for i in range(n_images):
            w.add_image({"prompt": f"{writer_id} {i}", "file": f"{writer_id}_{i}.png"},
                        {BLOCK: rows_for(first_tag + i, n)})
    return w


def shard_sizes(folder, block=BLOCK):
    return [int(safe_open(str(p), "pt").metadata()["n_rows"]) for p in shards.list_shards(folder, block)]


# -- writing -----------------------------------------------------------------------------------------------

def test_round_trip_fp32_exact_with_columns_and_metadata(tmp_path):
    fields = ("update", "input", "output")
    given = []
    with ShardWriter(tmp_path, writer_id="w0", rows_per_shard=10, dtype=torch.float32) as w:
        for i in range(3):
            r = rows_for(i, fields=fields, step=i)
            given.append(r)
            assert w.add_image({"prompt": f"p{i}", "seed": i}, {BLOCK: r, "mid.0": {"update": r["update"][:, :4],
                                                                                  "grid": GRID}}) == i
    m = shards.read_manifest(tmp_path)
    assert m["format"] == "sae-unbox-dump" and m["version"] == 1 and m["dtype"] == "float32"
    assert m["rows_per_shard"] == 10
    assert m["blocks"][BLOCK] == {"d_in": D, "fields": list(fields)}  # in the order given
    assert m["blocks"]["mid.0"] == {"d_in": 4, "fields": ["update"]}
    paths = shards.list_shards(tmp_path, BLOCK)
    assert [p.name for p in paths] == [f"w0-{i:06d}.safetensors" for i in range(5)]
    assert shard_sizes(tmp_path) == [10, 10, 10, 10, 8]
    got = {}
    for p in paths:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
            assert meta["block"] == BLOCK and meta["writer"] == "w0" and meta["grid"] == "4x4"
            for k in f.keys():
                got.setdefault(k, []).append(f.get_tensor(k))
    got = {k: torch.cat(v) for k, v in got.items()}
    for f in fields:
        assert got[f].dtype == torch.float32
        assert torch.equal(got[f], torch.cat([r[f] for r in given]))
    assert got["image"].dtype == torch.int64 and got["image"].tolist() == [i for i in range(3) for _ in range(16)]
    assert got["step"].tolist() == [i for i in range(3) for _ in range(16)]
    assert got["sigma"].dtype == torch.float32 and torch.equal(got["sigma"], torch.cat([r["sigma"] for r in given]))
    assert got["cond"].tolist() == [j % 2 for _ in range(3) for j in range(16)]
    assert got["position"].tolist() == list(range(16)) * 3
    assert got["seed"].tolist() == [i for i in range(3) for _ in range(16)]
    assert got["grid_w"].unique().tolist() == [4]
    recs = shards.done_images(tmp_path)
    assert recs == [{"image": i, "writer": "w0", "prompt": f"p{i}", "seed": i} for i in range(3)]
    # the reader, in order, with metadata
    s = iter_vectors(tmp_path, BLOCK, batch_size=7, shuffle=False, with_meta=True, field="input")
    assert s.n_rows == 48 and s.d_in == D and s.writers == ["w0"]
    out = list(s)
    assert [len(x) for x, _ in out] == [7] * 6 + [6]
    x = torch.cat([b for b, _ in out])
    assert torch.equal(x, torch.cat([r["input"] for r in given]))
    meta = {k: torch.cat([m[k] for _, m in out]) for k in out[0][1]}
    assert torch.equal(meta["sigma"], got["sigma"]) and torch.equal(meta["position"], got["position"])
    assert meta["writer"].unique().tolist() == [0] and meta["image"].tolist() == got["image"].tolist()


def test_fp16_dump_rounds_to_fp16(tmp_path):
    r = rows_for(1)
    with ShardWriter(tmp_path, writer_id="h", rows_per_shard=100) as w:
        w.add_image({}, {BLOCK: {**r, "update": r["update"] * 0.1}})
    assert shards.read_manifest(tmp_path)["dtype"] == "float16"
    with safe_open(str(shards.list_shards(tmp_path, BLOCK)[0]), "pt") as f:
        assert f.get_tensor("update").dtype == torch.float16
    (x,) = list(iter_vectors(tmp_path, BLOCK, shuffle=False, dtype=torch.float32))
    assert x.dtype == torch.float32
    assert torch.equal(x, (r["update"] * 0.1).half().float())
    assert torch.allclose(x, r["update"] * 0.1, rtol=1e-3, atol=1e-4)


def test_full_shards_then_shorter_tail_and_records_only_when_committed(tmp_path):
    w = ShardWriter(tmp_path, writer_id="w", rows_per_shard=10, dtype=torch.float32)
    w.add_image({}, {BLOCK: rows_for(0, n=7)})
    assert shard_sizes(tmp_path) == [] and w.pending_rows == 7 and w.pending_images == 1
    assert shards.done_images(tmp_path) == []
    w.add_image({}, {BLOCK: rows_for(1, n=7)})
    assert shard_sizes(tmp_path) == [10] and w.pending_rows == 4
    assert [r["image"] for r in shards.done_images(tmp_path)] == [0]
    w.add_image({}, {BLOCK: rows_for(2, n=25)})
    assert shard_sizes(tmp_path) == [10, 10, 10] and w.pending_rows == 9 and w.pending_images == 1
    assert [r["image"] for r in shards.done_images(tmp_path)] == [0, 1]
    w.close()
    assert shard_sizes(tmp_path) == [10, 10, 10, 9] and w.pending_rows == 0 and w.pending_images == 0
    assert [r["image"] for r in shards.done_images(tmp_path)] == [0, 1, 2]
    with pytest.raises(ValueError, match="closed"):
        w.add_image({}, {BLOCK: rows_for(3)})


def test_two_writers_share_a_folder_and_merge_the_manifest(tmp_path):
    a = ShardWriter(tmp_path, writer_id="a", rows_per_shard=10, dtype=torch.float32)
    b = ShardWriter(tmp_path, writer_id="b", rows_per_shard=10, dtype=torch.float32)
    for i in range(3):  # interleaved
        a.add_image({}, {BLOCK: rows_for(i)})
        b.add_image({}, {BLOCK: rows_for(100 + i), "mid.0": {"update": torch.randn(16, 4), "grid": GRID}})
    a.add_image({}, {"up.0.1": {"update": torch.randn(16, 4), "grid": GRID}})
    a.close()
    b.close()
    assert set(shards.read_manifest(tmp_path)["blocks"]) == {BLOCK, "mid.0", "up.0.1"}
    names = [p.name for p in shards.list_shards(tmp_path, BLOCK)]
    assert names == [f"a-{i:06d}.safetensors" for i in range(5)] + [f"b-{i:06d}.safetensors" for i in range(5)]
    assert sorted((r["writer"], r["image"]) for r in shards.done_images(tmp_path)) == \
        [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1), ("b", 2)]
    s = iter_vectors(tmp_path, BLOCK, batch_size=16, with_meta=True)
    assert s.writers == ["a", "b"] and s.n_rows == 96
    got = list(s)
    expect = [t * 1000 + j for t in (0, 1, 2, 100, 101, 102) for j in range(16)]
    assert sorted(ids(got)) == expect
    for x, m in got:  # the writer index in meta agrees with the row's origin
        assert ((x[:, 0] >= 100_000) == (m["writer"] == 1)).all()


def test_resume_with_same_writer_id_continues_numbering(tmp_path):
    write_dump(tmp_path, "w", n_images=2, n=16, rows_per_shard=10)  # shards 0..3 (10, 10, 10, 2)
    (tmp_path / BLOCK / "w-000003.safetensors.0badc0de.tmp").write_bytes(b"stale")
    w = ShardWriter(tmp_path, writer_id="w", rows_per_shard=10, dtype=torch.float32)
    assert not (tmp_path / BLOCK / "w-000003.safetensors.0badc0de.tmp").exists()  # stale temporary removed
    assert w.add_image({}, {BLOCK: rows_for(7)}) == 2
    w.close()
    assert [p.name for p in shards.list_shards(tmp_path, BLOCK)][-2:] == ["w-000004.safetensors", "w-000005.safetensors"]
    assert [r["image"] for r in shards.done_images(tmp_path)] == [0, 1, 2]
    assert sorted(ids(list(iter_vectors(tmp_path, BLOCK)))) == sorted(
        [t * 1000 + j for t in (0, 1, 7) for j in range(16)])


def test_default_writer_id_and_invalid_ones(tmp_path):
    w = ShardWriter(tmp_path)
    assert layout.NAME_RE.match(w.writer_id) and w.folder == tmp_path
    assert ShardWriter(tmp_path).writer_id != w.writer_id
    with pytest.raises(ValueError, match="writer_id"):
        ShardWriter(tmp_path, writer_id="a/b")


def test_crash_between_shard_commit_and_record(tmp_path, monkeypatch):
    def die(path, text):
        raise KeyboardInterrupt("killed")  # the process dies while appending the record

    w = ShardWriter(tmp_path, writer_id="w", rows_per_shard=10, dtype=torch.float32)
    w.add_image({}, {BLOCK: rows_for(0, n=10)})  # image 0: one full shard, recorded
    monkeypatch.setattr(files, "append_lines", die)
    with pytest.raises(KeyboardInterrupt):
        w.add_image({}, {BLOCK: rows_for(1, n=20)})  # image 1: two shards committed, record never written
    monkeypatch.undo()
    assert shard_sizes(tmp_path) == [10, 10, 10]
    assert [r["image"] for r in shards.done_images(tmp_path)] == [0]
    s = iter_vectors(tmp_path, BLOCK, batch_size=4)
    assert s.n_rows == 10 and sorted(ids(list(s))) == [float(j) for j in range(10)]
    # a new writer with the same id does not reuse image 1's index
    w2 = ShardWriter(tmp_path, writer_id="w", rows_per_shard=10, dtype=torch.float32)
    assert w2.add_image({}, {BLOCK: rows_for(2, n=5)}) == 2
    w2.close()
    assert sorted(ids(list(iter_vectors(tmp_path, BLOCK)))) == [float(j) for j in range(10)] + [2000.0 + j for j in range(5)]


def test_process_killed_mid_shard_leaves_no_partial_shard(tmp_path):
    script = textwrap.dedent(f"""
        import os, torch
        from sae_models import files, shards
        real = files.write_new
        calls = []  # shard writes only (not the manifest)
        def half_then_die(path, data):
            if ".safetensors" in str(path):
                calls.append(path)
            if len(calls) == 2:
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                os._exit(3)
            real(path, data)
        files.write_new = half_then_die
        w = shards.ShardWriter({str(tmp_path)!r}, writer_id="k", rows_per_shard=10, dtype=torch.float32)
        for i in range(3):
            w.add_image({{}}, {{"{BLOCK}": {{"update": torch.full((8, 4), float(i)), "grid": (4, 2)}}}})
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    names = sorted(p.name for p in (tmp_path / BLOCK).iterdir())
    temporaries = [n for n in names if n.endswith(".tmp")]
    assert [n for n in names if n not in temporaries] == ["k-000000.safetensors"] and len(names) == 2
    assert len(temporaries) == 1 and temporaries[0].startswith(".k-000001.safetensors.")
    assert [p.name for p in shards.list_shards(tmp_path, BLOCK)] == ["k-000000.safetensors"]
    assert shard_sizes(tmp_path) == [10]
    assert [r["image"] for r in shards.done_images(tmp_path)] == [0]  # image 1 is half in shard 0: not done
    assert iter_vectors(tmp_path, BLOCK).n_rows == 8
    # the next writer to open the folder, under any name, removes the dead writer's temporary
    ShardWriter(tmp_path, writer_id="next", rows_per_shard=10, dtype=torch.float32)
    assert sorted(p.name for p in (tmp_path / BLOCK).iterdir()) == ["k-000000.safetensors"]
    ShardWriter(tmp_path, writer_id="k", rows_per_shard=10, dtype=torch.float32)
    assert sorted(p.name for p in (tmp_path / BLOCK).iterdir()) == ["k-000000.safetensors"]


def test_temporary_and_foreign_files_are_ignored(tmp_path):
    write_dump(tmp_path, "w", n_images=1, n=16, rows_per_shard=100)
    bdir = tmp_path / BLOCK
    (bdir / "other-000001.safetensors.deadbeef.tmp").write_bytes(b"partial")
    (bdir / "notes.txt").write_text("x")
    (bdir / "w-1.safetensors").write_bytes(b"bad name")
    (tmp_path / "images" / "w.jsonl").open("a").write('{"image": 5, "wri')  # truncated last line
    assert [p.name for p in shards.list_shards(tmp_path, BLOCK)] == ["w-000000.safetensors"]
    assert [r["image"] for r in shards.done_images(tmp_path)] == [0]
    assert len(ids(list(iter_vectors(tmp_path, BLOCK)))) == 16
    # the next record of this writer starts on its own line
    write_dump(tmp_path, "w", n_images=1, n=16, rows_per_shard=100, first_tag=1)
    assert [r["image"] for r in shards.done_images(tmp_path)] == [0, 1]


def test_disk_full_keeps_committed_shards_and_buffered_rows(tmp_path, monkeypatch):
    w = ShardWriter(tmp_path, writer_id="w", rows_per_shard=10, dtype=torch.float32)
    w.add_image({}, {BLOCK: rows_for(0, n=12)})
    first = shards.list_shards(tmp_path, BLOCK)[0]
    before = first.read_bytes()

    def full(path, data):
        with open(path, "wb") as f:
            f.write(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_new", full)
    with pytest.raises(DumpWriteError) as ei:
        w.add_image({}, {BLOCK: rows_for(1, n=12)})
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(tmp_path) in str(e) and "w-000001.safetensors" in str(e) and "disk full" in str(e)
    assert sorted(p.name for p in (tmp_path / BLOCK).iterdir()) == ["w-000000.safetensors"]  # no temporary
    assert first.read_bytes() == before
    assert w.pending_rows == 14 and w.pending_images == 2
    with pytest.raises(DumpWriteError):
        w.flush()
    monkeypatch.undo()
    w.flush()  # the disk has room again
    assert shard_sizes(tmp_path) == [10, 10, 4] and w.pending_rows == 0 and w.pending_images == 0
    assert sorted(ids(list(iter_vectors(tmp_path, BLOCK)))) == sorted(
        [t * 1000.0 + j for t in (0, 1) for j in range(12)])


def test_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DumpWriteError, match="cannot create") as ei:
        ShardWriter(tmp_path / "file" / "dump")
    assert isinstance(ei.value, OSError) and str(tmp_path / "file" / "dump") in str(ei.value)


def test_manifest_mismatches_and_non_dump_folders(tmp_path):
    write_dump(tmp_path, "w", n_images=1, dtype=torch.float16)
    with pytest.raises(DumpFormatError, match="dtype") as ei:
        ShardWriter(tmp_path, dtype=torch.float32)
    assert isinstance(ei.value, ValueError) and str(tmp_path) in str(ei.value)
    with pytest.raises(ValueError, match="rows_per_shard"):
        ShardWriter(tmp_path, rows_per_shard=11, dtype=torch.float16)
    w = ShardWriter(tmp_path, rows_per_shard=10, dtype=torch.float16)
    with pytest.raises(ValueError, match="d_in"):
        w.add_image({}, {BLOCK: {"update": torch.zeros(16, D + 1), "grid": GRID}})
    with pytest.raises(ValueError, match="fields"):
        w.add_image({}, {BLOCK: {"update": torch.zeros(16, D), "input": torch.zeros(16, D), "grid": GRID}})
    assert w.pending_images == 0 and w.add_image({}, {BLOCK: rows_for(3)}) == 0  # failed calls assign nothing
    with pytest.raises(DumpFormatError, match="not an activation dump"):
        shards.read_manifest(tmp_path / BLOCK)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(DumpFormatError, match="not an activation dump"):
        shards.done_images(tmp_path / "other")
    with pytest.raises(DumpFormatError, match="no block"):
        iter_vectors(tmp_path, "up.1.2")


# -- reading -----------------------------------------------------------------------------------------------

@pytest.fixture
def dump(tmp_path):
    """Two writers, 9 images of 16 rows, shards of 10 rows: 15 shards."""
    write_dump(tmp_path, "a", n_images=5, first_tag=0)
    write_dump(tmp_path, "b", n_images=4, first_tag=100)
    return tmp_path


ALL = sorted(t * 1000.0 + j for t in (0, 1, 2, 3, 4, 100, 101, 102, 103) for j in range(16))


def test_ranks_are_disjoint_and_cover_everything(dump):
    got = []
    for rank in range(2):
        s = iter_vectors(dump, BLOCK, batch_size=8, rank=rank, world_size=2, seed=4)
        assert s.shards == shards.list_shards(dump, BLOCK)[rank::2]
        got.append(ids(list(s)))
        assert len(got[-1]) == s.n_rows
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == ALL
    with pytest.raises(ValueError, match="rank"):
        iter_vectors(dump, BLOCK, rank=2, world_size=2)


def test_shuffle_is_deterministic_and_batches_span_windows(dump):
    kw = dict(batch_size=16, shuffle_shards=3, epochs=2)
    a = ids(list(iter_vectors(dump, BLOCK, seed=1, **kw)))
    assert a == ids(list(iter_vectors(dump, BLOCK, seed=1, **kw)))
    assert a != ids(list(iter_vectors(dump, BLOCK, seed=2, **kw)))
    assert sorted(a[:144]) == ALL and sorted(a[144:]) == ALL and a[:144] != a[144:]  # each epoch reshuffled
    assert a[:144] != ALL
    s = iter_vectors(dump, BLOCK, seed=1, **kw)
    assert [len(x) for x in s] == [16] * 18 and s.batches_per_epoch == 9
    assert list(s) and list(s)  # iterating again starts over
    t = iter_vectors(dump, BLOCK, batch_size=20, epochs=1)
    assert [len(x) for x in t] == [20] * 7 + [4]
    t = iter_vectors(dump, BLOCK, batch_size=20, epochs=1, drop_last=True)
    assert [len(x) for x in t] == [20] * 7 and t.n_rows == 140


def test_state_dict_resume_gives_exactly_the_same_batches(dump):
    kw = dict(batch_size=7, shuffle_shards=2, epochs=2, seed=5, with_meta=True)
    full = list(iter_vectors(dump, BLOCK, **kw))
    assert len(full) == 2 * 21
    for k in [0, 1, 2, 5, 20, 21, 22, 30, 41, 42]:
        s = iter_vectors(dump, BLOCK, **kw)
        for _ in itertools.islice(s, k):  # noqa: B007
            pass
        state = json.loads(json.dumps(s.state_dict()))  # plain JSON
        r = iter_vectors(dump, BLOCK, **kw)
        r.load_state_dict(state)
        rest = list(r)
        assert len(rest) == len(full) - k, k
        for (x, m), (y, n) in zip(rest, full[k:]):
            assert torch.equal(x, y) and all(torch.equal(m[c], n[c]) for c in m)
    other = iter_vectors(dump, BLOCK, **{**kw, "seed": 6})
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_forever_stream(dump):
    s = iter_vectors(dump, BLOCK, batch_size=50, epochs=None)
    got = list(itertools.islice(s, 10))
    assert [len(x) for x in got] == [50, 50, 44] * 3 + [50]
    empty = iter_vectors(dump, BLOCK, batch_size=1000, epochs=None, drop_last=True)
    assert list(empty) == []  # never a full batch: ends instead of spinning


def test_train_eval_split_is_by_image_disjoint_and_covering(dump):
    kw = dict(batch_size=32, eval_fraction=0.4, with_meta=True)
    tr = iter_vectors(dump, BLOCK, split="train", **kw)
    ev = iter_vectors(dump, BLOCK, split="eval", **kw)
    a, b = ids(list(tr)), ids(list(ev))
    assert a and b and not set(a) & set(b) and sorted(a + b) == ALL
    assert len(a) == tr.n_rows and len(b) == ev.n_rows
    images_a = {int(v) // 1000 for v in a}
    images_b = {int(v) // 1000 for v in b}
    assert not images_a & images_b  # whole images go to one side
    assert len(ids(list(iter_vectors(dump, BLOCK, split="train", eval_fraction=0.0)))) == len(ALL)
    assert iter_vectors(dump, BLOCK, split="eval", eval_fraction=0.0).n_rows == 0


def test_memory_is_bounded_by_the_window(dump, monkeypatch):
    loaded = []
    real = reader.read_shard

    def counting(path, names):
        t, meta = real(path, names)
        if "update" in names:
            loaded.append(len(t["update"]))
        return t, meta

    monkeypatch.setattr(reader, "read_shard", counting)
    s = iter_vectors(dump, BLOCK, batch_size=16, shuffle_shards=2)
    assert sorted(ids(list(s))) == ALL
    assert len(loaded) == 15 and s.peak_window_rows <= 2 * 10
    s = iter_vectors(dump, BLOCK, batch_size=16, shuffle=False)
    list(s)
    assert s.peak_window_rows <= 10
