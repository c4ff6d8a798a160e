"""Sweep stage as a Ray job: every training trial of the config's sweep section, under Ray Tune.

    ray job submit --working-dir . -- python -m ray_jobs.sweep --config configs/demo.yaml [--set k=v ...]

The same as ``dcv sweep CONFIG``: inside a job RAY_ADDRESS names the cluster and the driver joins it; run
by hand without RAY_ADDRESS it starts a local Ray on 127.0.0.1. Rerunning the same command resumes the
sweep (finished trials are not rerun). ``ray_jobs/`` is not a package: run this file as a script or with
``python -m`` from the repository root.

The job's output is dcv's console; everything else (worker output, Ray's own lines) goes to
``<storage>/logs/`` on the node that runs the driver, unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# As a script, sys.path[0] is ray_jobs/; the repository root (the job's working dir) holds dcv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcv.cli import main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--verbose", action="store_true", help="everything in the job's output, no log file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    verbose = ["--verbose"] if args.verbose else []
    raise SystemExit(main(["sweep", args.config, *(f"--set={item}" for item in args.overrides), *verbose]))
