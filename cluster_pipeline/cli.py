"""`cluster-pipeline` (or `python -m cluster_pipeline`): make-shards, index, extract, train,
train-supervised, pretrain-rotnet, clusterfit, evaluate, specialists, activations."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster_pipeline import dist
from cluster_pipeline.analysis.activations import comparison_table, run_activations
from cluster_pipeline.analysis.evaluate import format_table, run_evaluate
from cluster_pipeline.analysis.specialists import COLUMNS, METHODS, run_specialists
from cluster_pipeline.config import Config, ConfigError, load_config
from cluster_pipeline.data.class_values import CLASS_FROM
from cluster_pipeline.data.imagefolder import tree_summary
from cluster_pipeline.data.index_shards import index_shards
from cluster_pipeline.data.reader import ShardError
from cluster_pipeline.data.shards import load_source, write_shards
from cluster_pipeline.data.sources import SourceError
from cluster_pipeline.exits import EXIT_STOPPED
from cluster_pipeline.features.extract import run_extract
from cluster_pipeline.models.weights import check_weights_file, config_for_weights
from cluster_pipeline.run.checkpoint import CheckpointError
from cluster_pipeline.run.lock import RunDirInUse
from cluster_pipeline.run.logs import log_error_to_files
from cluster_pipeline.run.stop import StopFlag, Stopped, follow_launcher, ignore_stop_signals
from cluster_pipeline.training.clusterfit import clusterfit_config
from cluster_pipeline.training.methods import (
    Requeue,
    run_clusterfit,
    run_deepcluster,
    run_rotnet,
    run_supervised,
)

log = logging.getLogger("cluster_pipeline")


def cmd_make_shards(args: argparse.Namespace) -> None:
    source = load_source(args.source, verify=args.verify, workers=args.workers)
    index = write_shards(source, args.out, args.samples_per_shard, workers=args.workers)
    if source.files is not None:  # an image folder: what became of each of its files
        print(f"make-shards: {tree_summary(source, args.out, len(index['shards']))}")
        return
    print(f"wrote {index['num_samples']} samples in {len(index['shards'])} shards to {args.out}")


def cmd_index(args: argparse.Namespace) -> None:
    print(index_shards(args.shards, args.out, args.class_from).summary)


# The commands below run from a config: each has a function that resolves it from the
# command's arguments and one that runs the command with it.
RunCommand = Callable[[argparse.Namespace, Config, StopFlag, Requeue | None], Path | None]


def config_file(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_extract(
    args: argparse.Namespace, cfg: Config, flag: StopFlag, requeue: Requeue | None
) -> Path | None:
    layers = [name for name in (args.layers or "").split(",") if name]
    folder = run_extract(cfg, args.checkpoint, args.out, layers, args.pool)
    if folder is not None:
        print(f"wrote features to {folder}")
    return folder


def clusterfit_args_config(args: argparse.Namespace) -> Config:
    cfg = clusterfit_config(args.config, args.pretrained, args.overrides)
    if args.layer is not None:
        cfg.clusterfit.layer = args.layer
    if args.pool is not None:
        cfg.clusterfit.pool = args.pool
    return cfg


def training(run: Callable[[Config, StopFlag, Requeue | None], Path]) -> RunCommand:
    """A training command: `run` checkpoints and stops on `flag`, then calls `requeue`."""

    def run_training(
        args: argparse.Namespace, cfg: Config, flag: StopFlag, requeue: Requeue | None
    ) -> Path:
        run_dir = run(cfg, flag, requeue)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"run directory: {run_dir}\nreport: {run_dir / 'report.png'}")
        return run_dir

    return run_training


def evaluate_config(args: argparse.Namespace) -> Config:
    if args.checkpoint is None and args.config is None:
        raise ConfigError("evaluate needs --checkpoint, or --config to evaluate a random init")
    if args.checkpoint is not None:
        check_weights_file(args.checkpoint)  # read only later, with --config
        return config_for_weights(args.config, args.checkpoint, args.overrides)
    return load_config(args.config, args.overrides)


def cmd_evaluate(
    args: argparse.Namespace, cfg: Config, flag: StopFlag, requeue: Requeue | None
) -> Path | None:
    layers = [name for name in (args.layers or "").split(",") if name]
    weights = None if args.random_init else args.checkpoint
    result = run_evaluate(cfg, weights, layers, args.out)
    if result is None:
        return None
    folder, report = result
    print(format_table(report))
    print(f"evaluation: {folder / 'evaluation.json'} ({report['seconds']:.1f} s)")
    return folder


def specialists_config(args: argparse.Namespace) -> Config:
    overrides = [*args.overrides, f"data.shards={args.shards}"]
    cfg = config_for_weights(args.config, args.checkpoint, overrides)
    if not any(item.startswith("run.dir=") for item in args.overrides):
        # A run checkpoint's config names its training run: never write into that one.
        cfg.run.dir, cfg.name = "", f"specialists-{cfg.name}"
    return cfg


def cmd_specialists(
    args: argparse.Namespace, cfg: Config, flag: StopFlag, requeue: Requeue | None
) -> Path | None:
    run_dir = run_specialists(cfg, args.checkpoint, args.groups, args.method, args.seed,
                              args.restarts, args.batch_size, args.columns)  # fmt: skip
    if run_dir is not None:
        print(f"wrote {run_dir / 'specialists.json'}, covariance.npy and covariance.png")
    return run_dir


def activations_config(args: argparse.Namespace) -> Config:
    if args.layer and args.layers:
        raise ConfigError("give --layer NAME or --layers a,b,c, not both")
    if bool(args.checkpoint) == args.random_init:
        raise ConfigError(
            "give --checkpoint CKPT (a run checkpoint or a state_dict), or --random-init with "
            "--config for an untrained network"
        )
    if args.random_init and not args.config:
        raise ConfigError("--random-init needs --config (the model.arch and data settings)")
    if args.checkpoint:
        cfg = config_for_weights(args.config, args.checkpoint, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.layer or args.layers:
        names = [args.layer] if args.layer else args.layers.split(",")
        cfg.activations.layers = [n.strip() for n in names]
    if args.pool is not None:
        cfg.activations.pool = args.pool
    if args.k is not None:
        cfg.cluster.k = args.k
    cfg.validate()
    return cfg


def cmd_activations(
    args: argparse.Namespace, cfg: Config, flag: StopFlag, requeue: Requeue | None
) -> Path | None:
    summaries = run_activations(cfg, args.checkpoint)
    if summaries is None:  # ranks other than 0
        return None
    print(comparison_table(summaries), end="")
    for row in summaries:
        print(f"{row['layer']}: {row['html']}")
    return Path(cfg.run.dir)


@dataclass(frozen=True)
class Command:
    """A command that runs from a config. `config` resolves it from the command's arguments
    first, so that their errors show before anything starts (the SLURM launcher submits that
    config, with its slurm section); `run` then runs the command with it on every rank. A
    training command (`trains`) writes a checkpoint and stops when `flag` catches a signal,
    then calls `requeue` (the SLURM job's) on rank 0; the other commands ignore both."""

    config: Callable[[argparse.Namespace], Config]
    run: RunCommand
    trains: bool = False


# Every command that runs from a config, by name: the CLI and the SLURM job dispatch here.
COMMANDS: dict[str, Command] = {
    "extract": Command(config_file, cmd_extract),
    "train": Command(config_file, training(run_deepcluster), trains=True),
    "train-supervised": Command(config_file, training(run_supervised), trains=True),
    "pretrain-rotnet": Command(config_file, training(run_rotnet), trains=True),
    "clusterfit": Command(clusterfit_args_config, training(run_clusterfit), trains=True),
    "evaluate": Command(evaluate_config, cmd_evaluate),
    "specialists": Command(specialists_config, cmd_specialists),
    "activations": Command(activations_config, cmd_activations),
}
# The commands that prepare data, with no config: they run where the data is, never launched.
DATA_COMMANDS = ("make-shards", "index")


def configured_command(name: str) -> Command:
    """The command `name` runs from a config; a launcher's unknown name is a one-line error."""
    if name in COMMANDS:
        return COMMANDS[name]
    if name in DATA_COMMANDS:
        raise ConfigError(
            f"{name} has no config to launch: run `cluster-pipeline {name} ...` on a machine "
            f"that sees the data; the launcher runs {', '.join(COMMANDS)}"
        )
    raise ConfigError(f"unknown command {name!r}: the launcher runs {', '.join(COMMANDS)}")


def run_configured(args: argparse.Namespace, restore_handlers: bool = True) -> None:
    """`cluster-pipeline COMMAND` for a command of COMMANDS. Collective: call on every rank.

    A training command stops on Ctrl-C, SIGTERM, SIGUSR2 or SIGHUP: checkpoint at the next step
    boundary, then exit 75 (a second Ctrl-C aborts at once)."""
    command = COMMANDS[args.command]
    cfg = command.config(args)
    flag = StopFlag()
    previous = flag.install() if command.trains else {}
    try:
        command.run(args, cfg, flag, None)
    finally:
        for s, handler in previous.items() if restore_handlers else ():
            signal.signal(s, handler)


def is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


class Parser(argparse.ArgumentParser):
    """A command's key=value overrides go anywhere among its options, before --config too.

    argparse fills the positional `overrides` (nargs="*") from one run of arguments only and
    calls the others unrecognized: those join `overrides`, in command-line order, which
    load_config applies over the config file's values (the last one of a key wins)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        if isinstance(getattr(parsed, "overrides", None), list):
            parsed.overrides += [arg for arg in rest if is_override(arg)]
            rest = [arg for arg in rest if not is_override(arg)]
        return parsed, rest


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cluster-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-shards", help="write webdataset tar shards and their index")
    p.add_argument(
        "--source", required=True, help="mnist5k, digits, imagefolder:PATH or synthetic:N[:SIZE]"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1,
                   help="processes verifying files and writing shards in parallel")  # fmt: skip
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="imagefolder: decode every image once before writing, so damaged files "
                   "are left out (with their reason in manifest.jsonl) instead of failing in "
                   "training; --no-verify checks only size and magic bytes")  # fmt: skip
    p.set_defaults(func=cmd_make_shards)

    p = sub.add_parser(
        "index", help="index existing webdataset shards in place (one pass over their headers)"
    )
    p.add_argument("shards", metavar="PATTERN|DIR",
                   help="shards to index: a brace pattern (data/train-{000000..001281}.tar), a "
                   "glob, or a directory of *.tar")  # fmt: skip
    p.add_argument("--out", help="directory for the index (default: the shards' directory)")
    p.add_argument("--class-from", default="auto", metavar="|".join(CLASS_FROM),
                   help="auto: .cls members when present; cls: required; json:FIELD; "
                   "key-prefix: the key's part before '_' (ImageNet synsets); none")  # fmt: skip
    p.set_defaults(func=cmd_index)

    for name, text in (
        ("extract", "extract features of every sample exactly once"),
        ("train", "train DeepCluster (resumes the run directory if it has checkpoints)"),
        ("train-supervised", "train on the shards' true classes (resumes too)"),
        ("pretrain-rotnet", "RotNet: predict 0/90/180/270 degree rotations"),
        ("clusterfit", "cluster a pretrained network's features once, then "
         "train a new network on the cluster labels"),
    ):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=name != "clusterfit",
                       help="YAML file, e.g. configs/demo_mnist.yaml")  # fmt: skip
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cluster.k=100")
        if name == "extract":
            p.add_argument("--checkpoint", help="model weights (a run checkpoint or a state_dict)")
            p.add_argument("--out", help="output folder (default: <run dir>/features)")
            p.add_argument("--layers", help="named modules to tap instead of the embedding, a,b,c")
            p.add_argument(
                "--pool", default="avg", help="spatial pooling: avg, max, grid:S, dims:D"
            )
        if name == "clusterfit":
            p.add_argument(
                "--pretrained",
                required=True,
                help="weights to cluster the features of (run checkpoint or "
                "state_dict); without --config, its saved config is the run's",
            )
            p.add_argument(
                "--layer",
                help="module to cluster the pooled output of (default: the embedding), e.g. block2",
            )
            p.add_argument("--pool", help="pooling of --layer: avg, max, grid:S, dims:D")

    p = sub.add_parser(
        "evaluate", help="linear probe per layer, kNN and k-means NMI: train split vs test split"
    )
    p.add_argument("--checkpoint", help="a run checkpoint (carries its config) or a state_dict")
    p.add_argument("--config", help="YAML file; needed for a state_dict or a random init")
    p.add_argument("--layers", help="named modules to probe, a,b,c (default: evaluate.layers, "
                   "else the model's blocks); 'embedding' is model.features")  # fmt: skip
    p.add_argument("--random-init", action="store_true",
                   help="ignore the checkpoint's weights: a randomly initialised network of its "
                   "(or the config's) architecture, seeded by train.seed")  # fmt: skip
    p.add_argument("--out", help="output folder (default: <run>/eval/<checkpoint name> for a "
                   "run checkpoint, else runs/<config name>-eval-<time>)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. evaluate.pool=avg")
    p = sub.add_parser(
        "specialists",
        help="group classes for specialist models: k-means on the columns of the covariance of "
        "a classifier's predictions (Hinton et al. 2015, section 5.3)",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="the generalist: a run checkpoint or a state_dict (any classifier of model.arch, "
        "a DeepCluster head over pseudo-classes included)",
    )
    p.add_argument("--shards", required=True, help="shard directory whose predictions are used")
    p.add_argument("--groups", type=int, required=True, help="number of specialist groups M")
    p.add_argument("--config", help="YAML file; needed only for a plain state_dict")
    p.add_argument("--method", choices=METHODS, default="kmeans",
                   help="kmeans: faiss Lloyd; online: mini-batch k-means (the paper's online "
                   "k-means)")  # fmt: skip
    p.add_argument("--columns", choices=COLUMNS, default="correlation",
                   help="cluster columns of the correlation (default: groups follow confusions) "
                   "or of the covariance (the paper's literal recipe)")  # fmt: skip
    p.add_argument("--restarts", type=int, default=10, help="seeded k-means runs; the best wins")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="columns per online update")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.split=train")
    p = sub.add_parser(
        "activations",
        help="cluster a layer's activations: per-cluster purity and nearest images, NMI per layer",
    )
    p.add_argument("--checkpoint", help="run checkpoint (carries its config) or plain state_dict")
    p.add_argument("--random-init", action="store_true", help="no weights: the seeded init")
    p.add_argument("--config", help="YAML config; needed for a plain state_dict or --random-init")
    p.add_argument("--layer", help="named module to cluster, e.g. block2, fc, block1.0")
    p.add_argument("--layers", help="several modules a,b,c, tapped in one pass and compared")
    p.add_argument("--k", type=int, help="number of clusters (sets cluster.k)")
    p.add_argument("--pool", help="spatial pooling: avg (default), max, grid:S, dims:D")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. activations.grid=6")
    return parser


def main(argv: list[str] | None = None, *, own_process: bool = False) -> int:
    """`cluster-pipeline ARGV`; returns its exit status. `own_process`: the command is this
    process's only work (`python -m cluster_pipeline`, a rank): it stops when its launcher dies,
    and once its work is done, a stop signal arriving while it exits is ignored. Otherwise (a
    caller's process) the signal handlers are restored after the command."""
    if own_process:
        follow_launcher()
    status = run_command(argv, own_process)
    if own_process and status == 0:
        ignore_stop_signals()
    return status


def entry() -> int:
    """The `cluster-pipeline` program and `python -m cluster_pipeline`: a process of its own."""
    return main(own_process=True)


def run_command(argv: list[str] | None = None, own_process: bool = False) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in COMMANDS:
            run_configured(args, restore_handlers=not own_process)
        else:
            args.func(args)
    except (ConfigError, ShardError, SourceError, FileNotFoundError, RunDirInUse) as exc:
        log_error_to_files(str(exc))  # the rank's log ends with what went wrong, too
        print(f"cluster-pipeline {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"cluster-pipeline {args.command}: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    except dist.RankLostError as exc:  # already in the rank's log, with where it was
        print(f"cluster-pipeline {args.command}: error: {exc}", file=sys.stderr)
        return dist.EXIT_RANK_LOST
    except (CheckpointError, dist.RankFailedError) as exc:  # a full disk, or another rank's error
        log.error("%s", exc)
        print(f"cluster-pipeline {args.command}: error: {exc}", file=sys.stderr)
        return dist.exit_status_of(exc)
    except BaseException:
        if logging.getLogger().handlers:  # the run's logs/rank<N>.log: keep the traceback there
            log.exception("cluster-pipeline %s failed", args.command)
        raise
    return 0
