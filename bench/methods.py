"""The papers' tables in miniature: linear probes per layer, kNN and NMI for six ways to train.

On MNIST-5k, split 4000 / 1000 by the fixed rule of `data.split` (every training run sees only
the 4000 train images; the probes fit on train and score on the 1000 test images), each row is
one network evaluated by `cluster-pipeline evaluate`:

  random init            the demo architecture as initialised, never trained;
  RotNet                 `pretrain-rotnet` (rotation prediction, the pretext ClusterFit used);
  ClusterFit(RotNet)     `clusterfit --pretrained <RotNet>`: a fresh network on k-means labels of
                         RotNet's features;
  DeepCluster            `train` (configs/demo_mnist.yaml);
  ClusterFit(DeepCluster) `clusterfit --pretrained <DeepCluster>`;
  supervised             `train-supervised` on the true classes: the upper bound.

Every command runs on 2 local ranks (`launch.local`), one seed per pass; the claims checked are
the directions of the ClusterFit paper (ClusterFit(RotNet) beats RotNet at the top layer) and of
the DeepCluster paper (DeepCluster beats random init at every layer but the first).

    .venv/bin/python -m bench.methods                 # part of make bench-quality
    .venv/bin/python -m bench.methods --seeds 0,1 --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    final_checkpoint,
    local_command,
    new_bench_dir,
    provenance,
    publish,
    table,
)
from bench.quality import seed_list

SECTION = "## Methods in miniature: linear probes per layer, kNN and NMI (MNIST-5k)"
SPLIT = ["data.split=train"]
# Probed layers: the small CNN's blocks and its 128-d embedding (what DeepCluster clusters).
LAYERS = "block1,block2,block3,embedding"


@dataclass(frozen=True)
class Method:
    name: str
    command: str  # the cluster-pipeline command that trains it ("" for random init)
    config: str
    pretrained: str = ""  # name of the method whose final checkpoint it starts from


METHODS = (
    Method("random init", "", "configs/demo_mnist.yaml"),
    Method("RotNet", "pretrain-rotnet", "configs/rotnet_mnist.yaml"),
    Method("ClusterFit(RotNet)", "clusterfit", "configs/clusterfit_mnist.yaml", "RotNet"),
    Method("DeepCluster", "train", "configs/demo_mnist.yaml"),
    Method("ClusterFit(DeepCluster)", "clusterfit", "configs/clusterfit_mnist.yaml", "DeepCluster"),
    Method("supervised", "train-supervised", "configs/supervised_mnist.yaml"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=seed_list, default=[0], help="training seeds, e.g. 0,1")
    p.add_argument("--nproc", type=int, default=2, help="local ranks of every command")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--report-only", metavar="BENCH_DIR", help="re-render a run's results.json")
    return p.parse_args(argv)


def run_seed(args: argparse.Namespace, bench_dir: Path, seed: int) -> dict[str, Any]:
    """Train every method with `seed`, then evaluate each; {method: evaluation + times}."""
    common = [f"train.seed={seed}", "run.progress=false", "wandb.mode=disabled", *SPLIT]
    ckpts: dict[str, Path] = {}
    out: dict[str, Any] = {}
    for m in METHODS:
        slug = m.name.lower().replace("(", "-").replace(")", "").replace(" ", "-")
        run_dir = bench_dir / f"seed{seed}" / slug
        train_s = 0.0
        if m.command:
            cmd = [m.command, "--config", m.config, f"run.dir={run_dir}", *common]
            if m.pretrained:
                cmd += ["--pretrained", str(ckpts[m.pretrained])]
            train_s = local_command(args.nproc, cmd, bench_dir / f"seed{seed}-{slug}-train.log")
            ckpts[m.name] = final_checkpoint(run_dir)
            weights = ["--checkpoint", str(ckpts[m.name])]
        else:
            weights = ["--random-init", "--config", m.config, f"train.seed={seed}"]
        eval_dir = bench_dir / f"seed{seed}" / f"{slug}-eval"
        cmd = ["evaluate", "--out", str(eval_dir), "--layers", LAYERS, *weights,
               "run.progress=false", "wandb.mode=disabled"]  # fmt: skip
        eval_s = local_command(args.nproc, cmd, bench_dir / f"seed{seed}-{slug}-eval.log")
        result = json.loads((eval_dir / "evaluation.json").read_text())
        out[m.name] = result | {"train_s": train_s, "eval_s": eval_s}
        probe = ", ".join(f"{k} {v['top1']:.3f}" for k, v in result["probe"].items())
        print(f"    {m.name}: probe {probe}; kNN {result['knn']['top1']:.3f}", flush=True)
    return out


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def seconds(values: list[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in values)


def claims(results: list[dict[str, Any]], layers: list[str]) -> list[str]:
    """The two papers' directions, per seed and on the mean, said plainly."""

    def top1(r: dict[str, Any], method: str, layer: str) -> float:
        return float(r[method]["probe"][layer]["top1"])

    top = layers[-1]
    cf = [top1(r, "ClusterFit(RotNet)", top) - top1(r, "RotNet", top) for r in results]
    dc = {
        layer: [top1(r, "DeepCluster", layer) - top1(r, "random init", layer) for r in results]
        for layer in layers[1:]
    }
    held_cf = all(d > 0 for d in cf)
    held_dc = all(np.mean(v) > 0 for v in dc.values())
    lines = [
        f"- **ClusterFit(RotNet) beats RotNet at the top layer ({top}): "
        f"{'holds' if held_cf else 'DOES NOT HOLD'}**; difference per seed: "
        + ", ".join(f"{d:+.3f}" for d in cf)
        + ".",
        f"- **DeepCluster beats random init at every layer but the first: "
        f"{'holds' if held_dc else 'DOES NOT HOLD'}**; mean difference per layer: "
        + ", ".join(f"{layer} {np.mean(v):+.3f}" for layer, v in dc.items())
        + ".",
    ]
    return lines


