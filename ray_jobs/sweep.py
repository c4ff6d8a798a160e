"""Sweep stage as a Ray job: every training trial of the config's sweep section, under Ray Tune.

    ray job submit --working-dir . -- python -m ray_jobs.sweep --config configs/demo.yaml [--set k=v ...]

``dcv sweep`` with these arguments (``--config PATH`` is dcv's CONFIG; --set, --verbose as there): inside
a job RAY_ADDRESS names the cluster and the driver joins it; run by hand without RAY_ADDRESS it starts a
local Ray on 127.0.0.1. Rerunning the same command resumes the sweep (finished trials are not rerun).
``ray_jobs/`` is not a package: run this file as a script or with ``python -m`` from the repository root.

The job's output is dcv's console; everything else (worker output, Ray's own lines) goes to
``<storage>/logs/`` on the node that runs the driver, unless ``--verbose``.
"""

import sys
from pathlib import Path

# As a script, sys.path[0] is ray_jobs/; the repository root (the job's working dir) holds dcv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcv.cli import job_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(job_main("sweep"))
