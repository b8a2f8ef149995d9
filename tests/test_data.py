"""Shards, reader, sampler, augmentation and models: what feeds the DeepCluster epoch."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cluster_pipeline.config import ARCHS, ModelConfig
from cluster_pipeline.data.augment import random_resized_crop
from cluster_pipeline.data.loader import batch_loader, start_worker_server
from cluster_pipeline.data.reader import SampleReader, ShardError, ShardIndex
from cluster_pipeline.data.sampler import (
    rank_slice,
    uniform_cluster_sampler,
    uniform_cluster_sampler_v1,
)
from cluster_pipeline.data.shards import INDEX_FILE, SAMPLES_FILE, iter_webdataset, write_shards
from cluster_pipeline.data.sources import Source
from cluster_pipeline.models.nets import build_model, reset_head

N_SAMPLES = 23
PER_SHARD = 5  # does not divide 23: shards of 5, 5, 5, 5, 3
SIZE = 8


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def random_source(
    n: int = N_SAMPLES, channels: int = 1, seed: int = 0
) -> tuple[Source, np.ndarray]:
    """A Source of random PNG images and the (n, SIZE, SIZE, channels) pixels it encodes."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, SIZE, SIZE, channels), dtype=np.uint8)
    images = [png(p[..., 0] if channels == 1 else p) for p in pixels]
    labels = rng.integers(0, 3, size=n).astype(np.int64)
    return Source(images, ["png"] * n, labels, ["a", "b", "c"]), pixels


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, Source, np.ndarray]:
    source, pixels = random_source()
    out = tmp_path / "shards"
    write_shards(source, out, samples_per_shard=PER_SHARD)
    return out, source, pixels


# ------------------------------------------------------------------------------ writing shards


