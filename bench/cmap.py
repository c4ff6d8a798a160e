"""Cross-model activation patching (cmap) on the real demo model, against a planted change.

    .venv/bin/python bench/cmap.py [--model smollm2-135m-instruct] [--probe ioi] [--items 16] [--layer 15]

The "checkpoint" is the base with one head's o_proj input columns zeroed (calibration's ablation): the
two models differ in nothing else. Closed form (tests/circuits/test_cmap.py checks it on the tiny model):
the planted head's ckpt_into_base delta is LD_base - LD_ckpt on every item, every head of its layer or
an earlier one has cmap 0, and only later layers' heads can move. Here, on SmolLM2, that is checked on
the planted head, the other heads of its layer, one earlier layer and one later layer, and the planted
head's rank by |cmap| among them is printed.

Cost: cmap patches every head twice (both directions) from position 0, so per head it costs about twice
exact patching's forward from the head's layer on all positions; exact patching starts at the first
clean/corrupted difference. The ratio of the two, measured on the same heads and items in this run, is
``cmap_over_exact_per_head``; it scales the exact patching stage's measured seconds to a cmap stage's.
Hardware: whatever runs it. The last lines are ``BENCH <name> <value>``.
"""

from __future__ import annotations

import argparse
import copy
import time

from dcv.calibration import plant_damage
from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import cmap_item_effects, item_effects
from dcv.config import ModelConfig, ProbeConfig, TargetTaskConfig
from dcv.evaluation import probe_logit_diffs
from dcv.models import load_model_and_tokenizer
from dcv.tasks.probes import build_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--probe", default="ioi")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--layer", type=int, default=15, help="the planted head's layer")
    parser.add_argument("--head", type=int, default=0)
    args = parser.parse_args()

    base, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model))
    base.eval()
    items = build_probe(
        ProbeConfig(name=args.probe, n_items=args.items, seed=0), tokenizer, TargetTaskConfig()
    ).items
    shape = model_shape(base)
    planted = plant_damage(copy.deepcopy(base), [(args.layer, args.head)], 0.0)
    earlier, later = max(0, args.layer - 5), min(shape.n_layers - 1, args.layer + 5)
    heads = sorted({(la, h) for la in (earlier, args.layer, later) for h in range(shape.n_heads)})
    batch_size = len(items)

    start = time.perf_counter()
    effects = cmap_item_effects(base, planted, items, heads=heads, batch_size=batch_size)
    t_cmap = time.perf_counter() - start
    start = time.perf_counter()
    item_effects(base, items, "exact", heads=heads, batch_size=batch_size)
    t_exact = time.perf_counter() - start

    ld = {
        name: probe_logit_diffs(model, items, batch_size)
        for name, model in (("base", base), ("ckpt", planted))
    }
    row = heads.index((args.layer, args.head))
    into_base = effects["ckpt_into_base"]
    closed_form_error = (into_base.delta[row] - (ld["base"] - ld["ckpt"])).abs().max().item()
    cmap = into_base.effects()
    same_or_earlier = [i for i, (la, h) in enumerate(heads) if la <= args.layer and i != row]
    in_later = [i for i, (la, _) in enumerate(heads) if la == later]
    rank = int((cmap.abs() > cmap[row].abs()).sum().item()) + 1
    print(
        f"{args.model}: {shape.n_layers} x {shape.n_heads} heads; {len(items)} {args.probe} items; planted "
        f"head ({args.layer}, {args.head}) zeroed; patched {len(heads)} heads of layers "
        f"{earlier}, {args.layer}, {later}"
    )
    print(
        f"planted head: cmap {cmap[row]:.4f} "
        f"(mean LD base {ld['base'].mean():.3f}, ckpt {ld['ckpt'].mean():.3f})"
    )
    print(f"  closed form LD_base - LD_ckpt, max error over items: {closed_form_error:.2e}")
    print(
        f"  max |cmap| of the other heads of layers <= {args.layer}: {cmap[same_or_earlier].abs().max():.2e}"
    )
    print(f"  max |cmap| in layer {later}: {cmap[in_later].abs().max():.4f}")
    print(f"  rank by |cmap| among the {len(heads)} heads: {rank}")
    print(f"time: cmap {t_cmap:.2f} s (both directions), exact {t_exact:.2f} s, same heads and items")
    print(f"BENCH cmap_closed_form_error {closed_form_error:.3g}")
    print(f"BENCH cmap_planted_head_rank {rank}")
    print(f"BENCH cmap_seconds_per_head {t_cmap / len(heads):.4f}")
    print(f"BENCH cmap_over_exact_per_head {t_cmap / t_exact:.3f}")


if __name__ == "__main__":
    main()
