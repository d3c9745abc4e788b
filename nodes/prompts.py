"""SAE Prompt List: one prompt of a list (the box, or a .txt file of ComfyUI's input folder) per queued run."""

from __future__ import annotations

import os

from comfy_api.v0_0_2 import io

from . import paths
from .errors import NodeInputError, excerpt, validation_answers
from .inputs import check_length
from .schema import CATEGORY, checked_numbers

PROMPTS = "SAE Prompt List"


PROMPT_FILES = (".txt",)
NO_FILE = ""


MAX_PROMPTS = 10_000
MAX_TEXT = 2**20  # characters in the box, bytes in a file


def prompt_file(node: str, file: str) -> str:
    """The path of a prompt file named in `file`, checked: a .txt file in ComfyUI's input folder, at most
    MAX_TEXT bytes."""
    path = paths.input_file(node, "file", file, PROMPT_FILES)
    size = os.path.getsize(path)
    if size > MAX_TEXT:
        raise NodeInputError(node, f"the prompt file {excerpt(file)} holds {size:,} bytes, more than {MAX_TEXT:,}")
    return path


def read_prompts(node: str, text: str, file: str) -> list[str]:
    """Prompts, one a line (blank lines and lines starting with '#' skipped), from `text` or from `file`, a
    text file in ComfyUI's input folder; at most MAX_PROMPTS of them, from at most MAX_TEXT characters."""
    file = (file or "").strip()
    if file:
        path = prompt_file(node, file)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_TEXT + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise NodeInputError(node, f"cannot read the prompt file {excerpt(file)}: "
                                       f"{getattr(e, 'strerror', None) or e}") from None
    prompts = [ln.strip() for ln in check_length(node, "prompts", text, MAX_TEXT).splitlines()] if text else []
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise NodeInputError(node, "no prompt given (one prompt a line)")
    if len(prompts) > MAX_PROMPTS:
        raise NodeInputError(node, f"the list holds {len(prompts):,} prompts, more than {MAX_PROMPTS:,}; split it")
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
                                tooltip=f"One prompt a line (at most {MAX_PROMPTS:,}); ignored when a file is given."),
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
    @checked_numbers
    def execute(cls, prompts, file, index, seed_base=0) -> io.NodeOutput:
        items = read_prompts(PROMPTS, prompts, file)
        if index >= len(items):
            raise NodeInputError(PROMPTS, f"index {index} is past the end of the list ({len(items)} prompts)")
        return io.NodeOutput(items[index], seed_base + index, index, len(items),
                             ui={"text": [f"{index + 1}/{len(items)}: {items[index]}"]})

    @classmethod
    def validate_inputs(cls, prompts, file):
        # `file` is listed here so that ComfyUI does not refuse a file added to input/ since the list was made;
        # the file is checked as the node would read it (size, not content: it may change before the run).
        return validation_answers(
            (lambda: (file or "").strip() and prompt_file(PROMPTS, file), file),
            (lambda: (file or "").strip() or read_prompts(PROMPTS, prompts, ""), prompts))

    @classmethod
    def fingerprint_inputs(cls, prompts, file, index, seed_base=0):
        if (file or "").strip():
            try:
                st = os.stat(paths.input_file(PROMPTS, "file", file, PROMPT_FILES))
                return f"{prompts}|{file}|{st.st_mtime_ns}|{st.st_size}|{index}|{seed_base}"
            except (NodeInputError, OSError):
                pass
        return f"{prompts}|{file}|{index}|{seed_base}"
