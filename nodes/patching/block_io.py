"""How the patch reads a block's input and output as a grid of image positions `[B, h, w, C]` for each kind of
block (`sae_models.blocks`); the output's grid is a view into the block's output, which edits write in place:

- `spatial` (SDXL's SpatialTransformer): `[B, C, H, W]` in and out; the grid is the tensor itself.
- `double` (FLUX double-stream): called with keywords `img`, `txt`, ...; returns `(img, txt)`. The image
  stream's first `h * w` tokens are the image's patches in row-major order (reference-image tokens of
  Kontext-style models follow them and are left alone).
- `single` (FLUX single-stream): called with the text tokens followed by the image tokens; the image's
  `h * w` tokens start after the call's own text length.

ComfyUI's FLUX blocks add to their input in place (v0.8.0 returns the very tensor it was given), so the
input's image tokens are copied by a forward pre-hook before the block runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Where one call's image tokens are: the grid `(h, w)` of FLUX's 2x2 patches and the text length."""

    h: int = 0
    w: int = 0
    n_txt: int = 0

    @classmethod
    def of_call(cls, diffusion_model, x: torch.Tensor, context) -> "Layout":
        patch = getattr(diffusion_model, "patch_size", None)
        if not isinstance(patch, int) or x.dim() != 4:
            return cls()
        n_txt = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.dim() == 3 else 0
        return cls(-(-x.shape[2] // patch), -(-x.shape[3] // patch), n_txt)


def _grid(tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Tokens `[B, h*w, C]` (a slice of a longer sequence) as a grid `[B, h, w, C]`: a view, so that writing into
    the grid writes into the tokens (`.view` refuses where a copy would be needed)."""
    return tokens.view(tokens.shape[0], layout.h, layout.w, tokens.shape[2])


def _grid_or_none(saved: torch.Tensor | None, layout: Layout) -> torch.Tensor | None:
    return None if saved is None else _grid(saved, layout)


class SpatialIO:
    needs_copy = False

    @staticmethod
    def capture(args, kwargs, layout):
        return None

    @staticmethod
    def grids(saved, args, kwargs, output, layout):
        x_in = args[0] if args else kwargs["x"]
        return x_in.permute(0, 2, 3, 1), output.permute(0, 2, 3, 1)


class DoubleIO:
    needs_copy = True

    @staticmethod
    def capture(args, kwargs, layout):
        return kwargs["img"][:, : layout.h * layout.w].clone()

    @staticmethod
    def grids(saved, args, kwargs, output, layout):
        return _grid_or_none(saved, layout), _grid(output[0][:, : layout.h * layout.w], layout)


class SingleIO:
    needs_copy = True

    @staticmethod
    def _span(layout) -> slice:
        return slice(layout.n_txt, layout.n_txt + layout.h * layout.w)

    @classmethod
    def capture(cls, args, kwargs, layout):
        x = args[0] if args else kwargs["x"]
        return x[:, cls._span(layout)].clone()

    @classmethod
    def grids(cls, saved, args, kwargs, output, layout):
        return _grid_or_none(saved, layout), _grid(output[:, cls._span(layout)], layout)


IO_BY_KIND = {"spatial": SpatialIO, "double": DoubleIO, "single": SingleIO}
