"""Import a published set of feature labels into the labels file beside an SAE (`<sae>.labels.json`), where
the workbench panel, the feature browser, Top Features and the steer node show them.

    python scripts/import_labels.py models/sae/<SAE> labels.json [--block down.2.1]
    python scripts/import_labels.py models/sae/<SAE> https://huggingface.co/datasets/<repo>/resolve/main/<file>

The source is a local file or a URL; a URL is downloaded with the quick start's downloader (resumed after a
break, kept only when its size and hash match what the server states) into `--cache`. Formats: JSON, JSON
Lines or CSV, as `sae_models.labels.parse_label_set` reads them; when a set covers several SAEs, the rows
of `--block` (default: the SAE's own block) are taken. Imported labels replace those the file had for the
same features; other labels are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_files import DownloadError, download  # noqa: E402

import sae_models  # noqa: E402
from sae_models.errors import SAEError  # noqa: E402
from sae_models.labels import LabelError, import_label_set, labels_path  # noqa: E402

DEFAULT_CACHE = Path.home() / ".cache" / "comfyui-sae" / "labels"


def source_text(source: str, cache: Path, progress: bool = True) -> str:
    """The text of a label set: a local file, or a URL downloaded (verified) into `cache`."""
    url = urlparse(source)
    if url.scheme in ("http", "https"):
        name = Path(unquote(url.path)).name or "labels"
        path = download(source, cache / url.netloc / name, progress=progress)
    else:
        path = Path(source)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(str(path), f"cannot be read as UTF-8 text ({e})") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sae", help="the SAE file or folder (e.g. models/sae/<name>)")
    ap.add_argument("source", help="a label set: a local file or an http(s) URL")
    ap.add_argument("--block", help="take the rows of this block (default: the SAE's block)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where downloaded label sets are kept")
    args = ap.parse_args(argv)
    try:
        config = sae_models.load(args.sae).config
        text = source_text(args.source, args.cache)
        found, total = import_label_set(args.sae, text, config.n_features, block=args.block or config.block)
    except (SAEError, LabelError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"imported {found} labels into {labels_path(args.sae)} ({total} labels in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
