"""Circuits: head sets that carry a probe's behaviour, and how faithfully they do.

- **Faithfulness** F(C, M): run M on the clean prompts with every head *outside* C patched from the
  corrupted run; F = (mean LD - mean LD_corrupt) / (mean LD_clean - mean LD_corrupt). 1 = C alone
  reproduces the clean behaviour, 0 = no better than the corrupted run.
- **Base circuit** C_T: heads ranked by |e_h| (descending); the smallest top-k whose faithfulness reaches
  ``tau``, capped at ``k_max`` (``selection: faithfulness``), or the fixed top ``top_k`` heads.

Several head sets are scored in one forward by expanding the batch (one copy of the items per set), and
only positions from the first clean/corrupted difference are computed (earlier positions are the clean
run's at every layer, whatever is patched).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch
from transformers import PreTrainedModel

from dcv.circuits.decoder import DecoderCache, Prefix, check_heads, hook_z_name, model_shape, run_decoder
from dcv.config import CircuitsConfig
from dcv.evaluation import contrast_batches
from dcv.tables import Head
from dcv.tasks.items import ProbeItem

CIRCUIT_SCHEMA = {
    "probe": pl.String,
    "rank": pl.Int32,
    "layer": pl.Int32,
    "head": pl.Int32,
    "effect": pl.Float64,
}


@dataclass(frozen=True)
class Circuit:
    probe: str
    heads: tuple[Head, ...]  # ranked by |effect|, largest first
    faithfulness: float
    reached_tau: bool  # False when even k_max heads stay below tau (selection "faithfulness")
    curve: tuple[float, ...]  # faithfulness of the top-1, top-2, ... sets that were scored

    def __len__(self) -> int:
        return len(self.heads)


@torch.inference_mode()
def faithfulness(
    model: PreTrainedModel,
    items: Sequence[ProbeItem],
    head_sets: Sequence[set[Head] | frozenset[Head]],
    batch_size: int = 16,
    sets_per_forward: int = 8,
) -> list[float]:
    """F(C, model) for each head set C, in order."""
    shape = model_shape(model)
    for head_set in head_sets:
        check_heads(model, list(head_set))
    # keep[s, layer, head]: head is in set s (kept clean); the rest take the corrupted z.
    keep = torch.zeros(len(head_sets), shape.n_layers, shape.n_heads, dtype=torch.bool)
    for s, head_set in enumerate(head_sets):
        for layer, head in head_set:
            keep[s, layer, head] = True
    sum_clean = sum_corrupt = 0.0
    sum_patched = torch.zeros(len(head_sets), dtype=torch.float64)
    for batch in contrast_batches(items, batch_size):
        clean, corrupt = DecoderCache(), DecoderCache()
        sum_clean += float(batch.logit_diff(run_decoder(model, batch.clean, cache=clean)).sum())
        sum_corrupt += float(batch.logit_diff(run_decoder(model, batch.corrupt, cache=corrupt)).sum())
        start = batch.first_difference
        n = len(batch.correct)
        for first in range(0, len(head_sets), sets_per_forward):
            sets = range(first, min(first + sets_per_forward, len(head_sets)))
            hooks = {}
            for layer in range(shape.n_layers):
                layer_keep = keep[list(sets), layer].to(clean.z[layer].device)  # [sets, head]
                z_corrupt = corrupt.z[layer][:, start:]

                def patch(z: torch.Tensor, layer_keep=layer_keep, z_corrupt=z_corrupt, n=n) -> torch.Tensor:
                    z = z.view(len(layer_keep), n, *z.shape[1:])  # [set, n, pos, head, d_head]
                    mask = layer_keep[:, None, None, :, None]
                    return torch.where(mask, z, z_corrupt.unsqueeze(0)).view(-1, *z.shape[2:])

                hooks[hook_z_name(layer)] = patch
            logits = run_decoder(
                model,
                hidden=clean.resid_pre[0][:, start:].repeat(len(sets), 1, 1),
                start_pos=start,
                prefix=Prefix(
                    [k[:, :, :start] for k in clean.keys],
                    [v[:, :, :start] for v in clean.values],
                    repeat=len(sets),
                ),
                hooks=hooks,
            )
            sum_patched[list(sets)] += batch.logit_diff(logits).view(len(sets), n).sum(dim=1).double().cpu()
    count = len(items)
    clean_mean, corrupt_mean = sum_clean / count, sum_corrupt / count
    return [float((p / count - corrupt_mean) / (clean_mean - corrupt_mean)) for p in sum_patched]


def rank_heads(effects: pl.DataFrame) -> list[Head]:
    """Heads of one effect table by |effect|, largest first; ties by (layer, head) for determinism."""
    ranked = effects.with_columns(pl.col("effect").abs().alias("magnitude")).sort(
        ["magnitude", "layer", "head"], descending=[True, False, False]
    )
    return list(zip(ranked["layer"].to_list(), ranked["head"].to_list(), strict=True))


def select_circuit(
    model: PreTrainedModel,
    items: Sequence[ProbeItem],
    effects: pl.DataFrame,
    cfg: CircuitsConfig,
    batch_size: int = 16,
) -> Circuit:
    """The base circuit of one probe from its head-effect table (one model, one method)."""
    if effects.is_empty():
        raise ValueError("select_circuit: the effect table is empty")
    if effects.select(pl.struct("model", "probe", "method").n_unique()).item() != 1:
        raise ValueError("select_circuit: the effect table must hold one model, one probe and one method")
    probe = effects["probe"][0]
    ranked = rank_heads(effects)
    sizes = (
        [min(cfg.top_k, len(ranked))]
        if cfg.selection == "top_k"
        else list(range(1, min(cfg.k_max, len(ranked)) + 1))
    )
    curve = faithfulness(model, items, [set(ranked[:k]) for k in sizes], batch_size)
    if cfg.selection == "top_k":
        chosen = 0
    else:
        reaching = [i for i, f in enumerate(curve) if f >= cfg.tau]
        chosen = reaching[0] if reaching else len(sizes) - 1
    return Circuit(
        probe=probe,
        heads=tuple(ranked[: sizes[chosen]]),
        faithfulness=curve[chosen],
        reached_tau=curve[chosen] >= cfg.tau,
        curve=tuple(curve),
    )


def circuit_table(circuit: Circuit, effects: pl.DataFrame) -> pl.DataFrame:
    """One row per circuit head (CIRCUIT_SCHEMA): its rank and effect."""
    lookup = {(layer, head): e for layer, head, e in effects.select("layer", "head", "effect").iter_rows()}
    return pl.DataFrame(
        {
            "probe": [circuit.probe] * len(circuit),
            "rank": list(range(1, len(circuit) + 1)),
            "layer": [layer for layer, _ in circuit.heads],
            "head": [head for _, head in circuit.heads],
            "effect": [lookup[h] for h in circuit.heads],
        },
        schema=CIRCUIT_SCHEMA,
    )
