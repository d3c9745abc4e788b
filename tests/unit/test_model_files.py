"""The quick start's downloader against a local HTTP server that behaves like Hugging Face's `resolve`
endpoint (size and hash in headers, a redirect for large files, Range requests, a connection that breaks)."""

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import model_files  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from fake_hub import LFS, Handler, serve  # noqa: E402
from model_files import DownloadError, download, missing_files, required_files  # noqa: E402

BIG = bytes(range(256)) * 4096 + b"tail"  # ~1 MB, served like an LFS file (sha256)
SMALL = b'{"n_dirs_local": 5120, "d_model": 1280, "k": 10}'  # served like a git file (blob sha1)


@pytest.fixture
def server():
    with serve({"/m/model.bin": BIG, "/m/config.json": SMALL, "/m/bad.bin": BIG}) as url:
        yield url


def test_downloads_and_verifies(server, tmp_path):
    dest = download(f"{server}/m/model.bin", tmp_path / "a" / "model.bin", progress=False)
    assert dest.read_bytes() == BIG
    dest = download(f"{server}/m/config.json", tmp_path / "config.json", progress=False)
    assert dest.read_bytes() == SMALL
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["config.json", "model.bin"]


def test_resumes_after_a_broken_connection(server, tmp_path):
    Handler.break_after["/m/model.bin"] = 300_000
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError, match="broke off|got"):
        download(f"{server}/m/model.bin", dest, progress=False, chunk=65536)
    part = tmp_path / "model.bin.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(BIG)
    have = part.stat().st_size
    download(f"{server}/m/model.bin", dest, progress=False)
    assert dest.read_bytes() == BIG and not part.exists()
    assert ("/cdn/m/model.bin", f"bytes={have}-") in Handler.requests


