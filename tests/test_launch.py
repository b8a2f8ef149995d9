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
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cluster_pipeline import cli
from cluster_pipeline.config import ConfigError, load_config, to_yaml
from cluster_pipeline.launcher import cluster
from cluster_pipeline.launcher import job as job_module
from cluster_pipeline.launcher.cluster import fit_request, read_partition, scontrol_record
from cluster_pipeline.launcher.job import failed_nodes, rendezvous_port, requeue_on_stop, situation
from cluster_pipeline.launcher.slurm import (
    COMMAND_FILE,
    SubmitError,
    check_one_writer,
    command_line,
    describe,
    judge_state,
    slurm_parameters,
)
from cluster_pipeline.run import lock
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
        f"follow:        squeue -j 4242; tail -f {tmp_path}/logs/rank0.log",
        f"resume:        make launch RESUME={tmp_path}",
    ):
        assert line in train, train
    evaluate = describe(job, tmp_path, cfg, "evaluate")  # type: ignore[arg-type]
    assert "submitted job 4242: evaluate," in evaluate and "resume:" not in evaluate
    assert f"tail -f {tmp_path}/slurm/4242/4242_0_log.out" in evaluate, evaluate


@pytest.fixture
def stop_handlers() -> Iterator[None]:
    """SIGTERM and USR2 handlers as they were before the test."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_training_job_records_sigterm_and_usr2_and_requeues_through_submitits_handler(
    stop_handlers: None,
) -> None:
    seen: list[int] = []

    def submitit_handler(signum: int, frame: object) -> None:
        seen.append(signum)
        sys.exit(-1)  # as submitit's does once it has requeued the job

    for signum in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(signal.SIGUSR2, submitit_handler)
        flag = StopFlag()
        requeue = requeue_on_stop(flag)
        os.kill(os.getpid(), signum)  # recorded, not submitit's: the loop stops first
        assert flag.poll() == signum and seen == []
        assert requeue(signum) is True and seen == [signum]
        seen.clear()


# `scontrol show job -o` and `scontrol show node -o` as SLURM 22.05 prints them (shortened).
JOB = ("JobId={job} JobName=demo_mnist UserId=root(0) JobState={state} Reason=None "
       "Dependency=(null) Requeue=1 Restarts={restarts} BatchFlag=1 Reboot=0 ExitCode=0:0 "
       "RunTime=00:00:12 TimeLimit=00:20:00 PreemptEligibleTime=2026-12-02T18:20:54 "
       "PreemptTime={preempt} Partition=low NodeList=n[1-2] NumNodes=2 NumCPUs=2")  # fmt: skip
NODE = ("NodeName={name} Arch=x86_64 CoresPerSocket=2 CPUAlloc=0 CPUEfctv={cpus} "
        "CPUTot={cpus} Gres={gres} NodeAddr=127.0.0.1 Version=22.05.8 OS=Linux 6.1 #1 SMP "
        "RealMemory=21694 State={state} ThreadsPerCore=1 Partitions={partitions} "
        "Reason={reason}")  # fmt: skip


def job_record(state: str = "RUNNING", restarts: int = 0, preempt: str = "None") -> dict:
    return scontrol_record(JOB.format(job=42, state=state, restarts=restarts, preempt=preempt))


def node_record(name: str, state: str = "IDLE", gres: str = "(null)", cpus: int = 2,
                reason: str = "(null)", partitions: str = "debug,low,high") -> dict:  # fmt: skip
    return scontrol_record(NODE.format(name=name, state=state, gres=gres, cpus=cpus,
                                       reason=reason, partitions=partitions))  # fmt: skip


@pytest.mark.parametrize(
    ("job", "sacct", "calls", "result"),
    [
        (job_record("COMPLETING", restarts=1), "REQUEUED", [], True),  # scontrol requeue
        (job_record("RUNNING", preempt="2026-12-02T18:21:05"), "RUNNING", [15], True),  # grace
        (job_record("COMPLETING"), "CANCELLED", [], False),  # scancel: stays cancelled
        (job_record("COMPLETING"), "TIMEOUT", [15], True),
    ],
)
def test_a_stop_requeues_unless_slurm_does_or_the_job_was_cancelled(
    monkeypatch: pytest.MonkeyPatch, stop_handlers: None, job: dict, sacct: str,
    calls: list[int], result: bool,
) -> None:  # fmt: skip
    seen: list[int] = []

    def submitit_handler(signum: int, frame: object) -> None:
        seen.append(signum)
        sys.exit(-1)

    signal.signal(signal.SIGUSR2, submitit_handler)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(job_module, "node_events", lambda names, since: [])  # no sacctmgr
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.setattr(job_module, "shown", lambda kind, name: [job] if kind == "job" else [])
    monkeypatch.setattr(job_module, "sacct_state", lambda job_id: sacct)
    assert requeue_on_stop(StopFlag())(signal.SIGTERM) is result
    assert seen == calls


def test_a_failed_scontrol_requeue_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, stop_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    def submitit_handler(signum: int, frame: object) -> None:
        raise subprocess.CalledProcessError(1, ["scontrol", "requeue", "42"])

    signal.signal(signal.SIGUSR2, submitit_handler)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(job_module, "node_events", lambda names, since: [])  # no sacctmgr
    monkeypatch.setattr(
        job_module, "shown", lambda kind, name: [job_record()] if kind == "job" else []
    )
    assert requeue_on_stop(StopFlag())(signal.SIGTERM) is False
    assert "job 42: could not requeue it" in caplog.text


def test_rank_0_says_which_node_failed_and_whether_slurm_requeued() -> None:
    nodes = [
        node_record("n1", "ALLOCATED"),
        node_record("n2", "DOWN+DRAIN", reason="test [root@18:30]"),
    ]
    line = situation(job_record("COMPLETING", restarts=1), failed_nodes(nodes), attempt=0)
    assert line == ("job 42 attempt 0: COMPLETING; SLURM has requeued it; failed node(s): "
                    "n2 (DOWN+DRAIN, Reason=test [root@18:30])"), line  # fmt: skip
    line = situation(job_record(preempt="2026-12-02T18:21:05"), [], 0)
    assert (
        line
        == "job 42 attempt 0: RUNNING, preempted at 2026-12-02T18:21:05; SLURM has not requeued it"
    )
    assert failed_nodes([node_record("n1", "IDLE*")]) == ["n1 (IDLE*, not responding)"]


def test_launch_wait_is_not_fooled_by_a_requeued_node_failure() -> None:
    final, line = judge_state("42", "PENDING", "NODE_FAIL")
    assert not final and line == ("job 42: NODE_FAIL: a node of the job failed; SLURM requeued it "
                                  "(PENDING), waiting")  # fmt: skip
    assert judge_state("42", "RUNNING", "PREEMPTED")[0] is False
    assert judge_state("42", "RUNNING", "RUNNING") == (False, "")
    final, line = judge_state("42", None, "NODE_FAIL")
    assert final and line == "job 42: NODE_FAIL: a node of the job failed; not requeued"
    assert judge_state("42", None, "COMPLETED") == (True, "")
    assert judge_state("42", None, "REQUEUED") == (False, "")  # between squeue and sacct


def cpu_and_gpu_nodes(kind: str, name: str = "") -> list[dict]:
    if kind == "partition":
        return [
            scontrol_record("PartitionName=debug Default=YES MaxTime=UNLIMITED Nodes=n[1-2]"),
            scontrol_record("PartitionName=gpu Default=NO MaxTime=2-00:00:00 Nodes=g1"),
        ]
    return [node_record("n1"), node_record("n2"),
            node_record("g1", gres="gpu:a100:8(S:0-1)", cpus=96, partitions="gpu")]  # fmt: skip


def test_a_request_is_fitted_to_its_partition_or_refused_in_one_line_per_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cluster, "scontrol_show", cpu_and_gpu_nodes)
    cpu = read_partition()
    assert (
        cpu.name == "debug" and [n.cpus for n in cpu.nodes] == [2, 2] and cpu.max_time_min is None
    )
    s = load_config(REPO / DEMO, ["slurm.nodes=2"]).slurm  # no GPUs, tasks or CPUs set
    assert fit_request(s, cpu) == []
    assert (s.gpus_per_node, s.tasks_per_node, s.cpus_per_task) == (0, 1, 2)
    gpu = read_partition("gpu")
    assert gpu.max_time_min == 2880 and gpu.nodes[0].gpus == 8
    s = load_config(REPO / DEMO).slurm
    assert fit_request(s, gpu) == [] and (s.gpus_per_node, s.tasks_per_node, s.cpus_per_task) == (
        8,
        8,
        12,
    )
    s = load_config(REPO / DEMO, ["slurm.tasks_per_node=2"]).slurm  # TASKS_PER_NODE=2
    assert fit_request(s, gpu) == [] and (s.gpus_per_node, s.tasks_per_node, s.cpus_per_task) == (
        2,
        2,
        48,
    )
    s = load_config(REPO / DEMO, ["slurm.tasks_per_node=2"]).slurm
    assert fit_request(s, cpu) == [] and (s.gpus_per_node, s.tasks_per_node, s.cpus_per_task) == (
        0,
        2,
        1,
    )
    s = load_config(REPO / DEMO, ["slurm.gpus_per_node=8", "slurm.cpus_per_task=3",
                                  "slurm.timeout_min=1", "slurm.mem_gb=100"]).slurm  # fmt: skip
    assert fit_request(s, cpu) == [
        "slurm.gpus_per_node=8: the partition debug has no GPUs (no gpu in its nodes' Gres); "
        "GPUS_PER_NODE=0 runs a CPU job",
        "slurm.cpus_per_task=3: 8 task(s) per node need 24 CPUs, but the partition debug has at "
        "most 2 CPUs per node; lower CPUS_PER_TASK to 1",
        "slurm.mem_gb=100: the partition debug has at most 21 GB (21694 MB) per node",
        "slurm.signal_delay_s=120: the time limit slurm.timeout_min=1 is 60 s; keep the signal "
        "delay under half of it (raise TIME or lower SIGNAL_DELAY_S)",
    ]
    s = load_config(REPO / DEMO, ["slurm.nodes=3", "slurm.timeout_min=4000"]).slurm
    assert fit_request(s, gpu) == [
        "slurm.nodes=3: the partition gpu has 1 node(s) with 8 GPUs and 96 CPUs (1 in all)",
        "slurm.timeout_min=4000: the partition gpu has MaxTime=2880 minutes; TIME=2880 fits",
    ]
    with pytest.raises(cluster.ClusterError, match=r"slurm\.partition=nope: no such partition; the "
                       r"cluster has debug, gpu"):  # fmt: skip
        read_partition("nope")
    with pytest.raises(ConfigError, match=r"slurm\.tasks_per_node=2 but slurm\.gpus_per_node=8"):
        load_config(REPO / DEMO, ["slurm.gpus_per_node=8", "slurm.tasks_per_node=2"])


@pytest.mark.slow
def test_launch_without_slurm_fails_at_once() -> None:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # python, but no sbatch
    res = subprocess.run([sys.executable, "-m", "launch.slurm", "--config",
                          "configs/demo_mnist.yaml"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=limit(60))  # fmt: skip
    assert res.returncode == 2
    assert "no SLURM here (sbatch is not on PATH)" in res.stderr
    assert "launch.local" in res.stderr


def test_a_run_directory_held_by_a_live_run_is_refused(tmp_path: Path) -> None:
    """The lock of a run on this host that is alive (this process) refuses a submission on
    its run directory, naming the holder; a stale lock does not."""
    (tmp_path / ".lock").write_text(json.dumps(lock.this_holder()))
    with pytest.raises(
        SubmitError, match=rf"run directory {tmp_path} is in use by pid {os.getpid()}"
    ):
        check_one_writer(tmp_path)
    (tmp_path / ".lock").write_text(json.dumps(lock.this_holder() | {"pid": 2**22 + 1}))
    check_one_writer(tmp_path)


def test_a_job_carries_its_config_as_yaml_and_reads_it_with_todays_fields() -> None:
    """An attempt requeued after the code gained a config field must still start: the job
    pickles the config's YAML, not a Config, and an older YAML reads with the new defaults."""
    import pickle

    from cluster_pipeline.launcher.job import CommandJob

    cfg = load_config(REPO / "configs" / "demo_mnist.yaml", ["cluster.k=7"])
    job = CommandJob(["train", "--config", "configs/demo_mnist.yaml"], cfg)
    blob = pickle.dumps(job)
    assert b"cluster_pipeline.config.root" not in blob  # no pickled Config inside
    again = pickle.loads(blob)
    assert again.cfg == cfg and again.cfg.cluster.k == 7
    # A YAML written before dcv2 and optim.optimizer existed: their defaults fill in.
    from omegaconf import OmegaConf

    older = OmegaConf.create(again.cfg_yaml)
    del older["dcv2"], older.optim["optimizer"], older.optim["lars_eta"]
    again.cfg_yaml = OmegaConf.to_yaml(older)
    assert again.cfg.dcv2.prototypes == [100, 100, 100] and again.cfg.optim.optimizer == "sgd"
