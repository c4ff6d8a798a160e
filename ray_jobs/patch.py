"""Patching stage as a Ray job: head effects of the base model and every checkpoint of the sweep.

    ray job submit --working-dir . -- python ray_jobs/patch.py --config configs/demo.yaml [--set k=v ...]

The same as ``dcv patch-all CONFIG``: inside a job RAY_ADDRESS names the cluster and the driver joins it;
run by hand without RAY_ADDRESS it starts a local Ray on 127.0.0.1. Rerunning continues where a killed
run stopped (finished items are skipped). ``ray_jobs/`` is not a package: run this file as a script.

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
    parser.add_argument("--probe", dest="probes", action="append", default=[], help="only this probe")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    argv = ["patch-all", args.config]
    argv += [f"--set={item}" for item in args.overrides] + [f"--probe={p}" for p in args.probes]
    argv += ["--verbose"] if args.verbose else []
    raise SystemExit(main(argv))
