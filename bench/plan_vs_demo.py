"""`dcv plan` against the demo's measured stage times: measured / planned, per stage.

    .venv/bin/python bench/plan_vs_demo.py [--run RUN_DIR] [--cores 2]

With ``--run`` it reads a finished run's ``stage_seconds.json`` and plans that run's own stored config
(``experiment_config.json``). Without it, it compares with the demo runs recorded in README.md, each
planned from the config it ran (``RECORDED``: the date, the commit's config as ``--set`` over
configs/demo.yaml, the stage seconds). Hardware: the 2-core demo machine (the plan's CPU constants were
measured there; dcv.plan.CPU_CORE). Nothing is trained or patched; it takes a second.

A ratio above 1 means the stage took longer than planned. The last lines are
``BENCH plan_ratio_<stage> <measured / planned>`` for the newest record (or the run given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcv.config import load_config, parse_config  # noqa: E402
from dcv.plan import Cluster, build_plan  # noqa: E402

# dcv.experiment's STAGE_SECONDS_FILE and CONFIG_FILE, named here so the script does not import the stages.
STAGE_SECONDS_FILE, CONFIG_FILE = "stage_seconds.json", "experiment_config.json"
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# Demo runs whose stage seconds README.md and FACTS.md record, with the config each ran.
RECORDED = [
    {
        "date": "2026-12-01",
        "about": "fresh clone, idle machine; config of 27c04d6 (16 items, SFT 12 steps, 3 lm-eval tasks)",
        "sets": [
            "probes=[{name: ioi, n_items: 16}, {name: capitals, n_items: 16},"
            " {name: greater_than, n_items: 16}, {name: induction, n_items: 16}]",
            "sft.learning_rate=1e-4",
            "sft.max_steps=12",
            "sft.eval_every=6",
            "rl.learning_rate=1e-5",
            "sweep.sft_learning_rates=[1e-4]",
            "sweep.rl_learning_rates=[1e-5]",
            "benchmarks.tasks=[dcv_hellaswag, dcv_winogrande, dcv_mmlu]",
            "circuits.curve_fractions=[]",
            "calibration.enabled=false",
        ],
        # analysis + report were recorded together (3 s): left out.
        "seconds": {"base": 19, "sweep": 394, "benchmarks": 65, "patching": 80, "circuits": 71},
    },
    {
        "date": "2026-12-02",
        "about": "fresh clone, idle machine, configs/demo.yaml of c9398b2 (as now)",
        "sets": [],
        "seconds": {"base": 22, "sweep": 574, "patching": 161, "circuits": 138, "calibration": 131},
    },
    {
        "date": "2026-12-07",
        "about": "fresh clone, idle machine, warm caches, configs/demo.yaml (as now)",
        "sets": [],
        "seconds": {
            "base": 4,
            "sweep": 908,
            "patching": 219,
            "circuits": 175,
            "calibration": 285,
            "analysis": 16,
            "report": 5,
        },
    },
]


def compare(label: str, plan, seconds: dict[str, float]) -> dict[str, float]:
    print(f"\n{label}")
    print(f"{'stage':<14} {'planned s':>9} {'measured s':>10} {'ratio':>6}")
    ratios = {}
    for stage in plan.stages:
        if stage.stage not in seconds:
            continue
        got, want = seconds[stage.stage], stage.wall_s
        ratios[stage.stage] = got / want if want else float("nan")
        print(f"{stage.stage:<14} {want:9.0f} {got:10.0f} {ratios[stage.stage]:6.2f}")
    planned = sum(s.wall_s for s in plan.stages if s.stage in seconds)
    measured = sum(seconds.values())
    print(f"{'these stages':<14} {planned:9.0f} {measured:10.0f} {measured / planned:6.2f}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a finished dcv run folder (holds stage_seconds.json)")
    parser.add_argument("--cores", type=float, default=2.0, help="CPU cores the run had (default 2)")
    args = parser.parse_args()
    cluster = Cluster(0.0, args.cores, f"{args.cores:g} CPU cores")
    if args.run:
        seconds = json.loads((args.run / STAGE_SECONDS_FILE).read_text())
        cfg = parse_config(json.loads((args.run / CONFIG_FILE).read_text()), str(args.run / CONFIG_FILE))
        plan = build_plan(cfg, cluster, str(args.run))
        ratios = compare(f"{args.run}: its stored config", plan, seconds)
    else:
        for record in RECORDED:
            plan = build_plan(load_config(DEMO, record["sets"]), cluster, str(DEMO))
            ratios = compare(f"{record['date']}: {record['about']}", plan, record["seconds"])
    for stage, ratio in ratios.items():
        print(f"BENCH plan_ratio_{stage} {ratio:.2f}")


if __name__ == "__main__":
    main()
