"""Training-data dumps: record block updates while a graph samples, and write them as shards with the images.

`SAE Dump Activations` adds a `DumpEdit` to the MODEL (through the one patching mechanism) and outputs an
`SAE_DUMP` session; `SAE Dump Images` receives the decoded images of the same run and writes the rows of
each image to the dump folder (`sae_models.shards`) beside its PNG and its record (prompt, seed, ...).

The session holds the shard writer, so rows accumulate across queued prompts into shards of a fixed
size. The session lives in ComfyUI's node cache: as long as the dump node's inputs do not change, every
queued prompt reuses it. Rows are committed to disk when a shard is full, and (by default) whenever the
queue runs empty, and at exit; rows of an interrupted run are dropped, never half-written.

While the model samples, the rows stay on the sampling device; SAE Dump Images brings them to the host and
hands the PNGs and shards to the session's writer thread, so the next queued prompt samples while they are
written. When nothing else is queued (or with 'after every prompt') it waits for the writes, so a finished
queue leaves a finished dump.
"""

from __future__ import annotations

import hashlib
import io as _io
import logging
import os
import shutil
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image


from ..sae_models import files, shards
from ..sae_models.blocks import Block
from ..sae_models.shards.layout import NAME_RE
from . import paths
from .errors import NodeInputError, excerpt, validation_answers
from .inputs import check_length, parse_steps
from .models import MAX_BLOCKS_TEXT, block_channels, parse_blocks
from .patching import CallInfo, DumpEdit, RunRecord, attach_edit
from .schema import CATEGORY, SAE_DUMP, TARGET_CHOICES, checked_numbers

log = logging.getLogger(__name__)

DUMP = "SAE Dump Activations"
SAVE = "SAE Dump Images"

FIELDS = {"update": ("update",), "update, input, output": ("update", "input", "output")}
FLUSH = ["when the queue is empty", "after every prompt", "only when a shard is full"]


MAX_WRITER_ID = 64


def check_writer_id(node: str, writer_id) -> str:
    """A writer id as typed ('' for the default): letters, digits, '_', '.' and '-', at most MAX_WRITER_ID."""
    writer_id = (writer_id or "").strip()
    if len(writer_id) > MAX_WRITER_ID:
        raise NodeInputError(node, f"writer_id holds {len(writer_id):,} characters, more than {MAX_WRITER_ID}: "
                                   f"{excerpt(writer_id)}")
    if writer_id and not NAME_RE.match(writer_id):
        raise NodeInputError(node, f"writer_id {excerpt(writer_id)} may hold only letters, digits, '_', '.' and '-'")
    return writer_id


