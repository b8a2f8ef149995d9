"""Exact resume: a run stopped and continued ends bit-identical to the uninterrupted run, in the
same W&B run.

Stops land at exact positions through a StopFlag that fires at its Nth poll (the loop polls once
before clustering each epoch and before every training step), then real signals: SIGTERM to
every torchrun rank, and SIGKILL of one rank followed by a restart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster_pipeline.run import checkpoint
from cluster_pipeline.run.metrics_file import read_metrics
from cluster_pipeline.run.wandb_file import read_wandb_file
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.testing.multiproc import launcher_env, run_ranks
from cluster_pipeline.testing.stops import train_rank, weights_hash

pytestmark = pytest.mark.slow  # every test here starts rank processes or whole runs

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "digits_test.yaml")
EPOCHS = 3
# digits: 1797 samples, 2 ranks x batch 64 -> 14 steps per epoch; one poll before clustering
# and one per step, so epoch e's polls are 15e+1 (before clustering) and 15e+2+s (step s).
POLLS_PER_EPOCH = 15


# Every run here trains under a full recipe: a rate that changes every step (warmup, then
# cosine), scaled with the batch, clipped gradients, no decay on BatchNorm and biases. A
# resume that set the rate or the groups from anything but the position would not be exact.
RECIPE = [
    "optim.schedule=cosine",
    "optim.warmup_epochs=0.5",
    "optim.scale_lr_with_batch=true",
    "optim.base_batch_size=64",
    "optim.clip_grad_norm=5.0",
    "optim.no_decay_bn_bias=true",
]


def overrides(shards: Path, run_dir: Path, *extra: str, recipe: list[str] = RECIPE) -> list[str]:
    """The runs' arguments; recipe=[] for runs of the code before the recipe (schema 1)."""
    return [f"data.shards={shards}", f"run.dir={run_dir}", f"train.epochs={EPOCHS}",
            "train.stop_check_every=1", "train.checkpoint_every_steps=4",
            "train.keep_checkpoints=50", *recipe, *extra]  # fmt: skip


def metric_values(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "images_per_s"}
            for r in rows]  # fmt: skip


# Stop positions of test_stop_and_resume_is_bit_identical, as the poll a StopAtPoll stops at.
STOPS = {
    "epoch-boundary": POLLS_PER_EPOCH + 1,
    "mid-epoch": POLLS_PER_EPOCH + 2 + 5,
    "right-after-clustering": 2 * POLLS_PER_EPOCH + 2,
}
# The mid-epoch case also runs with wandb.mode=auto and no WANDB_MODE (the W&B test below).
WANDB_CASE = "mid-epoch"


def stop_and_resume_every_case(rank: int, world: int, shards: Path, base: Path) -> dict:
    """The uninterrupted run, then each case of STOPS stopped and resumed, in one pair of rank
    processes (spawning ranks costs seconds): the same calls as separate processes would make,
    each run with its own process group. A copy of the mid-epoch case's run directory as it
    was stopped is left for test_resume_refuses_a_different_world_size_mid_epoch."""
    out = {"reference": train_rank(rank, world, CONFIG, overrides(shards, base / "reference"), 0)}
    for case, stop_at in STOPS.items():
        run_dir = base / case
        args = overrides(shards, run_dir, *(["wandb.mode=auto"] if case == WANDB_CASE else []))
        mode = os.environ.pop("WANDB_MODE", None) if case == WANDB_CASE else None
        first = train_rank(rank, world, CONFIG, args, stop_at)
        stopped = {"first": first, "epochs_logged": len(metric_values(run_dir)) if rank == 0 else 0}
        if case == WANDB_CASE and rank == 0:
            stopped["wandb_id"] = checkpoint.load_latest(run_dir)["tracker"]["wandb_id"]  # type: ignore[index]
            shutil.copytree(run_dir, base / "stopped-mid-epoch")
        stopped["second"] = train_rank(rank, world, CONFIG, args, 0)
        if mode is not None:
            os.environ["WANDB_MODE"] = mode
        out[case] = stopped
    return out


