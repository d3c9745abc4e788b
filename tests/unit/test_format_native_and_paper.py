"""Native format round trip, the paper's release layout, format detection and every error case."""

import json
import os
from pathlib import Path

import pytest
import torch

import sae_models
from sae_models import FeatureStats, SAEConfig, SAEFormatError, UnsafePickleError, build

RELEASE = Path(os.environ.get("SAE_PAPER_RELEASE", Path(__file__).resolve().parents[3] / "shared" / "paper-release"))
DOWN_2_1 = "unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001"


def random_sae(arch="topk", d=16, n=48, k=4, dtype=torch.float32, **kw):
    sae = build(SAEConfig(architecture=arch, d_in=d, n_features=n, k=k, block="up.0.1", **kw), dtype=dtype)
    with torch.no_grad():
        for p in list(sae.parameters()) + list(sae.buffers()):
            p.copy_(torch.randn(p.shape))
    sae.stats = FeatureStats(mean=torch.rand(n), frequency=torch.rand(n), std=torch.rand(n), n_vectors=1234)
    return sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_round_trip_is_bit_exact(tmp_path, arch, dtype):
    sae = random_sae(arch, dtype=dtype)
    path = sae_models.save(sae, tmp_path / "a.safetensors")
    back = sae_models.load(path)
    assert type(back) is type(sae) and back.config == sae.config
    for (name, a), (_, b) in zip(sae.state_dict().items(), back.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for s in ("mean", "frequency", "std"):
        assert torch.equal(getattr(sae.stats, s), getattr(back.stats, s))
    assert back.stats.n_vectors == 1234
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


def test_native_metadata_is_plain_json(tmp_path):
    from safetensors import safe_open

    path = sae_models.save(random_sae(), tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "comfyui-sae" and meta["format_version"] == "1"
    cfg = json.loads(meta["config"])
    assert cfg["block"] == "up.0.1" and cfg["block_comfy"] == "output_blocks.1.1"
    assert keys == {"W_enc", "b_enc", "W_dec", "b_dec", "stats.mean", "stats.frequency", "stats.std"}


def write_paper_folder(root: Path, n=48, d=16, k=4, name=DOWN_2_1, stats=True):
    folder = root / name / "final"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"n_dirs_local": n, "d_model": d, "k": k, "auxk": 256, "dead_steps_threshold": 2441})
    )
    sd = {
        "encoder.weight": torch.randn(n, d),
        "decoder.weight": torch.randn(d, n),
        "pre_bias": torch.randn(d),
        "latent_bias": torch.randn(n),
        "stats_last_nonzero": torch.zeros(n, dtype=torch.int64),
    }
    torch.save({"state_dict": sd}, folder / "state_dict.pth")
    if stats:
        torch.save(torch.rand(n), folder / "mean.pt")
        torch.save(torch.rand(n), folder / "std.pt")
    return folder, sd


