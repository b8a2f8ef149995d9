"""What a mistyped command leaves behind and says: no stray run directory, one line naming a file
that is not a checkpoint, and key=value overrides anywhere among a command's options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster_pipeline import cli
from cluster_pipeline.config import ModelConfig
from cluster_pipeline.models.nets import build_model
from cluster_pipeline.testing.limits import limit

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "digits_test.yaml")


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test in tmp_path/cwd, where runs/ goes (conftest's run_cli runs the CLI here)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A plain state_dict of the digits config's network (10 classes)."""
    path = tmp_path / "weights.pt"
    torch.save(build_model(ModelConfig(arch="small_cnn", width=8), 1, 10).state_dict(), path)
    return path


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"cluster-pipeline {command}: error: "), err
    return lines[0]


def left_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# (command and its arguments, the mistake, what the error line says)
EARLY_ERRORS = {
    "train-k-above-n": (["train", "--config", CONFIG, "data.shards={shards}", "cluster.k=5000"],
                        "1797 samples"),
    "supervised-no-shards": (["train-supervised", "--config", CONFIG, "data.shards={missing}"],
                             "index.json not found"),
    "rotnet-no-shards": (["pretrain-rotnet", "--config", CONFIG, "data.shards={missing}"],
                         "index.json not found"),
    "clusterfit-k-above-n": (["clusterfit", "--config", CONFIG, "--pretrained", "{weights}",
                              "data.shards={shards}", "cluster.k=5000"], "1797 samples"),
    "clusterfit-bad-pretrained": (["clusterfit", "--config", CONFIG, "--pretrained", "/etc/passwd",
                                   "data.shards={shards}"], "not a checkpoint"),
    "extract-k-above-n": (["extract", "--config", CONFIG, "data.shards={shards}",
                           "cluster.k=5000"], "1797 samples"),
    "extract-bad-checkpoint": (["extract", "--config", CONFIG, "--checkpoint", "{missing}",
                                "data.shards={shards}"], "does not exist"),
    "evaluate-no-shards": (["evaluate", "--config", CONFIG, "--random-init",
                            "data.shards={missing}"], "index.json not found"),
    "evaluate-bad-checkpoint": (["evaluate", "--config", CONFIG, "--checkpoint", "{missing}",
                                 "data.shards={shards}"], "does not exist"),
    "activations-k-above-n": (["activations", "--config", CONFIG, "--random-init", "--layer",
                               "block1", "data.shards={shards}", "cluster.k=5000"], "1797 samples"),
    "specialists-no-shards": (["specialists", "--config", CONFIG, "--checkpoint", "{weights}",
                               "--shards", "{missing}", "--groups", "2"], "index.json not found"),
}  # fmt: skip


@pytest.mark.parametrize("case", EARLY_ERRORS)
def test_early_error_leaves_no_run_dir(
    case: str, run_cli, digits_shards: Path, weights: Path, tmp_path: Path
) -> None:
    argv, says = EARLY_ERRORS[case]
    paths = dict(shards=digits_shards, missing=tmp_path / "missing", weights=weights)
    status, err = run_cli(*(arg.format(**paths) for arg in argv))
    assert status == 2 and says in one_error_line(err, argv[0]), err
    assert left_in(tmp_path / "cwd" / "runs") == []


def test_an_existing_run_dir_is_kept(run_cli, digits_shards: Path, tmp_path: Path) -> None:
    """Given run.dir (an empty folder, or a run with a checkpoint), or a run's checkpoint
    whose eval/ folder an evaluation would make: only what the failing command made goes."""
    empty, run = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "checkpoint-000002.pt"
    torch.save(build_model(ModelConfig(arch="small_cnn", width=8), 1, 10).state_dict(), ckpt)
    for run_dir in (empty, run):
        status, err = run_cli("train", "--config", CONFIG, f"data.shards={digits_shards}",
                              f"run.dir={run_dir}", "cluster.k=5000")  # fmt: skip
        assert status == 2 and "1797 samples" in one_error_line(err, "train")
    assert {"config.yaml", "logs"} <= set(left_in(empty))  # what the failed run wrote stays
    assert ckpt.is_file()
    new = tmp_path / "new"
    status, err = run_cli("train", "--config", CONFIG, f"data.shards={digits_shards}",
                          f"run.dir={new}", "cluster.k=5000")  # fmt: skip
    assert status == 2 and not new.exists()
    status, err = run_cli("evaluate", "--config", CONFIG, "--checkpoint", str(ckpt),
                          f"data.shards={tmp_path / 'missing'}")  # fmt: skip
    assert status == 2 and "index.json not found" in one_error_line(err, "evaluate")
    assert not (run / "eval" / "checkpoint-000002").exists() and ckpt.is_file()


def not_checkpoints(tmp_path: Path, weights: Path) -> dict[str, Path]:
    """Files a user may pass as --checkpoint by mistake."""
    text, empty, truncated = tmp_path / "notes.txt", tmp_path / "empty.pt", tmp_path / "cut.pt"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    empty.touch()
    truncated.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folder = tmp_path / "run"
    folder.mkdir()
    return {"passwd": Path("/etc/passwd"), "text": text, "empty": empty,
            "truncated": truncated, "directory": folder}  # fmt: skip