@pytest.fixture(scope="module")
def resumed(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    base = tmp_path_factory.mktemp("resume")
    return base, run_ranks(2, stop_and_resume_every_case, digits_shards, base, timeout=600)


@pytest.fixture(scope="module")
def reference(resumed: tuple[Path, list]) -> Path:
    base, results = resumed
    assert [r["reference"] for r in results] == ["done"] * 2
    return base / "reference"


@pytest.mark.parametrize("case", list(STOPS))
def test_stop_and_resume_is_bit_identical(
    reference: Path, resumed: tuple[Path, list], case: str
) -> None:
    base, results = resumed
    run_dir = base / case
    first = [r[case]["first"] for r in results]
    assert all(r.startswith("stopped:") for r in first), first
    epoch, step = divmod(STOPS[case] - 1, POLLS_PER_EPOCH)
    expected = checkpoint.checkpoint_path(run_dir, epoch, None if step == 0 else step - 1)
    assert first[0] == f"stopped:{expected}"
    assert results[0][case]["epochs_logged"] == epoch
    assert [r[case]["second"] for r in results] == ["done"] * 2
    assert weights_hash(run_dir, EPOCHS) == weights_hash(reference, EPOCHS)
    assert metric_values(run_dir) == metric_values(reference)


def torchrun(args: list[str], token: str = "") -> subprocess.Popen:
    """launch.local in a process group of its own, as a shell starts a job; every process it
    starts inherits CLUSTER_PIPELINE_TEST_TOKEN=`token` (see processes_of)."""
    env = launcher_env() | {"CLUSTER_PIPELINE_TEST_TOKEN": token}
    cmd = [sys.executable, "-m", "launch.local", "--nproc", "2", "train", "--config", CONFIG, *args]
    out = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def processes_of(token: str) -> list[str]:
    """Every live process that inherited `token`, wherever it was reparented: the launcher's
    ranks, their forkservers, resource trackers, DataLoader workers and W&B services."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"={token}".encode() in (proc / "environ").read_bytes():
                state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z":
                    found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:120]!r}")
        except OSError:
            continue
    return found


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    """The rank processes: the launcher's descendants that run cluster_pipeline."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True,
                         text=True).stdout  # fmt: skip
    procs = [line.split(None, 2) for line in out.splitlines()]
    family, ranks = {launcher.pid}, []
    for _ in range(3):  # children, grandchildren (under an agent such as torchrun)
        for pid, ppid, args in procs:
            if int(ppid) in family and int(pid) not in family:
                family.add(int(pid))
                if "-m cluster_pipeline" in args and "torch.distributed.run" not in args:
                    ranks.append(int(pid))
    return ranks


def wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit(timeout)
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# How people and machines stop a local run: the launcher's exit status (75: a stop with a
# checkpoint; a launcher killed by SIGKILL has none of its own, its ranks stop with a checkpoint
# on their parent-death signal; 1: any failure), and whether the test also continues the run
# to the end (every stop writes its checkpoint the same way: three of them are continued).
STRIKES = {
    "ctrl-c-to-the-process-group": (75, True),
    "sigterm-to-the-process-group": (75, False),
    "sigterm-to-the-launcher-only": (75, False),
    "sigterm-to-every-rank": (75, True),
    "sigkill-of-the-launcher": (-9, False),
    "sigkill-of-one-rank": (1, True),
}


def strike(how: str, launcher: subprocess.Popen) -> None:
    pids = rank_pids(launcher) if how in ("sigterm-to-every-rank", "sigkill-of-one-rank") else []
    if how == "ctrl-c-to-the-process-group":
        os.killpg(launcher.pid, signal.SIGINT)
    elif how == "sigterm-to-the-process-group":
        os.killpg(launcher.pid, signal.SIGTERM)
    elif how == "sigterm-to-the-launcher-only":
        os.kill(launcher.pid, signal.SIGTERM)
    elif how == "sigterm-to-every-rank":
        assert len(pids) == 2, pids
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    elif how == "sigkill-of-the-launcher":
        os.kill(launcher.pid, signal.SIGKILL)
    else:
        assert len(pids) == 2, pids
        os.kill(pids[1], signal.SIGKILL)