def test_paper_folder_matches_the_papers_math(tmp_path):
    folder, sd = write_paper_folder(tmp_path)
    for target in (folder, folder.parent, folder / "state_dict.pth"):
        sae = sae_models.load(target)
        assert sae_models.detect(target)[0] == "paper"
    c = sae.config
    assert (c.architecture, c.k, c.d_in, c.n_features, c.block, c.hook) == ("topk", 4, 16, 48, "down.2.1", "update")
    assert c.block_comfy == "input_blocks.8.1"
    x = torch.randn(30, 16)
    # the paper's SparseAutoencoder: latents = ReLU(TopK(encoder(x - pre_bias) + latent_bias)),
    # recons = decoder(latents) + pre_bias, with nn.Linear weights as stored
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    vals, idx = pre.topk(4, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    assert torch.allclose(sae.encode(x), z, atol=1e-5)
    assert torch.allclose(sae(x), z @ sd["decoder.weight"].T + sd["pre_bias"], atol=1e-4)
    assert torch.equal(sae.stats.mean, torch.load(folder / "mean.pt"))


@pytest.mark.skipif(not RELEASE.is_dir(), reason=f"the paper's release files are not at {RELEASE}")
def test_the_papers_released_files(tmp_path):
    """The real config.json / mean.pt / std.pt of the paper's four SAEs, with random weights in the
    documented state_dict layout (the release's weights are not available here)."""
    expected = {"down.2.1", "mid.0", "up.0.0", "up.0.1"}
    seen = set()
    for release_dir in sorted(RELEASE.iterdir()):
        if not (release_dir / "final" / "config.json").is_file():
            continue
        folder = tmp_path / release_dir.name / "final"
        folder.mkdir(parents=True)
        for f in ("config.json", "mean.pt", "std.pt"):
            (folder / f).symlink_to(release_dir / "final" / f)
        cfg = json.loads((folder / "config.json").read_text())
        n, d = cfg["n_dirs_local"], cfg["d_model"]
        torch.save(
            {"state_dict": {"encoder.weight": torch.randn(n, d), "decoder.weight": torch.randn(d, n),
                            "pre_bias": torch.zeros(d), "latent_bias": torch.zeros(n),
                            "stats_last_nonzero": torch.zeros(n, dtype=torch.int64)}},
            folder / "state_dict.pth",
        )
        sae = sae_models.load(folder.parent)
        assert (sae.d_in, sae.n_features, sae.config.k) == (1280, 5120, 10)
        assert sae.config.hyperparameters == {"auxk": 256, "dead_steps_threshold": 2441}
        mean = torch.load(release_dir / "final" / "mean.pt", map_location="cpu", weights_only=True)
        assert torch.equal(sae.stats.mean, mean) and sae.stats.std is not None
        assert (sae.stats.mean >= 0).all()
        seen.add(sae.config.block)
        if sae.config.block == "down.2.1":
            out = tmp_path / "conv.safetensors"
            sae_models.save(sae, out)
            assert torch.equal(sae_models.load(out).stats.mean, mean)
    assert seen == expected


# ---- errors -------------------------------------------------------------------------------------

def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(SAEFormatError, match="no such file"):
        sae_models.load(tmp_path / "nope")
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(SAEFormatError, match="junk.txt.*unknown SAE file"):
        sae_models.load(tmp_path / "junk.txt")
    with pytest.raises(SAEFormatError, match="unknown SAE folder layout"):
        sae_models.load(tmp_path)


def test_truncated_and_corrupt_native_files(tmp_path):
    path = sae_models.save(random_sae(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="trunc.safetensors.*(corrupt|truncated)"):
        sae_models.load(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a file" * 10)
    with pytest.raises(SAEFormatError, match="garbage.safetensors"):
        sae_models.load(tmp_path / "garbage.safetensors")


def test_plain_safetensors_without_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"W_enc": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(SAEFormatError, match="x.safetensors.*without comfyui-sae metadata"):
        sae_models.load(tmp_path / "x.safetensors")


def test_native_missing_tensor_and_contradicting_config(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = sae_models.save(random_sae(), tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    del tensors["b_dec"]
    save_file(tensors, tmp_path / "missing.safetensors", metadata=meta)
    with pytest.raises(SAEFormatError, match="missing.safetensors.*missing tensor 'b_dec'"):
        sae_models.load(tmp_path / "missing.safetensors")
    cfg = json.loads(meta["config"])
    cfg["d_in"] = 17
    save_file(load_file(path), tmp_path / "shape.safetensors", metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(SAEFormatError, match=r"shape.safetensors.*W_enc.*\[48, 16\].*\[48, 17\]"):
        sae_models.load(tmp_path / "shape.safetensors")


def test_paper_errors(tmp_path):
    folder, sd = write_paper_folder(tmp_path / "a")
    (folder / "config.json").write_text(json.dumps({"n_dirs_local": 48, "d_model": 20, "k": 4}))
    with pytest.raises(SAEFormatError, match=r"state_dict.pth.*encoder.weight.*\[48, 16\]"):
        sae_models.load(folder)
    folder, sd = write_paper_folder(tmp_path / "b")
    del sd["pre_bias"]
    torch.save({"state_dict": sd}, folder / "state_dict.pth")
    with pytest.raises(SAEFormatError, match="state_dict.pth.*missing tensor 'pre_bias'"):
        sae_models.load(folder)
    folder, _ = write_paper_folder(tmp_path / "c")
    data = (folder / "state_dict.pth").read_bytes()
    (folder / "state_dict.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(SAEFormatError, match="state_dict.pth.*(corrupt|truncated)"):
        sae_models.load(folder)
    folder, _ = write_paper_folder(tmp_path / "d")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="config.json.*not valid JSON"):
        sae_models.load(folder)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    folder, sd = write_paper_folder(tmp_path)
    _Evil.marker = tmp_path / "pwned"
    torch.save({"state_dict": sd, "payload": _Evil()}, folder / "state_dict.pth")
    with pytest.raises(UnsafePickleError, match="state_dict.pth.*refused"):
        sae_models.load(folder)
    assert not _Evil.marker.exists()


def test_refuses_unsafe_stats_pickle(tmp_path):
    folder, _ = write_paper_folder(tmp_path)
    _Evil.marker = tmp_path / "pwned2"
    torch.save(_Evil(), folder / "mean.pt")
    with pytest.raises(UnsafePickleError, match="mean.pt"):
        sae_models.load(folder)
    assert not _Evil.marker.exists()


def test_cli_info_and_convert(tmp_path, capsys):
    from sae_models.__main__ import main

    folder, _ = write_paper_folder(tmp_path)
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "paper" and info["block"] == "down.2.1" and info["k"] == 4
    assert info["statistics"] == ["mean", "std"]
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(folder), str(dst)]) == 0
    assert sae_models.detect(dst)[0] == "native"
    # the paper's SAE as a SAELens folder: read back, the same reconstructions
    assert main(["convert", str(folder), str(tmp_path / "as_saelens"), "--to", "saelens"]) == 0
    assert sae_models.detect(tmp_path / "as_saelens")[0] == "saelens"
    x = torch.randn(8, sae_models.load(dst).d_in)
    assert torch.allclose(sae_models.load(tmp_path / "as_saelens")(x), sae_models.load(dst)(x), atol=1e-5)
    assert main(["convert", str(folder), str(tmp_path / "as_saelens"), "--to", "saelens"]) == 2  # not overwritten
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def write_flux_release(folder: Path, n=96, d=24, k=20):
    """The paper's FLUX SAE as its model repo holds it: config.json, state_dict.pth ({"state_dict": ...}) and
    mean.pt at the root, no std.pt."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"n_dirs_local": n, "d_model": d, "k": k, "auxk": 256,
                                                    "dead_steps_threshold": 2441}))
    sd = {"encoder.weight": torch.randn(n, d), "decoder.weight": torch.randn(d, n), "pre_bias": torch.randn(d),
          "latent_bias": torch.randn(n), "stats_last_nonzero": torch.zeros(n, dtype=torch.int64)}
    torch.save({"state_dict": sd}, folder / "state_dict.pth")
    torch.save(torch.rand(n) * 10, folder / "mean.pt")
    return sd


def test_the_papers_flux_release_at_a_repos_root(tmp_path):
    sd = write_flux_release(tmp_path / "SAE_flux_18")
    sae = sae_models.load(tmp_path / "SAE_flux_18")
    c = sae.config
    assert (c.block, c.block_arch, c.block_comfy, c.k, c.n_features, c.base_model) == (
        "double.18", "flux", "double_blocks.18", 20, 96, "flux.1")
    assert sae.stats.std is None and torch.equal(sae.stats.mean, torch.load(tmp_path / "SAE_flux_18" / "mean.pt"))
    x = torch.randn(10, 24)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    vals, idx = pre.topk(20, dim=-1)
    assert torch.allclose(sae.encode(x), torch.zeros_like(pre).scatter(-1, idx, vals.relu()), atol=1e-5)


def test_the_papers_flux_training_folder_and_a_block_given_by_hand(tmp_path):
    write_flux_release(tmp_path / "transformer.transformer_blocks.18_k20_hidden12288_auxk256_bs4096_lr0.0001" / "final")
    assert sae_models.load(tmp_path / "transformer.transformer_blocks.18_k20_hidden12288_auxk256_bs4096_lr0.0001"
                           ).config.block == "double.18"
    write_flux_release(tmp_path / "downloaded")
    assert sae_models.load(tmp_path / "downloaded").config.block is None  # nothing names it
    sae = sae_models.load(tmp_path / "downloaded", block="single.4")
    assert (sae.config.block, sae.config.base_model) == ("single.4", "flux.1")
    with pytest.raises(SAEFormatError, match="unknown block 'double.99'"):
        sae_models.load(tmp_path / "downloaded", block="double.99")


def test_cli_names_the_block_of_an_sae_whose_files_do_not(tmp_path, capsys):
    from sae_models.__main__ import main

    write_flux_release(tmp_path / "downloaded")
    assert main(["convert", str(tmp_path / "downloaded"), str(tmp_path / "flux.safetensors"), "--block", "double.18"]) == 0
    assert main(["info", str(tmp_path / "flux.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert (info["block"], info["block_arch"], info["block_comfy"], info["stream"]) == (
        "double.18", "flux", "double_blocks.18", "image")
