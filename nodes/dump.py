"""Training-data dumps: record block updates while a graph samples, and write them as shards with the images.

`SAE Dump Activations` adds a `DumpEdit` to the MODEL (through the one patching mechanism) and outputs an
`SAE_DUMP` session; `SAE Dump Images` receives the decoded images of the same run and writes the rows of
each image to the dump folder (`sae_models.shards`) beside its PNG and its record (prompt, seed, ...).

The session holds the shard writer, so rows accumulate across queued prompts into shards of a fixed
size. The session lives in ComfyUI's node cache: as long as the dump node's inputs do not change, every
queued prompt reuses it. Rows are committed to disk when a shard is full, and (by default) whenever the
queue runs empty, and at exit; rows of an interrupted run are dropped, never half-written.
"""

from __future__ import annotations

import hashlib
import io as _io
import logging
import os
import shutil
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

import folder_paths

from ..sae_models import shards
from ..sae_models.blocks import PAPER_BLOCKS, SHORT_NAMES, Block, find_block
from . import paths
from .common import CATEGORY, TARGET_CHOICES, NodeInputError, parse_steps
from .patch import CallInfo, Edit, attach_edit, block_channels

log = logging.getLogger(__name__)

DUMP = "SAE Dump Activations"
SAVE = "SAE Dump Images"
PROMPTS = "SAE Prompt List"
SAE_DUMP = io.Custom("SAE_DUMP")

FIELDS = {"update": ("update",), "update, input, output": ("update", "input", "output")}
DTYPES = {"float16": torch.float16, "float32": torch.float32}
FLUSH = ["when the queue is empty", "after every prompt", "only when a shard is full"]


def resolve_dump_folder(node: str, folder: str, input_name: str = "folder") -> str:
    """The absolute dump folder a widget names: under ComfyUI's output folder, or in a dump folder the
    server's owner registered (`paths.dump_folder`). Nothing is created."""
    return paths.dump_folder(node, input_name, folder)


def parse_blocks(node: str, text: str) -> tuple[Block, ...]:
    """'paper' -> the paper's four blocks; else block names separated by commas or spaces."""
    names = [t for t in text.replace(",", " ").split() if t]
    if not names:
        raise NodeInputError(node, "no block given")
    if [n.lower() for n in names] == ["paper"]:
        names = list(PAPER_BLOCKS)
    blocks = []
    for n in names:
        b = find_block(n)
        if b is None:
            raise NodeInputError(node, f"unknown block {n!r}; use 'paper' or names from {', '.join(SHORT_NAMES)}")
        if b not in blocks:
            blocks.append(b)
    return tuple(blocks)


def check_writable(node: str, folder: str, need_bytes: int) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise NodeInputError(node, f"cannot write to the dump folder {folder}: {e.strerror or e}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise NodeInputError(
            node, f"the dump folder {folder} has {free / 2**20:.0f} MiB free; one shard per block needs about "
            f"{need_bytes / 2**20:.0f} MiB (lower rows_per_shard or free some space)")


def check_manifest(node: str, folder: str, blocks, channels: dict, dtype: str, rows_per_shard: int, fields) -> None:
    """A folder that already holds a dump must agree with what this node would write into it."""
    if not os.path.exists(os.path.join(folder, "manifest.json")):
        return
    try:
        m = shards.read_manifest(folder)
    except (ValueError, OSError) as e:
        raise NodeInputError(node, str(e)) from None
    if m.get("dtype") != dtype:
        raise NodeInputError(node, f"{folder} holds a {m.get('dtype')} dump; this node writes {dtype}")
    if int(m.get("rows_per_shard", -1)) != rows_per_shard:
        raise NodeInputError(node, f"{folder} holds shards of {m.get('rows_per_shard')} rows; this node "
                                   f"is set to {rows_per_shard}")
    for b in blocks:
        entry = m.get("blocks", {}).get(b.short)
        if entry is None:
            continue
        if int(entry["d_in"]) != channels[b.short]:
            raise NodeInputError(node, f"{folder} holds {b.short} vectors of size {entry['d_in']}; this MODEL's "
                                       f"block has {channels[b.short]} channels")
        if set(entry.get("fields", [])) != set(fields):
            raise NodeInputError(node, f"{folder} holds the fields {entry.get('fields')} of {b.short}; this node "
                                       f"writes {list(fields)}")


