"""The machine's matmul rate on a workload's own shapes: the limit bench scripts compare against.

Imported by the bench scripts (run as ``python bench/<script>.py``, so this folder is on ``sys.path``).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a GPU clock read without it times launches, not kernels."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(
    shapes: dict[tuple[int, int, int], float],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
) -> float:
    """FLOP/s of ``F.linear`` at ``dtype`` on ``device`` on a workload's shapes, at the current thread count.

    ``shapes`` maps (rows, in, out) to how often the workload multiplies that shape. Each shape's time is
    the best of ``repeats`` (each at least 20 ms of calls); the rate is the FLOP-weighted mix.
    """
    device = torch.device(device)
    flops = seconds = 0.0
    for (rows, k, n), count in shapes.items():
        x = torch.randn(rows, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        F.linear(x, w)  # warm-up (cuBLAS picks its kernel here)
        synchronize(device)
        start = time.perf_counter()
        F.linear(x, w)  # how many calls make 20 ms
        synchronize(device)
        calls = max(1, math.ceil(0.02 / (time.perf_counter() - start)))
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                F.linear(x, w)
            synchronize(device)
            best = min(best, (time.perf_counter() - start) / calls)
        flops += count * 2 * rows * k * n
        seconds += count * best
    return flops / seconds


def matmul_gflops(shapes: dict[tuple[int, int, int], float], repeats: int = 10) -> float:
    """fp32 GFLOP/s on the CPU (`matmul_flops`), what the CPU benches compare against."""
    return matmul_flops(shapes, repeats=repeats) / 1e9
