"""Do the specialist groups follow the generalist's confusions? (Hinton et al. 2015, 5.3)

On MNIST-5k: train a quick supervised generalist (`train-supervised`, data.split=train), find
its groups with `specialists` on 2 local ranks (covariance of its predictions on the train split),
then compute its confusion matrix on the held-out test split and compare the confusion rate of
class pairs INSIDE a group with that of pairs ACROSS groups. The pair rate of classes i, j is
(confusions i->j + j->i) / (test samples of i + of j).

    .venv/bin/python -m bench.specialists                       # make bench-specialists
    .venv/bin/python -m bench.specialists --generalist CKPT     # skip training: a run checkpoint
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    DIST_VARS,
    REPO,
    final_checkpoint,
    local_command,
    new_bench_dir,
    provenance,
    publish,
    table,
)
from cluster_pipeline import dist
from cluster_pipeline.analysis.specialists import COLUMNS
from cluster_pipeline.features.extract import extract_features
from cluster_pipeline.models.layers import LayerTaps
from cluster_pipeline.models.weights import config_for_weights, load_weights, model_state
from cluster_pipeline.run.setup import open_data_and_model

SECTION = "## Specialists: groups from the generalist's prediction covariance (MNIST-5k)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/supervised_mnist.yaml",
                   help="train-supervised config of the generalist")  # fmt: skip
    p.add_argument("--generalist", help="use this run checkpoint instead of training one")
    p.add_argument("--shards", default="data/mnist5k")
    p.add_argument("--groups", type=int, default=4, help="specialist groups M")
    p.add_argument("--methods", default="kmeans,online", help="comma-separated: kmeans,online")
    p.add_argument("--nproc", type=int, default=2, help="local ranks of training and specialists")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("overrides", nargs="*", help="key=value overrides for train-supervised")
    return p.parse_args(argv)


def train_generalist(args: argparse.Namespace, bench_dir: Path) -> tuple[Path, float]:
    run_dir = bench_dir / "generalist"
    seconds = local_command(
        args.nproc,
        ["train-supervised", "--config", args.config, f"run.dir={run_dir}",
         "run.progress=false", "wandb.mode=disabled", *args.overrides],
        bench_dir / "train-supervised.log",
    )  # fmt: skip
    return final_checkpoint(run_dir), seconds


def test_confusion(weights: Path, shards: str) -> tuple[np.ndarray, list[str]]:
    """The generalist's confusion matrix (true class x predicted class) on data.split=test,
    one process; and the class names."""
    overrides = [f"data.shards={shards}", "data.split=test", "data.num_workers=0",
                 "run.progress=false"]  # fmt: skip
    cfg = config_for_weights(None, str(weights), overrides)
    ctx = dist.init_distributed(cfg.dist.timeout_s, cfg.dist.heartbeat_timeout_s)
    index, reader, model = open_data_and_model(cfg, ctx, clusters=False)
    load_weights(model, model_state(weights), str(weights))
    with LayerTaps(model, ["head"]) as taps:
        idx, logits, _ = extract_features(model, reader, cfg, ctx, taps)
    truth = index.labels
    if truth is None:
        raise SystemExit(f"{shards} has samples without a class; the bench needs them")
    c = model.head.out_features
    conf = np.zeros((c, c), dtype=np.int64)
    np.add.at(conf, (truth[idx], logits.argmax(1)), 1)
    return conf, list(index.classes)


def pair_rates(conf: np.ndarray) -> np.ndarray:
    """Symmetric confusion rate of every class pair: (i->j + j->i) / (n_i + n_j)."""
    n = conf.sum(1)
    return (conf + conf.T) / np.maximum(n[:, None] + n[None, :], 1)


def inside_across(rates: np.ndarray, labels: np.ndarray) -> tuple[float, float, int, int]:
    pairs = list(itertools.combinations(range(len(labels)), 2))
    inside = [rates[i, j] for i, j in pairs if labels[i] == labels[j]]
    across = [rates[i, j] for i, j in pairs if labels[i] != labels[j]]
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return mean(inside), mean(across), len(inside), len(across)


def report(args: argparse.Namespace, results: dict[str, Any], conf: np.ndarray,
           names: list[str], info: dict[str, Any], runtime: float) -> str:  # fmt: skip
    rates = pair_rates(conf)
    acc = np.trace(conf) / conf.sum()
    out = [SECTION, ""]
    out += [
        "Hinton, Vinyals and Dean (2015, 5.3) group classes for specialist models by k-means on "
        "the columns of the covariance of a generalist's predicted probabilities. If that works, "
        "classes the generalist confuses should share a group. Generalist: "
        f"{info['generalist']} (test accuracy {acc:.3f} on {conf.sum()} held-out digits). Groups: "
        f"`specialists --groups {args.groups}` on {args.nproc} local ranks, covariance over the "
        f"{info['num_samples']} train-split digits. Confusion: the same network on the test "
        "split; the pair rate of digits i, j is (i→j + j→i) / (n_i + n_j).",
        "",
    ]
    rows = []
    for variant, r in results.items():
        inside, across, n_in, n_across = r["inside_across"]
        ratio = f"{inside / across:.1f}×" if across > 0 else "-"
        groups = " · ".join("{" + ",".join(g["classes"]) + "}" for g in r["groups"])
        rows.append([variant, groups, f"{inside:.4f} ({n_in})", f"{across:.4f} ({n_across})",
                     ratio, f"{r['seconds']:.0f}"])  # fmt: skip
    out += table(["columns, method", "groups found", "mean pair confusion inside (pairs)",
                  "across (pairs)", "inside / across", "wall s"], rows, "llrrrr")  # fmt: skip
    top = sorted(itertools.combinations(range(len(names)), 2), key=lambda p: -rates[p])[:8]
    first = next(iter(results.values()))
    labels = np.array(first["labels"])
    out += ["", f"Most confused test pairs, and whether `{next(iter(results))}` grouped them:", ""]
    out += table(
        ["pair", "pair rate", "i→j", "j→i", "same group"],
        [
            [
                f"{names[i]}/{names[j]}",
                f"{rates[i, j]:.4f}",
                str(conf[i, j]),
                str(conf[j, i]),
                "yes" if labels[i] == labels[j] else "no",
            ]
            for i, j in top
        ],
        "lrrrl",
    )
    for check in ([4, 9], [3, 5, 8]):
        idx = [names.index(str(c)) for c in check if str(c) in names]
        together = len({int(labels[i]) for i in idx}) == 1
        out += ["", f"- {'/'.join(map(str, check))}: "
                + ("in one group" if together else "split over groups "
                   + ", ".join(f"{names[i]}→{labels[i]}" for i in idx))]  # fmt: skip
    out += ["", "### How it was measured", "", *provenance("bench.specialists", runtime),
            f"- Bench directory: `{info['bench_dir']}`"]  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var in DIST_VARS:  # a world of one
        os.environ.pop(var, None)
    t0 = time.perf_counter()
    bench_dir = new_bench_dir("specialists")
    if args.generalist:
        weights, train_s = Path(args.generalist), 0.0
        generalist = f"`{args.generalist}` (given)"
    else:
        weights, train_s = train_generalist(args, bench_dir)
        generalist = f"`train-supervised --config {args.config}`, {train_s:.0f} s"
    results: dict[str, Any] = {}
    num_samples = 0
    for columns, method in itertools.product(COLUMNS, args.methods.split(",")):
        run = bench_dir / f"specialists-{columns}-{method}"
        seconds = local_command(
            args.nproc,
            ["specialists", "--checkpoint", str(weights), "--shards", args.shards,
             "--groups", str(args.groups), "--method", method, "--columns", columns,
             f"run.dir={run}", "data.split=train", "run.progress=false"],
            bench_dir / f"specialists-{columns}-{method}.log",
        )  # fmt: skip
        info = json.loads((run / "specialists.json").read_text())
        labels = np.empty(info["num_classes"], dtype=np.int64)
        for g in info["groups"]:
            labels[g["class_ids"]] = g["group"]
        results[f"{columns}, {method}"] = {"groups": info["groups"], "labels": labels.tolist(),
                           "seconds": seconds}  # fmt: skip
        num_samples = info["num_samples"]
    conf, names = test_confusion(weights, args.shards)
    rates = pair_rates(conf)
    for r in results.values():
        r["inside_across"] = inside_across(rates, np.array(r["labels"]))
        print(f"  inside {r['inside_across'][0]:.4f} across {r['inside_across'][1]:.4f}")
    meta = {"generalist": generalist, "num_samples": num_samples,
            "bench_dir": str(bench_dir.relative_to(REPO))}  # fmt: skip
    saved = {"results": results, "confusion": conf.tolist(), "train_s": train_s}
    (bench_dir / "results.json").write_text(json.dumps(saved, indent=1))
    publish(SECTION, report(args, results, conf, names, meta, time.perf_counter() - t0),
            not args.no_write)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
