"""Fixtures shared by the in-process integration tests."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="session")
def pk(comfy_pack):
    """The pack's modules as ComfyUI imported them."""
    name = comfy_pack.module.__name__

    class P:
        patch = sys.modules[name + ".nodes.patch"]
        edits = sys.modules[name + ".nodes.edits"]
        handle = sys.modules[name + ".nodes.sae_handle"]
        sm = sys.modules[name + ".sae_models"]
        N = comfy_pack.node_class_mappings

    return P


@pytest.fixture(scope="session")
def model(tiny):
    return tiny.tiny_model(seed=0)