def test_write_shards_index_counts(shards):
    out, source, _ = shards
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["num_samples"] == N_SAMPLES
    assert index["classes"] == ["a", "b", "c"]
    assert [s["count"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    assert [s["first_index"] for s in index["shards"]] == [0, 5, 10, 15, 20]
    for s in index["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"]
    table = np.load(out / SAMPLES_FILE)
    assert table.shape == (N_SAMPLES, 4)
    np.testing.assert_array_equal(table[:, 0], np.arange(N_SAMPLES) // PER_SHARD)
    np.testing.assert_array_equal(table[:, 2], [len(b) for b in source.images])
    np.testing.assert_array_equal(table[:, 3], source.labels)

    loaded = ShardIndex.load(out)
    assert loaded.num_samples == N_SAMPLES
    np.testing.assert_array_equal(loaded.shard_counts, [5, 5, 5, 5, 3])
    np.testing.assert_array_equal(loaded.labels, source.labels)


def test_samples_table_points_at_the_image_bytes(shards):
    out, source, _ = shards
    index = ShardIndex.load(out)
    for i, (shard, offset, size, _) in enumerate(index.samples):
        with open(out / index.shard_names[shard], "rb") as fh:
            fh.seek(offset)
            assert fh.read(size) == source.images[i]


def test_shards_are_readable_by_webdataset(shards):
    out, source, pixels = shards
    samples = list(iter_webdataset(out))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N_SAMPLES)]
    for i, s in enumerate(samples):
        assert int(s["idx"]) == i
        assert int(s["cls"]) == source.labels[i]
        assert s["png"] == source.images[i]
        decoded = np.asarray(Image.open(io.BytesIO(s["png"])))
        np.testing.assert_array_equal(decoded, pixels[i, ..., 0])


def test_unknown_class_is_minus_one_and_has_no_cls_member(tmp_path: Path):
    source, _ = random_source(n=7)
    source.labels[3] = -1
    write_shards(source, tmp_path, samples_per_shard=3)
    index = ShardIndex.load(tmp_path)
    assert index.samples[3, 3] == -1
    assert index.labels is None  # truth is unknown, so no NMI against it
    samples = list(iter_webdataset(tmp_path))
    assert "cls" not in samples[3]
    assert all("cls" in s for j, s in enumerate(samples) if j != 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_reader_returns_source_pixels(tmp_path: Path, channels: int):
    source, pixels = random_source(channels=channels, seed=channels)
    write_shards(source, tmp_path, samples_per_shard=PER_SHARD)
    reader = SampleReader(ShardIndex.load(tmp_path), load_size=SIZE, channels=channels)
    try:
        for i in range(N_SAMPLES):
            img = reader.read(i)
            assert img.shape == (SIZE, SIZE, channels) and img.dtype == np.uint8
            np.testing.assert_array_equal(img, pixels[i])
        order = np.array([22, 0, 7, 13, 7])
        np.testing.assert_array_equal(reader.read_batch(order), pixels[order])
    finally:
        reader.close()


def test_sample_reader_resizes_to_load_size(shards):
    out, _, _ = shards
    reader = SampleReader(ShardIndex.load(out), load_size=4, channels=1)
    try:
        assert reader.read(5).shape == (4, 4, 1)
    finally:
        reader.close()


def _jpeg(pixels: np.ndarray, mode: str = "RGB", **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", **options)
    return buf.getvalue()


def test_jpegs_read_as_pil_decodes_them_and_bad_ones_fail_naming_the_sample(tmp_path: Path):
    """RGB JPEGs go through libjpeg-turbo (simplejpeg) straight into the batch, every other kind
    through PIL: each must come out exactly as PIL's convert("RGB") + resize + crop makes it,
    and a JPEG cut short must still fail with PIL's reason and the sample's key."""
    from cluster_pipeline.data.decode import resize_square as _resize_square

    rng = np.random.default_rng(3)
    base = (rng.random((40, 52, 3)) * 255).astype(np.uint8)
    square = base[:32, :32]
    images = [
        _jpeg(square, quality=90),  # 4:2:0, already load_size: decoded into the batch row
        _jpeg(square, quality=95, subsampling=0),  # 4:4:4
        _jpeg(square, quality=90, progressive=True),
        _jpeg(square, "L", quality=90),  # grayscale JPEG read as RGB
        _jpeg(square, "CMYK", quality=90),  # libjpeg and PIL differ: PIL decodes it
        _jpeg(base, quality=90),  # not square: resized and cropped
        png(square),
    ]
    broken = _jpeg(square, quality=90)
    images.append(broken[: len(broken) // 2])
    n = len(images)
    write_shards(Source(images, ["jpg"] * (n - 2) + ["png", "jpg"], np.zeros(n, np.int64), ["a"]),
                 tmp_path, samples_per_shard=4)  # fmt: skip
    reader = SampleReader(ShardIndex.load(tmp_path), load_size=32, channels=3)
    try:
        for i, raw in enumerate(images[:-1]):
            with Image.open(io.BytesIO(raw)) as im:
                want = np.asarray(_resize_square(im.convert("RGB"), 32))
            np.testing.assert_array_equal(reader.read(i), want, err_msg=f"image {i}")
        batch = reader.read_batch(np.arange(n - 1))
        np.testing.assert_array_equal(batch[0], reader.read(0))
        premature = r"sample 000000007: damaged JPEG: libjpeg says .Premature end of JPEG file"
        with pytest.raises(ShardError, match=premature):
            reader.read(n - 1)
    finally:
        reader.close()


# --------------------------------------------------------------------------------- corruption


def test_truncated_shard_fails_index_load_naming_the_file(shards):
    out, _, _ = shards
    victim = out / "shard-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"shard-000001\.tar"):
        ShardIndex.load(out)


def test_truncated_shard_after_index_load_fails_read_naming_shard_and_sample(shards):
    out, _, _ = shards
    index = ShardIndex.load(out)
    last = 22  # the last sample of the last shard
    victim = out / index.shard_names[index.samples[last, 0]]
    victim.write_bytes(victim.read_bytes()[: int(index.samples[last, 1]) + 10])
    reader = SampleReader(index, load_size=SIZE, channels=1)
    try:
        with pytest.raises(ShardError, match=r"shard-000004\.tar: sample 000000022: truncated"):
            reader.read(last)
    finally:
        reader.close()


def test_overwritten_image_bytes_fail_read_naming_shard_and_key(shards):
    out, _, pixels = shards
    index = ShardIndex.load(out)
    i = 7
    shard, offset, size, _ = (int(v) for v in index.samples[i])
    path = out / index.shard_names[shard]
    before = path.stat().st_size
    with open(path, "r+b") as fh:  # same size: index.json's byte count still matches
        fh.seek(offset)
        fh.write(bytes(size))
    assert path.stat().st_size == before
    # The index loaded before the damage: a shard this small is all fingerprint, so loading
    # it now fails (tests/test_faults_shards.py); the reader must catch it on its own.
    reader = SampleReader(index, load_size=SIZE, channels=1)
    try:
        with pytest.raises(ShardError, match=r"shard-000001\.tar.*000000007"):
            reader.read(i)
        np.testing.assert_array_equal(reader.read(8), pixels[8])  # neighbours still read
    finally:
        reader.close()


def test_sample_at_wrong_offset_fails_read_naming_expected_key(shards):
    out, _, _ = shards
    table = np.load(out / SAMPLES_FILE)
    table[6, 1:3] = table[7, 1:3]  # sample 6 now points at sample 7's bytes
    np.save(out / SAMPLES_FILE, table)
    reader = SampleReader(ShardIndex.load(out), load_size=SIZE, channels=1)
    try:
        with pytest.raises(ShardError, match=r"shard-000001\.tar.*000000006.*000000007"):
            reader.read(6)
    finally:
        reader.close()


def test_missing_shard_fails_index_load_naming_it(shards):
    out, _, _ = shards
    (out / "shard-000002.tar").unlink()
    with pytest.raises(ShardError, match=r"shard-000002\.tar is missing"):
        ShardIndex.load(out)


def test_missing_index_fails_naming_it(tmp_path: Path):
    with pytest.raises(ShardError, match=r"index\.json"):
        ShardIndex.load(tmp_path)


def test_reader_pickles_without_its_open_files(shards):
    """Workers started by spawn or forkserver get a copy with no file descriptors of the parent."""
    out, _, pixels = shards
    reader = SampleReader(ShardIndex.load(out), load_size=8, channels=1)
    reader.read(0)
    assert reader._fds
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._fds == {}
    np.testing.assert_array_equal(copy.read(3), pixels[3])


def test_digits_shards_fixture_reads_back(digits_shards: Path):
    index = ShardIndex.load(digits_shards)
    assert index.num_samples == 1797
    np.testing.assert_array_equal(index.shard_counts, [500, 500, 500, 297])
    reader = SampleReader(index, load_size=8, channels=1)
    try:
        assert reader.read(1796).shape == (8, 8, 1)
    finally:
        reader.close()


# ------------------------------------------------------------------------------------ sampler


def unbalanced_labels() -> np.ndarray:
    """One cluster of 900 and nine of 10, in a shuffled order."""
    labels = np.concatenate([np.zeros(900, np.int64)] + [np.full(10, c) for c in range(1, 10)])
    return np.random.default_rng(0).permutation(labels)


# Counts stay within one even when the number of clusters does not divide num_draws.
@pytest.mark.parametrize("num_draws", [1000, 1001, 1234])
def test_uniform_sampler_counts_per_cluster_equal_within_one(num_draws: int):
    labels = unbalanced_labels()
    for seed in range(20):
        draws = uniform_cluster_sampler(labels, num_draws, seed)
        assert len(draws) == num_draws
        counts = np.bincount(labels[draws], minlength=10)
        assert counts.max() - counts.min() <= 1, (seed, counts.tolist())


def test_uniform_sampler_cycles_small_clusters_and_does_not_repeat_large_ones():
    labels = unbalanced_labels()
    draws = uniform_cluster_sampler(labels, 1000, seed=3)
    big = draws[labels[draws] == 0]
    assert len(np.unique(big)) == len(big) == 100  # 100 distinct members of the big cluster
    for c in range(1, 10):  # each small-cluster member drawn exactly 10 times
        members, counts = np.unique(draws[labels[draws] == c], return_counts=True)
        np.testing.assert_array_equal(members, np.flatnonzero(labels == c))
        np.testing.assert_array_equal(counts, 10)


def test_uniform_sampler_is_deterministic_for_a_seed():
    labels = unbalanced_labels()
    a = uniform_cluster_sampler(labels, 1000, seed=7)
    b = uniform_cluster_sampler(labels, 1000, seed=7)
    c = uniform_cluster_sampler(labels, 1000, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_uniform_sampler_ignores_empty_cluster_ids():
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 3, 7], size=300, p=[0.8, 0.15, 0.05])  # ids 1, 2, 4, 5, 6 empty
    draws = uniform_cluster_sampler(labels, 300, seed=0)
    assert draws.min() >= 0 and draws.max() < len(labels)
    counts = np.bincount(labels[draws], minlength=8)
    np.testing.assert_array_equal(counts, [100, 0, 0, 100, 0, 0, 0, 100])


def test_uniform_sampler_holds_one_int32_vector_and_its_ranks_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 1B samples every N-length temporary is 4 GB per rank: the sampler holds one int32
    vector (members by cluster) and the rank's draws, the rest chunk-sized. Version 1, kept
    for old runs, needed 16 times 4N."""
    import tracemalloc

    from cluster_pipeline.clustering import labels as label_vectors
    from cluster_pipeline.data import sampler

    monkeypatch.setattr(sampler, "CHUNK", 1 << 14)
    monkeypatch.setattr(label_vectors, "CHUNK", 1 << 14)
    n = 2_000_000
    labels = np.random.default_rng(0).integers(-1, 1000, n).astype(np.int32)
    peaks = {}
    cases = {
        "v1": lambda: uniform_cluster_sampler_v1(labels, n, 0),
        "v2": lambda: uniform_cluster_sampler(labels, n, 0),
        "v2 rank 1 of 4": lambda: uniform_cluster_sampler(labels, n, 0, 1, 4),
    }
    for name, draw in cases.items():
        tracemalloc.start()
        draws = draw()
        peaks[name] = tracemalloc.get_traced_memory()[1] / (4 * n)
        tracemalloc.stop()
        assert (labels[draws] >= 0).all()
    assert draws.dtype == np.int32 and len(draws) == n // 4
    assert peaks["v2"] <= 2.25, peaks  # members + all the draws, and about 2 MB of chunks
    assert peaks["v2 rank 1 of 4"] <= 1.5, peaks  # members + a quarter of the draws
    assert peaks["v1"] > 8, peaks


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_draws_its_positions_of_the_one_sequence(world: int) -> None:
    """A rank computes only its own positions (rank, rank + world, ...) of the sequence that
    world=1 draws, so the ranks together draw exactly it, and `rank_draws` cuts every rank to
    the same number of steps."""
    from cluster_pipeline.data.sampler import rank_draws

    labels = unbalanced_labels()
    whole = uniform_cluster_sampler(labels, 1003, seed=4)
    for rank in range(world):
        mine = uniform_cluster_sampler(labels, 1003, 4, rank, world)
        np.testing.assert_array_equal(mine, whole[rank::world])
        cut = rank_draws(2, labels, 1003, 4, rank, world, batch_size=16)
        assert len(cut) == 1003 // (world * 16) * 16
        np.testing.assert_array_equal(cut, mine[: len(cut)])
        old = rank_draws(1, labels, 1003, 4, rank, world, batch_size=16)
        v1 = uniform_cluster_sampler_v1(labels, 1003, 4)
        np.testing.assert_array_equal(old, rank_slice(v1, rank, world, 16))


def test_draws_are_in_a_random_order() -> None:
    """Neither the clusters nor the members come in runs: consecutive draws are of the same
    cluster about 1 / k of the time, and of increasing sample index about half the time."""
    labels = np.random.default_rng(2).integers(0, 20, 20_000)
    draws = uniform_cluster_sampler(labels, 20_000, seed=0)
    same = np.mean(labels[draws[1:]] == labels[draws[:-1]])
    assert abs(same - 1 / 20) < 0.01, same
    assert abs(np.mean(np.diff(draws) > 0) - 0.5) < 0.02


# uniform_cluster_sampler(unbalanced_labels(), 1000, seed=5)[:8] as drawn by the code up to
# commit 0eba730, when it was the only sampler.
PINNED_V1 = [778, 756, 669, 400, 60, 227, 110, 563]


def test_a_run_keeps_the_sampler_it_started_with() -> None:
    """New runs draw with version 2; a checkpoint written before versions were recorded (every
    one of those drew with version 1) continues with version 1, so its resume stays exact."""
    from cluster_pipeline.training.position import Position

    assert Position().state_dict()["sampler"] == 2
    assert Position(sampler=1).next_epoch().sampler == 1
    old = Position(epoch=3).state_dict()
    del old["sampler"]
    assert Position.from_state_dict(old).sampler == 1
    labels = unbalanced_labels()
    v1 = uniform_cluster_sampler_v1(labels, 1000, seed=5)
    assert not np.array_equal(v1, uniform_cluster_sampler(labels, 1000, seed=5))
    # Version 1's draws, pinned: its code must not change, or old runs resume elsewhere.
    assert v1[:8].tolist() == PINNED_V1


@pytest.mark.parametrize(("world", "batch_size"), [(1, 16), (2, 16), (3, 7), (4, 32)])
def test_rank_slice_equal_steps_on_every_rank(world: int, batch_size: int):
    draws = uniform_cluster_sampler(unbalanced_labels(), 1003, seed=0)
    parts = [rank_slice(draws, r, world, batch_size) for r in range(world)]
    lengths = {len(p) for p in parts}
    assert len(lengths) == 1
    length = lengths.pop()
    assert length % batch_size == 0
    assert length == (1003 // (world * batch_size)) * batch_size
    assert length > 0
    # The ranks take disjoint positions of the global draws.
    positions = np.concatenate([np.arange(r, 1003, world)[:length] for r in range(world)])
    assert len(np.unique(positions)) == len(positions)
    for r, p in enumerate(parts):
        np.testing.assert_array_equal(p, draws[r::world][:length])


# ------------------------------------------------------------------------------- augmentation


def test_random_resized_crop_output_shape():
    x = torch.rand(5, 3, 20, 20)
    gen = torch.Generator().manual_seed(0)
    out = random_resized_crop(x, 12, min_scale=0.08, flip=True, generator=gen)
    assert out.shape == (5, 3, 12, 12)
    assert torch.isfinite(out).all()


def test_random_resized_crop_full_scale_square_is_identity():
    x = torch.rand(4, 2, 16, 16)
    gen = torch.Generator().manual_seed(0)
    out = random_resized_crop(x, 16, min_scale=1.0, flip=False, generator=gen, ratio=(1.0, 1.0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_random_resized_crop_flip_gives_input_or_mirror():
    x = torch.rand(32, 1, 10, 10)
    gen = torch.Generator().manual_seed(1)
    out = random_resized_crop(x, 10, min_scale=1.0, flip=True, generator=gen, ratio=(1.0, 1.0))
    flipped = 0
    for i in range(len(x)):
        same = torch.allclose(out[i], x[i], atol=1e-5)
        mirror = torch.allclose(out[i], x[i].flip(-1), atol=1e-5)
        assert same != mirror, i  # exactly one of the two (random images are not symmetric)
        flipped += mirror
    assert 0 < flipped < len(x)  # both outcomes occur in 32 samples


def test_random_resized_crop_is_deterministic_for_a_generator_seed():
    x = torch.rand(6, 3, 16, 16)
    a = random_resized_crop(x, 8, 0.2, True, torch.Generator().manual_seed(5))
    b = random_resized_crop(x, 8, 0.2, True, torch.Generator().manual_seed(5))
    c = random_resized_crop(x, 8, 0.2, True, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


# ------------------------------------------------------------------------------------- models

MODEL_INPUTS = {  # arch: (channels, image size, batch)
    "small_cnn": (1, 28, 4),
    "alexnet_bn": (3, 224, 2),
    "resnet18": (3, 64, 2),
    "resnet50": (3, 64, 2),
}
FEATURE_DIMS = {"small_cnn": 128, "alexnet_bn": 4096, "resnet18": 512, "resnet50": 2048}


def test_every_arch_has_a_model_test():
    assert set(MODEL_INPUTS) == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_feature_shape(arch: str):
    channels, size, batch = MODEL_INPUTS[arch]
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch), in_channels=channels, num_classes=7).eval()
    assert model.feature_dim == FEATURE_DIMS[arch]
    x = torch.rand(batch, channels, size, size)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (batch, model.feature_dim)
    assert logits.shape == (batch, 7)
    assert torch.isfinite(feats).all()
    for name in model.layer_names:
        assert isinstance(getattr(model, name), torch.nn.Module)


def test_reset_head_same_seed_same_head_different_seed_different():
    cfg = ModelConfig(arch="small_cnn", width=8)
    a = build_model(cfg, 1, 10)
    b = build_model(cfg, 1, 10)
    reset_head(a, torch.Generator().manual_seed(42))
    reset_head(b, torch.Generator().manual_seed(42))
    torch.testing.assert_close(a.head.weight, b.head.weight, atol=0, rtol=0)
    assert torch.count_nonzero(a.head.bias) == 0
    assert a.head.weight.std().item() == pytest.approx(0.01, rel=0.3)
    weight_param = b.head.weight
    reset_head(b, torch.Generator().manual_seed(43))
    assert b.head.weight is weight_param  # in place: DDP's registered Parameter stays valid
    assert not torch.allclose(a.head.weight, b.head.weight)


@pytest.mark.parametrize("channels", [1, 3])
def test_sobel_input_layer_is_frozen(channels: int):
    model = build_model(ModelConfig(arch="small_cnn", sobel=True, width=8), channels, 5)
    params = list(model.input_layer.parameters())
    assert len(params) == (2 if channels == 3 else 1)  # gray conv (RGB only) + Sobel conv
    assert not any(p.requires_grad for p in params)
    assert all(p.requires_grad for p in model.block1.parameters())
    x = torch.rand(2, channels, 28, 28)
    edges = model.input_layer(x)
    assert edges.shape == (2, 2, 28, 28)  # grayscale, then x and y gradients
    flat = model.input_layer(torch.full((1, channels, 28, 28), 0.7))
    torch.testing.assert_close(flat[..., 1:-1, 1:-1], torch.zeros(1, 2, 26, 26))  # no edges
    assert model.features(x).shape == (2, 128)


def test_no_sobel_input_layer_is_identity():
    model = build_model(ModelConfig(arch="small_cnn", sobel=False, width=8), 1, 5)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.input_layer(x), x)


def test_batch_loader_workers_come_from_a_forkserver_with_a_timeout(digits_shards: Path):
    """Forked workers of a threaded rank can deadlock (CPython gh-112275); a stall must error."""
    reader = SampleReader(ShardIndex.load(digits_shards), load_size=8, channels=1)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # a rank always runs more than one thread
    other.start()
    try:
        loader = batch_loader(reader, np.arange(300), batch_size=128, num_workers=2, timeout_s=30)
    finally:
        stop.set()
        other.join()
    assert loader.loader.multiprocessing_context.get_start_method() == "forkserver"
    assert loader.loader.timeout == 30
    seen = np.concatenate([batch.indices.numpy() for batch in loader])
    np.testing.assert_array_equal(seen, np.arange(300))


ONE_THREAD_LOADER = """
import sys
import threading
import numpy as np
from cluster_pipeline.data.loader import batch_loader, start_worker_server
from cluster_pipeline.data.reader import SampleReader, ShardIndex

reader = SampleReader(ShardIndex.load(sys.argv[1]), load_size=8, channels=1)
print(threading.active_count())
for _ in range(2):  # the second right after the first, whose queues' threads are still ending
    loader = batch_loader(reader, np.arange(1797), batch_size=128, num_workers=2)
    seen = np.concatenate([batch.indices.numpy() for batch in loader])
    assert (seen == np.arange(1797)).all(), seen
    print(loader.loader.multiprocessing_context.get_start_method())
"""


def test_batch_loader_forks_its_workers_in_a_process_of_one_thread(digits_shards: Path):
    """No forkserver to start (it imports torch anew, ~1.5 s before the first batch) where a
    fork cannot inherit another thread's lock: a single process reading shards."""
    out = subprocess.run([sys.executable, "-c", ONE_THREAD_LOADER, str(digits_shards)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "fork", "fork"], out.stdout


def _preloaded(queue: Any) -> None:
    queue.put([name in sys.modules for name in ("numpy.random", "PIL.JpegImagePlugin")])


def test_workers_start_with_numpy_random_and_pil_plugins_loaded() -> None:
    """torch's worker loop seeds numpy.random, which numpy imports on first use (0.15 s), and
    PIL imports its format plugins on the first Image.open (0.2 s): each worker of each loader
    paid both before its first batch until the forkserver loaded them for all."""
    start_worker_server()
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    child = ctx.Process(target=_preloaded, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == [True, True]
    finally:
        child.join(timeout=30)


EXIT_WITH_A_LIVE_LOADER = """
import sys
import numpy as np
from cluster_pipeline.data.loader import batch_loader, start_worker_server
from cluster_pipeline.data.reader import SampleReader, ShardIndex

if __name__ == "__main__":
    reader = SampleReader(ShardIndex.load(sys.argv[1]), load_size=8, channels=1)
    batches = iter(batch_loader(reader, np.arange(1797), batch_size=64, num_workers=2))
    print(next(batches).images.shape, flush=True)
    KEEP = batches  # alive at exit, as in a rank that raises out of its epoch
"""


def test_a_process_exits_while_its_loader_workers_are_alive(digits_shards: Path, tmp_path: Path):
    """Workers ignore SIGTERM, which multiprocessing's exit hook sends them before joining them:
    without the loader's own exit hook, which kills them, the process never exits."""
    script = tmp_path / "exit_with_live_loader.py"
    script.write_text(EXIT_WITH_A_LIVE_LOADER)
    run = subprocess.run(
        [sys.executable, str(script), str(digits_shards)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr
    assert "torch.Size([64, 8, 8, 1])" in run.stdout


KILL_WITH_A_RAISING_SIGCHLD_HANDLER = """
import multiprocessing, signal, sys
import numpy as np
from cluster_pipeline.data import loader
from cluster_pipeline.data.reader import SampleReader, ShardIndex

if __name__ == "__main__":
    reader = SampleReader(ShardIndex.load(sys.argv[1]), load_size=8, channels=1)
    batches = iter(loader.batch_loader(reader, np.arange(1797), batch_size=64, num_workers=2))
    next(batches)
    def torch_like(signum, frame):  # torch's handler raises when a live loader's worker dies
        raise RuntimeError("DataLoader worker exited unexpectedly")
    signal.signal(signal.SIGCHLD, torch_like)
    loader._kill_workers_at_exit()
    print(sum(c.is_alive() for c in multiprocessing.active_children()), flush=True)
"""


def test_the_exit_hook_kills_forked_workers_whatever_sigchld_does(digits_shards: Path, tmp_path):
    """Forked workers are the process's own children: their death raises in torch's SIGCHLD
    handler, which once interrupted the hook with a worker still alive (the exit then hung)."""
    script = tmp_path / "kill_with_raising_handler.py"
    script.write_text(KILL_WITH_A_RAISING_SIGCHLD_HANDLER)
    run = subprocess.run([sys.executable, str(script), str(digits_shards)], capture_output=True,
                         text=True, timeout=90)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0"], run.stdout + run.stderr


def test_feature_sink_writes_buffered_batches_in_place() -> None:
    from cluster_pipeline.features.extract import FeatureSink

    out = np.full((10, 3), -1.0, dtype=np.float32)
    sink = FeatureSink(out, batches=3)
    rows = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    for pos, size in ((0, 4), (4, 2), (6, 3)):
        sink.add(pos, rows[pos : pos + size].to(torch.bfloat16))
    assert (out[:9] != -1).all()  # three batches: flushed
    sink.add(9, rows[9:])
    assert (out[9] == -1).all()  # held until flush
    sink.flush()
    assert np.array_equal(out, rows.numpy())


def test_eval_split_is_fixed_disjoint_and_reads_the_right_images(digits_shards: Path) -> None:
    whole = ShardIndex.load(digits_shards)
    train, test = whole.split("train", 0.2, 0), whole.split("test", 0.2, 0)
    assert (train.num_samples, test.num_samples) == (1438, 359)
    assert train.ids is not None and test.ids is not None
    assert not set(train.ids) & set(test.ids)  # never mixes train and test
    assert np.array_equal(np.sort(np.concatenate([train.ids, test.ids])), np.arange(1797))
    again = ShardIndex.load(digits_shards).split("test", 0.2, 0)
    assert again.ids is not None and np.array_equal(again.ids, test.ids)  # same on every run
    assert not np.array_equal(whole.split("test", 0.2, 1).ids, test.ids)  # the seed matters
    assert test.labels is not None and whole.labels is not None
    assert np.array_equal(test.labels, whole.labels[test.ids])
    assert len(set(test.labels.tolist())) == 10  # blind to class: every digit is in test
    a, b = SampleReader(whole, 8, 1), SampleReader(test, 8, 1)
    for row in (0, 100, 358):
        assert np.array_equal(b.read(row), a.read(int(test.ids[row])))
    assert whole.split("all", 0.2, 0) is whole


def test_mnist5k_split_is_4000_1000() -> None:
    from cluster_pipeline.data.reader import split_ids

    train, test = split_ids(5000, 0.2, 0)
    assert (len(train), len(test)) == (4000, 1000)


def test_batch_loader_reuses_a_ring_of_shared_buffers_without_mixing_batches(
    digits_shards: Path,
) -> None:
    """Each worker decodes into RING_SLOTS buffers in turn; every batch still arrives intact."""
    from cluster_pipeline.data.loader import RING_SLOTS

    reader = SampleReader(ShardIndex.load(digits_shards), load_size=8, channels=1)
    order = np.random.default_rng(0).permutation(1797)
    loader = batch_loader(reader, order, batch_size=20, num_workers=2, timeout_s=60)
    alive, got = [], []
    for batch in loader:  # 90 batches: each worker's ring goes round ~7 times
        alive.append(batch.images)  # all kept: fresh buffers per batch would be 90 mappings
        got.append((batch.indices.numpy().copy(), batch.images.numpy().copy()))
    buffers = {images.untyped_storage().data_ptr() for images in alive}
    assert len(buffers) <= RING_SLOTS * 2  # reused, not one fresh buffer per batch
    seen = np.concatenate([idx for idx, _ in got])
    np.testing.assert_array_equal(seen, order)
    direct = SampleReader(ShardIndex.load(digits_shards), load_size=8, channels=1)
    for idx, images in got[::7]:
        np.testing.assert_array_equal(images, direct.read_batch(idx))


def test_synthetic_source_writes_the_same_shards_from_any_writer(tmp_path: Path) -> None:
    """make-shards --source synthetic:N[:SIZE]: JPEGs made per sample index, so one writer or
    two processes (each sent a slice) write the same bytes; classes interleaved by index."""
    from cluster_pipeline.data.shards import load_source
    from cluster_pipeline.data.sources import synthetic_classes

    a = write_shards(load_source("synthetic:300:16"), tmp_path / "a", samples_per_shard=100)
    b = write_shards(load_source("synthetic:300:16"), tmp_path / "b", 100, workers=2)
    for x, y in zip(a["shards"], b["shards"], strict=True):  # the same bytes (no time in them)
        assert (tmp_path / "a" / x["name"]).read_bytes() == (
            tmp_path / "b" / y["name"]
        ).read_bytes()
    index = ShardIndex.load(tmp_path / "a")
    images = SampleReader(index, 16, 3).read_batch(np.arange(300))
    assert index.labels is not None and len(index.classes) == 1000
    np.testing.assert_array_equal(index.labels, synthetic_classes(np.arange(300), 1000))
    assert images.shape == (300, 16, 16, 3)
    assert len({im.tobytes() for im in images}) == 300  # every sample its own image
    with pytest.raises(ValueError, match="synthetic:N or synthetic:N:SIZE"):
        load_source("synthetic:many")