def check_writable(node: str, folder: str, need_bytes: int, shown: str) -> None:
    """The dump folder (`shown` as the workflow names it) can be written, with room for a shard per block."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = files.atomic_write_bytes(os.path.join(folder, f".write-test-{os.getpid()}"), b"ok")
        os.remove(probe)
    except OSError as e:
        raise NodeInputError(node, f"cannot write to the dump folder {excerpt(shown)}: {e.strerror or e}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise NodeInputError(
            node, f"the dump folder {excerpt(shown)} has {free / 2**20:.0f} MiB free; one shard per block needs "
            f"about {need_bytes / 2**20:.0f} MiB (lower rows_per_shard or free some space)")


def check_manifest(node: str, folder: str, channels: dict, dtype: str, rows_per_shard: int, fields,
                   shown: str) -> None:
    """A folder that already holds a dump must agree with what this node would write into it
    (`channels`: {block: d_in}; `shown`: the folder as the workflow names it)."""
    if not os.path.exists(os.path.join(folder, shards.MANIFEST)):
        return
    blocks = {b: (d_in, fields) for b, d_in in channels.items()}
    try:
        shards.check_compatible(folder, dtype, rows_per_shard, blocks, who="this node")
    except shards.DumpFormatError as e:
        raise NodeInputError(node, f"the dump folder {excerpt(shown)}: {e.reason}") from None


@dataclass(eq=False)
class DumpSession(RunRecord):
    """The `SAE_DUMP` value: where and what to dump, the rows of the current sampling run, and the writer."""

    folder: str = ""
    blocks: tuple[Block, ...] = ()
    fields: tuple[str, ...] = ("update",)
    dtype: torch.dtype = torch.float16
    rows_per_shard: int = 16384
    writer_id: str | None = None
    _run: dict = field(default_factory=dict)
    _writer: shards.ShardWriter | None = None
    _background: "BackgroundWriter | None" = None

    def _new_run(self) -> None:  # a new sampling run: forget an unfinished one
        self._run = {}

    def add(self, block: Block, info: CallInfo, rows: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Keep the rows of one UNet call (tensors `[len(rows), H, W, C]`) for the run in progress, on the sampling
        device (no wait for it while the model samples); `take_run` brings them to the host."""
        with self._lock:
            self._enter(info)
            self._run.setdefault(block.short, []).append(dict(
                tensors={k: v.detach().clone() for k, v in tensors.items()}, step=info.step, sigma=info.sigma,
                kind=[info.row_kind[r] for r in rows], image=[info.row_image[r] for r in rows]))

    def take_run(self) -> tuple[dict, dict]:
        """The rows recorded in the latest run, on the host in the dump's dtype, and the blocks whose values that
        dtype could not hold ({block: largest |value|}; float16 tops out at 65504)."""
        with self._lock:
            run = self._run
            self._run, self._schedule = {}, None
        bad: dict[str, float] = {}
        for block, chunks in run.items():
            for chunk in chunks:
                source = chunk["tensors"]
                chunk["tensors"] = {k: v.to("cpu", self.dtype) for k, v in source.items()}
                if not all(bool(torch.isfinite(v).all()) for v in chunk["tensors"].values()):
                    worst = max(float(t.float().abs().max()) for t in source.values())
                    bad[block] = max(worst, bad.get(block, 0.0))
        return run, bad

    @property
    def writer(self) -> shards.ShardWriter:
        if self._writer is None:
            self._writer = shards.ShardWriter(self.folder, writer_id=self.writer_id or None,
                                              rows_per_shard=self.rows_per_shard, dtype=self.dtype)
            self._background = BackgroundWriter(self._writer)
            weakref.finalize(self, self._background.close)  # also runs at interpreter exit
        return self._writer

    def write(self, fn, *args) -> None:
        """Run `fn(writer, *args)` on the session's writer thread (in order), so that the thread that samples
        does not wait on the disk. A failure of an earlier write is raised here (or by `wait`)."""
        self.writer
        self._background.submit(fn, *args)

    def wait(self) -> None:
        """Wait until every write handed to the writer thread is done; raise the first that failed."""
        if self._writer is not None:
            self._background.wait()

    def flush(self) -> None:
        """Write every buffered row now (a partial shard), after the writes in progress."""
        self.write(lambda writer: writer.flush())
        self.wait()


class BackgroundWriter:
    """One thread that writes a dump session's images and shards, in the order they were handed over. Every file
    is still written atomically (`sae_models.files`); a write that fails keeps its rows buffered in the
    ShardWriter, and the failure is raised to the next caller."""

    def __init__(self, writer: shards.ShardWriter):
        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-dump-writer")
        self._futures: list = []
        self._lock = threading.Lock()

    def submit(self, fn, *args) -> None:
        self._raise_failures(wait=False)
        with self._lock:
            self._futures.append(self._pool.submit(fn, self.writer, *args))

    def wait(self) -> None:
        self._raise_failures(wait=True)

    def _raise_failures(self, wait: bool) -> None:
        with self._lock:
            futures = list(self._futures)
        if wait:
            for f in futures:
                f.exception()  # blocks until done
        done = [f for f in futures if f.done()]
        with self._lock:
            self._futures = [f for f in self._futures if f not in done]
        for f in done:
            if f.exception() is not None:
                raise f.exception()

    def close(self) -> None:
        """Finish the queued writes and write the buffered rows (at exit, or when the session goes away)."""
        try:
            self.wait()
            self.writer.flush()
        except Exception as e:  # at exit there is nobody to tell but the log
            log.error("SAE dump: could not write the last rows of %s: %s", self.writer.folder, e)
        finally:
            self._pool.shutdown(wait=True)


