"""The error every node raises for bad input, and how it quotes what the user typed."""

from __future__ import annotations

EXCERPT_CHARS = 60


class NodeInputError(ValueError):
    """Bad input to a node, reported as '<node>: <what is wrong>'."""

    def __init__(self, node: str, message: str):
        super().__init__(f"{node}: {message}")


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """`repr` of what the user typed, cut to about `limit` characters (an error never echoes a whole
    100,000-feature list back)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}…' ({len(str(value))} characters)"


def validation_answer(check, value) -> bool | str:
    """What a node's `validate_inputs` answers ComfyUI: True, or the NodeInputError `check()` raises. A value
    that comes from another node's output is not known before the run (ComfyUI passes None): the node checks
    it when it runs."""
    if value is None:
        return True
    try:
        check()
    except NodeInputError as err:
        return str(err)
    return True
