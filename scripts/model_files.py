"""The model files the example workflows need, where they go, and a resuming, verifying downloader.

Hugging Face answers a `resolve` URL with the file's size and hash in its headers (`X-Linked-Size` and
`X-Linked-ETag` = sha256 for files stored with git LFS; `ETag` = the git blob sha1 for small files).
A download goes to `<file>.part`, resumes from there with an HTTP Range request after a break, and is
renamed into place only when its size and hash match.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HF = "https://huggingface.co"
CHECKPOINT_NAME = "sd_xl_turbo_1.0_fp16.safetensors"
CHECKPOINT_URL = f"{HF}/stabilityai/sdxl-turbo/resolve/main/{CHECKPOINT_NAME}"
# The paper's README points to its demo Space, which holds the four released SAEs under checkpoints/.
SAE_BASE_URL = f"{HF}/spaces/surokpro2/Unboxing_SDXL_with_SAEs/resolve/main/checkpoints"
RELEASE = "unet.{}_k10_hidden5120_auxk256_bs4096_lr0.0001"
PAPER_SAE_FOLDERS = {
    "down.2.1": RELEASE.format("down_blocks.2.attentions.1"),
    "mid.0": RELEASE.format("mid_block.attentions.0"),
    "up.0.0": RELEASE.format("up_blocks.0.attentions.0"),
    "up.0.1": RELEASE.format("up_blocks.0.attentions.1"),
}
SAE_FILES = ("config.json", "state_dict.pth", "mean.pt", "std.pt")

# SDXL base (the paper's later code paints on it with the Turbo SAEs, which transfer).
SDXL_BASE_NAME = "sd_xl_base_1.0.safetensors"
SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
# FLUX.1-schnell as ComfyUI loads it (UNETLoader, DualCLIPLoader type flux, VAELoader), and the paper's FLUX
# SAE (double-stream block 18, 12288 features, k 20): the files at the root of its model repo.
FLUX_FILES = {  # place under models/ -> (repo, file in the repo)
    "diffusion_models/flux1-schnell.safetensors": ("black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors"),
    "text_encoders/clip_l.safetensors": ("comfyanonymous/flux_text_encoders", "clip_l.safetensors"),
    "text_encoders/t5xxl_fp16.safetensors": ("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors"),
    "vae/ae.safetensors": ("black-forest-labs/FLUX.1-schnell", "ae.safetensors"),
}
FLUX_SAE_REPO = "antoniomari/SAE_flux_18"
FLUX_SAE_FOLDER = "SAE_flux_18"  # the folder name tells the reader the block (double.18)
FLUX_SAE_FILES = ("config.json", "state_dict.pth", "mean.pt")

MODELS = ("sdxl-turbo", "sdxl-base", "flux-schnell")
WORKFLOW_OF = {"sdxl-turbo": "explore.json", "sdxl-base": "sdxl_base_paint.json", "flux-schnell": "flux_explore.json"}


class DownloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelFile:
    url: str
    dest: Path  # where ComfyUI looks for it

    def describe(self) -> str:
        return f"{self.dest}  <-  {self.url}"


def required_files(models_dir: Path, checkpoint_url: str = CHECKPOINT_URL, sae_base_url: str = SAE_BASE_URL, *,
                   model: str = "sdxl-turbo", hf: str = HF) -> list[ModelFile]:
    """Every file `model`'s example workflow needs, with its source URL and its place under `models_dir`.
    `checkpoint_url`/`sae_base_url` point SDXL Turbo's checkpoint and the paper's SDXL SAEs elsewhere; `hf`
    replaces Hugging Face for the other files (a mirror holding the same repos)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    files = []
    if model == "sdxl-turbo":
        files.append(ModelFile(checkpoint_url, models_dir / "checkpoints" / CHECKPOINT_NAME))
    if model == "sdxl-base":
        files.append(ModelFile(f"{hf}/{SDXL_BASE_REPO}/resolve/main/{SDXL_BASE_NAME}",
                               models_dir / "checkpoints" / SDXL_BASE_NAME))
    if model in ("sdxl-turbo", "sdxl-base"):
        for folder in PAPER_SAE_FOLDERS.values():
            for name in SAE_FILES:
                files.append(ModelFile(f"{sae_base_url}/{folder}/final/{name}",
                                       models_dir / "sae" / folder / "final" / name))
    else:
        for place, (repo, name) in FLUX_FILES.items():
            files.append(ModelFile(f"{hf}/{repo}/resolve/main/{name}", models_dir / place))
        for name in FLUX_SAE_FILES:
            files.append(ModelFile(f"{hf}/{FLUX_SAE_REPO}/resolve/main/{name}", models_dir / "sae" / FLUX_SAE_FOLDER / name))
    return files


