"""Power budget of a dcv config on the 2-core demo machine: each stage's time from measured per-unit costs,
and the statistical power the design buys (noise floor, minimum detectable V and forgetting).

    .venv/bin/python bench/demo_power.py [configs/demo.yaml] [--set key=value ...] [--run RUN_DIR]

Nothing is trained or patched: the config is read (``dcv.config.load_config``, the same ``--set`` as
``dcv run``) and put through a cost model whose unit costs were measured on this machine (2 cores,
24 GiB, no GPU; ``UNIT``, ``IDLE``, ``FLOOR``, ``FAITHFULNESS`` and ``NOISE`` below say how and when). With
``--run`` it also prints a finished run's stage seconds (``stage_seconds.json``), noise floor, minimum
detectable effects and calibration beside the prediction for that run's own config.

Cost model, in CPU-seconds at one torch thread (what every demo worker computes on):
- sweep: per trial a start-up (Ray Train worker, TRL trainer, the evaluation kit: base model and KL
  reference), per evaluated checkpoint (step 0 is the base, scored once and shared, except by the
  trials that start together) the target answers (per test item), KL (per prompt), probe LDs (per item)
  and the save, per optimizer step an SFT or GRPO step. Trials run ``max_concurrent_trials`` at a time;
  the sweep's wall time is a greedy schedule of the trials in plan order (Tune's) on that many slots.
- patching: per (model, probe item) one attribution pass over all heads (exact costs about 100 times
  more); models = the base + every evaluated checkpoint after step 0; ``patching.num_actors`` actors.
- circuits: per (model, probe item) the top-k and base-circuit faithfulness passes, on the same pool.
- calibration: per planted model a copy, save and probe scores in the driver, then its own probe's
  patching and circuit on the pool, beside the base's effects and circuits again.
- analysis + report: the hierarchical bootstrap, per draw, model and probe.
The units were measured beside the test suite (load average 5-18); ``busy`` spreads the CPU over 2 cores,
``idle`` scales that by how much faster the same work ran on the idle machine (``IDLE``).

Power model (docs/method.md "Statistics: what a comparison may claim"): the standard error of SFT - RL
measured on a reference run at each matched step (``NOISE``: version 2's minimum detectable differences, 2.80
bootstrap SEs), read at the config's last step common to both methods and scaled as 1/sqrt(items per probe x
probes in the means) and 1/sqrt(runs per method), times the across-seeds test's factor t_{0.975,df} +
t_{0.8,df} at df = 2 (runs - 1) (its SE at 2 runs is taken as measured: version 2 underestimated the run part,
so this still flatters small n). Probes in the means are those whose measured top-k faithfulness reaches tau
(``FAITHFULNESS``); the noise floor per probe (5th-percentile Jaccard of the base circuit against itself on
bootstrap resamples of the items) comes from the base model's per-item attribution effects measured at 16..64
items (``FLOOR``).

The last lines are ``BENCH predicted_minutes <X>`` (the run), ``BENCH predicted_make_demo_minutes`` (with
``make venv`` on a fresh clone and ``dcv run``'s start: ``VENV_S``, ``START_S``) and
``BENCH predicted_min_detectable_V <Y>``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcv.config import ExperimentConfig, load_config  # noqa: E402

Z_FACTOR = 1.959964 + 0.841621  # z_0.975 + z_0.8: what NOISE's v2 figures were (2.80 bootstrap SEs)

# Unit costs, CPU-seconds at 1 torch thread, SmolLM2-135M fp32 (measured: docs/measurements.md).
UNIT = {
    "ray_start": 12.0,  # CLI imports, local Ray up, base snapshot read (converted once into ~/.cache/dcv)
    "ray_start_s": 22.0,  # the same in wall seconds (mostly waiting for Ray's processes)
    "trial_start_sft": 47.0,  # Ray Train worker, TRL SFTTrainer, evaluation kit (base model, probes)
    "trial_start_rl": 58.0,  # the same for GRPOTrainer, plus the rollout actor and its model
    "kl_reference_prompt": 0.37,  # base-model KL continuations, sampled once per trial
    "target_item": 0.38,  # greedy answer of one target test item (16 new tokens, batch 16)
    "kl_prompt": 0.52,  # KL(base || model) of one prompt's continuation (both models' forwards)
    "probe_item": 0.045,  # clean + corrupted LD of one probe item
    "checkpoint_save": 4.0,  # weights + AdamW state to scratch, Ray's persist copy
    "sft_step": 7.65,  # one AdamW step of 4 examples (~100 tokens each)
    "grpo_step": 21.8,  # one GRPO step of 8 completions (2 prompts x 4, 12 new tokens), rollout + sync
    "attribution_item": 0.35,  # one (model, probe item) of attribution patching, all 270 heads
    "exact_item": 27.0,  # exact patching costs about 100x attribution here
    "actor_start": 15.0,  # a patching actor: imports, model load
    "circuits_start": 10.0,
    "faithfulness_item": 0.27,  # a model's top-k and base-circuit faithfulness passes, per probe item
    "circuit": 0.5,  # per (model, probe): ranking, tables (the model load is in faithfulness_item)
    "floor_resample": 0.01,  # one noise-floor bootstrap resample (numpy)
    "calibration_start": 30.0,
    "plant": 12.0,  # a planted model: deepcopy, save 0.54 GB, read back by an actor
    "analysis_start": 5.0,
    "bootstrap_draw": 0.0002,  # per (draw, model, probe) of the hierarchical bootstrap
    "checkpoint_gb": 0.538,  # fp32 SmolLM2 weights; optimizer state is deleted when a trial finishes
    "storage_other_gb": 0.15,  # tokenizers, tables, MLflow
}
# The unit costs above were measured on 2026-12-02 with the test suite beside them (load average 5-18 on
# the 2 cores); the same work on the idle machine took this share of the "busy" wall time, per stage.
# Measured on a fresh clone of configs/demo.yaml, 2026-12-02 14:05-14:24 UTC, nothing else running (empty
# uv and dcv caches): sweep 574 s, patching 161 s, circuits 138 s, calibration 131 s; predicted busy here
# for that config: 473, 191, 154, 328 s. (The 2026-12-01 idle run gave 0.80, 0.69, 0.74, 0.81 for its
# config: the sweep's trial start-up, not modelled per process, and planting, cheaper than ``plant``, move
# most between configs.)
# `make venv` on a fresh clone (torch and uv by pip, the rest by uv; an empty uv cache), wall seconds:
# 32 s in that run, 35 s at load average 5-7. The part of `make demo` before `dcv run`.
VENV_S = 32.0
# `dcv run` before its first stage (CLI imports, preflight, the local Ray up): 30 s in that run (its wall
# 1065 s less its stages' 1035 s).
START_S = 30.0

IDLE = {"sweep": 574 / 473, "patching": 161 / 191, "circuits": 138 / 154, "calibration": 131 / 328}

# Noise floor of the base circuit against itself: 5th-percentile Jaccard over 200 bootstrap resamples, by
# top_k and items per probe, from the base model's per-item attribution effects on 64 items (capitals: 50,
# all its generator gives) at 1 thread, 2026-12-02; n < 64 is one random subset of those items, so each
# entry carries subset noise. J takes few values at top-10 (1, 0.82, 0.67: one swapped head is 0.82).
FLOOR = {
    "ioi": {
        5: {16: 0.67, 32: 0.67, 64: 0.67},
        10: {16: 0.67, 24: 0.67, 32: 0.82, 48: 0.82, 64: 0.82},
        20: {16: 0.67, 32: 0.74, 64: 0.74},
    },
    "capitals": {
        5: {16: 0.67, 24: 0.67, 32: 1.0, 48: 1.0},
        10: {16: 0.67, 24: 0.82, 32: 0.82, 48: 0.82},
        20: {16: 0.54, 32: 0.6, 48: 0.67},
    },
    "greater_than": {
        5: {16: 0.67, 32: 0.67, 64: 1.0},
        10: {16: 0.82, 24: 0.67, 32: 0.82, 48: 0.82, 64: 0.82},
        20: {16: 0.6, 32: 0.74, 64: 0.82},
    },
    "induction": {
        5: {16: 0.24, 32: 0.25, 64: 0.11},
        10: {16: 0.33, 32: 0.33, 64: 0.25},
        20: {16: 0.43, 32: 0.38, 64: 0.33},
    },
}
# Faithfulness of the base's top-k attribution heads (32 items): below tau, a probe leaves the means.
FAITHFULNESS = {
    "ioi": {5: 0.61, 10: 0.66, 15: 0.58, 20: 0.68, 30: 0.79},
    "capitals": {5: 0.88, 10: 0.84, 15: 0.86, 20: 0.89, 30: 0.92},
    "greater_than": {5: 0.90, 10: 0.91, 15: 0.94, 20: 0.98, 30: 0.98},
    "induction": {5: -0.01, 10: -0.01, 15: -0.01, 20: 0.02, 30: 0.03},
}
# Standard-error parts of SFT - RL at a matched level, measured at NOISE["items"] items and NOISE["runs"].
NOISE = {
    # Minimum detectable SFT - RL at each matched step (the headline's mde: 2.80 x the bootstrap SE) of the
    # reference run: the 2026-12-02 measurement run (SFT 5e-4 and GRPO 3e-5, 12 steps, evaluated at 4, 8,
    # 12; 2 runs per method; capitals, greater_than and ioi 32 items, induction 16). The SE grows with
    # the damage (and so with the step): the prediction reads it at the config's last common step.
    "circuit_vulnerability_abs": {
        "items": 32,
        "probes": 2,
        "runs": 2,
        "by_step": {4: 0.048, 8: 0.064, 12: 0.096},
    },
    "forgetting_ld": {"items": 16, "probes": 4, "runs": 2, "by_step": {4: 0.479, 8: 0.953, 12: 1.589}},
    "forgetting": {"items": 16, "probes": 4, "runs": 2, "by_step": {4: 0.046, 8: 0.079, 12: 0.110}},
}


def eval_steps(max_steps: int, every: int) -> list[int]:
    """The evaluated checkpoints of a trial: step 0, every ``eval_every``, and the last."""
    return sorted({0, *range(every, max_steps + 1, every), max_steps})


def trial_plan(cfg: ExperimentConfig) -> list[dict]:
    """Every trial in the sweep's order with its method, steps, evaluated steps and per-step batch."""
    from dcv.training.sweep import plan_trials

    out = []
    for spec in plan_trials(cfg):
        tc = spec.config(cfg)
        m = tc.sft if spec.method == "sft" else tc.rl
        out.append(
            {
                "name": spec.name,
                "method": spec.method,
                "steps": m.max_steps,
                "evals": eval_steps(m.max_steps, m.eval_every),
                "batch": m.per_device_batch_size * m.gradient_accumulation_steps,
                "cfg": tc,
            }
        )
    return out


