"""The server side of the workbench panel (web/workbench.js): the runs it shows, kept in memory within
bounds, and the routes it reads them and the feature labels through.

Top Features and Feature Heatmap hand each run's probe record, image and ranking to `RUNS`. It keeps the
newest `MAX_RUNS` runs, and at most `MAX_BYTES` of codes and images: a newer run pushes the oldest out, so
the panel's heatmaps come from the codes the server kept, and memory does not grow with use.

Routes (also under `/api`):
  GET  /sae_unbox/workbench/runs                           newest first, with each probed block's ranking
  GET  /sae_unbox/workbench/image?run=ID&index=I           a run's image (PNG)
  GET  /sae_unbox/workbench/heat?run=ID&block=B&feature=F&index=I
                                                           {"grid": [h, w], "values": [h*w], "max", "feature"}
  GET  /sae_unbox/labels?sae=NAME                          {"labels": {"12": "red cars", ...}, "categories": {...},
                                                            "present": false for an SAE not in models/sae}
  POST /sae_unbox/labels          {"sae", "feature", "label"}     (JSON from this server's page only)
  POST /sae_unbox/labels/import   {"sae", "text", "block"?}       a published label set (up to 16 MB)
"""

from __future__ import annotations

import io as _io
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from aiohttp import web
from PIL import Image

from ..sae_models.blocks import find_block
from ..sae_models.errors import SAEError
from ..sae_models.labels import LabelError, import_label_set, read_categories, read_labels, set_label
from ..sae_models.releases import recognise
from ..sae_models.stats import features_index_path
from .errors import NodeInputError
from .patching import StepRecord
from .routes import PREFIX, Refused, answer, posted
from .sae_folder import available_saes, find_sae, listed_sae, sae_header

MAX_RUNS = 4
MAX_BYTES = 256 * 2**20
MAX_LABEL_SET = 16 * 2**20
NODE = "SAE workbench"


@dataclass
class BlockView:
    """One probed block of a run: its codes (a probe's StepRecord), the rows shown, and the ranking."""

    sae: str
    n_features: int
    k: int | None
    record: StepRecord
    view: str
    cfg: float
    ranking: list
    stats: dict  # the SAE's per-feature statistics (its own tensors, not copied): {"mean", "frequency"} as present

    @property
    def nbytes(self) -> int:
        return self.record.values.nbytes + self.record.indices.nbytes

    def heat(self, feature: int, image: int) -> torch.Tensor:
        maps = self.record.by_image(self.record.feature_map(feature), self.view, self.cfg)
        return maps[min(image, maps.shape[0] - 1)]


@dataclass
class Run:
    id: str
    images: list = field(default_factory=list)  # PNG bytes per image of the batch
    blocks: dict = field(default_factory=dict)  # block name -> BlockView
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.images) + sum(b.nbytes for b in self.blocks.values())

    def describe(self) -> dict:
        return {"run": self.id, "created": self.created, "images": len(self.images),
                "blocks": [{"block": name, "sae": b.sae, "n_features": b.n_features, "k": b.k, "rows": b.view,
                            "grid": list(b.record.values.shape[1:3]), "ranking": b.ranking, **_sources(b.sae)}
                           for name, b in self.blocks.items()]}


def _sources(sae: str) -> dict:
    """Where the panel finds a feature's top images: the SAE's own features index (which wins), the paper's
    released images, or neither; so that it asks only for what exists."""
    try:
        path = find_sae(NODE, sae)
    except NodeInputError:
        return {"index": False, "released": False, "label_set": False}
    release = recognise(sae)
    try:
        if release is not None and sae_header(path)[0].block != release.block:
            release = None  # named like a release folder, but an SAE of another block
    except SAEError:
        release = None
    return {"index": os.path.isfile(features_index_path(path)), "released": release is not None,
            "label_set": release is not None and release.label_set is not None}


