"""The clustering step's results do not depend on the machine's kernels, threads or layout
(README, "Guarantees"): each check of `bitwise_check.py` here, then all of them in
subprocesses that force the kernels of other x86-64 CPUs and more threads than cores.

A CPU with AVX-512 runs AVX2 and AVX kernels when told to, so every machine checks the kernels
of an AVX2-only AMD EPYC too (where a result that was bit-exact on AVX-512 once was not).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bitwise_check import CHECKS

from cluster_pipeline.testing.limits import limit

HERE = Path(__file__).resolve().parent

# Environment that makes each library pick the kernels of an older CPU: OpenBLAS (numpy's,
# scipy's and faiss's), faiss's own SIMD, numpy's dispatched loops, torch's ATen and oneDNN.
AVX2 = {
    "OPENBLAS_CORETYPE": "Haswell",
    "FAISS_SIMD_LEVEL": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
AVX = AVX2 | {
    "OPENBLAS_CORETYPE": "Sandybridge",
    "FAISS_SIMD_LEVEL": "NONE",
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "AVX",
}
MANY_THREADS = {"OPENBLAS_NUM_THREADS": "3", "OMP_NUM_THREADS": "3"}  # more than 2 cores


@pytest.mark.parametrize("name", list(CHECKS))
def test_bitwise_promise_holds_here(name: str) -> None:
    CHECKS[name]()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernels",
    [{}, AVX2, AVX],
    ids=["native-kernels", "avx2-kernels", "avx-kernels"],
)
def test_bitwise_promises_hold_with_other_cpu_kernels_and_threads(kernels: dict) -> None:
    env = os.environ | kernels | MANY_THREADS
    res = subprocess.run(
        [sys.executable, str(HERE / "bitwise_check.py")], env=env, capture_output=True,
        text=True, timeout=limit(300),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert res.stdout.split() == [word for name in CHECKS for word in ("ok", name)]
    if kernels.get("OPENBLAS_CORETYPE"):  # the kernels asked for were the ones used
        probe = "import numpy, threadpoolctl; print(threadpoolctl.threadpool_info())"
        info = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
        assert f"'architecture': '{kernels['OPENBLAS_CORETYPE']}'" in info, info