def missing_files(files) -> list[ModelFile]:
    return [f for f in files if not f.dest.is_file()]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def expected_size_and_hash(url: str, timeout: float = 30) -> tuple[int | None, str | None, str | None]:
    """(size, hash algorithm, hex digest) announced by the server for `url`, without downloading it."""
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"})
    try:
        resp = opener.open(req, timeout=timeout)
        headers = resp.headers
    except urllib.error.HTTPError as e:  # a 3xx redirect lands here, with the headers we want
        if e.code >= 400:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        headers = e.headers
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: cannot connect ({e.reason})") from None
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    linked = (headers.get("X-Linked-ETag") or "").strip('W/"')
    etag = (headers.get("ETag") or "").strip('W/"')
    if re.fullmatch(r"[0-9a-f]{64}", linked):
        return (int(size) if size else None), "sha256", linked
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        return (int(size) if size else None), "git-sha1", etag
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return (int(size) if size else None), "sha256", etag
    return (int(size) if size else None), None, None


def file_digest(path: Path, algorithm: str) -> str:
    if algorithm == "git-sha1":  # git's blob id: sha1 of "blob <size>\0" + content
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress(name: str, done: int, total: int | None, started: float, out=sys.stderr):
    rate = done / max(time.monotonic() - started, 1e-6)
    if total:
        filled = int(30 * done / total)
        out.write(f"\r{name[:40]:<40} [{'#' * filled}{'.' * (30 - filled)}] {done / total:6.1%} "
                  f"{done / 1e6:8.1f}/{total / 1e6:.1f} MB {rate / 1e6:6.1f} MB/s")
    else:
        out.write(f"\r{name[:40]:<40} {done / 1e6:8.1f} MB {rate / 1e6:6.1f} MB/s")
    out.flush()


def download(url: str, dest: Path, *, progress: bool = True, timeout: float = 60, chunk: int = 1 << 20) -> Path:
    """Download `url` to `dest`, resuming `dest.part`; verify size and hash before renaming into place."""
    dest = Path(dest)
    size, algorithm, digest = expected_size_and_hash(url, timeout)
    if algorithm is None:
        raise DownloadError(f"{url}: the server gives no hash for this file, so it cannot be verified; not downloaded")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is None or have < size:
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and size is not None and have == size:
                resp = None
            else:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise DownloadError(f"{url}: cannot connect ({e.reason})") from None
        if resp is not None:
            mode = "ab" if have and resp.status == 206 else "wb"
            done = have if mode == "ab" else 0
            started = time.monotonic()
            try:
                with resp, open(part, mode) as f:
                    while True:
                        block = resp.read(chunk)
                        if not block:
                            break
                        f.write(block)
                        done += len(block)
                        if progress:
                            _progress(dest.name, done, size, started)
            except (OSError, urllib.error.URLError) as e:
                if progress:
                    sys.stderr.write("\n")
                raise DownloadError(
                    f"{url}: the download broke off after {done} bytes ({e}); run again to resume from {part}"
                ) from None
            if progress:
                sys.stderr.write("\n")
    got = part.stat().st_size
    if size is not None and got != size:
        raise DownloadError(f"{url}: got {got} bytes, expected {size}; run again to resume from {part}")
    actual = file_digest(part, algorithm)
    if actual != digest:
        part.unlink()
        raise DownloadError(f"{url}: {algorithm} of the download is {actual}, expected {digest}; the file was deleted")
    os.replace(part, dest)
    return dest