@dataclass(eq=False)
class DumpSession:
    """The `SAE_DUMP` value: where and what to dump, the rows of the current sampling run, and the writer."""

    folder: str
    blocks: tuple[Block, ...]
    fields: tuple[str, ...]
    steps: frozenset | None
    dtype: torch.dtype
    rows_per_shard: int
    writer_id: str | None = None
    _run: dict = field(default_factory=dict)
    _schedule: object = None
    _writer: shards.ShardWriter | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, block: Block, info: CallInfo, rows: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Keep the rows of one UNet call (tensors `[len(rows), H, W, C]`) for the run in progress."""
        with self._lock:
            if info.schedule is not self._schedule:  # a new sampling run: forget an unfinished one
                self._schedule = info.schedule
                self._run = {}
            self._run.setdefault(block.short, []).append(dict(
                tensors=tensors, step=info.step, sigma=info.sigma,
                kind=[info.row_kind[r] for r in rows], image=[info.row_image[r] for r in rows]))

    def take_run(self) -> dict:
        with self._lock:
            run, self._run, self._schedule = self._run, {}, None
        return run

    @property
    def writer(self) -> shards.ShardWriter:
        if self._writer is None:
            self._writer = shards.ShardWriter(self.folder, writer_id=self.writer_id or None,
                                              rows_per_shard=self.rows_per_shard, dtype=self.dtype)
            weakref.finalize(self, _flush_quietly, self._writer)  # also runs at interpreter exit
        return self._writer


def _flush_quietly(writer: shards.ShardWriter) -> None:
    try:
        writer.flush()
    except Exception as e:  # at exit there is nobody to tell but the log
        log.error("SAE dump: could not write the last rows of %s: %s", writer.folder, e)


@dataclass(frozen=True, eq=False)
class DumpEdit(Edit):
    """Copies the block's update (and optionally input and output) of the selected rows to the session."""

    session: DumpSession = None
    needs_block_input = True

    def apply(self, update, info, block_input=None):
        s = self.session
        if s.steps is not None and info.step not in s.steps:
            return None
        rows = info.rows(self.target)
        if not rows:
            return None
        u = update[rows]
        tensors = {"update": u}
        if "input" in s.fields:
            x = block_input[rows]
            tensors["input"], tensors["output"] = x, x + u
        s.record(self.block, info, rows, {k: v.detach().to("cpu", s.dtype) for k, v in tensors.items()})
        return None


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
                                tooltip="'paper' (down.2.1, mid.0, up.0.0, up.0.1) or block names, e.g. 'down.2.1 up.0.1'."),
                io.String.Input("steps", default="all", tooltip="'all', or step indices such as '0' or '0, 2-3'."),
                io.Combo.Input("apply_to", options=TARGET_CHOICES, default="cond",
                               tooltip="Rows to dump: positive (cond), negative (uncond) or both. SDXL Turbo at "
                               "cfg 1 has only cond rows."),
                io.Combo.Input("fields", options=list(FIELDS), default="update",
                               tooltip="The update only (what the paper's SAEs read), or also the block's input and output."),
                io.Combo.Input("dtype", options=list(DTYPES), default="float16"),
                io.Int.Input("rows_per_shard", default=16384, min=256, max=1 << 22, step=256,
                             tooltip="Rows per shard file (256 rows per image and block at 512x512)."),
                io.String.Input("writer_id", default="", optional=True,
                                tooltip="Name of this writer's shards; empty: host, process and a random tag."),
            ],
            outputs=[io.Model.Output(), SAE_DUMP.Output(display_name="dump")],
        )

    @classmethod
    def validate_inputs(cls, folder):
        return _valid(lambda: resolve_dump_folder(DUMP, folder), folder)

    @classmethod
    def execute(cls, model, folder, blocks, steps, apply_to, fields, dtype, rows_per_shard, writer_id="") -> io.NodeOutput:
        path = resolve_dump_folder(DUMP, folder)
        blks = parse_blocks(DUMP, blocks)
        channels = {}
        for b in blks:
            c = block_channels(model, b)
            if c is None:
                raise NodeInputError(DUMP, f"the MODEL has no transformer block {b.comfy} ({b.short}); is it SDXL?")
            channels[b.short] = c
        writer_id = (writer_id or "").strip()
        if writer_id and not all(ch.isalnum() or ch in "_.-" for ch in writer_id):
            raise NodeInputError(DUMP, f"writer_id {writer_id!r} may hold only letters, digits, '_', '.' and '-'")
        names = FIELDS[fields]
        check_manifest(DUMP, path, blks, channels, dtype, rows_per_shard, names)
        per_row = sum(channels.values()) * len(names) * DTYPES[dtype].itemsize
        check_writable(DUMP, path, rows_per_shard * per_row)
        session = DumpSession(path, blks, names, parse_steps(DUMP, steps), DTYPES[dtype], rows_per_shard, writer_id)
        m = model
        for b in blks:
            m = attach_edit(m, DumpEdit(block=b, target=apply_to, session=session))
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


