"""The launchers without a cluster: SLURM parameters, rendezvous ports, the command line each
command is submitted with, its dispatch (flag and requeue reach the training loop), and the
no-SLURM error."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cluster_pipeline import cli
from cluster_pipeline.config import ConfigError, load_config, to_yaml
from cluster_pipeline.launcher.job import rendezvous_port, requeue_on_usr2
from cluster_pipeline.launcher.slurm import COMMAND_FILE, command_line, describe, slurm_parameters
from cluster_pipeline.run.stop import StopFlag
from cluster_pipeline.testing.limits import limit
from cluster_pipeline.training import methods

REPO = Path(__file__).resolve().parent.parent
DEMO = "configs/demo_mnist.yaml"
TRAINING = ("train", "train-supervised", "pretrain-rotnet", "clusterfit")
# Each command with the arguments it is launched with, and what it runs.
LAUNCHED = {
    "train": ["--config", DEMO],
    "train-supervised": ["--config", DEMO],
    "pretrain-rotnet": ["--config", DEMO],
    "clusterfit": ["--config", DEMO, "--pretrained", "pre.pt", "--layer", "block1"],
    "extract": ["--config", DEMO, "--checkpoint", "w.pt"],
    "evaluate": ["--config", DEMO, "--random-init"],
    "specialists": ["--config", DEMO, "--checkpoint", "w.pt", "--shards", "s", "--groups", "2"],
    "activations": ["--config", DEMO, "--random-init", "--layer", "block1"],
}
# The head each training command's targets strategy trains (the method it runs).
HEADS = {"train": "clusters", "train-supervised": "classes", "pretrain-rotnet": "rotations",
         "clusterfit": "clusters"}  # fmt: skip
ANALYSES = {"extract": "run_extract", "evaluate": "run_evaluate",
            "specialists": "run_specialists", "activations": "run_activations"}  # fmt: skip


def test_slurm_parameters_follow_the_config() -> None:
    cfg = load_config(REPO / "configs" / "deepcluster_alexnet_imagenet.yaml",
                      ["slurm.partition=learnlab", "slurm.account=team", "slurm.nodes=4",
                       "slurm.additional_parameters.reservation=resa"])  # fmt: skip
    p = slurm_parameters(cfg)
    assert p["nodes"] == 4 and p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8
    assert p["slurm_partition"] == "learnlab" and p["slurm_account"] == "team"
    assert "slurm_qos" not in p and "slurm_constraint" not in p  # only when given
    assert p["cpus_per_task"] == 10 and p["mem_gb"] == 480 and p["timeout_min"] == 4320
    assert p["slurm_signal_delay_s"] == 180
    assert p["slurm_additional_parameters"] == {"reservation": "resa"}
    assert "--kill-on-bad-exit=1" in p["slurm_srun_args"]
    demo = REPO / "configs" / "demo_mnist.yaml"
    cpu = slurm_parameters(load_config(demo, ["slurm.gpus_per_node=0", "slurm.tasks_per_node=3"]))
    assert cpu["tasks_per_node"] == 3 and "gpus_per_node" not in cpu and "mem_gb" not in cpu


def test_rendezvous_ports_differ_between_jobs_and_attempts() -> None:
    ports = {rendezvous_port(job, 0) for job in range(100_000, 120_000)}
    assert len(ports) == 20_000 and min(ports) >= 20000 and max(ports) < 60000
    assert rendezvous_port(4242, 1) != rendezvous_port(4242, 0)


def subcommands() -> set[str]:
    actions = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def test_every_command_is_launched_or_a_data_command() -> None:
    assert subcommands() == set(cli.COMMANDS) | set(cli.DATA_COMMANDS)
    assert set(LAUNCHED) == set(cli.COMMANDS)  # this file tests each of them below
    assert {n for n, c in cli.COMMANDS.items() if c.trains} == set(TRAINING)
    for name in cli.DATA_COMMANDS:
        with pytest.raises(ConfigError, match=f"{name} has no config to launch"):
            cli.configured_command(name)


def test_an_unknown_command_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown command 'trian': the launcher runs extract, "):
        command_line(["trian", "--config", DEMO])
    with pytest.raises(ConfigError, match=r"give --config FILE \(make launch CONFIG=...\)"):
        command_line(["cluster.k=10"])


def test_without_a_command_name_the_arguments_are_trains() -> None:
    assert command_line(["--config", DEMO, "cluster.k=10"]) == ["train", "--config", DEMO,
                                                                 "cluster.k=10"]  # fmt: skip
    fit = ["clusterfit", "--pretrained", "p.pt", "cluster.k=10"]
    assert command_line(fit) == fit


@pytest.mark.parametrize("name", sorted(LAUNCHED))
def test_the_launcher_dispatches_each_command_with_flag_and_requeue(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """What the SLURM job does with a command line: parse it, resolve its config, run it by
    name. A training command hands the job's flag and requeue to the one training loop."""
    calls: list[tuple[Any, ...]] = []

    def fake_loop(cfg: Any, targets: Any, flag: Any, requeue: Any) -> Path:
        calls.append((cfg, targets, flag, requeue))
        return tmp_path

    def fake_analysis(cfg: Any, *rest: Any) -> None:
        calls.append((cfg, *rest))

    monkeypatch.setattr(methods, "run_training", fake_loop)
    for function in ANALYSES.values():
        monkeypatch.setattr(cli, function, fake_analysis)
    argv = command_line([name, *LAUNCHED[name], "train.epochs=3"])
    args = cli.build_parser().parse_args(argv)
    command = cli.configured_command(args.command)
    cfg = command.config(args)
    assert cfg.train.epochs == 3
    flag, requeue = StopFlag(), lambda signum: True
    out = command.run(args, cfg, flag, requeue)
    assert len(calls) == 1 and calls[0][0] is cfg
    if name in TRAINING:
        _, targets, got_flag, got_requeue = calls[0]
        assert got_flag is flag and got_requeue is requeue and targets.head == HEADS[name]
        assert out == tmp_path and f"run directory: {tmp_path}" in capsys.readouterr().out
    if name == "clusterfit":
        assert cfg.clusterfit.pretrained == "pre.pt" and cfg.clusterfit.layer == "block1"


