"""The machine's fp32 matmul rate on a workload's own shapes: the limit bench scripts compare against.

Imported by the bench scripts (run as ``python bench/<script>.py``, so this folder is on ``sys.path``).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def matmul_gflops(shapes: dict[tuple[int, int, int], float], repeats: int = 10) -> float:
    """fp32 GFLOP/s of ``F.linear`` on a workload's shapes, at the current torch thread count.

    ``shapes`` maps (rows, in, out) to how often the workload multiplies that shape. Each shape's time is
    the best of ``repeats`` (each at least 20 ms of calls); the rate is the FLOP-weighted mix.
    """
    flops = seconds = 0.0
    for (rows, k, n), count in shapes.items():
        x, w = torch.randn(rows, k), torch.randn(n, k)
        start = time.perf_counter()
        F.linear(x, w)  # warm-up, and how many calls make 20 ms
        calls = max(1, math.ceil(0.02 / (time.perf_counter() - start)))
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                F.linear(x, w)
            best = min(best, (time.perf_counter() - start) / calls)
        flops += count * 2 * rows * k * n
        seconds += count * best
    return flops / seconds / 1e9
