"""The feature browser: a page served by ComfyUI's own server that lists an SAE's features with their
statistics and top dataset images (the features index written by training), searchable and sortable.

Routes (also under ComfyUI's `/api` prefix):
  GET /sae_unbox/browser                 the page (web/feature_browser.html)
  GET /sae_unbox/saes                    SAEs in models/sae that have a features index (their headers)
  GET /sae_unbox/features?sae=NAME&sort=frequency|mean|max|feature&order=desc|asc&q=TEXT&hide_dead=1
                         &offset=0&limit=50
  GET /sae_unbox/image?sae=NAME&file=REL an image of the SAE's dump folder: only one that the dump's records
                                         name, and only from a dump folder in ComfyUI's output folder or a
                                         registered one
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from aiohttp import web

from ..sae_models import FeatureStats, FeatureTable, SAEError, shards
from ..sae_models.features_table import SORT_KEYS
from ..sae_models.labels import LabelError, read_labels
from ..sae_models.stats import features_index_path, read_features_index
from .errors import NodeInputError
from .paths import in_dump_roots
from .routes import PREFIX, Refused, answer
from .sae_folder import available_saes, file_version, find_sae, sae_header

NODE = "SAE feature browser"

PAGE = Path(__file__).resolve().parents[1] / "web" / "feature_browser.html"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_LIMIT = 500
MAX_FILE_PARAM = 1024


def _describe(name: str, config, stats: FeatureStats) -> dict:
    return {"name": name, "block": config.block, "architecture": config.architecture, "d_in": config.d_in,
            "n_features": config.n_features, "k": config.k, "base_model": config.base_model,
            "statistics": stats.present()}


class _Entry:
    """One SAE as the browser sees it: its table and the dump folder its images are relative to."""

    def __init__(self, name: str, path: str, index_path: str):
        config, stats = sae_header(path)
        index = read_features_index(index_path, config.n_features)
        self.name, self.config, self.path = name, config, path
        self.table = FeatureTable(index, stats)
        # The index is as untrusted as the SAE it came with: its dump folder is used only where a dump node
        # could have written it, and only the images that dump's own records name are served from it.
        dump = index.get("dump")
        self.dump = os.path.realpath(dump) if in_dump_roots(dump) else None
        self._images: tuple = ((), frozenset())  # (records' version, the image files they name)

    def image_files(self) -> frozenset:
        """The image files (relative to the dump) that the dump's image records name, read again when a
        record file changes."""
        folder = Path(self.dump) / shards.IMAGES_DIR
        try:
            version = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.jsonl")))
        except OSError:
            return frozenset()
        if version != self._images[0]:
            try:
                named = frozenset(r["file"] for r in shards.done_images(self.dump) if isinstance(r.get("file"), str))
            except (SAEError, OSError):
                named = frozenset()
            self._images = (version, named)
        return self._images[1]

    def refresh_labels(self) -> None:
        """The labels as they are now (they change while the page is open); a bad file shows none."""
        try:
            self.table.labels = read_labels(self.path, self.config.n_features)
        except LabelError:
            self.table.labels = {}

    def summary(self) -> dict:
        return {**_describe(self.name, self.config, self.table.stats), "top_n": self.table.index.get("top_n"),
                "images": self.dump is not None and os.path.isdir(self.dump)}


class FeatureBrowser:
    """The route handlers. Parsed SAEs are kept per file version (path, size, mtime) for paging; a
    changed file is read again."""

    def __init__(self, cache_size: int = 4):
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # handlers read in executor threads

    def add_routes(self, routes: web.RouteTableDef) -> None:
        routes.get(f"{PREFIX}/browser")(self.page)
        routes.get(f"{PREFIX}/saes")(self.saes)
        routes.get(f"{PREFIX}/features")(self.features)
        routes.get(f"{PREFIX}/image")(self.image)

    # -- reading (blocking; run off the event loop) --

    def _entry(self, name: str) -> _Entry:
        if not name:
            raise Refused(400, "give the SAE as ?sae=NAME (a name from /sae_unbox/saes)")
        with self._lock:
            known = any(k[0] == name for k in self._cache)
        if not known and name not in available_saes():  # the folder walk only for a name not seen yet
            raise Refused(404, f"no SAE named {name!r} in models/sae")
        try:
            path = find_sae(NODE, name)
        except NodeInputError as e:
            raise Refused(404, str(e)) from None
        index_path = features_index_path(path)
        if not os.path.isfile(index_path):
            raise Refused(404, f"{name!r} has no features index ({os.path.basename(index_path)}); "
                                f"write one with the SAE Train node or `python -m sae_models stats`")
        key = (name, path, file_version(path), index_path, file_version(index_path))
        with self._lock:
            return self._cached(key, name, path, index_path)

    def _cached(self, key: tuple, name: str, path: str, index_path: str) -> _Entry:
        entry = self._cache.get(key)
        if entry is None:
            try:
                entry = _Entry(name, path, index_path)
            except SAEError as e:
                raise Refused(422, str(e)) from None
            self._cache = OrderedDict((k, v) for k, v in self._cache.items() if k[1] != path)
            self._cache[key] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return entry

    def _list(self) -> list[dict]:
        out = []
        for name in available_saes():
            try:
                path = find_sae(NODE, name)
            except NodeInputError:
                continue
            if not os.path.isfile(features_index_path(path)):
                continue
            try:  # the header only: listing does not parse every index
                out.append(_describe(name, *sae_header(path)))
            except SAEError as e:
                out.append({"name": name, "error": str(e)})
        return out

    def _query(self, q) -> dict:
        entry = self._entry(q.get("sae", ""))
        order = q.get("order", "desc")
        if order not in ("desc", "asc"):
            raise Refused(400, f"order must be desc or asc, got {order!r}")
        sort = q.get("sort", "frequency")
        if sort not in SORT_KEYS:
            raise Refused(400, f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
        try:
            offset, limit = int(q.get("offset", 0)), int(q.get("limit", 50))
        except ValueError:
            raise Refused(400, "offset and limit must be integers") from None
        if offset < 0 or not 1 <= limit <= MAX_LIMIT:
            raise Refused(400, f"offset must be >= 0 and limit between 1 and {MAX_LIMIT}")
        entry.refresh_labels()
        result = entry.table.query(sort=sort, descending=order == "desc", text=q.get("q", ""),
                                   hide_dead=q.get("hide_dead", "0") in ("1", "true"), offset=offset, limit=limit)
        return {"sae": entry.summary(), **result}

    def _image_path(self, q) -> str:
        rel = q.get("file", "")
        if not rel or "\0" in rel or len(rel) > MAX_FILE_PARAM:
            raise Refused(400, "file is the image's path in the dump folder, as the features index gives it")
        entry = self._entry(q.get("sae", ""))
        if entry.dump is None:
            raise Refused(404, f"the features index of {entry.name!r} names no dump folder in ComfyUI's output "
                               "folder or a registered dump folder")
        with self._lock:
            named = entry.image_files()
        if rel not in named:
            raise Refused(404, f"{rel[:80]!r} is not an image that the dump's records name")
        path = os.path.realpath(os.path.join(entry.dump, rel))
        if os.path.commonpath([path, entry.dump]) != entry.dump:
            raise Refused(403, f"{rel[:80]!r} is not a file inside the dump folder of {entry.name!r}")
        if os.path.splitext(path)[1].lower() not in IMAGE_TYPES:
            raise Refused(403, f"{rel[:80]!r} is not an image ({', '.join(IMAGE_TYPES)})")
        if not os.path.isfile(path):
            raise Refused(404, f"{rel[:80]!r} is not in the dump folder (moved or deleted?)")
        return path

    # -- handlers --

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(PAGE, headers={"Content-Type": "text/html; charset=utf-8",
                                               "Cache-Control": "no-cache"})

    async def saes(self, request: web.Request) -> web.Response:
        return await answer(self._list)

    async def features(self, request: web.Request) -> web.Response:
        return await answer(self._query, request.query)

    async def image(self, request: web.Request) -> web.StreamResponse:
        return await answer(self._image_path, request.query, respond=_image_response)


def _image_response(path: str) -> web.FileResponse:
    return web.FileResponse(path, headers={"Content-Type": IMAGE_TYPES[os.path.splitext(path)[1].lower()],
                                           "Cache-Control": "max-age=3600"})

