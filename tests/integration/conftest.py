"""Fixtures shared by the in-process integration tests."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="session")
def pk(comfy_pack):
    """The pack's modules as ComfyUI imported them."""
    name = comfy_pack.module.__name__

    class P:
        patch = sys.modules[name + ".nodes.patching"]  # the patching engine (its package exports all of it)
        edits = patch
        inputs = sys.modules[name + ".nodes.inputs"]
        render = sys.modules[name + ".nodes.render"]
        paths = sys.modules[name + ".nodes.paths"]
        handle = sys.modules[name + ".nodes.sae_handle"]
        sm = sys.modules[name + ".sae_models"]
        N = comfy_pack.node_class_mappings

    return P


@pytest.fixture(scope="session")
def model(tiny):
    return tiny.tiny_model(seed=0)


def _fresh_folder(tmp_path, monkeypatch, name: str):
    """A new empty folder `tmp_path/name` that ComfyUI's `folder_paths.<name>_directory` points at."""
    import folder_paths

    folder = tmp_path / name
    folder.mkdir()
    monkeypatch.setattr(folder_paths, f"{name}_directory", str(folder))
    return folder


@pytest.fixture
def output_dir(comfyui_path, tmp_path, monkeypatch):
    """ComfyUI's output folder, pointed at a fresh temporary folder for one test."""
    return _fresh_folder(tmp_path, monkeypatch, "output")


@pytest.fixture
def input_dir(comfyui_path, tmp_path, monkeypatch):
    """ComfyUI's input folder, pointed at a fresh temporary folder for one test."""
    return _fresh_folder(tmp_path, monkeypatch, "input")