class DumpActivations(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxDumpActivations",
            display_name=DUMP,
            category=CATEGORY,
            description="Record the residual updates (block output minus input) of chosen transformer blocks "
            "while the model samples: the training data of the paper's SAEs. Connect 'dump' to SAE Dump "
            "Images, which writes them with the decoded images as sharded safetensors files.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("folder", default="sae_dumps/sdxl_turbo",
                                tooltip="Dump folder under ComfyUI's output folder, or '<name>/<path>' in a dump "
                                "folder the server's owner registered (see README). Several processes or "
                                "machines may dump into the same folder."),
                io.String.Input("blocks", default="paper",
                                tooltip="'paper' (SDXL: down.2.1, mid.0, up.0.0, up.0.1; FLUX: double.18) or block "
                                "names, e.g. 'down.2.1 up.0.1' or 'double.18 single.10'."),
                io.String.Input("steps", default="all", tooltip="'all', or step indices such as '0' or '0, 2-3'."),
                io.Combo.Input("apply_to", options=TARGET_CHOICES, default="cond",
                               tooltip="Rows to dump: positive (cond), negative (uncond) or both. SDXL Turbo at "
                               "cfg 1 has only cond rows."),
                io.Combo.Input("fields", options=list(FIELDS), default="update",
                               tooltip="The update only (what the paper's SAEs read), or also the block's input and output."),
                io.Combo.Input("dtype", options=list(shards.DTYPES), default="float16"),
                io.Int.Input("rows_per_shard", default=16384, min=256, max=1 << 22, step=256,
                             tooltip="Rows per shard file (256 rows per image and block at 512x512)."),
                io.String.Input("writer_id", default="", optional=True,
                                tooltip="Name of this writer's shards; empty: host, process and a random tag."),
            ],
            outputs=[io.Model.Output(), SAE_DUMP.Output(display_name="dump")],
        )

    @classmethod
    def validate_inputs(cls, folder, blocks, steps, writer_id=None):
        return validation_answers((lambda: paths.dump_folder(DUMP, "folder", folder), folder),
                                  (lambda: check_length(DUMP, "blocks", blocks, MAX_BLOCKS_TEXT), blocks),
                                  (lambda: parse_steps(DUMP, steps), steps),
                                  (lambda: check_writer_id(DUMP, writer_id), writer_id))

    @classmethod
    @checked_numbers
    def execute(cls, model, folder, blocks, steps, apply_to, fields, dtype, rows_per_shard, writer_id="") -> io.NodeOutput:
        path = paths.dump_folder(DUMP, "folder", folder)
        blks = parse_blocks(DUMP, blocks, model)
        channels = {}
        for b in blks:
            c = block_channels(model, b)
            if c is None:
                raise NodeInputError(DUMP, f"the MODEL has no transformer block {b.comfy} ({b.short})")
            channels[b.short] = c
        writer_id = check_writer_id(DUMP, writer_id)
        names = FIELDS[fields]
        check_manifest(DUMP, path, channels, dtype, rows_per_shard, names, folder)
        per_row = sum(channels.values()) * len(names) * shards.DTYPES[dtype].itemsize
        check_writable(DUMP, path, rows_per_shard * per_row, folder)
        session = DumpSession(steps=parse_steps(DUMP, steps), folder=path, blocks=blks, fields=names,
                              dtype=shards.DTYPES[dtype], rows_per_shard=rows_per_shard, writer_id=writer_id)
        m = model
        for b in blks:
            m = attach_edit(m, DumpEdit(block=b, target=apply_to, node=DUMP, record=session))
        return io.NodeOutput(m, session)


def _rows_of_image(run_block: list, image: int, seed: int) -> dict[str, torch.Tensor]:
    """The rows of one image from the chunks recorded for one block, flattened over positions."""
    parts = {}
    for chunk in run_block:
        sel = [i for i, img in enumerate(chunk["image"]) if img == image]
        if not sel:
            continue
        t = chunk["tensors"]
        n, H, W, C = t["update"][sel].shape
        for name, v in t.items():
            parts.setdefault(name, []).append(v[sel].reshape(-1, C))
        cols = {
            "batch_index": torch.full((n * H * W,), image, dtype=torch.int64),
            "step": torch.full((n * H * W,), -1 if chunk["step"] is None else chunk["step"], dtype=torch.int64),
            "sigma": torch.full((n * H * W,), chunk["sigma"], dtype=torch.float32),
            "cond": torch.tensor([chunk["kind"][i] for i in sel], dtype=torch.int64).repeat_interleave(H * W),
            "position": torch.arange(H * W, dtype=torch.int64).repeat(n),
            "seed": torch.full((n * H * W,), seed, dtype=torch.int64),
        }
        for name, v in cols.items():
            parts.setdefault(name, []).append(v)
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["grid"] = _grid(run_block)
    return out


def _grid(run_block: list) -> tuple[int, int]:
    _, H, W, _ = run_block[0]["tensors"]["update"].shape
    return H, W


def _png_pixels(image: torch.Tensor) -> np.ndarray:
    """One IMAGE `[H, W, 3]` as 8-bit pixels."""
    return (image.clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)


