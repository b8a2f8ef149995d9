"""`make gpu-check`'s script, run whole in its CPU smoke mode: every step runs and records the
figures the GPU run will report, so the one lent GPU run is not where its bugs show up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_every_step_in_its_cpu_smoke_mode(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
            "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path),
            "WANDB_CACHE_DIR": str(tmp_path)}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu", "--out",
                          str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["cpu_smoke"] is True
    for step in ("kmeans", "pca", "extract", "train"):
        assert res[step]["ok"], res[step]
    km = res["kmeans"]
    for precision in ("fp32", "tf32"):
        assert km[precision]["seconds"] > 0 and km[precision]["finite"]
        assert 0 <= km[precision]["exact_rows"] <= km["n"] * km["niter"]
    assert res["pca"]["fit_s"] > 0 and abs(res["pca"]["whitened_variance"] - 1) < 0.1
    ex = res["extract"]
    assert ex["images"] == 96 and ex["extract_img_s"] > 0 and ex["ratio"] > 0
    tr = res["train"]
    assert tr["epochs"] == 2
    assert all("time_cluster_s" in row and "time_extract_s" in row for row in tr["phases"])
