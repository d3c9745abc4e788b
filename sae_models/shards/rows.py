"""One image's rows of one block as `ShardWriter.add_image` takes them: checked, converted to the dump's
dtype, and completed with the per-row columns (defaults, the image index and the block's grid)."""

from __future__ import annotations

import math

import torch

from ..blocks import find_block
from .layout import COLUMN_DEFAULTS, COLUMNS, NAME_RE, column_dtype, is_block_name
from .shard_files import parse_grid


def block_grid(block: str, spec: dict, record: dict, n: int, position) -> tuple[int, int]:
    """(H, W) of the block's feature map: `spec["grid"]`, else from the image size in the record, else from
    the positions (or the number of rows) of a square grid."""
    grid = spec.get("grid")
    if grid is not None:
        if isinstance(grid, str):
            grid = parse_grid(grid)
        h, w = (int(v) for v in grid)
        if h < 1 or w < 1:
            raise ValueError(f"block {block!r}: invalid grid {spec.get('grid')!r}")
        return h, w
    b = find_block(block)
    if b is not None and record.get("width") and record.get("height"):
        return b.grid(int(record["height"]) // 8, int(record["width"]) // 8)
    if position is not None and torch.is_tensor(position) and position.numel():
        side = math.isqrt(int(position.max()) + 1)
        if side * side == int(position.max()) + 1:
            return side, side
    side = math.isqrt(n)
    if position is None and side * side == n:
        return side, side
    raise ValueError(f"block {block!r}: give the feature map size as rows[{block!r}]['grid'] = (H, W)")


def prepare_rows(record: dict, block: str, spec: dict, image: int,
                 dtype: torch.dtype) -> tuple[int, int, list[str], dict[str, torch.Tensor]]:
    """(n rows, d_in, field names, tensors to store) of one image's rows of `block`; ValueError if they are
    malformed."""
    if not isinstance(spec, dict):
        raise ValueError(f"rows[{block!r}] must be a dict of tensors, got {type(spec).__name__}")
    if not is_block_name(block):
        raise ValueError(f"invalid block name {block!r}")
    fields, columns = {}, {}
    for key, value in spec.items():
        if key == "grid":
            continue
        if key == "image":
            raise ValueError(f"rows[{block!r}]: 'image' is filled in by the writer")
        if key in COLUMNS:
            columns[key] = value
        elif torch.is_tensor(value) and value.dim() == 2:
            if not NAME_RE.match(key):
                raise ValueError(f"rows[{block!r}]: invalid field name {key!r}")
            fields[key] = value
        else:
            raise ValueError(f"rows[{block!r}][{key!r}]: not a field tensor [n, d_in] nor a known column "
                             f"({', '.join(c for c in COLUMNS if c != 'image')})")
    if not fields:
        raise ValueError(f"rows[{block!r}] has no field tensor [n, d_in] (e.g. 'update')")
    shapes = {tuple(t.shape) for t in fields.values()}
    if len(shapes) != 1:
        raise ValueError(f"rows[{block!r}]: field tensors differ in shape: {sorted(shapes)}")
    n, d_in = shapes.pop()
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in fields.items()}
    for key, value in columns.items():
        t = torch.as_tensor(value).detach().to("cpu")
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"rows[{block!r}][{key!r}] has shape {tuple(t.shape)}, expected ({n},) or a scalar")
        columns[key] = t.to(column_dtype(key)).contiguous()
    gh, gw = block_grid(block, spec, record, n, columns.get("position"))
    if "position" not in columns:
        columns["position"] = torch.arange(n, dtype=torch.int64) % (gh * gw)
    elif n and (int(columns["position"].min()) < 0 or int(columns["position"].max()) >= gh * gw):
        raise ValueError(f"rows[{block!r}]['position'] outside the {gh}x{gw} grid")
    for key, default in COLUMN_DEFAULTS.items():
        if key not in columns:
            columns[key] = torch.full((n,), default, dtype=column_dtype(key))
    columns["image"] = torch.full((n,), image, dtype=torch.int64)
    columns["grid_h"] = torch.full((n,), gh, dtype=torch.int64)
    columns["grid_w"] = torch.full((n,), gw, dtype=torch.int64)
    out.update(columns)
    return n, d_in, list(fields), out
