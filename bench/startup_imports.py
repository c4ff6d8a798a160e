"""What each Ray process of a trial imports before the trial can start, in CPU seconds.

    .venv/bin/python bench/startup_imports.py [--repeats 3]

A trial is three kinds of process, each a fresh interpreter that imports its code first: the Tune trial
(the trainable's module, `dcv.training.sweep`), Ray Train's controller (it unpickles the run config's
callbacks: `dcv.training.checkpoint_folders`), and each Ray Train worker (the training loop,
`dcv.training.sft` or `dcv.training.grpo`). Until 2026-12-07 the controller's callback lived in
`dcv.training.checkpoints`, which loads the whole training stack (torch, transformers, TRL, the evaluation
kit, MLflow): that import is the baseline, measured in the same run. On 2 cores several such processes
start at once, so their CPU seconds, not their wall time alone, decide a trial's start-up.

Each module is imported in a fresh interpreter ``--repeats`` times; the median CPU time (user + system) of
those children is reported. Prints ``BENCH import_cpu_s_<role> <seconds>`` per role and
``BENCH import_cpu_ratio_<role> <role / baseline>``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys

BASELINE = ("training_stack", "dcv.training.checkpoints")
ROLES = (
    ("train_controller", "dcv.training.checkpoint_folders"),
    ("tune_trial", "dcv.training.sweep"),
    ("sft_worker", "dcv.training.sft"),
    ("grpo_worker", "dcv.training.grpo"),
)


def import_cpu_seconds(module: str) -> float:
    """CPU seconds (user + system) of a fresh interpreter that imports ``module`` and exits."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    measured = {}
    for role, module in (BASELINE, *ROLES):
        measured[role] = statistics.median(import_cpu_seconds(module) for _ in range(args.repeats))
        print(f"BENCH import_cpu_s_{role} {measured[role]:.2f}")
    for role, _ in ROLES:
        print(f"BENCH import_cpu_ratio_{role} {measured[role] / measured[BASELINE[0]]:.2f}")


if __name__ == "__main__":
    main()
