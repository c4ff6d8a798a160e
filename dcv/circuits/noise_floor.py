"""The noise floor of circuit discovery: how well the base circuit agrees with itself.

A circuit found from a finite sample of probe items (and, for learned masks, one optimiser seed) is itself
noisy, so a fine-tuned model's preservation below 1 means something only where it is below what the base
model scores against itself. Per probe and discovery method, the base model's circuit is found twice:

- ``halves``: from two disjoint halves of the probe items (a seeded split). For patching methods the half
  effects come from the stored per-item parts (effect = mean(item_delta) / mean(item_denominator) over the
  half), so nothing is patched again; each half's circuit is selected with the usual rule, its
  faithfulness measured on that half's items. For masks, the masks are learned again on each half.
- ``seed`` (masks only): the masks learned again on all items with the next seed.

Each pair is scored like a checkpoint against the base: Jaccard of the two circuits, preservation (mean of
|A ∩ B| / |A| and |A ∩ B| / |B|) and the Spearman of all heads' effects.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial

import numpy as np
import polars as pl

from dcv.circuits.pipeline import MASK
from dcv.circuits.vulnerability import effect_spearman
from dcv.config import ExperimentConfig

NOISE_FLOOR_SCHEMA = {
    "probe": pl.String,
    "method": pl.String,
    "kind": pl.String,  # "halves" | "seed"
    "n_items": pl.Int32,  # items behind each of the two circuits
    "size_a": pl.Int32,
    "size_b": pl.Int32,
    "jaccard": pl.Float64,
    "preservation": pl.Float64,
    "effect_spearman": pl.Float64,
}
NOISE_FLOOR_FILE = "noise_floor.parquet"

Head = tuple[int, int]


def split_halves(n_items: int, seed: int) -> tuple[list[int], list[int]]:
    """Two disjoint halves of ``range(n_items)`` (sizes differ by at most one), in a seeded order."""
    if n_items < 2:
        raise ValueError(f"noise floor: {n_items} probe item(s); two halves need at least 2")
    order = list(range(n_items))
    random.Random(f"noise-floor:{seed}").shuffle(order)
    half = n_items // 2
    return sorted(order[:half]), sorted(order[half:])


def subset_effects(effects: pl.DataFrame, items: Sequence[int]) -> pl.DataFrame:
    """The effect table over a subset of probe items, from its per-item parts (EFFECTS_SCHEMA rows)."""
    index = list(items)
    denominator = float(np.mean(np.asarray(effects["item_denominator"][0], dtype=np.float64)[index]))
    deltas = np.array(effects["item_delta"].to_list(), dtype=np.float64)[:, index]
    return effects.with_columns(pl.Series("effect", deltas.mean(axis=1) / denominator))


def agreement(a: Sequence[Head], b: Sequence[Head]) -> tuple[float | None, float | None]:
    """(Jaccard, preservation) of two circuits; preservation is symmetrised (mean of both directions).
    Two empty circuits (no behaviour found on either half) agree on nothing: (None, None)."""
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return None, None
    shared = len(sa & sb)
    directions = [shared / len(s) for s in (sa, sb) if s]
    return shared / len(sa | sb), float(np.mean(directions))


def _learn_masks(
    model, items: list, cfg: ExperimentConfig, probe: str, heads: list[Head], subset: list[int], seed: int
) -> pl.DataFrame:
    from dcv.circuits.mask import mask_effects

    mask_cfg = cfg.circuits.mask.model_copy(update={"seed": seed})
    chosen = [items[i] for i in subset]
    return mask_effects(model, chosen, mask_cfg, "base", probe, heads, cfg.patching.batch_size)


def noise_floor(
    model, probe_items: dict[str, list], effects: pl.DataFrame, cfg: ExperimentConfig
) -> pl.DataFrame:
    """NOISE_FLOOR_SCHEMA rows for the base model: ``effects`` are its rows with per-item parts."""
    from dcv.circuits.circuit import select_circuit
    from dcv.circuits.mask import mask_circuit

    seed, batch = cfg.circuits.mask.seed, cfg.patching.batch_size
    rows = []
    for (probe, method), table in sorted(effects.group_by("probe", "method"), key=lambda g: g[0]):
        items = probe_items[probe]
        halves = split_halves(len(items), seed)
        pairs: list[tuple[str, int, pl.DataFrame, pl.DataFrame]] = []
        if method == MASK:
            heads = list(zip(table["layer"], table["head"], strict=True))
            learn = partial(_learn_masks, model, items, cfg, probe, heads)
            pairs.append(("halves", len(halves[0]), learn(halves[0], seed), learn(halves[1], seed)))
            pairs.append(("seed", len(items), table, learn(list(range(len(items))), seed + 1)))
        else:
            pairs.append(("halves", len(halves[0]), *(subset_effects(table, h) for h in halves)))
        for kind, n_items, first, second in pairs:
            if method == MASK:
                circuits = [mask_circuit(first), mask_circuit(second)]
            else:
                circuits = [
                    list(select_circuit(model, [items[i] for i in half], frame, cfg.circuits, batch).heads)
                    for half, frame in zip(halves, (first, second), strict=True)
                ]
            jaccard, kept = agreement(*circuits)
            rows.append(
                {
                    "probe": probe,
                    "method": method,
                    "kind": kind,
                    "n_items": n_items,
                    "size_a": len(circuits[0]),
                    "size_b": len(circuits[1]),
                    "jaccard": jaccard,
                    "preservation": kept,
                    "effect_spearman": effect_spearman(first, second),
                }
            )
    return pl.DataFrame(rows, schema=NOISE_FLOOR_SCHEMA)
