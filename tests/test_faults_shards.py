"""Corrupt and changed shards: fail naming shard and key, or skip, count and never train on them.

The corrupt shard sets are copies of the digits shards (500, 500, 500, 297 samples) with
  - garbage: sample 250's image bytes overwritten in place (same length, the tar stays valid),
  - no_image: sample 1234's image member renamed to .txt (the sample has no image member),
  - truncated: shard 3 cut inside the header of sample 1790 (samples 1790..1796 lost).
Each is far from the shards' first and last 64 KiB, so only reading the sample finds it.
With 2 ranks, rank 0 reads samples 0..897 and rank 1 898..1796: both ranks meet bad samples.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from cluster_pipeline import cli, dist
from cluster_pipeline.clustering import metrics
from cluster_pipeline.config import Config, DistConfig, load_config
from cluster_pipeline.data.augment import center_crop, to_float
from cluster_pipeline.data.loader import batch_loader
from cluster_pipeline.data.reader import SampleReader, ShardError, ShardIndex
from cluster_pipeline.data.sampler import uniform_cluster_sampler
from cluster_pipeline.data.shards import INDEX_FILE, SAMPLES_FILE, shard_fingerprint
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.features.gather import broadcast_labels, gather_features
from cluster_pipeline.models.nets import ClusterNet, build_model
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import launcher_env, run_ranks

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "digits_test.yaml")
N = 1797
GARBAGE, NO_IMAGE, TRUNCATED = 250, 1234, np.arange(1790, N)
BAD = np.concatenate([[GARBAGE, NO_IMAGE], TRUNCATED])  # sorted
GOOD = np.setdiff1d(np.arange(N), BAD)


# ------------------------------------------------------------------------ building bad shards


def _where(root: Path, i: int) -> tuple[Path, int, int]:
    """(shard path, offset, size) of sample i's image member."""
    shard, offset, size, _ = (int(v) for v in np.load(root / SAMPLES_FILE)[i])
    name = json.loads((root / INDEX_FILE).read_text())["shards"][shard]["name"]
    return root / name, offset, size