COMMANDS_ON_WEIGHTS = {
    "evaluate": ["evaluate", "--checkpoint", "{path}"],
    "evaluate-with-config": ["evaluate", "--config", CONFIG, "--checkpoint", "{path}"],
    "activations": ["activations", "--checkpoint", "{path}", "--layer", "block1"],
    "activations-with-config": ["activations", "--config", CONFIG, "--checkpoint", "{path}",
                                "--layer", "block1", "data.shards={shards}"],
    "specialists": ["specialists", "--checkpoint", "{path}", "--shards", "{shards}", "--groups",
                    "2"],
    "specialists-with-config": ["specialists", "--config", CONFIG, "--checkpoint", "{path}",
                                "--shards", "{shards}", "--groups", "2"],
    "clusterfit": ["clusterfit", "--pretrained", "{path}"],
    "extract": ["extract", "--config", CONFIG, "--checkpoint", "{path}", "data.shards={shards}"],
}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS_ON_WEIGHTS)
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(
    command: str, run_cli, digits_shards: Path, weights: Path, tmp_path: Path
) -> None:
    for kind, path in not_checkpoints(tmp_path, weights).items():
        argv = [a.format(path=path, shards=digits_shards) for a in COMMANDS_ON_WEIGHTS[command]]
        status, err = run_cli(*argv)
        line = one_error_line(err, argv[0])
        assert status == 2 and f"{path} is not a checkpoint" in line, (kind, line)
        assert "IndexError" not in line and "list index" not in line, (kind, line)
    assert left_in(tmp_path / "cwd" / "runs") == []


# Each command that runs from a config, with the arguments it needs besides --config.
NEEDS = {
    "train": [], "train-supervised": [], "pretrain-rotnet": [], "extract": [],
    "clusterfit": ["--pretrained", "{weights}"],
    "evaluate": ["--checkpoint", "{weights}"],
    "activations": ["--checkpoint", "{weights}", "--layer", "block1"],
    "specialists": ["--checkpoint", "{weights}", "--shards", "{shards}", "--groups", "2"],
}  # fmt: skip


@pytest.mark.parametrize("command", NEEDS)
def test_overrides_go_anywhere_and_win_over_the_config(
    command: str, digits_shards: Path, weights: Path
) -> None:
    needs = [a.format(weights=weights, shards=digits_shards) for a in NEEDS[command]]
    for argv in (
        [command, "cluster.k=7", "train.seed=3", "--config", CONFIG, *needs],
        [command, "cluster.k=7", "--config", CONFIG, "train.seed=3", *needs],
        [command, "--config", CONFIG, "cluster.k=7", *needs, "train.seed=3"],
        [command, "cluster.k=5", *needs, "train.seed=3", "--config", CONFIG, "cluster.k=7"],
    ):
        args = cli.build_parser().parse_args(argv)
        cfg = cli.COMMANDS[command].config(args)
        assert (cfg.cluster.k, cfg.train.seed) == (7, 3), argv  # the config file has k=20
    with pytest.raises(SystemExit):  # what is neither an option nor key=value still fails
        cli.build_parser().parse_args([command, "cluster.k=7", "--config", CONFIG, "oops"])


@pytest.mark.slow
def test_the_cli_as_the_issue_ran_it(digits_shards: Path, tmp_path: Path) -> None:
    """`python -m cluster_pipeline`, three processes at once: an override before --config is
    applied; --checkpoint /etc/passwd and missing shards: one line, no run directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    shards = f"data.shards={digits_shards}"
    commands = {
        "before": ["train", "cluster.k=5000", "--config", CONFIG, shards],
        "passwd": ["evaluate", "--checkpoint", "/etc/passwd"],
        "no-shards": ["evaluate", "--config", CONFIG, "--random-init", "data.shards=missing"],
    }
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "cluster_pipeline", *argv], cwd=tmp_path,
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, argv in commands.items()
    }  # fmt: skip
    errors = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=limit(120))
        assert proc.returncode == 2 and "Traceback" not in err, (name, out[-2000:], err[-2000:])
        errors[name] = one_error_line(err, commands[name][0])
    assert "cluster.k=5000 but only 1797 samples" in errors["before"]
    assert "/etc/passwd is not a checkpoint" in errors["passwd"]
    assert left_in(tmp_path / "runs") == []


def test_a_run_dir_whose_work_began_is_kept(tmp_path: Path) -> None:
    """Set-up files alone are no work; a phase begun (its debug log says so) or an output is,
    so an error after it (an unreadable sample in extraction) keeps the logs that explain it."""
    from cluster_pipeline.run.rundir import holds_work

    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    (run / "logs" / "rank0.debug.log").write_text("... rank 0 is pid 1 on host\n")
    assert not holds_work(run)
    with (run / "logs" / "rank0.debug.log").open("a") as f:
        f.write("... DEBUG cluster_pipeline.training.position: phase extract started\n")
    assert holds_work(run)
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "checkpoint-0001.pt").write_bytes(b"x")
    assert holds_work(other)
