"""False-positive rate and coverage of the SFT-vs-RL comparison under a true null, by simulation.

    .venv/bin/python bench/null_calibration.py [--experiments 1000] [--bootstrap 100] [--run RUN_DIR]

Synthetic experiments (``dcv.simulate``: SFT and RL runs drawn from one distribution; between-run and
item-level variance from ``--run``'s analysis tables or the defaults) go through dcv's own comparison
(``dcv.matched.compare`` and ``across_seeds``), at 2, 3 and 5 runs per method, on the step axis (last
step) and the accuracy axis (the highest level both methods reach: the level the report states). Per
setting it prints:

- ``BENCH fpr_<axis>_<n>v<n>``: the across-seeds test's false-positive rate (nominal 0.05), with its
  one-sided 95% Clopper-Pearson upper bound;
- ``BENCH coverage_<axis>_<n>v<n>``: its 95% CI's coverage of the true difference (0);
- ``BENCH v2_fpr_<axis>_<n>v<n>``: version 2's (bootstrap over runs, then items) rate, the "before";
- ``BENCH these_runs_coverage_step_<n>v<n>``: the these-runs CI's coverage of these runs' own difference
  (conditional on the trained runs: that CI is not an across-seeds claim, and its rate of excluding 0
  under the across-seeds null, ``these_runs_excludes0``, is expected to exceed 0.05);
- ``start_reached``: the mean share of draws in which a run's resampled start reached the accuracy level
  (that run left out of the draw: no run is matched at its step 0).
The ratio against the baseline is ``fpr / 0.05`` (``BENCH fpr_ratio_...``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcv.simulate import VarianceComponents, null_rates, upper_bound  # noqa: E402

NOMINAL = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=100, help="item draws per experiment")
    parser.add_argument("--runs", type=int, nargs="+", default=[2, 3, 5], help="runs per method")
    parser.add_argument("--run", type=Path, help="a finished run's storage root: its variance components")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    components = VarianceComponents.from_run(args.run) if args.run else VarianceComponents()
    print(f"components: {components}")
    for n in args.runs:
        start = time.perf_counter()
        tallies = null_rates(n, args.experiments, components, args.bootstrap, NOMINAL, args.seed + n)
        seconds = time.perf_counter() - start
        for axis, t in tallies.items():
            if not t.experiments:
                print(f"{axis} {n}v{n}: no experiment reached a level with 2 runs of each method")
                continue
            k = t.experiments
            fpr = t.seeds_rejected / k
            print(
                f"{axis} {n}v{n}: {k} experiments, across seeds fpr {fpr:.4f} (95% upper "
                f"{upper_bound(t.seeds_rejected, k):.4f}), coverage {t.seeds_covered / k:.4f}; v2 fpr "
                f"{t.v2_rejected / k:.4f}; these runs exclude 0 in {t.runs_rejected / k:.4f}"
                + (f", cover their own truth in {t.runs_covered / k:.4f}" if axis == "step" else "")
                + f"; start reached in {t.start_reached / k:.4f} of draws ({seconds:.0f} s)"
            )
            print(f"BENCH fpr_{axis}_{n}v{n} {fpr:.4f}")
            print(f"BENCH fpr_ratio_{axis}_{n}v{n} {fpr / NOMINAL:.3f}")
            print(f"BENCH coverage_{axis}_{n}v{n} {t.seeds_covered / k:.4f}")
            print(f"BENCH v2_fpr_{axis}_{n}v{n} {t.v2_rejected / k:.4f}")
            if axis == "step":
                print(f"BENCH these_runs_coverage_step_{n}v{n} {t.runs_covered / k:.4f}")


if __name__ == "__main__":
    main()
