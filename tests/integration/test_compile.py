"""A compiled MODEL (ComfyUI's TorchCompileModel) with the pack's edits: every edit takes effect.

TorchCompileModel (v0.8.0) compiles the diffusion model with a guard filter that ignores `transformer_options`
(where the pack's wrapper and its per-run step clock live), and a CUDA-graph backend replays captured kernels
without running Python hooks; either can run a patched MODEL without its edits. The pack samples a patched
MODEL uncompiled (one log line), and these tests check the result is exactly the eager one. They compile with
Dynamo's `eager` backend (the same tracing and guards as `inductor`, without generating C++ on this machine)
through ComfyUI's own `set_torch_compile_wrapper`, as TorchCompileModel does.
"""

from __future__ import annotations

import logging

import pytest
import torch

from test_patching import make_sae, sample, steer


def compiled(model):
    """As TorchCompileModel compiles (with its guard filter where the ComfyUI version has one), with Dynamo's
    eager backend."""
    import comfy_extras.nodes_torch_compile as node
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    m = model.clone()
    guard_filter = getattr(node, "skip_torch_compile_dict", None)  # v0.8.0; v0.3.64 has none
    set_torch_compile_wrapper(model=m, backend="eager",
                              options={"guard_filter_fn": guard_filter} if guard_filter else None)
    return m


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiling_before_the_pack_keeps_every_edit(pk, tiny, model, caplog):
    h = make_sae(pk)
    base = compiled(model)
    plain = sample(tiny, base)  # compiles the plain model's graph
    assert torch.equal(plain, sample(tiny, model))
    with caplog.at_level(logging.WARNING):
        out = sample(tiny, steer(pk, base, h, "3", 4.0))
    assert torch.equal(out, sample(tiny, steer(pk, model, h, "3", 4.0)))
    assert not torch.equal(out, plain)
    assert any("samples uncompiled while the pack's probes, edits or dumps are on it" in r.getMessage()
               for r in caplog.records)


def test_compiling_after_the_pack_keeps_every_edit(pk, tiny, model):
    h = make_sae(pk)
    sample(tiny, compiled(model))  # a plain graph in Dynamo's cache
    out = sample(tiny, compiled(steer(pk, model, h, "3", 4.0, mode="ablate")))
    assert torch.equal(out, sample(tiny, steer(pk, model, h, "3", 4.0, mode="ablate")))
