"""Patching pipeline scaling: items/s with 2 actors vs 1, and the pipeline's cost vs a plain loop.

    .venv/bin/python bench/pipeline.py                       # SmolLM2-135M, attribution, 12 items
    .venv/bin/python bench/pipeline.py --model tiny --method exact

Hardware it was written on: a 2-core x86 CPU VM, 24 GiB, no GPU, shared with other jobs (so timings are
noisy; run it on an idle machine for numbers you rely on).

Workload: the base model and one "checkpoint" (the same weights, the converted HF folder listed in a
results table), ``--probes`` (default ioi, ``--probe-items`` items each, fixed seeds), one patching method
(default attribution: about 5-10 s per item on one loaded core), ``--chunk`` heads per item: for SmolLM2
(270 heads) by default 2 models x 1 probe x 6 chunks = 12 items.

Fairness: every worker computes on one torch thread: each actor gets num_cpus_per_actor=1 (dcv sets one
intra-op thread per CPU Ray gives the actor) and the plain loop calls torch.set_num_threads(1). So 1 actor
vs the plain loop compares the same per-core work with and without Ray Data, and 2 actors on 2 cores vs 1
actor is a per-core scaling figure (ideal 2.0). Letting the plain loop use both cores would instead
compare torch's intra-op threading against process parallelism, a different question.

Stages: warm-up (start Ray, convert/load the model once, one plain item), then timed, each into a fresh
storage folder so nothing is skipped: the plain loop over ``head_effects``; the pipeline with 1 actor; with
2 actors. A pipeline's time is ``run_pipeline``'s wall time, actor start-up (imports, model load) included.

    BENCH two_actors_vs_one   items/s with 2 actors / items/s with 1 actor (goal >= 1.6)
    BENCH pipeline_vs_plain   pipeline time with 1 actor / plain loop time (1.0 = no overhead)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcv.circuits.patching import head_effects  # noqa: E402
from dcv.circuits.pipeline import build_work_items, item_heads, run_pipeline  # noqa: E402
from dcv.config import RANKING_METHODS, ModelConfig, parse_config  # noqa: E402
from dcv.models import load_model, load_tokenizer, resolve_model_source, save_model  # noqa: E402
from dcv.results import build_results_table, write_results  # noqa: E402
from dcv.storage import items_dir  # noqa: E402
from dcv.tasks.probes import build_probe  # noqa: E402

SEED = 0


def bench_config(storage: Path, args: argparse.Namespace, num_actors: int):
    raw = {
        "name": "bench-pipeline",
        "model": {"name": args.model},
        "probes": [{"name": p, "n_items": args.probe_items, "seed": SEED} for p in args.probes.split(",")],
        "patching": {
            "methods": [args.method],
            "batch_size": args.probe_items,
            "head_chunk_size": args.chunk,
            "num_actors": num_actors,
            "num_cpus_per_actor": 1,
        },
        "storage": {"root": str(storage)},
    }
    cfg = parse_config(raw)
    checkpoint = resolve_model_source(cfg.model) if args.model != "tiny" else None
    if checkpoint is None:  # the tiny model has no folder: save one
        tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, tokenizer)
        checkpoint = str(save_model(model, tokenizer, storage.parent / "tiny-ckpt"))
    row = {
        "trial": "copy-lr0-seed0",
        "method": "sft",
        "learning_rate": 0.0,
        "seed": SEED,
        "init": "base",
        "step": 0,
        "checkpoint": checkpoint,
    }
    write_results(build_results_table([row]), storage)
    return cfg


def plain_loop(cfg, limit: int | None = None) -> tuple[int, float]:
    """The same items in this process, one thread: load each model once, head_effects per item."""
    from dcv.storage import local_storage_root

    work = build_work_items(cfg, pl.read_parquet(local_storage_root(cfg) / "results" / "checkpoints.parquet"))
    work = work.head(limit) if limit else work
    tokenizer = load_tokenizer(cfg.model)
    probes = {p.name: build_probe(p, tokenizer, cfg.target_task).items for p in cfg.probes}
    start = time.perf_counter()
    loaded, model = None, None
    for item in work.iter_rows(named=True):
        if loaded != item["checkpoint"]:
            name = cfg.model.name if item["model"] == "base" else item["checkpoint"]
            model = load_model(ModelConfig(name=name, dtype=cfg.model.dtype), tokenizer)
            loaded = item["checkpoint"]
        head_effects(
            model,
            probes[item["probe"]],
            item["model"],
            item["probe"],
            item["method"],
            heads=item_heads(item),
            batch_size=cfg.patching.batch_size,
            head_chunk_size=cfg.patching.head_chunk_size,
        )
    return work.height, time.perf_counter() - start


def timed_pipeline(cfg) -> tuple[int, float, float]:
    """(items, wall seconds, steady-state items/s from the first to the last finished item file)."""
    start = time.perf_counter()
    run = run_pipeline(cfg, progress=lambda line: None)
    seconds = time.perf_counter() - start
    from dcv.storage import local_storage_root

    stamps = sorted(p.stat().st_mtime for p in items_dir(local_storage_root(cfg)).glob("*.parquet"))
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    assert run.computed == run.total, (run.computed, run.total)
    return run.computed, seconds, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--method", default="attribution", choices=RANKING_METHODS)
    parser.add_argument("--probe-items", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=45)
    parser.add_argument("--probes", default="ioi", help="comma-separated probe names")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="dcv-bench-pipeline-"))
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    print("warm-up ...", flush=True)
    plain_loop(bench_config(root / "warmup", args, 1), limit=1)

    n_plain, t_plain = plain_loop(bench_config(root / "plain", args, 1))
    print(f"plain loop (1 thread)    {n_plain} items in {t_plain:7.1f} s = {n_plain / t_plain:.3f} items/s")
    results = {}
    for actors in (1, 2):
        n, seconds, steady = timed_pipeline(bench_config(root / f"actors{actors}", args, actors))
        results[actors] = n / seconds
        print(
            f"pipeline, {actors} actor(s)      {n} items in {seconds:7.1f} s = {n / seconds:.3f} items/s "
            f"(steady state, first to last item: {steady:.3f} items/s)"
        )
    ray.shutdown()
    print(f"BENCH two_actors_vs_one {results[2] / results[1]:.2f}")
    print(f"BENCH pipeline_vs_plain {(n_plain / t_plain) / results[1]:.2f}")


if __name__ == "__main__":
    main()