def saved_run(tmp_path: Path, command: str | None, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(load_config(REPO / DEMO, list(overrides))))
    if command:
        (run_dir / "slurm" / COMMAND_FILE).write_text(json.dumps({"command": command}))
    return run_dir


def test_resume_runs_the_launched_command_on_the_saved_config(tmp_path: Path) -> None:
    run_dir = saved_run(tmp_path, "clusterfit", "clusterfit.pretrained=/w/pre.pt")
    saved, here = str(run_dir / "config.yaml"), [f"run.dir={run_dir}", "run.resume=true"]
    fit = ["clusterfit", "--config", saved, "--pretrained", "/w/pre.pt"]
    assert command_line(["train.epochs=5"], str(run_dir)) == [*fit, "train.epochs=5", *here]
    # The command given wins; the run's config is the saved one, overrides before run.dir.
    sup = command_line(["train-supervised", "slurm.nodes=2"], str(run_dir))
    assert sup == ["train-supervised", "--config", saved, "slurm.nodes=2", *here]
    args = cli.build_parser().parse_args(command_line([], str(run_dir)))
    cfg = cli.configured_command(args.command).config(args)
    assert (
        cfg.clusterfit.pretrained == "/w/pre.pt" and cfg.run.resume and cfg.run.dir == str(run_dir)
    )


def test_resume_of_a_run_launched_before_the_record_is_train(tmp_path: Path) -> None:
    run_dir = saved_run(tmp_path, None)
    assert command_line([], str(run_dir))[:3] == ["train", "--config", str(run_dir / "config.yaml")]
    with pytest.raises(ConfigError, match="evaluate is not a training command; give one of train"):
        command_line(["evaluate"], str(run_dir))
    with pytest.raises(ConfigError, match="unknown command 'trian'"):
        command_line(["trian"], str(run_dir))
    with pytest.raises(ConfigError, match=r"no config\.yaml there; is it a run directory"):
        command_line([], str(tmp_path / "nowhere"))


def test_what_the_launcher_prints_follows_the_command(tmp_path: Path) -> None:
    cfg = load_config(REPO / DEMO, ["slurm.nodes=2", "slurm.gpus_per_node=0"])
    job = SimpleNamespace(job_id="4242")
    train = describe(job, tmp_path, cfg, "clusterfit")  # type: ignore[arg-type]
    assert train.startswith("submitted job 4242: clusterfit, 2 node(s) x 1 rank(s), config ")
    for line in (
        "rank logs:",
        "metrics:",
        "follow:",
        f"resume:        make launch RESUME={tmp_path}",
    ):
        assert line in train, train
    evaluate = describe(job, tmp_path, cfg, "evaluate")  # type: ignore[arg-type]
    assert "submitted job 4242: evaluate," in evaluate and "resume:" not in evaluate
    assert f"tail -f {tmp_path}/slurm/4242/4242_0_log.out" in evaluate, evaluate


def test_a_training_job_records_usr2_and_requeues_through_submitits_handler() -> None:
    seen: list[int] = []

    def submitit_handler(signum: int, frame: object) -> None:
        seen.append(signum)
        sys.exit(-1)  # as submitit's does once it has requeued the job

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        flag = StopFlag()
        requeue = requeue_on_usr2(flag)
        os.kill(os.getpid(), signal.SIGUSR2)  # recorded, not submitit's: the loop stops first
        assert flag.poll() == signal.SIGUSR2 and seen == []
        assert requeue(signal.SIGUSR2) is True and seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.slow
def test_launch_without_slurm_fails_at_once() -> None:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # python, but no sbatch
    res = subprocess.run([sys.executable, "-m", "launch.slurm", "--config",
                          "configs/demo_mnist.yaml"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=limit(60))  # fmt: skip
    assert res.returncode == 2
    assert "no SLURM here (sbatch is not on PATH)" in res.stderr
    assert "launch.local" in res.stderr
