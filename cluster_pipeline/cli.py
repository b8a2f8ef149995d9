"""`cluster-pipeline` (or `python -m cluster_pipeline`): make-shards, extract, train,
train-supervised, pretrain-rotnet, clusterfit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import dist
from .checkpoint import CheckpointError
from .clusterfit import clusterfit_config, run_clusterfit
from .config import Config, ConfigError, load_config
from .data.reader import ShardError
from .data.shards import load_source, write_shards
from .extract import run_extract
from .fixed_targets import run_supervised
from .rotnet import run_rotnet
from .stop import StopFlag, Stopped
from .train import run_deepcluster

log = logging.getLogger("cluster_pipeline")

# Exit status of a run stopped by a signal after writing its checkpoint (EX_TEMPFAIL).
EXIT_STOPPED = 75


def cmd_make_shards(args: argparse.Namespace) -> None:
    index = write_shards(
        load_source(args.source), args.out, args.samples_per_shard, workers=args.workers
    )
    print(f"wrote {index['num_samples']} samples in {len(index['shards'])} shards to {args.out}")


def cmd_extract(args: argparse.Namespace) -> None:
    layers = [name for name in (args.layers or "").split(",") if name]
    cfg = load_config(args.config, args.overrides)
    folder = run_extract(cfg, args.checkpoint, args.out, layers, args.pool)
    if folder is not None:
        print(f"wrote features to {folder}")


def cmd_train(args: argparse.Namespace) -> None:
    training(run_deepcluster, load_config(args.config, args.overrides))


def cmd_supervised(args: argparse.Namespace) -> None:
    training(run_supervised, load_config(args.config, args.overrides))


def cmd_rotnet(args: argparse.Namespace) -> None:
    training(run_rotnet, load_config(args.config, args.overrides))


def cmd_clusterfit(args: argparse.Namespace) -> None:
    cfg = clusterfit_config(args.config, args.pretrained, args.overrides)
    if args.layer is not None:
        cfg.clusterfit.layer = args.layer
    if args.pool is not None:
        cfg.clusterfit.pool = args.pool
    training(run_clusterfit, cfg)


def training(run: Callable[[Config, StopFlag], Path], cfg: Config) -> None:
    """A training command that stops cleanly on a signal and resumes on a re-run."""
    flag = StopFlag()
    flag.install()  # SIGTERM / SIGUSR2: checkpoint at the next step boundary, then exit 75
    run_dir = run(cfg, flag)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {run_dir}\nreport: {run_dir / 'report.png'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-shards", help="write webdataset tar shards and their index")
    p.add_argument("--source", required=True, help="mnist5k, digits or imagefolder:PATH")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.set_defaults(func=cmd_make_shards)

    for name, func, text in (
        ("extract", cmd_extract, "extract features of every sample exactly once"),
        ("train", cmd_train, "train DeepCluster (resumes the run directory if it has checkpoints)"),
        ("train-supervised", cmd_supervised, "train on the shards' true classes (resumes too)"),
        ("pretrain-rotnet", cmd_rotnet, "RotNet: predict 0/90/180/270 degree rotations"),
        ("clusterfit", cmd_clusterfit, "cluster a pretrained network's features once, then "
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
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ShardError, FileNotFoundError) as exc:
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
        return 1
    except BaseException:
        if logging.getLogger().handlers:  # the run's logs/rank<N>.log: keep the traceback there
            log.exception("cluster-pipeline %s failed", args.command)
        raise
    return 0
