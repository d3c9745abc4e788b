"""Activation dumps: crash-safe sharded storage of UNet block activations, and a resumable shuffled reader.

Folder layout (`<dump>`):

    manifest.json                     {"format": "sae-unbox-dump", "version": 1, "dtype": "float16"|"float32",
                                       "rows_per_shard": N, "blocks": {"down.2.1": {"d_in": 1280,
                                       "fields": ["update", ...]}, ...}}
    <block>/<writer>-<seq:06d>.safetensors
                                      one shard: "<field>" [rows, d_in] in the dump dtype for each field, and the
                                      per-row columns "image", "batch_index", "step", "cond", "position", "seed",
                                      "grid_h", "grid_w" (int64) and "sigma" (float32); metadata: block, writer,
                                      grid ("HxW", or "mixed"), n_rows.
    images/<writer>.jsonl             one JSON line per image whose rows (all blocks) are in committed shards.

Every file is written under a temporary name in its final folder, fsynced, then renamed into place, so a crash
never leaves a partial shard. Rows of images without a record in `images/` (the process died before their last
shard was committed) are skipped by the reader. Several writers (processes, machines on a shared disk) may fill
one folder at once, each with its own `writer_id`; one `writer_id` must not be used by two writers at once.

    with ShardWriter("dumps/run1") as w:
        w.add_image({"prompt": p, "seed": s}, {"down.2.1": {"update": u, "position": pos, "step": st, ...}})
    for x in iter_vectors("dumps/run1", "down.2.1", batch_size=4096):
        ...

Modules: `layout` (constants, columns, names), `manifest` (manifest.json and `check_compatible`, the one
check that a writer agrees with a dump), `records` (images/*.jsonl), `shard_files` (one shard file), `rows`
(an image's rows checked and completed), `writer` (`ShardWriter`), `reader` (`iter_vectors`, `VectorStream`).
"""

from .errors import DumpFormatError, DumpWriteError
from .layout import (
    COLUMNS,
    DTYPES,
    FLOAT_COLUMNS,
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGES_DIR,
    INT_COLUMNS,
    MANIFEST,
)
from .manifest import check_compatible, dump_block, read_manifest
from .reader import VectorStream, iter_vectors, list_shards, split_hash
from .records import done_images
from .writer import ShardWriter

__all__ = [
    "COLUMNS",
    "DTYPES",
    "FLOAT_COLUMNS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGES_DIR",
    "INT_COLUMNS",
    "MANIFEST",
    "DumpFormatError",
    "DumpWriteError",
    "ShardWriter",
    "VectorStream",
    "check_compatible",
    "done_images",
    "dump_block",
    "iter_vectors",
    "list_shards",
    "read_manifest",
    "split_hash",
]
