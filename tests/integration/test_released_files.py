"""What the paper published beside its SAEs, fetched on demand through a real server's routes from a local
HTTP server on 127.0.0.1 that stands in for Hugging Face (`HF_ENDPOINT`): each feature's top image in the
paper's demo's layout, and the block's label set with categories. Files are verified (size, hash, a JPEG),
kept only under models/sae/.released, fetched once; an absent file, a bad file and an offline hub are
answered with a message, not an HTTP error, and leave nothing behind."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from fake_hub import Handler, serve  # noqa: E402
from paper_release import write_flux_release, write_paper_release  # noqa: E402

from sae_models.releases import FLUX_SAE_FOLDER, PAPER_SAE_FOLDERS, recognise  # noqa: E402

DOWN = PAPER_SAE_FOLDERS["down.2.1"]
UP = PAPER_SAE_FOLDERS["up.0.1"]
SDXL_IMAGES = "/surokpro2/sdxl_sae_images/resolve/main"
FLUX_IMAGES = "/datasets/antoniomari/flux_sae_images/resolve/main/flux_18"
LABELS = "/datasets/hammamiomar/sdxl-turbo-sae-labels/resolve/main"


def jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, format="JPEG")
    return buf.getvalue()


LABEL_ROWS = [{"feature_id": 5, "label": "red cars", "category": "object", "confidence": 0.93},
              {"feature_id": 6, "label": "watercolour wash", "category": "style", "confidence": 0.71}]
FILES = {f"{SDXL_IMAGES}/down.2.1/5.jpg": jpeg((200, 20, 20)), f"{SDXL_IMAGES}/up.0.1/5.jpg": jpeg((20, 200, 20)),
         f"{SDXL_IMAGES}/down.2.1/8.jpg": b"<html>not an image</html>",  # the hub holds a wrong file
         f"{SDXL_IMAGES}/down.2.1/9.jpg": jpeg((1, 2, 3)),  # sent corrupted: its hash will not match
         f"{FLUX_IMAGES}/part1/200.jpg": jpeg((20, 20, 200)),
         f"{LABELS}/down.2.1.json": json.dumps(LABEL_ROWS).encode()}


@pytest.fixture(scope="module")
def hub():
    with serve(FILES) as url:
        Handler.served_instead[f"{SDXL_IMAGES}/down.2.1/9.jpg"] = jpeg((250, 250, 250))
        yield url


@pytest.fixture(scope="module")
def server(start_comfy_server, tmp_path_factory, hub):
    import sae_models

    root = tmp_path_factory.mktemp("released")
    (root / "sae").mkdir()
    for i, folder in enumerate((DOWN, UP)):
        write_paper_release(root / "sae" / folder, seed=i)
    write_flux_release(root / "sae" / FLUX_SAE_FOLDER, seed=3)
    sae = sae_models.build(sae_models.SAEConfig(architecture="topk", d_in=128, n_features=64, k=4, block="down.2.1"))
    sae_models.save(sae, root / "sae" / "own.safetensors")
    with start_comfy_server(root=root, env={"HF_ENDPOINT": hub}) as s:
        yield s


def top(server, sae, feature):
    r = requests.get(f"{server.url}/sae_unbox/released/top", params={"sae": sae, "feature": feature}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def gets(path) -> int:
    return sum(1 for p, _ in Handler.requests if p.removeprefix("/cdn") == path)


def files_under(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_the_releases_are_recognised_by_their_folders():
    assert recognise(DOWN).top_image_path(5) == "surokpro2/sdxl_sae_images/resolve/main/down.2.1/5.jpg"
    assert recognise(f"{DOWN}/final").block == "down.2.1"
    flux = recognise(f"mine/{FLUX_SAE_FOLDER}")
    assert flux.top_image_path(7000).endswith("flux_18/part1/7000.jpg")
    assert flux.top_image_path(7001).endswith("flux_18/part2/7001.jpg")  # the paper's demo splits at 7000
    assert flux.label_set_path() is None and recognise("own.safetensors") is None


def test_a_released_top_image_is_fetched_once_verified_and_served_from_models_sae(server):
    before = files_under(server.root)
    got = top(server, DOWN, 5)
    assert got["released"] and got["message"] is None and got["source"].endswith("/down.2.1/5.jpg")
    r = requests.get(f"{server.url}{got['image']}", timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert r.content == FILES[f"{SDXL_IMAGES}/down.2.1/5.jpg"]
    kept = server.sae_dir / ".released" / "surokpro2" / "sdxl_sae_images" / "down.2.1" / "5.jpg"
    assert kept.read_bytes() == r.content
    assert files_under(server.root) - before <= {kept.relative_to(server.root).as_posix(), "server.log"}
    assert top(server, DOWN, 5)["image"] == got["image"] and gets(f"{SDXL_IMAGES}/down.2.1/5.jpg") == 1
    # the same feature of another block is another file; the FLUX release has its own layout
    assert requests.get(f"{server.url}{top(server, UP, 5)['image']}", timeout=60).content == FILES[f"{SDXL_IMAGES}/up.0.1/5.jpg"]
    flux = top(server, FLUX_SAE_FOLDER, 200)
    assert requests.get(f"{server.url}{flux['image']}", timeout=60).content == FILES[f"{FLUX_IMAGES}/part1/200.jpg"]
    # the cache is no SAE: the SAE lists do not show it
    listed = requests.get(f"{server.url}/object_info/UnboxLoadSAE", timeout=60).json()
    names = listed["UnboxLoadSAE"]["input"]["required"]["sae_name"]
    names = names[1]["options"] if names[0] == "COMBO" else names[0]
    assert not [n for n in names if ".released" in n]


def test_an_sae_that_is_not_the_papers_asks_nothing_of_the_hub(server):
    n = len(Handler.requests)
    assert top(server, "own.safetensors", 5) == {"sae": "own.safetensors", "released": False}
    assert len(Handler.requests) == n


@pytest.mark.parametrize("feature, why", [
    (7, "HTTP 404"),  # the hub has no image of this feature
    (8, "not a usable JPEG"),  # a verified file that is not an image
    (9, "sha256|git-sha1"),  # the bytes do not match the stated hash
])
def test_an_absent_or_bad_file_is_a_message_and_leaves_nothing(server, feature, why):
    import re

    got = top(server, DOWN, feature)
    assert got["released"] and got["image"] is None and re.search(why, got["message"]), got
    assert got["message"].startswith(f"the paper's top images of #{feature} could not be fetched")
    assert not [p for p in (server.sae_dir / ".released").rglob(f"{feature}.jpg*")]
    r = requests.get(f"{server.url}/sae_unbox/released/image", params={"sae": DOWN, "feature": feature}, timeout=60)
    assert r.status_code == 404


def test_refusals(server):
    r = requests.get(f"{server.url}/sae_unbox/released/top", params={"sae": DOWN, "feature": 512}, timeout=60)
    assert r.status_code == 400 and "out of range 0..511" in r.json()["error"]
    r = requests.get(f"{server.url}/sae_unbox/released/top", params={"sae": DOWN, "feature": "-1"}, timeout=60)
    assert r.status_code == 400
    r = requests.get(f"{server.url}/sae_unbox/released/top", params={"sae": "../../etc", "feature": 1}, timeout=60)
    assert r.status_code == 404
    r = requests.post(f"{server.url}/sae_unbox/released/labels", json={"sae": FLUX_SAE_FOLDER}, timeout=60)
    assert r.status_code == 404 and "no label set was published" in r.json()["error"]


def test_the_published_label_set_is_imported_in_one_step_with_its_categories(server):
    r = requests.post(f"{server.url}/sae_unbox/released/labels", json={"sae": DOWN}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["imported"] == 2 and r.json()["source"].endswith("/down.2.1.json")
    got = requests.get(f"{server.url}/sae_unbox/labels", params={"sae": DOWN}, timeout=60).json()
    assert got["labels"] == {"5": "red cars", "6": "watercolour wash"}
    assert got["categories"] == {"5": "object", "6": "style"}
    # the up.0.1 set is absent on the hub: a clear refusal, and no labels file appears
    r = requests.post(f"{server.url}/sae_unbox/released/labels", json={"sae": UP}, timeout=60)
    assert r.status_code == 502 and "HTTP 404" in r.json()["error"]
    assert not (server.sae_dir / f"{UP}.labels.json").exists()


def test_labels_of_an_sae_that_is_not_installed_are_empty_not_an_error(server):
    r = requests.get(f"{server.url}/sae_unbox/labels", params={"sae": "shared_by_someone.safetensors"}, timeout=60)
    assert r.status_code == 200 and r.json() == {"sae": "shared_by_someone.safetensors", "present": False,
                                                  "labels": {}, "categories": {}}


def test_offline_the_panel_gets_a_message(server, hub):
    """Last: the stand-in hub is shut down (as if offline). A cached image is still served."""
    Handler.files.pop(f"{SDXL_IMAGES}/up.0.1/5.jpg")  # not consulted: the cached copy serves
    H = Handler
    H.offline = True
    try:
        got = top(server, UP, 5)
        assert got["image"] is not None
        got = top(server, DOWN, 11)
        assert got["image"] is None and "cannot connect" in got["message"], got
        r = requests.post(f"{server.url}/sae_unbox/released/labels", json={"sae": UP}, timeout=60)
        assert r.status_code == 502 and "cannot connect" in r.json()["error"]
    finally:
        H.offline = False