def eval_cpu(cfg: ExperimentConfig) -> float:
    """CPU-seconds to score one checkpoint: target answers, KL, probe LDs, save and persist."""
    u = UNIT
    items = sum(p.n_items for p in cfg.probes)
    target = cfg.target_task.n_test * u["target_item"] * cfg.evaluation.max_new_tokens / 16
    kl = cfg.evaluation.kl_prompts * cfg.evaluation.kl_samples_per_prompt * u["kl_prompt"]
    return target + kl + items * u["probe_item"] + u["checkpoint_save"]


def trial_cpu(cfg: ExperimentConfig, trial: dict, base_scored: bool) -> float:
    """CPU-seconds of one trial at one thread (step 0 scored here unless another trial scored it)."""
    u = UNIT
    tc = trial["cfg"]
    start = u["trial_start_" + trial["method"]]
    start += tc.evaluation.kl_prompts * u["kl_reference_prompt"]
    if trial["method"] == "sft":
        step = u["sft_step"] * trial["batch"] / 4
    else:
        r = tc.rl
        # Measured at 8 completions of 12 tokens, 1 update per batch: scaled by completions only.
        step = u["grpo_step"] * trial["batch"] / 8 * r.num_iterations
    evals = len(trial["evals"]) - (1 if base_scored else 0)
    return start + trial["steps"] * step + evals * eval_cpu(tc)