def test_wrong_hash_is_deleted_and_never_used(server, tmp_path):
    Handler.files["/m/bad.bin"] = BIG[:-4] + b"XXXX"  # same size, announced hash is of other bytes

    def lying_meta(self, path, orig=Handler._meta):
        meta = orig(self, path)
        if path == "/m/bad.bin":
            meta["X-Linked-ETag"] = f'"{hashlib.sha256(BIG).hexdigest()}"'
        return meta

    Handler._meta = lying_meta
    try:
        with pytest.raises(DownloadError, match="sha256 .* expected"):
            download(f"{server}/m/bad.bin", tmp_path / "bad.bin", progress=False)
    finally:
        Handler._meta = lying_meta.__defaults__[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_file_and_server(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(f"{server}/m/none.bin", tmp_path / "x", progress=False)
    with pytest.raises(DownloadError, match="cannot connect"):
        download("http://127.0.0.1:9/x.bin", tmp_path / "x", progress=False, timeout=5)


def test_required_files_say_where_each_goes(tmp_path):
    files = required_files(tmp_path, "http://h/ckpt.safetensors", "http://h/checkpoints")
    dests = {f.dest.relative_to(tmp_path).as_posix() for f in files}
    assert "checkpoints/sd_xl_turbo_1.0_fp16.safetensors" in dests
    assert "sae/unet.down_blocks.2.attentions.1_k10_hidden5120_auxk256_bs4096_lr0.0001/final/state_dict.pth" in dests
    assert len(files) == 1 + 4 * 4
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / model_files.CHECKPOINT_NAME).write_bytes(b"x")
    assert len(missing_files(files)) == 16


def test_flux_schnell_files_go_where_comfyui_loads_them(tmp_path):
    files = required_files(tmp_path, model="flux-schnell", hf="http://mirror")
    where = {f.dest.relative_to(tmp_path).as_posix(): f.url for f in files}
    assert where == {
        "diffusion_models/flux1-schnell.safetensors":
            "http://mirror/black-forest-labs/FLUX.1-schnell/resolve/main/flux1-schnell.safetensors",
        "text_encoders/clip_l.safetensors": "http://mirror/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
        "text_encoders/t5xxl_fp16.safetensors":
            "http://mirror/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
        "vae/ae.safetensors": "http://mirror/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors",
        "sae/SAE_flux_18/config.json": "http://mirror/antoniomari/SAE_flux_18/resolve/main/config.json",
        "sae/SAE_flux_18/state_dict.pth": "http://mirror/antoniomari/SAE_flux_18/resolve/main/state_dict.pth",
        "sae/SAE_flux_18/mean.pt": "http://mirror/antoniomari/SAE_flux_18/resolve/main/mean.pt",
    }
    base = {f.dest.relative_to(tmp_path).as_posix() for f in required_files(tmp_path, model="sdxl-base")}
    assert "checkpoints/sd_xl_base_1.0.safetensors" in base and len(base) == 1 + 4 * 4
    with pytest.raises(ValueError, match="unknown model 'flux-dev'"):
        required_files(tmp_path, model="flux-dev")


def test_quickstart_downloads_the_flux_files_verified(server, tmp_path):
    import subprocess

    models = tmp_path / "models"
    for f in required_files(models, model="flux-schnell", hf=server):
        Handler.files[f.url.removeprefix(server)] = BIG if f.dest.suffix in LFS else SMALL
    script = Path(__file__).resolve().parents[2] / "scripts" / "quickstart.py"
    args = [sys.executable, str(script), "--model", "flux-schnell", "--models-dir", str(models), "--hf-url", server,
            "--no-install", "--no-run"]
    missing = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and f"{models}/vae/ae.safetensors  <-  {server}/black-forest-labs" in missing.stderr
    got = subprocess.run(args + ["--download"], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    placed = {p.relative_to(models).as_posix(): p.read_bytes() for p in models.rglob("*") if p.is_file()}
    assert set(placed) == {"diffusion_models/flux1-schnell.safetensors", "text_encoders/clip_l.safetensors",
                           "text_encoders/t5xxl_fp16.safetensors", "vae/ae.safetensors", "sae/SAE_flux_18/config.json",
                           "sae/SAE_flux_18/state_dict.pth", "sae/SAE_flux_18/mean.pt"}
    assert placed["vae/ae.safetensors"] == BIG and placed["sae/SAE_flux_18/config.json"] == SMALL


def test_a_published_label_set_is_downloaded_verified_and_imported(server, tmp_path, capsys):
    import json

    import sae_models
    import import_labels
    from sae_models.labels import read_labels

    sae_path = tmp_path / "sae.safetensors"
    sae_models.save(sae_models.build(sae_models.SAEConfig(architecture="topk", d_in=8, n_features=16, k=2,
                                                          block="up.0.1")), sae_path)
    rows = [{"layer": "up.0.1", "feature_id": 3, "caption": "warm sunset light"},
            {"layer": "up.0.1", "feature_id": 5, "caption": "blue tones"},
            {"layer": "down.2.1", "feature_id": 3, "caption": "another block"}]
    Handler.files["/datasets/labels/resolve/main/up.jsonl"] = "\n".join(map(json.dumps, rows)).encode()
    url = f"{server}/datasets/labels/resolve/main/up.jsonl"
    local = tmp_path / "mine.csv"
    local.write_text("feature,label\n5,my own label\n7,kept\n")
    assert import_labels.main([str(sae_path), str(local)]) == 0
    assert import_labels.main([str(sae_path), url, "--cache", str(tmp_path / "cache")]) == 0
    assert read_labels(sae_path) == {3: "warm sunset light", 5: "blue tones", 7: "kept"}
    assert "imported 2 labels" in capsys.readouterr().out
    # a file whose hash does not match what the server states is not imported
    Handler.files["/datasets/labels/resolve/main/bad.jsonl"] = b'{"feature": 1, "label": "x"}'
    original_meta = Handler._meta
    Handler._meta = lambda self, path: {**original_meta(self, path), "ETag": '"' + "0" * 40 + '"'}
    try:
        assert import_labels.main([str(sae_path), f"{server}/datasets/labels/resolve/main/bad.jsonl",
                                   "--cache", str(tmp_path / "cache")]) == 1
    finally:
        Handler._meta = original_meta
    assert "error:" in capsys.readouterr().err and 1 not in read_labels(sae_path)


def test_a_file_larger_than_accepted_is_refused_and_nothing_kept(server, tmp_path):
    with pytest.raises(DownloadError, match="at most 1000 bytes"):
        download(f"{server}/m/model.bin", tmp_path / "model.bin", progress=False, max_bytes=1000)
    assert not any(tmp_path.iterdir())
    # a server that sends more than it stated is cut off at the bound, and the part is deleted
    Handler.files["/m/liar.json"] = SMALL * 100
    Handler.stated_size = {"/m/liar.json": len(SMALL)}
    try:
        with pytest.raises(DownloadError, match="more than the 100 bytes"):
            download(f"{server}/m/liar.json", tmp_path / "liar.json", progress=False, max_bytes=100, chunk=64)
    finally:
        Handler.stated_size = {}
    assert not any(tmp_path.iterdir())