def _write_images(writer: shards.ShardWriter, folder: str, base: dict, pixels: list, per_image: list) -> None:
    """On the writer thread: each image's PNG, then its rows and record."""
    for i, (arr, rows) in enumerate(zip(pixels, per_image)):
        writer.add_image({**base, "batch_index": i, "file": _save_png(folder, arr)}, rows)


def _save_png(folder: str, arr: np.ndarray) -> str:
    """Write 8-bit pixels `[H, W, 3]` as PNG named by its content; returns the path relative to the dump."""
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    data = buf.getvalue()
    rel = f"{shards.IMAGES_DIR}/{hashlib.sha1(data).hexdigest()[:20]}.png"
    dst = os.path.join(folder, rel)
    if not os.path.exists(dst):  # named by its content: one already there is this image
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        files.atomic_write_bytes(dst, data)
    return rel


def _queue_empty() -> bool:
    """True when no other prompt waits in ComfyUI's queue (the one running counts as one)."""
    try:
        import server

        q = server.PromptServer.instance.prompt_queue
        return q.get_tasks_remaining() <= 1
    except Exception:  # no server (e.g. ComfyUI used as a library): nothing else is queued
        return True


class DumpImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxDumpImages",
            display_name=SAVE,
            category=CATEGORY,
            description="Write the block updates recorded by SAE Dump Activations during this run, with the "
            "decoded images (PNG) and their prompt and seed, to the dump folder.",
            inputs=[
                io.Image.Input("images", tooltip="The images decoded from the sampling run that was dumped."),
                SAE_DUMP.Input("dump"),
                io.String.Input("prompt", default="", force_input=True, optional=True,
                                tooltip="The prompt of these images (e.g. from SAE Prompt List), stored with each image."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, force_input=True, optional=True,
                             tooltip="The sampler's seed, stored with each image."),
                io.Combo.Input("commit", options=FLUSH, default=FLUSH[0],
                               tooltip="When rows that do not fill a shard are written to disk. Full shards "
                               "are always written at once."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    @checked_numbers
    def execute(cls, images, dump, prompt="", seed=0, commit=FLUSH[0]) -> io.NodeOutput:
        run, out_of_range = dump.take_run()
        if out_of_range:
            worst = ", ".join(f"{b} (|x| up to {v:.3g})" for b, v in out_of_range.items())
            raise NodeInputError(
                SAVE, f"the run's values of {worst} do not fit the dump's {str(dump.dtype).replace('torch.', '')}"
                " (largest float16: 65504), so nothing was written; dump in float32")
        missing = [b.short for b in dump.blocks if b.short not in run]
        if missing:
            raise NodeInputError(
                SAVE, f"nothing was recorded on {', '.join(missing)} in this run. Connect the MODEL output of "
                f"SAE Dump Activations to the sampler that made these images, and check its steps "
                f"({'all' if dump.steps is None else sorted(dump.steps)}). (A sampler served from ComfyUI's "
                "cache samples nothing new.)")
        n_images = images.shape[0]
        recorded = {img for chunks in run.values() for c in chunks for img in c["image"]}
        if max(recorded) + 1 != n_images:
            raise NodeInputError(SAVE, f"the run recorded {max(recorded) + 1} images per batch but {n_images} "
                                       "images came in; connect the images decoded from the dumped run")
        steps = sorted({-1 if c["step"] is None else c["step"] for cs in run.values() for c in cs})
        pixels = [_png_pixels(images[i]) for i in range(n_images)]
        per_image = [{b: _rows_of_image(chunks, i, int(seed)) for b, chunks in run.items()} for i in range(n_images)]
        base = {"prompt": prompt, "seed": int(seed), "width": int(images.shape[2]), "height": int(images.shape[1]),
                "steps": steps}
        now = commit == FLUSH[1] or (commit == FLUSH[0] and _queue_empty())
        try:
            dump.write(_write_images, dump.folder, base, pixels, per_image)
            if now:  # asked for, or nothing else is queued: nothing waits on this
                dump.flush()
        except OSError as e:
            raise NodeInputError(SAVE, f"writing to the dump folder failed: {e}. Completed shards are kept; "
                                       "rows not yet written stay in memory for the next attempt") from None
        n_rows = sum(r["update"].shape[0] for r in per_image[-1].values())
        text = (f"{n_images} image(s), {n_rows} rows each over {len(run)} block(s) -> {dump.folder}; "
                + (f"{dump.writer.pending_rows} rows waiting for a full shard" if now else "written in the background"))
        return io.NodeOutput(ui={"text": [text]})
