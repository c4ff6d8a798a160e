"""The ``dcv`` command.

dcv validate CONFIG                      check a config; exit 0, or print every problem and exit 2
dcv eval CONFIG [--model M] [--set k=v]  score a model on the target task and every probe; log to MLflow
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from dcv.config import ConfigError, ExperimentConfig, load_config

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcv", description="Differential circuit vulnerability experiments")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="check a config file")
    validate.add_argument("config")

    evaluate = commands.add_parser(
        "eval", help="score a model: target accuracy, probes, KL to the config's base"
    )
    evaluate.add_argument("config")
    evaluate.add_argument(
        "--model", help="model to score (local folder, hub id, built-in name); default model.name"
    )
    evaluate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(getattr(args, "overrides", []))
    try:
        cfg = load_config(args.config, overrides)
        model_cfg = (
            cfg.model
            if not getattr(args, "model", None)
            else load_config(args.config, [*overrides, f"model.name={args.model}"]).model
        )
    except ConfigError as exc:
        print(f"dcv {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "validate":
        print(
            f"{args.config}: ok (model {cfg.model.name}, target {cfg.target_task.name}, "
            f"probes {', '.join(p.name for p in cfg.probes)})"
        )
        return 0
    try:
        run_eval(cfg, model_cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dcv {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def run_eval(cfg: ExperimentConfig, model_cfg) -> dict[str, float]:
    """Evaluate ``model_cfg``'s model with ``cfg``'s tasks; KL is to ``cfg.model`` when they differ."""
    from transformers.utils import logging as hf_logging

    from dcv import tracking
    from dcv.evaluation import evaluate_model, sample_kl_reference
    from dcv.models import load_model, load_tokenizer
    from dcv.tasks import load_target_splits
    from dcv.tasks.probes import build_probes

    hf_logging.disable_progress_bar()
    # Everything that can fail on bad input is built before the model is loaded.
    _, test_items = load_target_splits(cfg.target_task)
    tracking_uri = tracking.resolve_tracking_uri(cfg)
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_cfg)
    probes = build_probes(cfg.probes, tokenizer)
    model = load_model(model_cfg, tokenizer)
    base_model = kl_reference = None
    if model_cfg.name != cfg.model.name:
        base_model = load_model(cfg.model, tokenizer)
        kl_reference = sample_kl_reference(base_model, tokenizer, test_items, cfg.evaluation)
    metrics = evaluate_model(model, tokenizer, cfg.evaluation, test_items, probes, base_model, kl_reference)
    seconds = time.perf_counter() - start

    print(format_scores(model_cfg.name, metrics, probes))
    print(
        f"evaluated in {seconds:.1f} s; probe items kept / generated: "
        + ", ".join(f"{p.name} {len(p)}/{p.n_candidates}" for p in probes)
    )
    tags = {"dcv.stage": "eval", "dcv.model": model_cfg.name}
    with tracking.child_run(cfg, f"eval:{model_cfg.name}", tags=tags) as run:
        run.log_params({"eval.model": model_cfg.name})
        run.log_metrics({**metrics, "eval/seconds": seconds})
    print(f"logged to MLflow at {tracking_uri} (experiment {cfg.tracking.experiment_name!r})")
    return metrics


def format_scores(model_name: str, metrics: dict[str, float], probes) -> str:
    rows = [("target", int(metrics["target/n_items"]), metrics["target/accuracy"], None)]
    rows += [
        (f"probe:{p.name}", len(p), metrics[f"probe/{p.name}/accuracy"], metrics[f"probe/{p.name}/mean_ld"])
        for p in probes
    ]
    lines = [f"model {model_name}", f"{'task':<20}{'items':>7}{'accuracy':>10}{'mean LD':>10}"]
    for task, n, accuracy, ld in rows:
        lines.append(f"{task:<20}{n:>7}{accuracy:>10.3f}{'' if ld is None else f'{ld:.3f}':>10}")
    lines.append(f"{'format rate':<20}{'':>7}{metrics['target/format_rate']:>10.3f}")
    if "kl_to_base" in metrics:
        lines.append(f"{'KL(base || model)':<20}{'':>7}{metrics['kl_to_base']:>10.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
