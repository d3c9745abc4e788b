"""Feature statistics and the top-images index, against plain dense computations."""

import json

import pytest
import torch

from sae_models import SAEConfig, build, shards, stats

BLOCK = "up.0.1"
D = 12


def random_sae(arch="topk", n=40, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = build(SAEConfig(architecture=arch, d_in=D, n_features=n, k=k, block=BLOCK))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


@torch.no_grad()
def dense_stats(sae, x):
    codes = sae.encode(x).double()
    mean, std, freq = [], [], []
    for f in range(sae.n_features):
        v = codes[:, f][codes[:, f] > 0]
        freq.append(len(v) / len(x))
        mean.append(v.mean().item() if len(v) else 0.0)
        std.append(v.std(unbiased=False).item() if len(v) else 0.0)
    f64 = torch.float64
    return torch.tensor(mean, dtype=f64), torch.tensor(std, dtype=f64), torch.tensor(freq, dtype=f64)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_feature_stats_match_a_dense_computation(arch):
    sae = random_sae(arch)
    x = torch.randn(700, D)
    batches = [x[:1], x[1:300], x[300:301], x[301:]]  # uneven batches
    st = stats.feature_stats(sae, batches)
    mean, std, freq = dense_stats(sae, x)
    assert st.n_vectors == 700
    assert (st.frequency > 0).any() and (st.frequency == 0).any() == (freq == 0).any()
    assert torch.allclose(st.frequency.double(), freq, atol=1e-7)
    assert torch.allclose(st.mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(st.std.double(), std, rtol=1e-4, atol=1e-5)
    assert st.mean.dtype == st.std.dtype == st.frequency.dtype == torch.float32
    # max_tokens cuts inside a batch; (x, meta) pairs are accepted
    st = stats.feature_stats(sae, [(b, {}) for b in batches], max_tokens=450)
    mean, std, freq = dense_stats(sae, x[:450])
    assert st.n_vectors == 450 and torch.allclose(st.mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(st.frequency.double(), freq, atol=1e-7)


def test_feature_stats_are_sound_for_large_offsets():
    """Activations of 1e4 + small spread: the spread survives (no sum-of-squares cancellation)."""
    sae = build(SAEConfig(architecture="relu", d_in=2, n_features=2, apply_b_dec_to_input=False), dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.fill_(1e4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64) * 1e-3
    st = stats.feature_stats(sae, x.split(777))
    assert torch.allclose(st.std.double(), x.std(0, unbiased=False), rtol=1e-3)
    assert torch.allclose(st.mean.double(), 1e4 + x.mean(0), rtol=1e-7)  # stored as float32
    assert st.frequency.tolist() == [1.0, 1.0]


def test_feature_stats_from_a_dump_stream(tmp_path):
    sae = random_sae()
    x = torch.randn(64, D)
    with shards.ShardWriter(tmp_path, writer_id="w", rows_per_shard=20, dtype=torch.float32) as w:
        for i in range(4):
            w.add_image({}, {BLOCK: {"update": x[16 * i:16 * (i + 1)], "grid": (4, 4)}})
    st = stats.feature_stats(sae, shards.iter_vectors(tmp_path, BLOCK, batch_size=10, seed=3))
    mean, _, freq = dense_stats(sae, x)
    assert st.n_vectors == 64 and torch.allclose(st.mean.double(), mean, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no vectors"):
        stats.feature_stats(sae, [])


def make_dump(folder, grid=(3, 5)):
    """Two writers, 7 images, rows at two steps per position; some images unfinished (no record)."""
    h, w_ = grid
    g = torch.Generator().manual_seed(1)
    writers = {}
    for name, n_images in (("alpha", 4), ("beta", 3)):
        w = shards.ShardWriter(folder, writer_id=name, rows_per_shard=11, dtype=torch.float32)
        for i in range(n_images):
            n = h * w_
            rows = {"update": torch.randn(2 * n, D, generator=g) * 2, "step": torch.arange(2 * n) // n,
                    "position": torch.arange(2 * n) % n, "grid": grid}
            w.add_image({"prompt": f"{name} prompt {i}", "file": f"{name}/{i}.png", "seed": i}, {BLOCK: rows})
        writers[name] = w
    writers["alpha"].close()
    writers["beta"].close()
    # an image whose record never got written: rows present, skipped by the reader
    crashed = shards.ShardWriter(folder, writer_id="gamma", rows_per_shard=11, dtype=torch.float32)
    crashed.add_image({}, {BLOCK: {"update": torch.full((30, D), 50.0), "grid": grid}})
    crashed._write_records = lambda: None
    crashed.flush()
    return folder


@torch.no_grad()
def brute_force_index(sae, folder, top_n, grid_w):
    s = shards.iter_vectors(folder, BLOCK, shuffle=False, with_meta=True, batch_size=1000)
    best = {}  # feature -> {(writer, image): (value, position)}
    for x, meta in s:
        codes = sae.encode(x)
        for r in range(len(x)):
            img = (s.writers[int(meta["writer"][r])], int(meta["image"][r]))
            p = int(meta["position"][r])
            for f in range(sae.n_features):
                v = float(codes[r, f])
                if v > 0 and v > best.setdefault(f, {}).get(img, (-1.0,))[0]:
                    best[f][img] = (v, [p // grid_w, p % grid_w])
    out = []
    for f in range(sae.n_features):
        items = sorted(best.get(f, {}).items(), key=lambda kv: -kv[1][0])[:top_n]
        out.append([(w, i, v, pos) for (w, i), (v, pos) in items])
    return out


def test_features_index_matches_brute_force(tmp_path):
    folder = make_dump(tmp_path)
    sae = random_sae(n=24, k=3, seed=2)
    stream = shards.iter_vectors(folder, BLOCK, with_meta=True, batch_size=13, seed=7, shuffle_shards=2)
    assert stream.writers == ["alpha", "beta", "gamma"]
    index = stats.features_index(sae, stream, top_n=3)
    assert index["block"] == BLOCK and index["n_features"] == 24 and index["top_n"] == 3
    expect = brute_force_index(sae, folder, 3, grid_w=5)
    assert len(index["features"]) == 24
    assert any(len(e) == 3 for e in expect) and any(len(e) < 3 for e in expect)
    for got, exp in zip(index["features"], expect):
        assert len(got) == len(exp)
        for g, (w, i, v, pos) in zip(got, exp):
            assert (g["writer"], g["image"], g["position"]) == (w, i, pos)
            assert g["value"] == pytest.approx(v, rel=1e-5)
            assert g["prompt"] == f"{w} prompt {i}" and g["file"] == f"{w}/{i}.png" and g["seed"] == i
            assert g["grid"] == [3, 5]
        assert len({(g["writer"], g["image"]) for g in got}) == len(got)  # distinct images
        assert all(a["value"] >= b["value"] for a, b in zip(got, got[1:]))
    assert all(g["writer"] != "gamma" for e in index["features"] for g in e)
    # without the records, entries have no prompt
    index2 = stats.features_index(sae, shards.iter_vectors(folder, BLOCK, with_meta=True), top_n=3, records=[])
    assert [[(g["writer"], g["image"]) for g in e] for e in index2["features"]] == \
        [[(g["writer"], g["image"]) for g in e] for e in index["features"]]
    assert all("prompt" not in g for e in index2["features"] for g in e)
    # written atomically as plain JSON
    path = stats.write_features_index(index, tmp_path / "out" / "features.json")
    assert json.loads(path.read_text()) == index
    assert [p.name for p in path.parent.iterdir()] == ["features.json"]


def test_features_index_needs_metadata():
    sae = random_sae()
    with pytest.raises(ValueError, match="with_meta"):
        stats.features_index(sae, [torch.randn(4, D)])


def test_one_pass_summary_equals_the_two_passes(tmp_path):
    folder = make_dump(tmp_path)
    sae = random_sae(n=24, k=3, seed=2)
    def stream():
        return shards.iter_vectors(folder, BLOCK, with_meta=True, batch_size=13, shuffle=False)
    got_stats, got_index = stats.summarize_features(sae, stream(), top_n=3)
    want = stats.feature_stats(sae, stream())
    for name in ("mean", "frequency", "std"):
        assert torch.allclose(getattr(got_stats, name), getattr(want, name), atol=1e-6), name
    assert got_stats.n_vectors == want.n_vectors
    assert got_index.pop("dump") == str(folder)
    assert got_index == stats.features_index(sae, stream(), top_n=3)
    # a limit applies to both, cutting inside a batch
    part_stats, part_index = stats.summarize_features(sae, stream(), top_n=3, max_tokens=20)
    assert part_stats.n_vectors == 20
    assert torch.allclose(part_stats.frequency, stats.feature_stats(sae, stream(), max_tokens=20).frequency)
    with pytest.raises(ValueError, match="with_meta"):
        stats.summarize_features(sae, [torch.randn(4, D)])
