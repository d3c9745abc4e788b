"""Helpers shared by the readers: config integers, opening safetensors files, the block an SAE reads, and the
native format's atomic save."""

import pytest
import torch
from safetensors.torch import save_file

import sae_models
from sae_models import SAEConfig, SAEFormatError, build
from sae_models.formats.common import block_of, load_safetensors, open_safetensors, positive_int


def test_positive_int_accepts_integers_and_names_the_key():
    assert positive_int("cfg.json", {"k": 10}, "k") == 10
    assert positive_int("cfg.json", {"k": 10.0}, "k") == 10
    with pytest.raises(SAEFormatError, match="cfg.json: missing config key 'k'"):
        positive_int("cfg.json", {}, "k")
    with pytest.raises(SAEFormatError, match="missing config key 'k'"):
        positive_int("cfg.json", {"k": None}, "k")
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(SAEFormatError, match=f"config key 'k' must be a positive integer, not {bad!r}"):
            positive_int("cfg.json", {"k": bad}, "k")
    with pytest.raises(SAEFormatError, match="missing config key 'trainer.dict_size'"):
        positive_int("config.json", {}, "dict_size", prefix="trainer.")
    with pytest.raises(SAEFormatError, match="config key 'trainer.k' must be a positive integer"):
        positive_int("config.json", {"k": 0}, "k", prefix="trainer.")


def test_open_safetensors_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(2)}, str(good), metadata={"x": "y"})
    tensors, meta = load_safetensors(good, select=lambda name: name == "a")
    assert list(tensors) == ["a"] and meta == {"x": "y"}
    with pytest.raises(SAEFormatError, match="missing.safetensors: file not found"):
        load_safetensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(SAEFormatError, match=r"bad.safetensors: corrupt or truncated safetensors file \(.+\)"):
        load_safetensors(bad)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(SAEFormatError, match="cut.safetensors: corrupt or truncated"):
        load_safetensors(cut)

    class Other(ValueError):
        def __init__(self, path, message):
            super().__init__(f"{path}| {message}")

    with pytest.raises(Other, match=r"bad.safetensors\| broken \("):
        with open_safetensors(bad, error=Other, missing="gone", corrupt="broken"):
            pass
    with pytest.raises(Other, match=r"missing.safetensors\| gone"):
        with open_safetensors(tmp_path / "missing.safetensors", error=Other, missing="gone", corrupt="broken"):
            pass


def test_block_of_prefers_the_hint_then_the_folder_path(tmp_path):
    folder = tmp_path / "unet.up_blocks.0.attentions.1_k10" / "unet.down_blocks.2.attentions.1"
    folder.mkdir(parents=True)
    assert block_of(folder, "diffusion_model.middle_block.1") == "mid.0"
    assert block_of(folder, "not a block") == "up.0.1"  # the first block named in the path
    assert block_of(folder, {"hook": "x"}) == "up.0.1"  # a hint that is not a string is ignored
    assert block_of(folder, folder.name) == "down.2.1"  # sparsify's hint: the hookpoint folder's own name
    assert block_of(tmp_path) is None


def test_native_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    sae = build(SAEConfig(architecture="topk", d_in=4, n_features=8, k=2))
    path = sae_models.save(sae, tmp_path / "sub" / "a.safetensors")
    before = path.read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.safetensors"]

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        sae_models.save(sae, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["a.safetensors"]
