"""The error every node raises for bad input, and how it quotes what the user typed."""

from __future__ import annotations

EXCERPT_CHARS = 60


# ComfyUI shows a node's error with the exception's module and class name, and names a custom node's modules by
# the folder they were loaded from: the pack's errors carry a short module name instead, so that an error a
# workflow's user sees does not reveal the server's folders.
PUBLIC_MODULE = "sae_unbox"


class NodeInputError(ValueError):
    """Bad input to a node, reported as '<node>: <what is wrong>'."""

    __module__ = PUBLIC_MODULE

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


def validation_answers(*checks) -> bool | str:
    """`validation_answer` of several `(check, value)` pairs: True, or the first refusal."""
    for check, value in checks:
        answer = validation_answer(check, value)
        if answer is not True:
            return answer
    return True
