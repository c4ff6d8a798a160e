"""The noise floor of circuit discovery: how well the base circuit agrees with itself (docs/method.md
"Noise floor").

A circuit found from a finite sample of probe items (and, for learned masks, one optimiser seed) is itself
noisy, so a checkpoint's preservation below 1 means something only where it is below what the base model
scores against itself. The floor compares like with like: the base circuit C (found on all n items) against
the base model's circuit found again on B bootstrap resamples of the same n items, with the same
one-directional P = |C ∩ C_b| / |C| and the same J as every checkpoint. The floor is the 5th percentile
of P and of J (a checkpoint is distinguishable from base only below it), and the 95th percentile of the
circuit vulnerability V of the resampled base against the base (item noise alone gives V up to there).

- Patching methods (``bootstrap_floor``): pure numpy on the stored per-item parts. C_b is the top |C|
  heads by |effect| on the resample: for top-k selection exactly the selection rule; for faithfulness
  selection the rule's size is kept and only the ranking is resampled (re-scoring faithfulness needs
  B x k_max forwards of the model).
- Learned masks (``mask_noise_floor``): masks learned again on ``circuits.mask_noise_floor_resamples``
  bootstrap resamples (kind ``bootstrap``) and once on all items with the next seed (kind ``seed``); with
  so few refits the floor is their minimum.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from dcv.circuits.methods import MASK_METHODS
from dcv.circuits.vulnerability import effect_spearman, spearman
from dcv.config import ExperimentConfig
from dcv.tables import Head

NOISE_FLOOR_SCHEMA = {
    "probe": pl.String,
    "method": pl.String,
    "kind": pl.String,  # "bootstrap" | "seed" (masks)
    "n_items": pl.Int32,  # items behind every circuit (each resample has as many as the base)
    "n_resamples": pl.Int32,
    "size": pl.Int32,  # the base circuit's size
    "preservation": pl.Float64,  # floor: 5th percentile of |C ∩ C_b| / |C| (minimum for masks)
    "jaccard": pl.Float64,  # floor: 5th percentile of J(C, C_b)
    "circuit_vulnerability": pl.Float64,  # 95th percentile of V(resample) against base
    "effect_spearman": pl.Float64,  # median Spearman of all heads' effects, base against resample
}
FLOOR_QUANTILE = 0.05


def bootstrap_floor(
    delta: np.ndarray, denominator: np.ndarray, circuit: np.ndarray, n_resamples: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per resample of the items: P, J, V and the Spearman of effects, base circuit against the base
    model's circuit on the resample. ``delta`` [heads, items] and ``denominator`` [items] are the base
    model's per-item parts, ``circuit`` the base circuit's head indices."""
    n_items = delta.shape[1]
    size = len(circuit)
    base_effect = delta.mean(axis=1) / denominator.mean()
    base_set = set(circuit.tolist())
    weight = np.abs(base_effect[circuit])
    rng = np.random.default_rng(seed)
    out = {k: np.empty(n_resamples) for k in ("preservation", "jaccard", "circuit_vulnerability", "spearman")}
    for b in range(n_resamples):
        items = rng.integers(0, n_items, n_items)
        effect = delta[:, items].mean(axis=1) / denominator[items].mean()
        own = set(np.argsort(-np.abs(effect), kind="stable")[:size].tolist())
        out["preservation"][b] = len(base_set & own) / size
        out["jaccard"][b] = len(base_set & own) / len(base_set | own)
        e_base = base_effect[circuit]
        v = np.sign(e_base) * (e_base - effect[circuit]) / np.abs(e_base)
        out["circuit_vulnerability"][b] = float((weight * v).sum() / weight.sum())
        out["spearman"][b] = spearman(base_effect, effect)
    return out


def floor_row(probe: str, method: str, kind: str, n_items: int, size: int, draws: dict) -> dict:
    """A NOISE_FLOOR_SCHEMA row from per-resample P, J, V and Spearman."""
    n = len(draws["preservation"])
    low = (lambda x: float(np.min(x))) if n < 20 else (lambda x: float(np.quantile(x, FLOOR_QUANTILE)))
    high = (lambda x: float(np.max(x))) if n < 20 else (lambda x: float(np.quantile(x, 1 - FLOOR_QUANTILE)))
    spearman = np.asarray(draws["spearman"], dtype=np.float64)
    return {
        "probe": probe,
        "method": method,
        "kind": kind,
        "n_items": n_items,
        "n_resamples": n,
        "size": size,
        "preservation": low(draws["preservation"]),
        "jaccard": low(draws["jaccard"]),
        "circuit_vulnerability": high(draws["circuit_vulnerability"]),
        "effect_spearman": float(np.nanmedian(spearman)) if np.isfinite(spearman).any() else None,
    }


def _mask_refit(model, chosen: list, table: pl.DataFrame, base: list[Head], cfg: ExperimentConfig, seed: int):
    """Masks learned again on ``chosen`` items: P, J and V of the base mask circuit against them."""
    from dcv.circuits.mask import mask_circuit, mask_effects

    heads = list(zip(table["layer"], table["head"], strict=True))
    mask_cfg = cfg.circuits.mask.model_copy(update={"seed": seed})
    probe = table["probe"][0]
    again = mask_effects(model, chosen, mask_cfg, "base", probe, heads, cfg.patching.batch_size)
    base_set, own = set(base), set(mask_circuit(again))
    m_base = {(la, h): e for la, h, e in table.select("layer", "head", "effect").iter_rows()}
    m_again = {(la, h): e for la, h, e in again.select("layer", "head", "effect").iter_rows()}
    # Masks lie in [0, 1], so v_h = (m_base - m_again) / m_base, weighted by m_base.
    v = sum(m_base[h] - m_again[h] for h in base) / sum(m_base[h] for h in base)
    return {
        "preservation": len(base_set & own) / len(base_set),
        "jaccard": len(base_set & own) / len(base_set | own),
        "circuit_vulnerability": v,
        "spearman": effect_spearman(table, again),
    }


def mask_noise_floor(
    model, probe_items: dict[str, list], effects: pl.DataFrame, reference: dict, cfg: ExperimentConfig
) -> pl.DataFrame:
    """NOISE_FLOOR_SCHEMA rows of the learned masks: ``effects`` are the base model's mask rows,
    ``reference`` the base circuits {(probe, method): heads}."""
    rows = []
    seed = cfg.circuits.mask.seed
    masks = effects.filter(pl.col("method").is_in(MASK_METHODS))
    for (probe, method), table in sorted(masks.group_by("probe", "method")):
        items, base = probe_items[probe], reference[(probe, method)]
        if not base:
            continue
        rng = np.random.default_rng(seed)
        resamples = [
            _mask_refit(
                model, [items[i] for i in rng.integers(0, len(items), len(items))], table, base, cfg, seed
            )
            for _ in range(cfg.circuits.mask_noise_floor_resamples)
        ]
        seeded = [_mask_refit(model, list(items), table, base, cfg, seed + 1)]
        for kind, draws in (("bootstrap", resamples), ("seed", seeded)):
            columns = {k: [d[k] for d in draws] for k in draws[0]}
            rows.append(floor_row(probe, method, kind, len(items), len(base), columns))
    return pl.DataFrame(rows, schema=NOISE_FLOOR_SCHEMA)
