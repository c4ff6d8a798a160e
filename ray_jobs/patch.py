"""Patching stage as a Ray job: head effects of the base model and every checkpoint of the sweep.

    ray job submit --working-dir . -- python ray_jobs/patch.py --config configs/demo.yaml [--set k=v ...]

``dcv patch-all`` with these arguments (``--config PATH`` is dcv's CONFIG; --set, --probe, --verbose as
there): inside a job RAY_ADDRESS names the cluster and the driver joins it; run by hand without
RAY_ADDRESS it starts a local Ray on 127.0.0.1. Rerunning continues where a killed run stopped (finished
items are skipped). ``ray_jobs/`` is not a package: run this file as a script.

The job's output is dcv's console; everything else (worker output, Ray's own lines) goes to
``<storage>/logs/`` on the node that runs the driver, unless ``--verbose``.
"""

import sys
from pathlib import Path

# As a script, sys.path[0] is ray_jobs/; the repository root (the job's working dir) holds dcv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcv.cli import job_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(job_main("patch-all"))