def sweep_wall(cfg: ExperimentConfig, trials: list[dict], cores: float) -> tuple[float, float]:
    """(CPU-seconds, wall seconds) of the sweep: trials in plan order on ``max_concurrent_trials`` slots.

    Step 0 is the base model, scored once and shared; but trials that start together all score it
    (none has written the shared file yet), which is what the first wave does."""
    slots = max(1, min(cfg.sweep.max_concurrent_trials, int(cores)))
    speed = min(1.0, cores / slots)  # a slot computes at one core, or less when slots outnumber cores
    free = [0.0] * slots
    total = 0.0
    for i, trial in enumerate(trials):
        slot = min(range(slots), key=free.__getitem__)
        first_wave = i < slots
        cpu = trial_cpu(cfg, trial, base_scored=not first_wave)
        total += cpu
        free[slot] += cpu / speed
    return total, max(free)


def checkpoints(trials: list[dict]) -> int:
    """Evaluated checkpoints after step 0 (step 0 is the base model: patched once)."""
    return sum(len(t["evals"]) - 1 for t in trials)


def patching_cpu(cfg: ExperimentConfig, n_models: int) -> float:
    u = UNIT
    per_item = u["attribution_item"] if cfg.patching.methods[0] == "attribution" else u["exact_item"]
    items = sum(p.n_items for p in cfg.probes)
    return n_models * items * per_item * len(cfg.patching.methods)