@pytest.mark.parametrize("how", list(STRIKES))
def test_real_signal_then_restart_is_bit_identical(
    reference: Path, digits_shards: Path, tmp_path: Path, how: str
) -> None:
    """Each way a run is stopped for real, with DataLoader workers (forkserver) on both ranks:
    the launcher's status, no process left behind within seconds, then the same command
    continues to the uninterrupted run's exact weights and metrics."""
    run_dir = tmp_path / "run"
    args = overrides(digits_shards, run_dir, "data.num_workers=1")
    status, continued = STRIKES[how]
    token = f"{how}-{os.getpid()}-{time.monotonic_ns()}"
    proc = torchrun(args, token)
    # Strike once training is under way: a within-epoch checkpoint exists (of epoch 1 when the
    # run is continued, so that the continuation starts from a mid-run clustering).
    prefix = "checkpoint-000001-" if continued else "checkpoint-00000"
    wait_for(lambda: any(p.name.startswith(prefix) and "-" in p.name[11:]
                         for p in checkpoint.list_checkpoints(run_dir)))  # fmt: skip
    strike(how, proc)
    struck = time.monotonic()
    out, _ = proc.communicate(timeout=limit(120))
    if status == 1:  # rank 1 killed: rank 0 names it and fails
        assert proc.returncode not in (0, 75), out[-3000:]
        log = (run_dir / "logs" / "rank0.log").read_text()
        assert re.search(r"rank 1 is lost: no heartbeat for \d+ s .*; rank 0 was in ", log), log
        assert "rank 1 is lost" in out, out[-3000:]
    else:
        assert proc.returncode == status, out[-3000:]
    deadline = struck + limit(15)
    while processes_of(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_of(token), processes_of(token)
    if status != 1:  # every rank stopped at a step boundary, with a checkpoint
        log = (run_dir / "logs" / "rank0.log").read_text()
        assert re.search(r"stopping at epoch \d+ step \d+; checkpoint", log), log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.is_file() or len(metric_values(run_dir)) < EPOCHS
    if not continued:
        return
    again = torchrun(args)
    out, _ = again.communicate(timeout=limit(240))
    assert again.returncode == 0, out[-3000:]
    assert weights_hash(run_dir, EPOCHS) == weights_hash(reference, EPOCHS)
    assert metric_values(run_dir) == metric_values(reference)


def test_a_second_ctrl_c_aborts_at_once(digits_shards: Path, tmp_path: Path) -> None:
    """Ctrl-C, then Ctrl-C again before the stop is done: the launcher says so and exits 130
    at once, and leaves no process behind."""
    run_dir = tmp_path / "run"
    token = f"twice-{os.getpid()}-{time.monotonic_ns()}"
    proc = torchrun(overrides(digits_shards, run_dir, "data.num_workers=1"), token)
    wait_for(lambda: any(p.name.startswith("checkpoint-000000-")
                         for p in checkpoint.list_checkpoints(run_dir)))  # fmt: skip
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)  # two SIGINTs at once would be one: a signal pending is not queued twice
    os.killpg(proc.pid, signal.SIGINT)
    struck = time.monotonic()
    out, _ = proc.communicate(timeout=limit(60))
    assert proc.returncode == 130, out[-3000:]
    assert time.monotonic() - struck < limit(5)
    assert "second Ctrl-C: aborting" in out, out[-3000:]
    deadline = struck + limit(10)
    while processes_of(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_of(token), processes_of(token)


SCHEMA1_RUN = REPO / "tests" / "data" / "schema1-mid-epoch"  # see its README.md


def schema1_of(ckpt: dict, prev_labels: torch.Tensor) -> dict:
    """A checkpoint of today's schema in the flat layout the code before named parts wrote
    (the inverse of `checkpoints.upgrade`; SCHEMA1_RUN holds a real one to compare with):
    int64 labels, and the previous epoch's labels where today's holds their NMI instead."""
    t, p = ckpt["targets"], ckpt["position"]
    kmeans = {k: v for k, v in t["kmeans"].items() if k != "nmi_prev"}
    return {"epoch": p["epoch"], "step": p["step"], "labels": t["labels"].long(),
            "prev_labels": prev_labels.long(), "kmeans": kmeans, "loss_sums": p["loss_sums"],
            "acc_sums": p["acc_sums"], "seconds": p["seconds"], "fixed_labels": None,
            "head": t["head"], "model": ckpt["model"], "optimizer": ckpt["optimizer"],
            "world": p["world"], "wandb_id": ckpt["tracker"]["wandb_id"],
            "config": ckpt["config"]}  # fmt: skip


def layout(value: object) -> object:
    """The keys, types, shapes and dtypes of a checkpoint, not its values."""
    if isinstance(value, dict):
        return {k: layout(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    return type(value).__name__


def test_a_schema1_checkpoint_resumes_bit_identical(digits_shards: Path, tmp_path: Path) -> None:
    """A run stopped mid-epoch under the checkpoint layout before named parts (schema 1, a flat
    dict, with the sampler it started with, version 1) continues with today's code to the
    weights and metrics of the uninterrupted run. The schema-1 checkpoint is written here, from
    this machine's own stopped run, in the layout of the real one in SCHEMA1_RUN (made by that
    code on another CPU, whose kernels round the training steps differently)."""
    reference = tmp_path / "reference"
    sampler_v1 = overrides(digits_shards, reference, "train.sampler=1", recipe=[])
    assert run_ranks(2, train_rank, CONFIG, sampler_v1, 0) == ["done"] * 2
    run_dir = tmp_path / "run"
    stopped = overrides(digits_shards, run_dir, "train.sampler=1", recipe=[])
    assert all(
        r.startswith("stopped:")
        for r in run_ranks(2, train_rank, CONFIG, stopped, STOPS["mid-epoch"])
    )
    *earlier, latest = checkpoint.list_checkpoints(run_dir)
    states = [torch.load(path, weights_only=True) for path in earlier]
    (epoch0,) = [c["targets"]["labels"] for c in states if c["position"]["epoch"] == 0
                 and c["targets"]["labels"] is not None][-1:]  # fmt: skip
    old = schema1_of(torch.load(latest, weights_only=True), epoch0)
    (real,) = checkpoint.list_checkpoints(SCHEMA1_RUN)
    real_old = torch.load(real, weights_only=True)
    assert layout(old) == layout(real_old)  # the old code's layout, key for key
    assert (old["epoch"], old["step"]) == (real_old["epoch"], real_old["step"]) == (1, 5)
    torch.save(old, latest)
    assert (
        run_ranks(2, train_rank, CONFIG, overrides(digits_shards, run_dir, recipe=[]), 0)
        == ["done"] * 2
    )
    assert weights_hash(run_dir, EPOCHS) == weights_hash(reference, EPOCHS)
    assert metric_values(run_dir) == metric_values(reference)
    assert torch.load(checkpoint.list_checkpoints(run_dir)[-1])["schema_version"] == 2


def test_the_old_codes_own_schema1_run_resumes_to_the_end(digits_shards: Path, tmp_path: Path):
    """The run directory the code before named parts left (SCHEMA1_RUN) resumes with today's
    code, with sampler 1, and finishes every epoch in today's schema. (Its bits belong to the
    CPU it was made on: the test above checks them on this one.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(SCHEMA1_RUN, run_dir)
    assert (
        run_ranks(2, train_rank, CONFIG, overrides(digits_shards, run_dir, recipe=[]), 0)
        == ["done"] * 2
    )
    final = torch.load(checkpoint.list_checkpoints(run_dir)[-1], weights_only=True)
    assert final["schema_version"] == 2 and final["position"]["sampler"] == 1
    assert [r["epoch"] for r in metric_values(run_dir)] == list(range(EPOCHS))


def test_resume_refuses_a_different_world_size_mid_epoch(
    resumed: tuple[Path, list], digits_shards: Path
) -> None:
    run_dir = resumed[0] / "stopped-mid-epoch"  # as stopped within epoch 1 by 2 ranks, at step 5
    with pytest.raises(AssertionError, match="written within epoch 1 by 2 ranks"):
        run_ranks(1, train_rank, CONFIG, overrides(digits_shards, run_dir), 0)
    last = torch.load(checkpoint.list_checkpoints(run_dir)[-1], weights_only=True)
    assert last["position"]["step"] == 5


WANDB_KEYS = ("nmi_gt", "nmi_prev", "train_loss", "kmeans_loss", "cluster_size_max")


def test_stopped_run_continues_the_same_wandb_run(resumed: tuple[Path, list]) -> None:
    """W&B without network or API key (wandb.mode=auto, WANDB_MODE unset): offline, no hang.
    A run stopped mid-epoch and resumed logs into the same run id (stored in the checkpoint,
    resumed with resume="allow"), and its offline files hold every epoch exactly once, with
    the values of metrics.jsonl."""
    base, results = resumed
    run_dir, stored_id = base / WANDB_CASE, results[0][WANDB_CASE]["wandb_id"]
    runs = sorted((run_dir / "wandb").glob("*run-*"))
    assert [p.name.split("-")[0] for p in runs] == ["offline", "offline"], runs
    assert {p.name.rsplit("-", 1)[-1] for p in runs} == {stored_id}, runs
    histories = [read_wandb_file(p / f"run-{stored_id}.wandb").epoch_rows for p in runs]
    assert [[h["epoch"] for h in part] for part in histories] == [[0], [1, 2]]
    rows = read_metrics(run_dir)
    logged = [h for part in histories for h in part]
    assert [h["epoch"] for h in logged] == [r["epoch"] for r in rows] == [0, 1, 2]
    for h, r in zip(logged, rows, strict=True):
        for key in WANDB_KEYS:
            if r[key] is None:
                assert key not in h, (key, h)
            else:
                assert h[key] == pytest.approx(r[key]), (key, h, r)
