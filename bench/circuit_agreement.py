"""Learned-mask circuits against exact-patching circuits, and each method's noise floor.

    .venv/bin/python bench/circuit_agreement.py [--items 32] [--steps 100] [--threads 2]

Hardware: whatever runs it (the figures quoted in docs/measurements.md come from a 2-core CPU). The model
is the one of configs/demo.yaml (base SmolLM2-135M-Instruct), the probe IOI, circuit settings from that config
(``circuits``, ``circuits.mask``) except where a flag overrides them. Fixed seeds throughout.

- mask circuit: {h : m_h >= 0.5} after `dcv.circuits.mask.mask_effects`; its size and faithfulness.
- exact circuit: `select_circuit` on exact head effects (the config's selection rule).
- agreement: Jaccard |A n B| / |A u B| of the two circuits.
- noise floor: each method run on two disjoint random halves of the items (and the mask method also with
  another seed on all items); the Jaccard of the two circuits is the overlap to expect from resampling
  alone, so agreement between methods can be read against it.

The last lines are ``BENCH <name> <value>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dcv.circuits.circuit import faithfulness, select_circuit
from dcv.circuits.mask import mask_circuit, mask_effects
from dcv.circuits.patching import head_effects
from dcv.config import load_config
from dcv.models import load_model_and_tokenizer
from dcv.tables import Head
from dcv.tasks.probes import build_probe

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def jaccard(a: set[Head], b: set[Head]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--probe", default="ioi")
    parser.add_argument("--items", type=int, default=32)
    # 100 steps instead of the config's 200 keeps the four mask runs affordable on a loaded 2-core CPU;
    # at lr 0.1 a logit can still travel 10 from its start of 3, and masks end binary (see the output).
    parser.add_argument("--steps", type=int, default=100, help="mask steps (0: the config's)")
    parser.add_argument("--l1", type=float, default=None, help="mask l1_penalty (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. circuits.selection=faithfulness (the demo config picks top_k)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config, args.overrides)
    overrides = {k: v for k, v in (("steps", args.steps), ("l1_penalty", args.l1)) if v}
    mask_cfg = cfg.circuits.mask.model_validate({**cfg.circuits.mask.model_dump(), **overrides})
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    probe_cfg = cfg.probe(args.probe).model_copy(update={"n_items": args.items})
    items = list(build_probe(probe_cfg, tokenizer, cfg.target_task).items)
    split = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    halves = [[items[i] for i in split[: len(items) // 2]], [items[i] for i in split[len(items) // 2 :]]]
    c = cfg.circuits
    print(
        f"{cfg.model.name} on {args.probe}: {len(items)} items, halves of {len(halves[0])} and "
        f"{len(halves[1])}; "
        f"torch threads {torch.get_num_threads()}; batch size {args.batch_size}"
    )
    print(f"mask settings: {mask_cfg.model_dump()}")
    print(f"exact circuit: selection {c.selection}, tau {c.tau}, k_max {c.k_max}, top_k {c.top_k}")

    def mask_run(part, seed: int) -> tuple[set[Head], float]:
        start = time.perf_counter()
        run_cfg = mask_cfg.model_copy(update={"seed": seed})
        table = mask_effects(model, part, run_cfg, cfg.model.name, args.probe, batch_size=args.batch_size)
        undecided = int(table["effect"].is_between(0.05, 0.95).sum())
        print(f"  mask run ({len(part)} items, seed {seed}): {undecided} masks left between 0.05 and 0.95")
        return set(mask_circuit(table)), time.perf_counter() - start

    def exact_run(part):
        start = time.perf_counter()
        effects = head_effects(model, part, cfg.model.name, args.probe, "exact", batch_size=args.batch_size)
        circuit = select_circuit(model, part, effects, c, batch_size=args.batch_size)
        return circuit, time.perf_counter() - start

    mask_all, t_mask = mask_run(items, mask_cfg.seed)
    f_mask = faithfulness(model, items, [mask_all], batch_size=args.batch_size)[0]
    print(f"mask circuit: {len(mask_all)} heads, faithfulness {f_mask:.3f} ({t_mask:.1f} s)")
    exact_all, t_exact = exact_run(items)
    print(
        f"exact circuit: {len(exact_all)} heads, faithfulness {exact_all.faithfulness:.3f}, "
        f"reached tau {exact_all.reached_tau} ({t_exact:.1f} s)"
    )
    agreement = jaccard(mask_all, set(exact_all.heads))
    print(f"mask vs exact: {len(mask_all & set(exact_all.heads))} shared heads, Jaccard {agreement:.3f}")

    mask_halves = [mask_run(part, mask_cfg.seed)[0] for part in halves]
    mask_floor = jaccard(*mask_halves)
    mask_seed, _ = mask_run(items, mask_cfg.seed + 1)
    seed_floor = jaccard(mask_all, mask_seed)
    exact_halves = [set(exact_run(part)[0].heads) for part in halves]
    exact_floor = jaccard(*exact_halves)
    print(f"mask noise floor (halves): sizes {[len(h) for h in mask_halves]}, Jaccard {mask_floor:.3f}")
    print(
        f"mask noise floor (seed {mask_cfg.seed} vs {mask_cfg.seed + 1}, all items): Jaccard {seed_floor:.3f}"
    )
    print(f"exact noise floor (halves): sizes {[len(h) for h in exact_halves]}, Jaccard {exact_floor:.3f}")

    print(f"BENCH mask_faithfulness {f_mask:.3f}")
    print(f"BENCH mask_vs_exact_jaccard {agreement:.3f}")
    print(f"BENCH noise_floor_jaccard {mask_floor:.3f}")


if __name__ == "__main__":
    main()