def _png(image: torch.Tensor) -> bytes:
    arr = (image[..., :3].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class RunStore:
    """The newest runs (at most `max_runs`, at most `max_bytes` of codes and images), newest last."""

    def __init__(self, max_runs: int = MAX_RUNS, max_bytes: int = MAX_BYTES):
        self.max_runs, self.max_bytes = max_runs, max_bytes
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, run_id: str, images: torch.Tensor, block: str, view: BlockView) -> None:
        """Record one probed block of a run (the run is made, with its images, by its first block). A view
        without a ranking (Feature Heatmap's) keeps the ranking Top Features gave the block in the same run,
        whichever of the two nodes ran first."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                run = self._runs[run_id] = Run(run_id, [_png(img) for img in images])
            old = run.blocks.get(block)
            if old is not None and not view.ranking and old.ranking:
                view = replace(view, ranking=old.ranking)
            run.blocks[block] = view
            self._runs.move_to_end(run_id)
            while len(self._runs) > self.max_runs or (
                    len(self._runs) > 1 and sum(r.nbytes for r in self._runs.values()) > self.max_bytes):
                self._runs.popitem(last=False)

    def get(self, run_id: str) -> Run:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            raise Refused(404, f"no run {str(run_id)[:40]!r} is kept (the server keeps the newest {self.max_runs})")
        return run

    def list(self) -> list[dict]:
        with self._lock:
            return [r.describe() for r in reversed(self._runs.values())]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._runs.values())


RUNS = RunStore()


def keep_run(handle, record: StepRecord, run_id: str, block: str, images: torch.Tensor, view: str, cfg: float,
             ranking: list) -> str:
    """Hand a probed block of a run to the workbench (called by the nodes that have its record and image)."""
    stats = {name: getattr(handle.sae.stats, name)
             for name in ("mean", "frequency") if getattr(handle.sae.stats, name) is not None}
    RUNS.add(run_id, images, block, BlockView(handle.name, handle.sae.n_features, handle.sae.config.k, record, view,
                                              cfg, ranking, stats))
    return run_id


def _int(query, name: str, default: int | None = None) -> int:
    try:
        value = int(query.get(name, default))
    except (TypeError, ValueError):
        raise Refused(400, f"give {name} as a whole number") from None
    if value < 0:
        raise Refused(400, f"{name} must be >= 0")
    return value


class Workbench:
    """The route handlers."""

    def __init__(self, store: RunStore = RUNS):
        self.store = store

    def add_routes(self, routes: web.RouteTableDef) -> None:
        routes.get(f"{PREFIX}/workbench/runs")(self.runs)
        routes.get(f"{PREFIX}/workbench/image")(self.image)
        routes.get(f"{PREFIX}/workbench/heat")(self.heat)
        routes.get(f"{PREFIX}/labels")(self.labels)
        routes.post(f"{PREFIX}/labels")(self.set_label)
        routes.post(f"{PREFIX}/labels/import")(self.import_labels)

    # -- runs --

    def _heat(self, q) -> dict:
        run = self.store.get(q.get("run", ""))
        name = q.get("block", "")
        if name not in run.blocks:
            raise Refused(404, f"block {name[:40]!r} was not probed in this run (probed: {', '.join(run.blocks)})")
        view = run.blocks[name]
        feature = _int(q, "feature")
        if feature >= view.n_features:
            raise Refused(400, f"feature {feature} is out of range 0..{view.n_features - 1}")
        heat = view.heat(feature, _int(q, "index", 0)).float()
        stats = {k: float(v[feature]) for k, v in view.stats.items()}
        return {"run": run.id, "block": name, "feature": feature, "grid": list(heat.shape),
                "values": heat.flatten().tolist(), "max": float(heat.max()), "stats": stats}

    def _image(self, q) -> bytes:
        run = self.store.get(q.get("run", ""))
        index = _int(q, "index", 0)
        if index >= len(run.images):
            raise Refused(404, f"the run has {len(run.images)} images")
        return run.images[index]

    async def runs(self, request: web.Request) -> web.Response:
        return await answer(self.store.list)

    async def heat(self, request: web.Request) -> web.Response:
        return await answer(self._heat, request.query)

    async def image(self, request: web.Request) -> web.StreamResponse:
        return await answer(self._image, request.query,
                            respond=lambda png: web.Response(body=png, content_type="image/png"))

    # -- labels --

    @staticmethod
    def _sae(name) -> tuple[str, int]:
        """(path, n_features) of an SAE of the SAE folders."""
        path, config = listed_sae(name, NODE)
        return path, config.n_features

    def _labels(self, q) -> dict:
        """An SAE's labels and their categories. An SAE that is not in models/sae (a shared workflow names one
        the user has not installed) is a normal state: no labels, `present: false`, not an HTTP error."""
        name = q.get("sae")
        if isinstance(name, str) and name and name not in available_saes():
            return {"sae": name, "present": False, "labels": {}, "categories": {}}
        path, n = self._sae(name)
        try:
            labels, categories = read_labels(path, n), read_categories(path, n)
        except LabelError as e:
            raise Refused(422, str(e)) from None
        return {"sae": name, "present": True, "labels": {str(f): t for f, t in labels.items()},
                "categories": {str(f): t for f, t in categories.items()}}

    def _set_label(self, body: dict) -> dict:
        path, n = self._sae(body.get("sae"))
        feature = body.get("feature")
        if not isinstance(feature, int) or isinstance(feature, bool):
            raise Refused(400, "feature is a whole number")
        try:
            labels = set_label(path, feature, body.get("label", ""), n)
        except LabelError as e:
            raise Refused(400, e.reason) from None
        return {"sae": body["sae"], "labels": {str(f): t for f, t in labels.items()}}

    def _import(self, body: dict) -> dict:
        path, n = self._sae(body.get("sae"))
        text, block = body.get("text"), body.get("block")
        if not isinstance(text, str) or not text.strip():
            raise Refused(400, "text holds the label set (JSON, JSON Lines or CSV)")
        if block is None:
            block = sae_header(path)[0].block
        elif not isinstance(block, str) or find_block(block) is None:
            raise Refused(400, "block names one block, e.g. 'down.2.1' (or leave it out: the SAE's own block)")
        try:
            found, total = import_label_set(path, text, n, block=block)
        except LabelError as e:
            raise Refused(400, f"text: {e.reason}") from None
        return {"sae": body["sae"], "imported": found, "labels": total}

    async def labels(self, request: web.Request) -> web.Response:
        return await answer(self._labels, request.query)

    async def set_label(self, request: web.Request) -> web.Response:
        return await posted(request, self._set_label)

    async def import_labels(self, request: web.Request) -> web.Response:
        return await posted(request, self._import, limit=MAX_LABEL_SET)
