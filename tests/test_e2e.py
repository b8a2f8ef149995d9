"""End to end: real torchrun ranks, real shards, real faiss, real W&B offline files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster_pipeline.config import load_config
from cluster_pipeline.run.wandb_file import read_wandb_file
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import RANK_THREADS, launcher_env
from cluster_pipeline.training.recipe import lr_factor
from cluster_pipeline.training.targets import DEEPCLUSTER_COLUMNS

pytestmark = pytest.mark.slow  # every test here starts rank processes or whole runs

REPO = Path(__file__).resolve().parent.parent
KEYS = {
    "epoch", "nmi_prev", "nmi_gt", "ari_gt", "kmeans_loss", "n_empty_before_split",
    "cluster_size_min", "cluster_size_median", "cluster_size_max", "train_loss",
    "time_extract_s", "time_gather_s", "time_cluster_s", "time_train_s", "images_per_s",
}  # fmt: skip


def cli(*args: str, nproc: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    """`cluster-pipeline ARGS` as one process, or on `nproc` torchrun ranks through launch.local."""
    prefix = ["-m", "launch.local", "--nproc", str(nproc)] if nproc else ["-m", "cluster_pipeline"]
    env = launcher_env(threads=RANK_THREADS if nproc else None)
    return subprocess.run(
        [sys.executable, *prefix, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=limit(timeout),
    )  # fmt: skip


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# A warmup and a cosine schedule, and W&B step rows every 5 of an epoch's 14 steps.
RECIPE = ("optim.schedule=cosine", "optim.warmup_epochs=0.5", "wandb.log_every_steps=5")


@pytest.fixture(scope="module")
def two_rank_run(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    cfg = "configs/digits_test.yaml"
    res = cli("train", "--config", cfg, f"data.shards={digits_shards}", f"run.dir={run_dir}",
              "run.progress=true", *RECIPE, nproc=2)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir.parent / "stdout.txt").write_text(res.stdout)
    (run_dir.parent / "stderr.txt").write_text(res.stderr)
    return run_dir


def test_two_rank_run_writes_metrics_with_every_key(two_rank_run: Path) -> None:
    rows = rows_of(two_rank_run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert r.keys() >= KEYS, KEYS - r.keys()
        assert 0.0 <= r["nmi_gt"] <= 1.0 and r["train_loss"] > 0
    assert rows[0]["nmi_prev"] is None and 0.0 <= rows[1]["nmi_prev"] <= 1.0
    for name in ("config.yaml", "report.png", "logs/rank0.log", "logs/rank1.log"):
        assert (two_rank_run / name).is_file(), name
    assert len(list((two_rank_run / "checkpoints").glob("checkpoint-*.pt"))) == 2


def test_the_log_a_user_follows_shows_the_epoch_table(two_rank_run: Path) -> None:
    """logs/rank0.log (what the launchers' "follow" hint tails) has the epoch table as stdout
    prints it, and no DEBUG lines; those are in rank0.debug.log."""
    log = (two_rank_run / "logs" / "rank0.log").read_text()
    header = " ".join(f"{title:>9}" for _, title, _ in DEEPCLUSTER_COLUMNS)
    assert log.count(header) == 1, log[-3000:]
    table = [line.split(": ", 1)[1] for line in log.splitlines() if ": " in line]
    assert sum(line.split()[0] in ("0", "1") for line in table if line.strip()) >= 2, log
    assert " DEBUG " not in log
    debug = (two_rank_run / "logs" / "rank0.debug.log").read_text()
    assert "phase train started" in debug and header in debug


def test_progress_into_a_pipe_is_log_lines_not_a_bar(two_rank_run: Path) -> None:
    """run.progress=true with stdout and stderr captured, not a terminal: no tqdm bar in them
    (captured as text, a bar's \\r reads as a newline: its "it/s" gives it away), and rank 0's
    log has the end-of-phase progress lines instead."""
    for name in ("stdout.txt", "stderr.txt"):
        text = (two_rank_run.parent / name).read_text()
        assert "it/s" not in text and "\x1b" not in text, text[-3000:]
    log = (two_rank_run / "logs" / "rank0.log").read_bytes()
    assert b"\r" not in log
    assert re.search(rb"train 1: \d+/\d+ batches \(100%\), [\d.]+ batch/s", log), log[-3000:]


def test_no_cluster_is_empty(two_rank_run: Path) -> None:
    k = 20  # configs/digits_test.yaml
    for epoch, row in enumerate(rows_of(two_rank_run)):
        labels = np.load(two_rank_run / "assignments" / f"epoch-{epoch:04d}.npy")
        assert len(labels) == 1797
        sizes = np.bincount(labels, minlength=k)
        assert len(sizes) == k and sizes.min() >= 1
        assert row["cluster_size_min"] == sizes.min() and row["cluster_size_max"] == sizes.max()


def test_wandb_offline_run_holds_the_same_values(two_rank_run: Path) -> None:
    files = list((two_rank_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # rank 0 only
    history = read_wandb_file(files[0]).epoch_rows
    rows = rows_of(two_rank_run)
    assert [h["epoch"] for h in history] == [r["epoch"] for r in rows]
    for h, r in zip(history, rows, strict=True):
        assert h["nmi_gt"] == pytest.approx(r["nmi_gt"])
        assert h["train_loss"] == pytest.approx(r["train_loss"])
    assert history[1]["nmi_prev"] == pytest.approx(rows[1]["nmi_prev"])


def test_wandb_run_has_epoch_axis_step_rows_media_and_summary(two_rank_run: Path) -> None:
    """The offline run file read back: epoch metrics plotted against `epoch` (not W&B's
    _step), a step row every 5 steps with the scheduled rate, a cluster-size histogram and an
    image grid per epoch, and at the end the report, the NMI table and best/final values."""
    run_dir = next((two_rank_run / "wandb").glob("offline-run-*"))
    run = read_wandb_file(next(run_dir.glob("run-*.wandb")))
    assert run.metrics["epoch"] == "" and run.metrics["train/*"] == "train/global_step"
    for key in ("nmi_gt", "nmi_prev", "train_loss", "cluster_sizes", "cluster_images"):
        assert run.metrics[key] == "epoch", (key, run.metrics)
    steps = [h for h in run.history if "train/global_step" in h]
    assert len(steps) >= 4 and {"train/loss", "train/acc", "train/lr", "train/images_per_s",
                                "train/data_wait_s"} <= steps[0].keys()  # fmt: skip
    per_epoch = round(steps[0]["train/global_step"] / steps[0]["train/epoch"])
    cfg = load_config("configs/digits_test.yaml", list(RECIPE))
    for h in steps:
        epoch, before = divmod(h["train/global_step"] - 1, per_epoch)  # steps before this one
        assert (before + 1) % 5 == 0, (h, per_epoch)
        want = cfg.optim.lr * lr_factor(cfg.optim, cfg.train.epochs, epoch, before, per_epoch)
        assert h["train/lr"] == pytest.approx(want, rel=1e-9), h
    assert steps[0]["train/lr"] < cfg.optim.lr  # still warming up at step 5 of 14
    rows = run.epoch_rows
    for row in rows:
        hist = row["cluster_sizes"]
        assert hist["_type"] == "histogram" and sum(hist["values"]) == 20  # k clusters
        image = row["cluster_images"]
        assert image["_type"] == "image-file" and (run_dir / "files" / image["path"]).is_file()
    end = next(h for h in run.history if "report" in h)
    assert end["report"]["_type"] == "image-file" and end["epochs"]["_type"] == "table-file"
    metrics = rows_of(two_rank_run)
    assert run.summary["final/nmi_gt"] == pytest.approx(metrics[-1]["nmi_gt"])
    assert run.summary["best/nmi_gt"] == pytest.approx(max(r["nmi_gt"] for r in metrics))


def test_rerun_under_another_recipe_is_refused(two_rank_run: Path, digits_shards: Path) -> None:
    res = cli("train", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              f"run.dir={two_rank_run}", "train.epochs=3", *RECIPE, "optim.lr=0.1")  # fmt: skip
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "optim.lr=0.05 (now 0.1)" in res.stderr, res.stderr[-3000:]
    assert [r["epoch"] for r in rows_of(two_rank_run)] == [0, 1]


def test_rerun_resumes_without_repeating_an_epoch(two_rank_run: Path, digits_shards: Path) -> None:
    """... and compiles the network (torch.compile, aot_eager: no code generation) under DDP."""
    wandb_before = {p.name for p in (two_rank_run / "wandb").glob("offline-run-*")}
    res = cli("train", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              f"run.dir={two_rank_run}", "train.epochs=3", *RECIPE, "train.compile=true",
              "train.compile_backend=aot_eager")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "training through torch.compile (mode default, backend aot_eager)" in res.stdout
    assert [r["epoch"] for r in rows_of(two_rank_run)] == [0, 1, 2]
    ids = {p.name.rsplit("-", 1)[-1] for p in (two_rank_run / "wandb").glob("offline-run-*")}
    assert ids == {n.rsplit("-", 1)[-1] for n in wandb_before}, "resume must continue the W&B run"


def test_extract_writes_every_sample_once(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    res = cli("extract", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              f"run.dir={tmp_path / 'run'}", "--out", str(out), nproc=2)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    feats, index = np.load(out / "features.npy"), np.load(out / "index.npy")
    assert feats.shape == (1797, 128) and np.isfinite(feats).all()
    assert np.array_equal(index, np.arange(1797))
    assert np.array_equal(np.load(out / "labels.npy")[:10], np.arange(10))


def test_k_greater_than_n_is_a_clear_error(digits_shards: Path, tmp_path: Path) -> None:
    res = cli("train", "--config", "configs/digits_test.yaml", f"data.shards={digits_shards}",
              f"run.dir={tmp_path / 'run'}", "cluster.k=5000")  # fmt: skip
    assert res.returncode == 2
    assert "cluster.k=5000" in res.stderr and "1797" in res.stderr


def test_unknown_config_key_is_a_clear_error(tmp_path: Path) -> None:
    res = cli("train", "--config", "configs/digits_test.yaml", "cluster.kk=5")
    assert res.returncode == 2 and "cluster.kk" in res.stderr
