"""The pieces of a dump below the writer and the reader: the one compatibility check, shard files, records of
old dumps, and the names of a writer's files in a block folder."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sae_models import shards
from sae_models.shards import DumpFormatError, ShardWriter, check_compatible, iter_vectors, layout, shard_files

BLOCK = "down.2.1"


def make_dump(folder, dtype=torch.float16, rows_per_shard=10):
    with ShardWriter(folder, writer_id="w", rows_per_shard=rows_per_shard, dtype=dtype) as w:
        w.add_image({"prompt": "p"}, {BLOCK: {"update": torch.randn(12, 8), "grid": (3, 4)}})
    return folder


def test_check_compatible_names_the_first_disagreement(tmp_path):
    make_dump(tmp_path)
    m = check_compatible(tmp_path, "float16", 10, {BLOCK: (8, ["update"]), "mid.0": (4, ["update", "input"])})
    assert m["blocks"] == {BLOCK: {"d_in": 8, "fields": ["update"]}}  # a block the dump lacks agrees
    cases = [
        (("float32", 10, {}), "holds a float16 dump; this node writes float32 .*dtype"),
        (("float16", 256, {}), "holds shards of 10 rows; this node is set to 256 .*rows_per_shard"),
        (("float16", 10, {BLOCK: (9, ["update"])}), f"holds {BLOCK} vectors of size d_in=8; this node writes size 9"),
        (("float16", 10, {BLOCK: (8, ["update", "input"])}),
         rf"holds the fields \['update'\] of {BLOCK}; this node writes \['update', 'input'\]"),
    ]
    for args, message in cases:
        with pytest.raises(DumpFormatError, match=message) as ei:
            check_compatible(tmp_path, *args, who="this node")
        assert isinstance(ei.value, ValueError) and ei.value.path == str(tmp_path)
    with pytest.raises(DumpFormatError, match="this writer writes float32"):
        check_compatible(tmp_path, "float32", 10)
    with pytest.raises(DumpFormatError, match="not an activation dump"):
        check_compatible(tmp_path / BLOCK, "float16", 10)


def test_writer_uses_the_same_check(tmp_path):
    make_dump(tmp_path)
    with pytest.raises(DumpFormatError, match="holds a float16 dump; this writer writes float32"):
        ShardWriter(tmp_path, dtype=torch.float32)
    w = ShardWriter(tmp_path, rows_per_shard=10)
    with pytest.raises(DumpFormatError, match=f"holds {BLOCK} vectors of size d_in=8; this writer writes size 5"):
        w.add_image({}, {BLOCK: {"update": torch.zeros(12, 5), "grid": (3, 4)}})


def test_shard_files_write_never_overwrites_and_read_reports_bad_shards(tmp_path):
    cols = {"grid_h": torch.tensor([3, 3]), "grid_w": torch.tensor([4, 4]), "update": torch.ones(2, 2)}
    meta = shard_files.shard_metadata(BLOCK, "w", "float32", cols)
    assert meta == {"format": "sae-unbox-dump", "block": BLOCK, "writer": "w", "n_rows": "2", "grid": "3x4",
                    "dtype": "float32"}
    mixed = {**cols, "grid_w": torch.tensor([4, 5])}
    assert shard_files.shard_metadata(BLOCK, "w", "float32", mixed)["grid"] == "mixed"
    assert shard_files.parse_grid("3x4") == (3, 4) and shard_files.parse_grid("mixed") == (-1, -1)
    path = tmp_path / layout.shard_name("w", 0)
    shard_files.write_shard(path, cols, meta)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        shard_files.write_shard(path, {**cols, "update": torch.zeros(2, 2)}, meta)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w-000000.safetensors"]
    tensors, got = shard_files.read_shard(path, ["update", "absent"])
    assert list(tensors) == ["update"] and got == meta
    path.write_bytes(before[:-3])
    with pytest.raises(DumpFormatError, match="w-000000.safetensors: corrupt shard"):
        shard_files.read_shard(path, ["update"])
    with pytest.raises(DumpFormatError, match="shard disappeared while reading the dump"):
        shard_files.read_shard(tmp_path / "gone-000000.safetensors", ["update"])


def test_old_records_with_grids_and_shards_without_grid_columns_still_read(tmp_path):
    make_dump(tmp_path)
    rec = tmp_path / "images" / "w.jsonl"
    old = [dict(json.loads(line), grids={BLOCK: "3x4"}) for line in rec.read_text().splitlines()]
    rec.write_text("".join(json.dumps(r) + "\n" for r in old))  # as the dump node wrote records before
    assert shards.done_images(tmp_path)[0]["grids"] == {BLOCK: "3x4"}
    # a shard holding no grid_h/grid_w columns: the grid comes from its metadata
    for p in shards.list_shards(tmp_path, BLOCK):
        t, meta = shard_files.read_shard(p, shards.COLUMNS + ("update",))
        save_file({k: v for k, v in t.items() if k not in ("grid_h", "grid_w")}, str(p), metadata=meta)
    (x, meta), = list(iter_vectors(tmp_path, BLOCK, batch_size=100, shuffle=False, with_meta=True))
    assert len(x) == 12 and set(meta["grid_h"].tolist()) == {3} and set(meta["grid_w"].tolist()) == {4}


def test_writer_files_in_a_block_folder(tmp_path):
    for name in ("w-000000.safetensors", "w-000003.safetensors", "w2-000007.safetensors", "w-1.safetensors",
                 "w-000004.safetensors.0badc0de.tmp", ".w-000005.safetensors.12ab34cd.tmp",
                 ".w2-000001.safetensors.12ab34cd.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(layout.writer_shards(tmp_path, "w")) == [0, 3]
    assert layout.next_seq(tmp_path, "w") == 4 and layout.next_seq(tmp_path, "w2") == 8
    assert layout.next_seq(tmp_path, "new") == 0 and layout.next_seq(tmp_path / "absent", "w") == 0
    assert sorted(p.name for p in layout.writer_temporaries(tmp_path, "w")) == [
        ".w-000005.safetensors.12ab34cd.tmp", "w-000004.safetensors.0badc0de.tmp"]
    assert layout.shard_writer(tmp_path / "w2-000007.safetensors") == "w2"
    assert layout.is_block_name("down.2.1") and not layout.is_block_name("images") and not layout.is_block_name("a/b")