def circuits_cpu(cfg: ExperimentConfig, n_models: int) -> float:
    u = UNIT
    items = sum(p.n_items for p in cfg.probes)
    floor = len(cfg.probes) * cfg.circuits.noise_floor_resamples * u["floor_resample"]
    return (
        u["circuits_start"]
        + n_models * (items * u["faithfulness_item"] + len(cfg.probes) * u["circuit"])
        + floor
    )


def calibration_plants(cfg: ExperimentConfig) -> list[tuple[str, int]]:
    """(probe, k) of every planted model: top-k circuit heads and k random heads per probe at every alpha,
    one precision copy."""
    c = cfg.calibration
    probes = c.probes or [p.name for p in cfg.probes if p.name != "chem"]
    k_max = cfg.circuits.top_k if cfg.circuits.selection == "top_k" else cfg.circuits.k_max
    plants = [("", 0)]
    for probe in probes:
        plants += [(probe, k) for k in c.k if k <= k_max for _ in c.alphas for _ in ("circuit", "random")]
    return plants


def calibration_cost(cfg: ExperimentConfig) -> tuple[float, float]:
    """(CPU-seconds, wall seconds): the driver plants the models one by one (copy, save, probe scores),
    then the actor pool patches each on its own probe (the copy on every calibrated probe) and finds
    their circuits, beside the base's effects and circuits again."""
    if not cfg.calibration.enabled:
        return 0.0, 0.0
    u = UNIT
    items = {p.name: p.n_items for p in cfg.probes}
    plants = calibration_plants(cfg)
    probes = sorted({p for p, _ in plants if p})
    serial = len(plants) * (u["plant"] + sum(items[p] for p in probes) * u["probe_item"])
    own = sum(sum(items[p] for p in ([probe] if probe else probes)) for probe, _ in plants)
    pool = (sum(items.values()) + own) * (u["attribution_item"] + u["faithfulness_item"])
    actors = min(cfg.patching.num_actors, 2)
    cpu = u["calibration_start"] + serial + pool + 2 * actors * u["actor_start"]
    return cpu, u["calibration_start"] + serial + pool / actors + 2 * u["actor_start"]


def analysis_cpu(cfg: ExperimentConfig, n_models: int) -> float:
    return (
        UNIT["analysis_start"]
        + cfg.circuits.n_bootstrap * n_models * len(cfg.probes) * UNIT["bootstrap_draw"]
    )


def floor_jaccard(probe: str, n: int, top_k: int) -> float | None:
    """The measured noise floor (5th-percentile J) at the largest measured count <= n; None if unmeasured."""
    table = FLOOR.get(probe, {}).get(top_k, {})
    counts = [m for m in table if m <= n]
    return table[max(counts)] if counts else None


def in_means(cfg: ExperimentConfig) -> list[str]:
    """Probes expected in the means of P, J and V: base circuit faithfulness (measured) >= tau."""
    k = cfg.circuits.top_k
    return [
        p.name
        for p in cfg.probes
        if p.name != "chem" and FAITHFULNESS.get(p.name, {}).get(k, 0.0) >= cfg.circuits.tau
    ]


def mde(cfg: ExperimentConfig, metric: str, probes: list[str], runs: int, step: int) -> float:
    """Minimum detectable SFT - RL difference at matched step ``step``: the reference run's (``NOISE``) at
    the nearest measured step, scaled as 1/sqrt(items per probe x probes) and 1/sqrt(runs per method).

    One run cannot split its SE into the item and run parts, so both are scaled together: a config that
    adds only items or only runs is predicted better than it will be; docs/measurements.md compares with
    real runs.
    """
    from scipy import stats

    ref = NOISE[metric]
    at = min(ref["by_step"], key=lambda s: (abs(s - step), s))
    n = min((p.n_items for p in cfg.probes if p.name in probes), default=ref["items"])
    scale = (ref["items"] / n) * (ref["probes"] / max(len(probes), 1)) * (ref["runs"] / max(runs, 1))
    se = ref["by_step"][at] / Z_FACTOR * math.sqrt(scale)
    # The across-seeds test's MDE (dcv.matched.across_seeds): t at Welch's df, 2 (n - 1) for equal runs
    # and variances, not z: at 2 runs per method 3.3 times the z figure.
    df = max(2 * (runs - 1), 1)
    return se * (stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df))


