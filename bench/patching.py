"""Exact head patching: dcv's fast path against the plain per-head loop and TransformerLens's utility.

    .venv/bin/python bench/patching.py [--model smollm2-135m-instruct] [--probe ioi] [--items 16]

Hardware: whatever runs it (the figures in the issue notes come from a 2-core CPU). Fixed seed; one
warm-up call of every method, then the timed calls. All methods patch the same heads on the same items
(the probe's items of its most common token length, since TransformerLens's utility takes one unpadded
batch). The plain loop and TransformerLens's utility run one full forward per head whatever its layer, so
their heads/s is measured on a spread subset of heads (``--baseline-heads``) and compared as a rate.

Also reported: the forward-FLOP floor of exact patching (for each head: the layers from its layer on x
the positions from the first clean/corrupted difference, plus a last-position unembed) as a fraction of
what the machine's fp32 matmul rate, measured in the same run, could do in the time dcv took; and the
speed and Spearman rank agreement with exact of attribution patching and integrated gradients.

The last lines are ``BENCH <name> <value>``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter

import torch

from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import item_effects
from dcv.config import ModelConfig, ProbeConfig, TargetTaskConfig
from dcv.models import load_model_and_tokenizer
from dcv.tasks.probes import build_probe


def matmul_gflops(seconds: float = 2.0, size: int = 1024) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


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

    rate = matmul_gflops()
    print(f"fp32 matmul rate: {rate:.1f} GFLOP/s")

    exact, t_exact = timed(
        lambda: item_effects(model, items, "exact", batch_size=len(items), head_chunk_size=32)
    )
    floor = exact_flop_floor(model, len(items), length, first_diff)
    print(
        f"dcv exact: {t_exact:.2f} s for {len(heads)} heads = {len(heads) / t_exact:.2f} heads/s; "
        f"FLOP floor {floor / 1e9:.1f} GFLOP = {floor / 1e9 / rate / t_exact:.2f} of the matmul rate"
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

    exact_rate = len(heads) / t_exact
    print(f"BENCH exact_vs_transformerlens {exact_rate / (len(subset) / t_tl):.2f}")
    print(f"BENCH exact_vs_loop {exact_rate / (len(subset) / t_loop):.2f}")
    print(f"BENCH exact_floor_fraction {floor / 1e9 / rate / t_exact:.3f}")
    print(f"BENCH attribution_speedup {t_exact / t_attr:.2f}")
    print(f"BENCH attribution_spearman {rho_attr:.3f}")
    print(f"BENCH ig_speedup {t_exact / t_ig:.2f}")
    print(f"BENCH ig_spearman {rho_ig:.3f}")


if __name__ == "__main__":
    main()
