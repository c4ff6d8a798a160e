"""A trial's start-up: seconds from ``run_trial`` to its first training step, on the demo's config.

    .venv/bin/python bench/trial_startup.py [--methods sft rl] [--seeds 0 1] [--model smollm2-135m-instruct]
                                            [--processes]

Each trial is the demo's (SmolLM2, one worker, one torch thread) cut to one optimizer step, evaluated at
step 0 and step 1, run one after the other on one local Ray (as ``dcv train`` starts it) with a fresh storage
root. Start-up is the time from calling ``run_trial`` to Ray Train registering step 0's checkpoint (the
base model's, which the worker reports from ``on_train_begin``, just before the first step): the Train
controller and worker, model and tokenizer, the evaluation kit, the trainer, and step 0's checkpoint. The
first trial of a storage root also scores the base model (later trials read its scores back), so the first
trial of each method is reported apart from the others (``first``) and each method's later trials are
averaged (``later``): ``later`` is what each of a sweep's trials costs.

Prints ``BENCH trial_startup_<method>_<first|later>_s <seconds>`` and ``BENCH trial_<method>_total_s``.

With ``--processes``, the CPU seconds of every Ray process the trials started (this process's descendants,
read every 0.5 s; named by the title Ray gives them, ``ray::<Actor>``), summed per kind over all trials and
divided by their number: ``BENCH trial_process_cpu_s_<kind> <seconds per trial>``, and each kind's share of
the Ray Train worker's (``BENCH trial_process_cpu_ratio_<kind>``). The idle pool and Ray's own daemons are
left out. Ray Train v2 starts, per trial, a controller, a worker per learner, and four helper actors of its
own (synchronization actor, placement-group cleaner, dataset manager, preemption watcher).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
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


WORKER_KIND = "RayTrainWorker"
NOT_TRIAL_KINDS = ("IDLE", "DashboardAgent", "RuntimeEnvAgent", "_AutoscalingCoordinatorActor")


def process_kind(process: psutil.Process) -> str | None:
    """``RayTrainWorker`` for a process titled ``ray::RayTrainWorker.train_fn``; None for what is not a Ray
    worker process."""
    title = " ".join(process.cmdline())
    if not title.startswith("ray::"):
        return None
    return title.removeprefix("ray::").split(".")[0].split(" ")[0] or None


class ProcessCpu:
    """Samples the CPU time of this process's Ray worker descendants until stopped: the last reading of
    each pid counts (a process that lives less than a sampling interval may be missed)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.last: dict[int, tuple[str, float]] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stopped.wait(self.interval_s):
            for child in psutil.Process().children(recursive=True):
                try:
                    kind, times = process_kind(child), child.cpu_times()
                except psutil.Error:
                    continue
                if kind is not None and kind not in NOT_TRIAL_KINDS:
                    # The title changes while a worker runs (ray::IDLE, then its actor): keep the last one.
                    self.last[child.pid] = (kind, times.user + times.system)

    def per_kind(self) -> dict[str, float]:
        total: dict[str, float] = collections.defaultdict(float)
        for kind, seconds in self.last.values():
            total[kind] += seconds
        return dict(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["sft", "rl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--processes", action="store_true", help="CPU seconds per Ray process kind")
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
    sampler = ProcessCpu()
    if args.processes:
        sampler.thread.start()
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
    if args.processes:
        time.sleep(2 * sampler.interval_s)  # a last reading of the last trial's processes
        sampler.stopped.set()
        sampler.thread.join()
        n_trials = len(args.methods) * len(args.seeds)
        cpu = {kind: seconds / n_trials for kind, seconds in sampler.per_kind().items()}
        ranked = sorted(cpu.items(), key=lambda item: -item[1])
        for kind, seconds in ranked:
            print(f"BENCH trial_process_cpu_s_{kind} {seconds:.1f}")
        for kind, seconds in ranked:
            if WORKER_KIND in cpu and kind != WORKER_KIND:
                print(f"BENCH trial_process_cpu_ratio_{kind} {seconds / cpu[WORKER_KIND]:.2f}")


if __name__ == "__main__":
    main()