def predict(cfg: ExperimentConfig, cores: float) -> dict:
    """Per stage: CPU-seconds, wall seconds, and what it buys; plus the power figures."""
    u = UNIT
    trials = trial_plan(cfg)
    n_models = 1 + checkpoints(trials)
    sweep_cpu, sweep_s = sweep_wall(cfg, trials, cores)
    actors = min(cfg.patching.num_actors, int(cores))
    patch_cpu = patching_cpu(cfg, n_models) + actors * u["actor_start"]
    circ_cpu = circuits_cpu(cfg, n_models)
    cal_cpu, cal_s = calibration_cost(cfg)
    ana_cpu = analysis_cpu(cfg, n_models)
    runs = {m: sum(t["method"] == m for t in trials) for m in ("sft", "rl")}
    means = in_means(cfg)
    prior = [p.name for p in cfg.probes if p.name != "chem"]
    steps = [{s for t in trials if t["method"] == m for s in t["evals"]} for m in ("sft", "rl")]
    last = max(steps[0] & steps[1], default=0)
    stages = {
        "ray start + base": (u["ray_start"], u["ray_start_s"]),
        "sweep": (sweep_cpu, sweep_s),
        "patching": (patch_cpu, patch_cpu / actors),
        "circuits": (circ_cpu, circ_cpu / actors),  # on the patching actor pool
        "calibration": (cal_cpu, cal_s),
        "analysis + report": (ana_cpu, ana_cpu),
    }
    plants = calibration_plants(cfg) if cfg.calibration.enabled else []
    n_items = {p.name: p.n_items for p in cfg.probes}
    floors = {p: floor_jaccard(p, n, cfg.circuits.top_k) for p, n in n_items.items()}
    return {
        "stages": stages,
        "trials": trials,
        "n_models": n_models,
        "runs": runs,
        "in_means": means,
        "floors": floors,
        "plants": plants,
        "gb": (n_models * u["checkpoint_gb"]) + u["storage_other_gb"],
        "last_step": last,
        "mde_v": mde(cfg, "circuit_vulnerability_abs", means, min(runs.values()), last),
        "mde_forgetting_ld": mde(cfg, "forgetting_ld", prior, min(runs.values()), last),
        "mde_forgetting": mde(cfg, "forgetting", prior, min(runs.values()), last),
    }


def buys(cfg: ExperimentConfig, p: dict) -> dict[str, str]:
    by_method = {
        m: {s for x in p["trials"] if x["method"] == m for s in x["evals"] if s} for m in ("sft", "rl")
    }
    common = sorted(by_method["sft"] & by_method["rl"])
    return {
        "ray start + base": "the local Ray and the base snapshot (converted once into ~/.cache/dcv)",
        "sweep": f"{p['runs']['sft']} SFT + {p['runs']['rl']} GRPO runs, {p['n_models'] - 1} evaluated "
        f"checkpoints; steps evaluated by both methods (matched levels): {common or 'none'}",
        "patching": f"attribution effects of {p['n_models']} models x "
        + ", ".join(f"{q.name} {q.n_items}" for q in cfg.probes)
        + " items",
        "circuits": f"top-{cfg.circuits.top_k} circuits, faithfulness, noise floor "
        f"(B={cfg.circuits.noise_floor_resamples})",
        "calibration": f"{len(p['plants'])} planted models (k {cfg.calibration.k} x alpha "
        f"{cfg.calibration.alphas} on {', '.join(cfg.calibration.probes or [])} + a precision copy): "
        "detection curves and controls",
        "analysis + report": f"hierarchical bootstrap, B={cfg.circuits.n_bootstrap}",
    }


