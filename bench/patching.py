"""Exact head patching: dcv's fast path against the plain per-head loop and TransformerLens's utility.

    .venv/bin/python bench/patching.py [--model smollm2-135m-instruct] [--probe ioi] [--items 16]

Hardware: whatever runs it (the figures quoted in docs/measurements.md come from a 2-core CPU). Fixed seed;
one warm-up call of every method, then the timed calls. All methods patch the same heads on the same items
(the probe's items of its most common token length, since TransformerLens's utility takes one unpadded
batch). The plain loop and TransformerLens's utility run one full forward per head whatever its layer, so
their heads/s is measured on a spread subset of heads (``--baseline-heads``) and compared as a rate.

Also reported: the forward-FLOP floor of exact patching (for each head: the layers from its layer on x
the positions from the first clean/corrupted difference, plus a last-position unembed) as a fraction of
what the machine's fp32 matmul rate could do in the time dcv took; and the speed and Spearman rank
agreement with exact of attribution patching and integrated gradients.

The matmul rate is measured in the same process at the same torch thread count, on exact patching's own
matrix shapes (its projections, MLP and unembed at the rows one head-chunk forward multiplies, weighted
by how often it runs each), before and after the timed runs; each shape's time is the best of several
repeats, and the rate is the better of the two measurements. A rate read while another process holds a
core comes out low; since no code beats the matmul rate, a floor fraction above 1 means the measurement
was wrong, and the script then prints the two rates instead of a fraction.

The last lines are ``BENCH <name> <value>``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter

import torch
from matmul_rate import matmul_gflops

from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import item_effects
from dcv.config import ModelConfig, ProbeConfig, TargetTaskConfig
from dcv.models import load_model_and_tokenizer
from dcv.tasks.probes import build_probe


def exact_shapes(model, n_items: int, n_pos: int, first_diff: int, head_chunk: int):
    """Exact patching's matmuls as (rows, in, out) -> count: one forward patches up to ``head_chunk``
    heads of one layer for every item, over the positions from the first difference, through the
    remaining layers ((n_layers + 1) / 2 on average), then unembeds the last position."""
    c, shape = model.config, model_shape(model)
    copies = min(head_chunk, shape.n_heads) * n_items
    rows = copies * (n_pos - first_diff)
    d, inner = c.hidden_size, c.intermediate_size
    q, kv = shape.n_heads * shape.d_head, shape.n_kv_heads * shape.d_head
    per_forward = (shape.n_layers + 1) / 2
    shapes: dict[tuple[int, int, int], float] = {}
    for k, n, count in [(d, q, 1), (d, kv, 2), (q, d, 1), (d, inner, 2), (inner, d, 1)]:
        shapes[(rows, k, n)] = shapes.get((rows, k, n), 0) + count * per_forward
    shapes[(copies, d, c.vocab_size)] = 1
    return shapes


def exact_flop_floor(model, n_items: int, n_pos: int, first_diff: int) -> float:
    """Forward FLOPs exact patching cannot avoid, summed over every head, for one batch of items."""
    c = model.config
    shape = model_shape(model)
    d, inner = c.hidden_size, c.intermediate_size
    attn_params = d * shape.n_heads * shape.d_head * 2 + d * shape.n_kv_heads * shape.d_head * 2
    per_token_layer = 2 * (attn_params + 3 * d * inner) + 4 * shape.n_heads * shape.d_head * n_pos
    positions = n_pos - first_diff
    total = 0.0
    for layer, _ in shape.heads:
        total += (shape.n_layers - layer) * positions * per_token_layer + 2 * d * c.vocab_size
    return total * n_items


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def timed(fn, repeats: int = 1):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--probe", default="ioi")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--baseline-heads", type=int, default=18)
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=args.model))
    model.requires_grad_(False)
    probe_cfg = ProbeConfig(name=args.probe, n_items=args.items * 4, seed=0)
    probe = build_probe(probe_cfg, tokenizer, TargetTaskConfig())
    length = Counter(len(it.clean_ids) for it in probe.items).most_common(1)[0][0]
    items = [it for it in probe.items if len(it.clean_ids) == length][: args.items]
    clean = torch.tensor([it.clean_ids for it in items])
    corrupt = torch.tensor([it.corrupt_ids for it in items])
    rows = torch.arange(len(items))
    correct = torch.tensor([it.correct_id for it in items])
    wrong = torch.tensor([it.wrong_id for it in items])
    first_diff = int((clean != corrupt).any(0).nonzero()[0])
    heads = model_shape(model).heads
    subset = heads[:: max(1, len(heads) // args.baseline_heads)][: args.baseline_heads]
    print(
        f"{args.model}: {len(heads)} heads; {len(items)} {args.probe} items of {length} tokens, "
        f"first difference at position {first_diff}; torch threads {torch.get_num_threads()}"
    )

    head_chunk = 32
    shapes = exact_shapes(model, len(items), length, first_diff, head_chunk)
    rate_before = matmul_gflops(shapes)
    print(f"fp32 matmul rate on exact patching's shapes, before the timed runs: {rate_before:.1f} GFLOP/s")

    exact, t_exact = timed(
        lambda: item_effects(model, items, "exact", batch_size=len(items), head_chunk_size=head_chunk)
    )
    floor = exact_flop_floor(model, len(items), length, first_diff)
    exact_gflops = floor / 1e9 / t_exact
    print(
        f"dcv exact: {t_exact:.2f} s for {len(heads)} heads = {len(heads) / t_exact:.2f} heads/s; "
        f"FLOP floor {floor / 1e9:.1f} GFLOP = {exact_gflops:.1f} GFLOP/s"
    )

    bridge = TransformerBridge.boot_transformers(
        args.model, hf_model=copy.deepcopy(model), tokenizer=tokenizer
    )
    with torch.no_grad():
        _, corrupt_cache = bridge.run_with_cache(corrupt, names_filter=lambda n: n.endswith("attn.hook_z"))

    def mean_ld(logits):
        return (logits[rows, -1, correct] - logits[rows, -1, wrong]).mean()

    def plain_loop():
        out = []
        with torch.no_grad():
            for layer, head in subset:
                name = f"blocks.{layer}.attn.hook_z"

                def patch(z, hook, name=name, head=head):
                    z = z.clone()
                    z[:, :, head] = corrupt_cache[name][:, :, head]
                    return z

                out.append(mean_ld(bridge.run_with_hooks(clean, fwd_hooks=[(name, patch)])))
        return torch.stack(out)

    loop_ld, t_loop = timed(plain_loop)
    with torch.no_grad():
        clean_ld = mean_ld(bridge(clean))
    index = [heads.index(h) for h in subset]
    agreement = float((clean_ld - loop_ld - exact.delta[index].mean(1)).abs().max())
    print(
        f"plain loop: {t_loop:.2f} s for {len(subset)} heads = {len(subset) / t_loop:.2f} heads/s; "
        f"max |difference| from dcv exact {agreement:.2e}"
    )

    import pandas as pd

    index_df = pd.DataFrame(subset, columns=["layer", "head_index"])

    def tl_utility():
        with torch.no_grad():
            return patching.generic_activation_patch(
                bridge,
                clean,
                corrupt_cache,
                mean_ld,
                patch_setter=patching.layer_head_vector_patch_setter,
                activation_name="z",
                index_df=index_df,
            )

    tl_ld, t_tl = timed(tl_utility)
    tl_agreement = float((clean_ld - tl_ld.flatten() - exact.delta[index].mean(1)).abs().max())
    print(
        f"TransformerLens generic_activation_patch: {t_tl:.2f} s for {len(subset)} heads = "
        f"{len(subset) / t_tl:.2f} heads/s; max |difference| from dcv exact {tl_agreement:.2e}"
    )

    attribution, t_attr = timed(lambda: item_effects(model, items, "attribution", batch_size=len(items)))
    ig, t_ig = timed(lambda: item_effects(model, items, "ig", batch_size=len(items), ig_steps=args.ig_steps))
    rho_attr = spearman(exact.effects(), attribution.effects())
    rho_ig = spearman(exact.effects(), ig.effects())
    print(f"attribution: {t_attr:.2f} s, Spearman with exact {rho_attr:.3f}")
    print(f"integrated gradients ({args.ig_steps} steps): {t_ig:.2f} s, Spearman with exact {rho_ig:.3f}")

    rate_after = matmul_gflops(shapes)
    rate = max(rate_before, rate_after)
    print(
        f"fp32 matmul rate after the timed runs: {rate_after:.1f} GFLOP/s; the better, {rate:.1f}, is the "
        f"limit ({torch.get_num_threads()} threads)"
    )
    fraction = exact_gflops / rate
    if fraction > 1:
        print(
            f"exact patching ran at {exact_gflops:.1f} GFLOP/s, above the measured matmul rate {rate:.1f}: "
            "the rate measurement is wrong (was the machine busy?), so no floor fraction is printed"
        )

    exact_rate = len(heads) / t_exact
    print(f"BENCH exact_vs_transformerlens {exact_rate / (len(subset) / t_tl):.2f}")
    print(f"BENCH exact_vs_loop {exact_rate / (len(subset) / t_loop):.2f}")
    print(f"BENCH exact_gflops {exact_gflops:.1f}")
    print(f"BENCH matmul_gflops {rate:.1f}")
    if fraction <= 1:
        print(f"BENCH exact_floor_fraction {fraction:.3f}")
    print(f"BENCH attribution_speedup {t_exact / t_attr:.2f}")
    print(f"BENCH attribution_spearman {rho_attr:.3f}")
    print(f"BENCH ig_speedup {t_exact / t_ig:.2f}")
    print(f"BENCH ig_spearman {rho_ig:.3f}")


if __name__ == "__main__":
    main()
