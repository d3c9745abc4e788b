"""The model files the example workflows need, where they go, and the pack's resuming, verifying downloader
(`sae_models/download.py`, loaded by its path so that the quick start runs before torch is installed)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path



def _stdlib_module(name: str):
    """A stdlib-only module of sae_models, loaded without the package (whose import needs torch)."""
    spec = importlib.util.spec_from_file_location(
        f"_sae_unbox_{name}", Path(__file__).resolve().parents[1] / "sae_models" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_download, _releases = _stdlib_module("download"), _stdlib_module("releases")
DownloadError, download = _download.DownloadError, _download.download
expected_size_and_hash, file_digest = _download.expected_size_and_hash, _download.file_digest
PAPER_SAE_FOLDERS, FLUX_SAE_FOLDER = _releases.PAPER_SAE_FOLDERS, _releases.FLUX_SAE_FOLDER

HF = "https://huggingface.co"
CHECKPOINT_NAME = "sd_xl_turbo_1.0_fp16.safetensors"
CHECKPOINT_URL = f"{HF}/stabilityai/sdxl-turbo/resolve/main/{CHECKPOINT_NAME}"
# The paper's README points to its demo Space, which holds the four released SAEs under checkpoints/.
SAE_BASE_URL = f"{HF}/spaces/surokpro2/Unboxing_SDXL_with_SAEs/resolve/main/checkpoints"
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
FLUX_SAE_FILES = ("config.json", "state_dict.pth", "mean.pt")

MODELS = ("sdxl-turbo", "sdxl-base", "flux-schnell")
WORKFLOW_OF = {"sdxl-turbo": "explore", "sdxl-base": "sdxl_base_paint", "flux-schnell": "flux_explore"}  # keys of example_names


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