def report(args: argparse.Namespace, results: list[dict[str, Any]], runtime: float) -> str:
    first = results[0]
    layers = list(first["random init"]["probe"])
    header = ["method", *[f"probe {layer}" for layer in layers], "kNN (k=20)", "NMI (k=10)"]
    rows = []
    for m in METHODS:
        cells = [m.name]
        for layer in layers:
            cells.append(mean_sd([r[m.name]["probe"][layer]["top1"] for r in results]))
        cells.append(mean_sd([r[m.name]["knn"]["top1"] for r in results]))
        cells.append(mean_sd([r[m.name]["nmi"] for r in results]))
        rows.append(cells)
    seeds = ", ".join(map(str, args.seeds))
    out = [SECTION, "", *claims(results, layers), ""]
    out += [
        f"Top-1 on the 1000 test images (mean ± sd over seeds {seeds} when more than one):",
        "",
        *table(header, rows),
        "",
    ]
    times = [
        [m.name, seconds([r[m.name]["train_s"] for r in results]) if m.command else "-",
         seconds([r[m.name]["eval_s"] for r in results])]
        for m in METHODS
    ]  # fmt: skip
    out += ["Wall time per command and seed, seconds (2 local ranks):", ""]
    out += table(["method", "training", "evaluate"], times)
    split = first["random init"].get("split", {})
    out += ["", "### How it was measured", ""]
    out += provenance("bench.methods", runtime)
    out += [
        f"- Split: `data.split` (a hash of the sample id, seed 0): {split.get('train', '?')} "
        f"train / {split.get('test', '?')} test images. Every training command gets "
        "`data.split=train`, so no test image is seen before evaluation.",
        "- Configs: " + ", ".join(sorted({f"`{m.config}`" for m in METHODS})) + "; seeds "
        f"{seeds} (`train.seed`).",
        *(
            [f"- Table re-rendered from `{args.report_only}/results.json` (the runs above)."]
            if args.report_only
            else []
        ),
        "- Probes: `cluster-pipeline evaluate` — a linear classifier per layer on frozen, "
        "pooled features (train split), top-1 on the test split; kNN: k=20, cosine, test "
        "against train; NMI: k-means with k=10 on the embedding, against the true digits.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.report_only:  # re-render a finished run's results.json
        results = json.loads((Path(args.report_only) / "results.json").read_text())
        runtime = sum(r[m.name]["train_s"] + r[m.name]["eval_s"] for r in results for m in METHODS)
        publish(SECTION, report(args, results, runtime), not args.no_write)
        return 0
    bench_dir = new_bench_dir("methods")
    results = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        results.append(run_seed(args, bench_dir, seed))
    (bench_dir / "results.json").write_text(json.dumps(results, indent=1))
    section = report(args, results, time.perf_counter() - t0)
    publish(SECTION, section, not args.no_write)
    print(f"runtime {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
