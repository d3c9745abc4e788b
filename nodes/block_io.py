"""How the patch reads a block's input and output as a grid of image positions `[B, h, w, C]`, and writes an
edited output back, for each kind of block (`sae_models.blocks`):

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
from einops import rearrange


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
    return rearrange(tokens, "b (h w) c -> b h w c", h=layout.h, w=layout.w)


class SpatialIO:
    needs_copy = False

    @staticmethod
    def capture(args, kwargs, layout):
        return None

    @staticmethod
    def grids(saved, args, kwargs, output, layout):
        x_in = args[0] if args else kwargs["x"]
        return rearrange(x_in, "b c h w -> b h w c"), rearrange(output, "b c h w -> b h w c")

    @staticmethod
    def write(output, delta, layout):
        return output + rearrange(delta, "b h w c -> b c h w").to(output.dtype)


class DoubleIO:
    needs_copy = True

    @staticmethod
    def capture(args, kwargs, layout):
        return kwargs["img"][:, : layout.h * layout.w].clone()

    @staticmethod
    def grids(saved, args, kwargs, output, layout):
        return _grid(saved, layout), _grid(output[0][:, : layout.h * layout.w], layout)

    @staticmethod
    def write(output, delta, layout):
        img, txt = output[0], output[1]
        n = layout.h * layout.w
        edited = img[:, :n] + rearrange(delta, "b h w c -> b (h w) c").to(img.dtype)
        return (torch.cat([edited, img[:, n:]], dim=1), txt, *output[2:])


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
        return _grid(saved, layout), _grid(output[:, cls._span(layout)], layout)

    @classmethod
    def write(cls, output, delta, layout):
        span = cls._span(layout)
        edited = output[:, span] + rearrange(delta, "b h w c -> b (h w) c").to(output.dtype)
        return torch.cat([output[:, : span.start], edited, output[:, span.stop:]], dim=1)


IO_BY_KIND = {"spatial": SpatialIO, "double": DoubleIO, "single": SingleIO}
