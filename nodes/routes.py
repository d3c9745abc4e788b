"""What the pack's HTTP routes share: refusals as JSON errors, work off the event loop, JSON bodies that only
the page ComfyUI serves may send, and registering every route on ComfyUI's server.

All routes live under `/sae_unbox/` (ComfyUI also serves them under `/api/sae_unbox/`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import urlsplit

from aiohttp import web

PREFIX = "/sae_unbox"
MAX_JSON_BODY = 64 * 1024


class Refused(Exception):
    """A request the pack answers with an HTTP error status and a JSON `{"error": ...}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def answer(fn, *args, respond=web.json_response) -> web.StreamResponse:
    """`respond(fn(*args))`, with `fn` run off the event loop; a refusal becomes a JSON error."""
    try:
        result = await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except Refused as e:
        return web.json_response({"error": str(e)}, status=e.status)
    return respond(result)


async def json_body(request: web.Request, limit: int = MAX_JSON_BODY) -> dict:
    """The JSON object a page of this server posted. Refused: another origin (a page elsewhere may not write
    through the user's browser), a body that is not `application/json`, or one larger than `limit` bytes."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise Refused(403, f"requests from {origin} are not accepted; use the page this server serves")
    if request.content_type != "application/json":
        raise Refused(415, "send the body as application/json")
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, f"the body is larger than {limit} bytes")
    raw = await request.read()
    if len(raw) > limit:
        raise Refused(413, f"the body is larger than {limit} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(400, f"the body is not JSON ({e})") from None
    except RecursionError:  # Python's decoder recurses once per level of nesting
        raise Refused(400, "the body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body is a JSON object")
    return body


async def posted(request: web.Request, fn, limit: int = MAX_JSON_BODY) -> web.StreamResponse:
    """Answer a POST: its JSON body (checked by `json_body`) handed to `fn`, off the event loop."""
    try:
        body = await json_body(request, limit)
    except Refused as e:
        return web.json_response({"error": str(e)}, status=e.status)
    return await answer(fn, body)


def register_routes() -> bool:
    """Add the pack's routes (feature browser, workbench, labels, the paper's released files) to the running ComfyUI server; False where
    there is none (the pack imported by a script or a test harness rather than by `main.py`)."""
    from .feature_browser import FeatureBrowser
    from .released import Released
    from .workbench import Workbench

    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    FeatureBrowser().add_routes(instance.routes)
    Workbench().add_routes(instance.routes)
    Released().add_routes(instance.routes)
    return True