def garble(root: Path, i: int) -> None:
    path, offset, size = _where(root, i)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write((b"not an image " * (size // 13 + 1))[:size])


def drop_image_member(root: Path, i: int) -> None:
    """Rename sample i's image member to <key>.txt: a valid tar whose sample i has no image."""
    path, offset, _ = _where(root, i)
    with open(path, "r+b") as fh:
        fh.seek(offset - 512)
        info = tarfile.TarInfo.frombuf(fh.read(512), "utf-8", "surrogateescape")
        info.name = f"{i:09d}.txt"
        header = info.tobuf(tarfile.USTAR_FORMAT)
        assert len(header) == 512
        fh.seek(offset - 512)
        fh.write(header)


def truncate_at(root: Path, i: int) -> None:
    """Cut sample i's shard inside the tar header of sample i."""
    path, offset, _ = _where(root, i)
    with open(path, "r+b") as fh:
        fh.truncate(offset - 512 + 100)


def corrupt_copy(src: Path, dst: Path, *kinds: str) -> Path:
    shutil.copytree(src, dst)
    for kind in kinds:
        {"garbage": lambda: garble(dst, GARBAGE),
         "no_image": lambda: drop_image_member(dst, NO_IMAGE),
         "truncated": lambda: truncate_at(dst, int(TRUNCATED[0]))}[kind]()  # fmt: skip
    return dst


@pytest.fixture(scope="module")
def corrupt_shards(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three corruptions in one shard set: 9 of 1797 samples unreadable (0.50%)."""
    root = tmp_path_factory.mktemp("corrupt") / "shards"
    corrupt_copy(digits_shards, root, "garbage", "no_image", "truncated")
    with tarfile.open(root / "shard-000002.tar") as tf:  # a standard reader agrees
        names = set(tf.getnames())
    assert f"{NO_IMAGE:09d}.png" not in names and f"{NO_IMAGE:09d}.txt" in names
    return root


# --------------------------------------------------------------- the CLI in this process


def train_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", CONFIG, f"data.shards={shards}", f"run.dir={run_dir}",
            "wandb.mode=disabled", *extra]  # fmt: skip


def no_work_done(run_dir: Path) -> None:
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "assignments").exists()


# ------------------------------------------------------------------------------- fail mode


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("garbage", r"shard-000000.tar: sample 000000250: image does not decode (cannot identify "
                    "image file)"),
        ("no_image", r"shard-000002.tar: sample 000001234: no image member ('000001234.txt'"),
        ("truncated", "shard-000003.tar is truncated: "),
    ],
)  # fmt: skip
def test_fail_mode_names_shard_and_key(
    kind: str, expected: str, digits_shards: Path, tmp_path: Path, run_cli
) -> None:
    shards = corrupt_copy(digits_shards, tmp_path / "shards", kind)
    status, err = run_cli(*train_args(shards, tmp_path / "run"))
    assert status == 2, err
    assert "cluster-pipeline train: error:" in err
    if kind == "truncated":  # found when the index is checked, before any work
        assert "cut at sample 000001790 (7 samples lost" in err, err
        assert "re-run `cluster-pipeline make-shards`" in err, err
    assert expected in err, err
    no_work_done(tmp_path / "run")


# ------------------------------------------------------------------------------- skip mode


@pytest.fixture(scope="module")
def skip_run(corrupt_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two torchrun ranks, data.on_error=skip, two epochs on the corrupt shards."""
    run_dir = tmp_path_factory.mktemp("skip") / "run"
    env = launcher_env()
    res = subprocess.run(
        [sys.executable, "-m", "launch.local", "--nproc", "2", "train", "--config", CONFIG,
         f"data.shards={corrupt_shards}", f"run.dir={run_dir}", "data.on_error=skip",
         "wandb.mode=disabled"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=limit(300),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def test_skip_mode_counts_the_bad_samples_every_epoch(skip_run: Path) -> None:
    rows = [json.loads(x) for x in (skip_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert [r["skipped_samples"] for r in rows] == [len(BAD)] * 2


def test_skip_mode_labels_bad_samples_minus_one(skip_run: Path, corrupt_shards: Path) -> None:
    truth = np.load(corrupt_shards / SAMPLES_FILE)[:, 3]
    rows = [json.loads(x) for x in (skip_run / "metrics.jsonl").read_text().splitlines()]
    for epoch, row in enumerate(rows):
        labels = np.load(skip_run / "assignments" / f"epoch-{epoch:04d}.npy")
        np.testing.assert_array_equal(np.flatnonzero(labels < 0), BAD)
        assert (labels[BAD] == -1).all() and labels[GOOD].min() >= 0
        # Metrics cover only the samples read.
        sizes = np.bincount(labels[GOOD], minlength=20)
        assert sizes.sum() == len(GOOD) and sizes.min() >= 1
        assert (row["cluster_size_min"], row["cluster_size_max"]) == (sizes.min(), sizes.max())
        want = normalized_mutual_info_score(truth[GOOD], labels[GOOD])
        assert row["nmi_gt"] == pytest.approx(want, abs=1e-12)


def test_skip_mode_logs_shard_key_and_reason_on_the_reading_rank(
    skip_run: Path, corrupt_shards: Path
) -> None:
    rank0 = (skip_run / "logs" / "rank0.log").read_text()
    rank1 = (skip_run / "logs" / "rank1.log").read_text()
    assert "shard-000000.tar: sample 000000250: image does not decode" in rank0
    assert "shard-000002.tar: sample 000001234: no image member" in rank1
    cut = (corrupt_shards / "shard-000003.tar").stat().st_size
    for i in TRUNCATED:  # each names the real end of the file, not where its sample was
        assert f"shard-000003.tar: sample {i:09d}: truncated: the file ends at byte {cut}," in rank1
    assert "sample 000000250" not in rank1 and "sample 000001234" not in rank0
    # Rank 0 sums up the epoch, first keys included.
    assert "9 of 1797 samples could not be read and are left out (first: 000000250 000001234 " \
        "000001790" in rank0  # fmt: skip
    # The training epochs read with a strict reader: had a bad sample been drawn, it would
    # have raised. Each epoch's extraction (2 epochs) logs each bad sample once, nothing more.
    assert rank0.count("sample 000000250: image") == 2
    assert rank1.count("sample 000001234: no image") == 2


# ------------------------------------------------- fail mode on two ranks: who is to blame


@pytest.fixture(scope="module")
def tree_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """The digits as an image folder (class folders of PNG files) written by make-shards, one
    sample garbled in the middle of shard 1: (shards, bad sample, its original file)."""
    from cluster_pipeline.data.sources import digits_source

    base = tmp_path_factory.mktemp("tree")
    source = digits_source()
    for i, (image, label) in enumerate(zip(source.images, source.labels, strict=True)):
        folder = base / "tree" / f"digit {label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:04d}.png").write_bytes(image)
    shards = base / "shards"
    assert cli.main(["make-shards", "--source", f"imagefolder:{base / 'tree'}", "--out",
                     str(shards), "--samples-per-shard", "1000"]) == 0  # fmt: skip
    bad = 1500  # rank 1 extracts 898..1796
    garble(shards, bad)
    original = ShardIndex.load(shards).names.source(bad)
    assert original and original.startswith("digit ") and original.endswith(".png"), original
    return shards, bad, original


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "train-supervised"])
def test_fail_mode_on_two_ranks_blames_the_rank_that_read_the_sample(
    command: str, tree_shards: tuple[Path, int, str], tmp_path: Path
) -> None:
    """data.on_error=fail, a damaged sample on 2 ranks: in extraction (train: rank 1 reads it)
    and in training (train-supervised: whichever rank draws it). The rank that read it ends on
    its SampleError, the other on "rank R failed: <that error>", every rank and the launcher
    exit 2, and both name the shard, the sample and the original file."""
    shards, bad, original = tree_shards
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "launch.local", "--nproc", "2", command, "--config", CONFIG,
         f"data.shards={shards}", f"run.dir={run_dir}", "wandb.mode=disabled"],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=limit(300),
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    what = f"shard {shards / 'shard-000001.tar'}: sample {bad:09d} ({original}): image does not"
    last = {}
    for rank in range(2):
        lines = (run_dir / "logs" / f"rank{rank}.log").read_text().splitlines()
        errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
        assert errors, lines[-20:]
        last[rank] = errors[-1]
        assert what in last[rank], last[rank]
    readers = [r for r in range(2) if "failed:" not in last[r]]
    assert len(readers) == 1, last
    reader = readers[0]
    if command == "train":
        assert reader == 1, last
    other = 1 - reader
    assert f"rank {reader} failed: {what}" in last[other], last[other]
    assert f"rank {other} failed" not in out and "rank(s) [" not in out, out[-3000:]
    assert res.stderr.count(f"cluster-pipeline {command}: error: ") == 2, res.stderr[-3000:]
    assert res.stderr.count(what) >= 2, res.stderr[-3000:]


def test_too_many_skipped_samples_abort_with_a_clear_error(
    corrupt_shards: Path, tmp_path: Path, run_cli
) -> None:
    run_dir = tmp_path / "run"
    status, err = run_cli(*train_args(corrupt_shards, run_dir, "data.on_error=skip",
                                      "data.max_skip_fraction=0.004"))  # fmt: skip
    assert status == 2, err
    assert "9 of 1797 samples (0.50%)" in err, err
    assert "more than data.max_skip_fraction=0.004" in err, err
    no_work_done(run_dir)


def test_uniform_sampler_never_draws_a_skipped_sample() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=500)
    skipped = rng.choice(500, size=40, replace=False)
    labels[skipped] = -1
    for seed in range(10):
        draws = uniform_cluster_sampler(labels, 1000, seed)
        assert len(draws) == 1000
        assert not np.isin(draws, skipped).any()
        counts = np.bincount(labels[draws], minlength=7)
        assert counts.max() - counts.min() <= 1


def test_metrics_ignore_skipped_samples() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, size=200)
    labels = (truth + (rng.random(200) < 0.3)) % 5
    labels[[3, 50, 77]] = -1
    good = labels >= 0
    assert metrics.nmi(truth, labels) == normalized_mutual_info_score(truth[good], labels[good])
    assert metrics.nmi(labels, labels) == 1.0
    stats = metrics.cluster_stats(labels, 6)
    assert stats["n_empty_clusters"] == 1 and stats["cluster_size_min"] == 0
    assert stats["cluster_size_max"] == np.bincount(labels[good]).max()


@pytest.mark.slow
def test_loader_workers_report_skipped_samples_to_the_main_process(corrupt_shards: Path) -> None:
    index = ShardIndex.load(corrupt_shards, allow_truncated=True)
    reader = SampleReader(index, load_size=8, channels=1)
    wanted = np.concatenate([np.arange(200, 260), np.arange(1200, 1260), np.arange(1760, N)])
    loader = batch_loader(reader, wanted, 64, num_workers=2, timeout_s=60, skip_errors=True)
    batches = list(loader)
    read = np.concatenate([b.indices.numpy() for b in batches])
    skipped = np.concatenate([b.skipped.numpy() for b in batches])
    reasons = [r for b in batches for r in b.reasons]
    np.testing.assert_array_equal(np.sort(np.concatenate([read, skipped])), wanted)
    np.testing.assert_array_equal(skipped, BAD)
    assert len(reasons) == len(BAD) and "sample 000001234: no image member" in reasons[1]
    images = np.concatenate([b.images.numpy() for b in batches])
    np.testing.assert_array_equal(images, reader.read_batch(read))  # the good rows, in order
    # A strict loader (training) stops at the first bad sample, naming it, from a worker too.
    strict = iter(batch_loader(reader, wanted[:64], 64, num_workers=1, timeout_s=60))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample 000000250: image does not"):
        next(strict)
    del strict  # shut down here, not in the next test: after an error, DataLoader waits 5 s
    gc.collect()  # per worker, and the traceback's reference cycle holds the iterator


# ----------------------------------------------------- missing or changed shards: before work


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_missing_shard_fails_before_any_work(
    on_error: str, digits_shards: Path, tmp_path: Path, run_cli
) -> None:
    shards = corrupt_copy(digits_shards, tmp_path / "shards")
    (shards / "shard-000002.tar").unlink()
    status, err = run_cli(*train_args(shards, tmp_path / "run", f"data.on_error={on_error}"))
    assert status == 2, err
    assert "shard-000002.tar is missing" in err, err
    assert "re-run `cluster-pipeline make-shards`" in err, err
    no_work_done(tmp_path / "run")


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_shard_changed_at_the_same_size_fails_before_any_work(
    on_error: str, digits_shards: Path, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = corrupt_copy(digits_shards, tmp_path / "shards")
    head, tail = shards / "shard-000001.tar", shards / "shard-000002.tar"
    sizes = head.stat().st_size, tail.stat().st_size
    garble(shards, 501)  # in shard 1's first 64 KiB
    garble(shards, 1498)  # in shard 2's last 64 KiB
    assert (head.stat().st_size, tail.stat().st_size) == sizes
    import cluster_pipeline.training.targets

    def no_extraction(*args: object) -> None:
        raise AssertionError("extraction started")

    monkeypatch.setattr(cluster_pipeline.training.targets, "extract_features", no_extraction)
    status, err = run_cli(*train_args(shards, tmp_path / "run", f"data.on_error={on_error}"))
    assert status == 2, err
    for name in ("shard-000001.tar", "shard-000002.tar"):
        assert f"{name} changed since make-shards: same size" in err, err
    assert "re-run `cluster-pipeline make-shards`" in err, err
    no_work_done(tmp_path / "run")


def test_index_without_fingerprints_still_loads(digits_shards: Path, tmp_path: Path) -> None:
    shards = corrupt_copy(digits_shards, tmp_path / "shards")
    meta = json.loads((shards / INDEX_FILE).read_text())
    assert meta["shards"][0]["fingerprint"] == shard_fingerprint(shards / "shard-000000.tar")
    for entry in meta["shards"]:
        del entry["fingerprint"]
    (shards / INDEX_FILE).write_text(json.dumps(meta))
    assert ShardIndex.load(shards).num_samples == N
    truncate_at(shards, int(TRUNCATED[0]))  # the size is still checked
    with pytest.raises(ShardError, match=r"shard-000003\.tar is truncated"):
        ShardIndex.load(shards)


# ---------------------------------------- 2 gloo ranks: gather exactly-once with skips, extract


def _feats(n: int) -> np.ndarray:
    return np.arange(3 * n, dtype=np.float32).reshape(n, 3)


# Per case: N, then per rank (extracted indices, skipped indices).
GATHER_CASES: dict[str, tuple[int, list[tuple[list[int], list[int]]]]] = {
    "split": (10, [([0, 2, 4], [1]), ([9, 6, 5, 8], [7, 3])]),
    "rank0_skips_only": (4, [([], [2, 0]), ([1, 3], [])]),
    "extracted_and_skipped": (6, [([0, 1, 2], [3]), ([3, 4], [])]),  # 3 twice, 5 never
    "skipped_twice": (5, [([0, 1], [2]), ([3], [2])]),  # 2 skipped by both, 4 never
    "skip_out_of_range": (4, [([0, 1], []), ([2], [9])]),
    "count_mismatch": (5, [([0, 1], [2]), ([3], [])]),
}


def _digits_config(shards: Path, on_error: str) -> Config:
    overrides = [f"data.shards={shards}", f"data.on_error={on_error}"]
    return load_config(CONFIG, [*overrides, "data.num_workers=0", "data.extract_batch_size=97"])


def _model(cfg: Config) -> ClusterNet:
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.data.channels, cfg.cluster.k)


def _ranks_worker(rank: int, world: int, corrupt: Path, garbage_only: Path) -> dict:
    ctx = dist.init_distributed(DistConfig.timeout_s, DistConfig.heartbeat_timeout_s)
    out: dict = {}
    for case, (n, per_rank) in GATHER_CASES.items():
        index, skipped = (np.asarray(a, dtype=np.int64) for a in per_rank[rank])
        try:
            g = gather_features(ctx, index, _feats(n)[index], n, skipped)
            out[case] = None if g is None else (g.feats, g.index, g.skipped)
        except RuntimeError as exc:
            out[case] = str(exc)
    out["after_errors"] = broadcast_labels(
        ctx, np.arange(3, dtype=np.int64) if rank == 0 else None, 3
    )
    # Extraction in skip mode on the corrupt shards, gathered.
    cfg = _digits_config(corrupt, "skip")
    reader = SampleReader(ShardIndex.load(corrupt, allow_truncated=True), 8, 1)
    idx, feats, skipped = extract_features(_model(cfg), reader, cfg, ctx)
    g = gather_features(ctx, idx, feats, N, skipped)
    out["skip"] = (idx, skipped, None if g is None else (g.feats, g.index, g.skipped))
    # Fail mode: both ranks meet a bad sample; then only rank 0 does.
    for case, root in (("fail_both", corrupt), ("fail_rank0", garbage_only)):
        cfg = _digits_config(root, "fail")
        reader = SampleReader(ShardIndex.load(root, allow_truncated=True), 8, 1)
        try:
            extract_features(_model(cfg), reader, cfg, ctx)
            out[case] = "no error"
        except Exception as exc:
            out[case] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.fixture(scope="module")
def rank_results(corrupt_shards: Path, digits_shards: Path, tmp_path_factory) -> list[dict]:
    garbage_only = corrupt_copy(digits_shards, tmp_path_factory.mktemp("g") / "s", "garbage")
    return run_ranks(2, _ranks_worker, corrupt_shards, garbage_only, timeout=120)


def test_gather_with_skips_equals_single_process(rank_results: list[dict]) -> None:
    for case in ("split", "rank0_skips_only"):
        n, per_rank = GATHER_CASES[case]
        skipped = np.sort(np.concatenate([np.asarray(s, np.int64) for _, s in per_rank]))
        good = np.setdiff1d(np.arange(n), skipped)
        feats, index, got_skipped = rank_results[0][case]
        np.testing.assert_array_equal(index, good)
        np.testing.assert_array_equal(got_skipped, skipped)
        np.testing.assert_array_equal(feats, _feats(n)[good])  # row j is sample index[j]
        assert rank_results[1][case] is None


def test_gather_exactly_once_check_covers_skipped_samples(rank_results: list[dict]) -> None:
    rank0, rank1 = rank_results
    assert "1 missing (first [5]), 1 duplicated (first [3])" in rank0["extracted_and_skipped"]
    assert "1 both extracted and skipped (first [3])" in rank0["extracted_and_skipped"]
    assert "1 missing (first [4]), 1 duplicated (first [2])" in rank0["skipped_twice"]
    assert "1 skipped more than once (first [2])" in rank0["skipped_twice"]
    assert "rank 1 sent sample indices in [9, 9], outside 0..3" in rank0["skip_out_of_range"]
    for case in ("extracted_and_skipped", "skipped_twice", "skip_out_of_range"):
        assert "did not read every sample exactly once (or report it skipped" in rank1[case]
    for result in rank_results:
        mismatch = result["count_mismatch"]
        assert "3 rows (per rank [2, 1]) for 5 samples and skipped 1 (per rank [1, 0])" in mismatch
        np.testing.assert_array_equal(result["after_errors"], np.arange(3))


def test_distributed_skip_extraction_equals_single_process(
    rank_results: list[dict], corrupt_shards: Path
) -> None:
    (idx0, skipped0, gathered), (idx1, skipped1, none) = (r["skip"] for r in rank_results)
    assert none is None
    np.testing.assert_array_equal(skipped0, [GARBAGE])
    np.testing.assert_array_equal(skipped1, np.concatenate([[NO_IMAGE], TRUNCATED]))
    np.testing.assert_array_equal(np.sort(np.concatenate([idx0, idx1])), GOOD)
    feats, index, skipped = gathered
    np.testing.assert_array_equal(index, GOOD)
    np.testing.assert_array_equal(skipped, BAD)
    # Reference: one process, the good samples only, no loader, no partition.
    cfg = _digits_config(corrupt_shards, "skip")
    reader = SampleReader(ShardIndex.load(corrupt_shards, allow_truncated=True), 8, 1)
    x = to_float(torch.from_numpy(reader.read_batch(GOOD)), cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        want = _model(cfg).eval().features(center_crop(x, cfg.data.image_size)).numpy()
    np.testing.assert_allclose(feats, want, rtol=0, atol=1e-5)


def test_fail_mode_raises_on_every_rank(rank_results: list[dict]) -> None:
    rank0, rank1 = rank_results
    assert rank0["fail_both"].startswith("SampleError: shard "), rank0["fail_both"]
    assert "shard-000000.tar: sample 000000250: image does not decode" in rank0["fail_both"]
    assert "shard-000002.tar: sample 000001234: no image member" in rank1["fail_both"]
    assert "shard-000000.tar: sample 000000250: image does not decode" in rank0["fail_rank0"]
    # The other rank names the failing rank and its error, with its status (bad input: 2).
    assert rank1["fail_rank0"].startswith("RankFailedError: rank 0 failed: shard "), rank1
    assert "sample 000000250: image does not decode" in rank1["fail_rank0"], rank1["fail_rank0"]
