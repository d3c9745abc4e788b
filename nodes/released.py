"""What the paper published beside its SAEs, fetched on demand for the workbench: each feature's top images
and the label set of a block. Files come through the pack's verifying downloader (`sae_models.download`:
size and hash as the hub states them, bounded size) from Hugging Face or `HF_ENDPOINT`, and are kept in
`models/sae/.released/` (a mirror of the hub paths), never elsewhere.

Routes (also under `/api`):
  GET  /sae_unbox/released/top?sae=NAME&feature=F
        {"released": false} for an SAE that is not one of the paper's, else {"released": true, "source",
        "image": URL of the cached file or null, "message": why not}; absent files and an offline hub are
        answered in the message, not with an HTTP error
  GET  /sae_unbox/released/image?sae=NAME&feature=F      the cached JPEG (404 before /top fetched it)
  POST /sae_unbox/released/labels {"sae"}                 the block's published label set imported beside the SAE
"""

from __future__ import annotations

import os
import threading
from urllib.parse import quote

from aiohttp import web
from PIL import Image

from ..sae_models.download import DownloadError, download
from ..sae_models.labels import LabelError, import_label_set
from ..sae_models.releases import Release, hub_url, recognise
from .routes import PREFIX, Refused, answer, posted
from .sae_folder import listed_sae, sae_root

CACHE = ".released"
MAX_IMAGE_BYTES = 16 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_LABEL_SET_BYTES = 16 * 2**20
TIMEOUT_S = 20

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(path: str) -> threading.Lock:
    """One lock per cached file: two requests for the same file download it once."""
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def cache_path(hub_path: str) -> str:
    """Where a hub file is kept: `models/sae/.released/<hub path without resolve/main>`. Hub paths are built
    from constants and whole numbers (`sae_models.releases`), never from request text."""
    repo, _, rest = hub_path.partition("/resolve/main/")
    return os.path.join(sae_root(), CACHE, *repo.split("/"), *rest.split("/"))


def fetch(hub_path: str, max_bytes: int, check=None) -> str:
    """The cached copy of a hub file, downloaded (verified, then `check`ed) first where it is not yet kept."""
    dest = cache_path(hub_path)
    with _lock(dest):
        if not os.path.isfile(dest):
            download(f"{hub_url()}/{hub_path}", dest, progress=False, timeout=TIMEOUT_S, max_bytes=max_bytes)
            if check is not None:
                check(dest)
    return dest


def _checked_image(path: str) -> None:
    """A downloaded top image that is not a JPEG of a sane size is deleted (a verified file can still be a
    wrong one: the hash only says it is what the hub holds)."""
    try:
        with Image.open(path) as img:
            if img.format != "JPEG" or img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"a {img.format} of {img.width}x{img.height} pixels")
            img.verify()
    except Exception as e:  # PIL raises many kinds for a broken file
        os.unlink(path)
        raise DownloadError(f"the file is not a usable JPEG ({str(e)[:120]}); it was deleted") from None


class Released:
    """The route handlers."""

    def add_routes(self, routes: web.RouteTableDef) -> None:
        routes.get(f"{PREFIX}/released/top")(self.top)
        routes.get(f"{PREFIX}/released/image")(self.image)
        routes.post(f"{PREFIX}/released/labels")(self.labels)

    @staticmethod
    def _release(name) -> tuple[str, int, Release | None]:
        """(path, n_features, release or None) of an SAE of the SAE folders."""
        path, config = listed_sae(name)
        release = recognise(name)
        return path, config.n_features, (release if release and release.block == config.block else None)

    @staticmethod
    def _feature(q) -> int:
        try:
            feature = int(q.get("feature", ""))
        except ValueError:
            raise Refused(400, "give feature as a whole number") from None
        if feature < 0:
            raise Refused(400, "feature must be >= 0")
        return feature

    def _top(self, q) -> dict:
        name = q.get("sae")
        _, n, release = self._release(name)
        if release is None:
            return {"sae": name, "released": False}
        feature = self._feature(q)
        if feature >= n:
            raise Refused(400, f"feature {feature} is out of range 0..{n - 1}")
        hub_path = release.top_image_path(feature)
        source = f"{hub_url()}/{hub_path}"
        try:
            fetch(hub_path, MAX_IMAGE_BYTES, check=_checked_image)
        except DownloadError as e:
            return {"sae": name, "released": True, "source": source, "image": None,
                    "message": f"the paper's top images of #{feature} could not be fetched: {e}"}
        image = f"{PREFIX}/released/image?sae={quote(name)}&feature={feature}"
        return {"sae": name, "released": True, "source": source, "image": image, "message": None}

    def _image(self, q) -> str:
        name = q.get("sae")
        _, _, release = self._release(name)
        if release is None:
            raise Refused(404, f"{str(name)[:80]!r} is not one of the paper's released SAEs")
        dest = cache_path(release.top_image_path(self._feature(q)))
        if not os.path.isfile(dest):
            raise Refused(404, "not fetched yet: ask /sae_unbox/released/top first")
        return dest

    def _labels(self, body: dict) -> dict:
        name = body.get("sae")
        path, n, release = self._release(name)
        hub_path = release.label_set_path() if release else None
        if hub_path is None:
            raise Refused(404, f"no label set was published for {str(name)[:80]!r}")

        try:
            text_path = fetch(hub_path, MAX_LABEL_SET_BYTES)
        except DownloadError as e:
            raise Refused(502, f"the published label set of {release.block} could not be fetched: {e}") from None
        try:
            with open(text_path, encoding="utf-8") as f:
                text = f.read()
            found, total = import_label_set(path, text, n, block=release.block)
        except (OSError, UnicodeDecodeError, LabelError) as e:
            os.unlink(text_path)  # a set that cannot be read is not kept: the next try fetches it again
            raise Refused(422, f"the published label set of {release.block} cannot be imported: {e}") from None
        return {"sae": name, "imported": found, "labels": total, "source": f"{hub_url()}/{hub_path}"}

    async def top(self, request: web.Request) -> web.Response:
        return await answer(self._top, request.query)

    async def image(self, request: web.Request) -> web.StreamResponse:
        return await answer(self._image, request.query, respond=lambda p: web.FileResponse(
            p, headers={"Content-Type": "image/jpeg", "Cache-Control": "max-age=86400"}))

    async def labels(self, request: web.Request) -> web.Response:
        return await posted(request, self._labels)
