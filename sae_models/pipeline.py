"""Training an SAE on a dump folder from start to finish: the one sequence behind `python -m sae_models
train` and the SAE Train node."""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import SparseAutoencoder
from .formats.native import save
from .metrics import evaluate
from .shards import DumpFormatError, dump_block, iter_vectors
from .stats import features_index_path, summarize_features, write_features_index
from .training import TrainConfig, distributed, train


@dataclass
class DumpTraining:
    """What `train_on_dump` made: the SAE (as saved), its block, and `metrics.evaluate`'s result on the
    held-out images (`held_out`) or, when none are held out, on the whole dump."""

    sae: SparseAutoencoder
    block: str
    metrics: dict
    held_out: bool
    index_path: Path | None


def train_on_dump(dump, out, config: TrainConfig | None = None, *, block: str | None = None,
                  eval_fraction: float = 0.05, epochs: int | None = 1, shuffle_shards: int = 8,
                  statistics: bool = True, top_n: int = 16, stats_tokens: int | None = None,
                  remove_checkpoints: bool = False, callback: Callable[[dict], Any] | None = None,
                  **options) -> DumpTraining | None:
    """Train an SAE on the `block` vectors (None: the dump's only block) of the dump folder `dump` and save
    it to `out` (a native `.safetensors` file). `config`/`options` are `train`'s; the images are split by
    `split_hash` into `eval_fraction` held out and the rest trained on, for `epochs` passes (None: until
    `max_tokens`), shuffled `shuffle_shards` shards at a time.

    In this order:
    1. train (under torchrun, every rank on its share of the shards; the process group, if this call made
       it, is torn down when training ends);
    2. then rank 0 alone: evaluate on the held-out images (on the whole dump when none are held out);
    3. with `statistics`, one pass over the whole dump (at most `stats_tokens` vectors) for the per-feature
       statistics stored in the SAE and the features index with each feature's `top_n` images;
    4. save the SAE file, then write the index beside it (`<out>.features.json`), so that an index never
       sits beside a missing or older SAE;
    5. with `remove_checkpoints`, delete `config.checkpoint_dir` (only after all of the above succeeded).

    A small dump still trains: when the training split holds fewer rows than one batch (on any rank), the
    batch size becomes that row count (one batch of everything per pass), and the SAE records it.
    `callback` gets `train`'s dicts plus `total_steps` (the steps the run will reach; None when unknown).
    Returns the result on rank 0 and None on the other ranks. Raises DumpFormatError when the training split
    is empty."""
    config = dataclasses.replace(config, **options) if config is not None else TrainConfig(**options)
    block = dump_block(dump, block)

    def stream(split: str, **kw):
        return iter_vectors(dump, block, batch_size=config.batch_size, seed=config.seed, split=split,
                            eval_fraction=eval_fraction, **kw)

    with distributed.torchrun_group(config.device):
        rank, world = distributed.rank(), distributed.world_size()

        def training_split():
            return stream("train" if eval_fraction > 0 else "all", rank=rank, world_size=world,
                          shuffle_shards=shuffle_shards, epochs=epochs)

        data = training_split()
        rows = distributed.global_min(data.n_rows, config.device)
        if rows == 0:
            raise DumpFormatError(dump, f"no complete {block} rows to train on")
        if rows < config.batch_size:
            config = dataclasses.replace(config, batch_size=rows)
            data = training_split()
        config = dataclasses.replace(config, block=block, hook="update")
        steps = _total_steps(config, rows, epochs, world)
        report = None if callback is None else (lambda m: callback({**m, "total_steps": steps}))
        sae = train(data, config, callback=report)
    if rank != 0:
        return None

    held_out = stream("eval", shuffle=False) if eval_fraction > 0 else None
    on_held_out = held_out is not None and held_out.n_rows > 0
    metrics = evaluate(sae, held_out if on_held_out else stream("all", shuffle=False))
    index = None
    if statistics:
        sae.stats, index = summarize_features(sae, stream("all", shuffle=False, with_meta=True), top_n=top_n,
                                              max_tokens=stats_tokens)
    save(sae, out)
    index_path = write_features_index(index, features_index_path(out)) if index is not None else None
    if remove_checkpoints and config.checkpoint_dir is not None:
        shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
    return DumpTraining(sae, block, metrics, on_held_out, index_path)


def _total_steps(config: TrainConfig, rows: int, epochs: int | None, world: int) -> int | None:
    """Steps until the first rank's data ends or `max_tokens` is reached (None when neither is known)."""
    limits = []
    if epochs is not None:
        limits.append(rows * epochs // config.batch_size)
    if config.max_tokens:
        limits.append(math.ceil(config.max_tokens / (config.batch_size * world)))
    return min(limits) if limits else None