def _save_png(folder: str, image: torch.Tensor) -> str:
    """Write one IMAGE `[H, W, 3]` as PNG named by its content; returns the path relative to the dump."""
    arr = (image.clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    data = buf.getvalue()
    rel = f"images/{hashlib.sha1(data).hexdigest()[:20]}.png"
    dst = os.path.join(folder, rel)
    if not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
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
    def execute(cls, images, dump, prompt="", seed=0, commit=FLUSH[0]) -> io.NodeOutput:
        run = dump.take_run()
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
        writer = dump.writer
        try:
            for i in range(n_images):
                rows = {b: _rows_of_image(chunks, i, int(seed)) for b, chunks in run.items()}
                record = {
                    "prompt": prompt, "seed": int(seed), "batch_index": i,
                    "file": _save_png(dump.folder, images[i]),
                    "width": int(images.shape[2]), "height": int(images.shape[1]),
                    "grids": {b: "x".join(map(str, _grid(chunks))) for b, chunks in run.items()},
                    "steps": sorted({-1 if c["step"] is None else c["step"] for cs in run.values() for c in cs}),
                }
                writer.add_image(record, rows)
            if commit == FLUSH[1] or (commit == FLUSH[0] and _queue_empty()):
                writer.flush()
        except OSError as e:
            raise NodeInputError(SAVE, f"writing to {dump.folder} failed: {e}. Completed shards are kept; "
                                       "rows not yet written stay in memory for the next attempt") from None
        n_rows = sum(r["update"].shape[0] for r in rows.values())
        text = (f"{n_images} image(s), {n_rows} rows each over {len(run)} block(s) -> {dump.folder}; "
                f"{writer.pending_rows} rows waiting for a full shard")
        return io.NodeOutput(ui={"text": [text]})


def _valid(check, value) -> bool | str:
    """validate_inputs' answer: True, or the error of `check()`. A value that comes from a link is not known
    before the run (ComfyUI passes None) and is checked when the node runs."""
    if value is None:
        return True
    try:
        check()
    except NodeInputError as e:
        return str(e)
    return True


PROMPT_FILES = (".txt",)
NO_FILE = ""


def read_prompts(node: str, text: str, file: str) -> list[str]:
    """Prompts, one a line (blank lines and lines starting with '#' skipped), from `text` or from `file`, a
    text file in ComfyUI's input folder."""
    file = (file or "").strip()
    if file:
        path = paths.input_file(node, "file", file, PROMPT_FILES)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise NodeInputError(node, f"cannot read the prompt file {file!r}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [ln.strip() for ln in (text or "").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise NodeInputError(node, "no prompt given (one prompt a line)")
    return prompts


class PromptList(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UnboxPromptList",
            display_name=PROMPTS,
            category=CATEGORY,
            description="One prompt of a list (a text file or the box below, one prompt a line), chosen by "
            "index. With 'increment' after each run, queueing the graph N times walks through the list; "
            "scripts/queue_prompts.py sets the index itself.",
            inputs=[
                io.String.Input("prompts", multiline=True, default="a photo of a cat\na watercolor of a lighthouse",
                                tooltip="One prompt a line; ignored when a file is given."),
                io.Combo.Input("file", options=[NO_FILE, *paths.input_files(PROMPT_FILES)], default=NO_FILE,
                               tooltip="A .txt file in ComfyUI's input folder, one prompt a line (empty: use the "
                               "box above)."),
                io.Int.Input("index", default=0, min=0, max=1 << 31, control_after_generate=True),
                io.Int.Input("seed_base", default=0, min=0, max=1 << 48,
                             tooltip="The 'seed' output is seed_base + index: one reproducible seed per prompt."),
            ],
            outputs=[io.String.Output(display_name="prompt"), io.Int.Output(display_name="seed"),
                     io.Int.Output(display_name="index"), io.Int.Output(display_name="count")],
        )

    @classmethod
    def execute(cls, prompts, file, index, seed_base=0) -> io.NodeOutput:
        items = read_prompts(PROMPTS, prompts, file)
        if index >= len(items):
            raise NodeInputError(PROMPTS, f"index {index} is past the end of the list ({len(items)} prompts)")
        return io.NodeOutput(items[index], seed_base + index, index, len(items),
                             ui={"text": [f"{index + 1}/{len(items)}: {items[index]}"]})

    @classmethod
    def validate_inputs(cls, file):
        # Listed here so that ComfyUI does not refuse a file added to input/ since the list was made; the
        # file is checked as the node would read it.
        return _valid(lambda: (file or "").strip() and paths.input_file(PROMPTS, "file", file, PROMPT_FILES), file)

    @classmethod
    def fingerprint_inputs(cls, prompts, file, index, seed_base=0):
        if (file or "").strip():
            try:
                st = os.stat(paths.input_file(PROMPTS, "file", file, PROMPT_FILES))
                return f"{prompts}|{file}|{st.st_mtime_ns}|{st.st_size}|{index}|{seed_base}"
            except (NodeInputError, OSError):
                pass
        return f"{prompts}|{file}|{index}|{seed_base}"
