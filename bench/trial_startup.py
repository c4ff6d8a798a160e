"""A trial's start-up: seconds from ``run_trial`` to its first training step, on the demo's config.

    .venv/bin/python bench/trial_startup.py [--methods sft rl] [--seeds 0 1] [--model smollm2-135m-instruct]

Each trial is the demo's (SmolLM2, one worker, one torch thread) cut to one optimizer step, evaluated at
step 0 and step 1, run one after the other on one local Ray (as ``dcv train`` starts it) with a fresh storage
root. Start-up is the time from calling ``run_trial`` to Ray Train registering step 0's checkpoint (the
base model's, which the worker reports from ``on_train_begin``, just before the first step): the Train
controller and worker, model and tokenizer, the evaluation kit, the trainer, and step 0's checkpoint. The
first trial of a storage root also scores the base model (later trials read its scores back), so the first
trial of each method is reported apart from the others (``first``) and each method's later trials are
averaged (``later``): ``later`` is what each of a sweep's trials costs.

Prints ``BENCH trial_startup_<method>_<first|later>_s <seconds>`` and ``BENCH trial_<method>_total_s``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray.train
import yaml

from dcv.cli import init_ray
from dcv.config import parse_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


class ReportTimes(ray.train.UserCallback):
    """When the Train controller registered each reported checkpoint (wall-clock seconds), appended to a
    file: the callback runs on the controller, a process of its own, so an attribute set there never
    reaches the driver (the first version kept a list and failed on its first run, 2026-12-07)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as out:
            out.write(f"{time.time()}\n")

    def times(self) -> list[float]:
        return [float(line) for line in Path(self.path).read_text().split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["sft", "rl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    from dcv.training.trial import run_trial

    raw = yaml.safe_load(DEMO.read_text())
    raw["model"]["name"] = args.model
    raw["storage"] = {"root": tempfile.mkdtemp(prefix="dcv-startup-")}
    for section in ("sft", "rl"):
        raw[section].update(max_steps=1, eval_every=1)
    cfg = parse_config(raw)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_ray()
    for method in args.methods:
        startups, totals = [], []
        for seed in args.seeds:
            timer = ReportTimes(Path(raw["storage"]["root"]) / f"report-times-{method}-{seed}.txt")
            start = time.time()
            run_trial(cfg, method, seed, callbacks=[timer])
            end = time.time()
            startups.append(timer.times()[0] - start)
            totals.append(end - start)
            print(
                f"{method} seed {seed}: start-up {startups[-1]:.1f} s, trial {totals[-1]:.1f} s", flush=True
            )
        print(f"BENCH trial_startup_{method}_first_s {startups[0]:.1f}")
        if len(startups) > 1:
            print(f"BENCH trial_startup_{method}_later_s {statistics.fmean(startups[1:]):.1f}")
        print(f"BENCH trial_{method}_total_s {statistics.fmean(totals):.1f}")


if __name__ == "__main__":
    main()