def measured(run_dir: Path) -> dict:
    """A finished run's stage seconds, headline MDEs, noise floor and calibration, where present."""
    import polars as pl

    seconds = run_dir / "stage_seconds.json"  # written when the run finished
    out = {"seconds": json.loads(seconds.read_text()) if seconds.is_file() else {}}
    headline = run_dir / "analysis" / "headline.parquet"
    if headline.is_file():
        h = pl.read_parquet(headline).filter((pl.col("training") == "sft-rl") & pl.col("mde").is_not_null())
        for metric in ("circuit_vulnerability_abs", "forgetting_ld", "forgetting"):
            rows = h.filter(pl.col("metric") == metric)
            steps = rows.filter(pl.col("matched_by") == "step").sort("matched_at")
            if not steps.is_empty():
                last = steps.row(-1, named=True)
                out[f"mde {metric}"] = (
                    f"{last['mde']:.3f} at step {last['matched_at']:g} "
                    f"(all levels {rows['mde'].min():.3f}-{rows['mde'].max():.3f})"
                )
    floor = run_dir / "analysis" / "noise_floor.parquet"
    if floor.is_file():
        f = pl.read_parquet(floor)
        out["floor"] = {r["probe"]: r["jaccard"] for r in f.iter_rows(named=True) if r["kind"] == "bootstrap"}
    cal = run_dir / "calibration" / "calibration.parquet"
    if cal.is_file():
        c = pl.read_parquet(cal)
        out["min_detectable_k"] = {
            probe: rows["min_detectable_k"][0]
            for (probe,), rows in c.filter(pl.col("probe") != "").group_by("probe")
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as dcv run --set")
    parser.add_argument("--cores", type=float, default=2.0, help="cores the demo gets (default 2)")
    parser.add_argument("--run", type=Path, help="a finished run folder to compare the prediction with")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    p = predict(cfg, args.cores)
    what = buys(cfg, p)
    real = measured(args.run) if args.run else None
    print(f"{args.config}: {len(p['trials'])} trials, {p['n_models']} models, {args.cores:g} cores")
    print("CPU-s: unit costs measured beside the test suite; busy: that CPU on 2 cores; idle: busy x IDLE")
    print(f"{'stage':<18} {'CPU-s':>6} {'busy':>7} {'idle':>6} {'measured':>9}  what it buys")
    total = idle = 0.0
    keys = {"ray start + base": ("base",), "analysis + report": ("analysis", "report")}
    for stage, (cpu, wall) in p["stages"].items():
        quiet = wall * IDLE.get(stage, 1.0)
        total, idle = total + wall, idle + quiet
        got = ""
        if real:
            names = keys.get(stage, (stage,))
            got = f"{sum(real['seconds'].get(n, 0.0) for n in names):.0f}"
        print(f"{stage:<18} {cpu:6.0f} {wall:7.0f} {quiet:6.0f} {got:>9}  {what[stage]}")
    got = f"{sum(real['seconds'].values()):9.0f}" if real else ""
    print(
        f"{'total':<18} {'':6} {total:7.0f} {idle:6.0f} {got}  (measured: stage_seconds.json, no Ray start)"
    )
    print(f"storage: about {p['gb']:.1f} GB (every evaluated checkpoint's weights; step 0 is a hard link)")
    print(
        f"noise floor (5th-pct Jaccard, top-{cfg.circuits.top_k}) at the config's items: "
        + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} unmeasured" for k, v in p["floors"].items())
        + (
            f"; measured: {', '.join(f'{k} {v:.2f}' for k, v in real['floor'].items())}"
            if real and "floor" in real
            else ""
        )
    )
    print(
        f"probes expected in the circuit means (top-{cfg.circuits.top_k} F >= tau {cfg.circuits.tau}): "
        f"{', '.join(p['in_means']) or 'none'}"
    )
    print(
        f"minimum detectable SFT - RL at step {p['last_step']}: V (absolute) {p['mde_v']:.3f}, forgetting "
        f"(mean LD) {p['mde_forgetting_ld']:.3f}, (accuracy) {p['mde_forgetting']:.3f}; runs {p['runs']}"
    )
    if real:
        for key in ("mde circuit_vulnerability_abs", "mde forgetting_ld", "min_detectable_k"):
            if key in real:
                print(f"measured {key}: {real[key]}")
    print(f"predicted minutes beside today's test suite: {total / 60:.1f}")
    make_demo = (VENV_S + START_S + idle) / 60
    print(
        f"make demo on a fresh clone: make venv {VENV_S:.0f} s + dcv start {START_S:.0f} s + the stages: "
        f"{make_demo:.1f} min idle"
    )
    print(f"BENCH predicted_minutes {idle / 60:.1f}")
    print(f"BENCH predicted_make_demo_minutes {make_demo:.1f}")
    print(f"BENCH predicted_min_detectable_V {p['mde_v']:.3f}")


if __name__ == "__main__":
    main()
