"""Learned-mask circuits (the seed paper's protocol): one trainable mask per head, the model frozen.

Each head h gets a logit; its mask is m_h = sigmoid(logit_h / T). On the clean prompts, head h's output
(``blocks.L.attn.hook_z[:, :, h]``) becomes m_h * z_clean + (1 - m_h) * z_corrupt, with z_corrupt cached
from the corrupted run: m_h = 1 keeps the head clean, m_h = 0 patches it from the corrupted run, as in
exact patching and faithfulness. With D = mean_i(LD_clean_i - LD_corrupt_i) over all items, a minibatch B
minimises

    loss = (mean_{i in B}(LD_clean_i - LD_masked_i) / D)^2 + l1_penalty * mean_h(m_h)

i.e. it keeps the clean behaviour (the squared term is (1 - F)^2 for the soft mask's faithfulness F, the
ratio of means used everywhere in dcv) while the L1 term switches heads off. Squared, not plain 1 - F:
that one is unbounded below, so the mask also switched off every head that works against the answer and
found circuits of faithfulness about 2 (124 of 270 heads on SmolLM2 IOI); the seed paper's are near 1.
T is annealed geometrically from ``t_start`` to ``t_end`` so masks end near 0 or 1; the circuit is {h :
m_h >= 0.5}. Only positions from the first clean/corrupted difference are run, attending to the clean
run's cached keys and values before it (there m_h z_clean + (1 - m_h) z_corrupt = z_clean whatever m_h),
as in `dcv.circuits.circuit`.

The result is the head-effect table (HEAD_EFFECTS_SCHEMA) with method ``mask`` and effect = the final m_h.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from dcv.circuits.decoder import DecoderCache, Prefix, check_heads, hook_z_name, model_shape, run_decoder
from dcv.circuits.methods import MASK
from dcv.config import MaskConfig
from dcv.evaluation import ContrastBatch, contrast_batches
from dcv.tables import HEAD_EFFECTS_SCHEMA, Head
from dcv.tasks.items import ProbeItem


@dataclass(frozen=True)
class _CachedBatch:
    """What every step needs of one minibatch, computed once without gradients."""

    batch: ContrastBatch
    start: int  # first position where clean and corrupted prompts differ
    hidden: torch.Tensor  # clean embeddings from ``start``, [n, pos - start, d_model]
    prefix: Prefix  # clean keys/values before ``start``
    z_corrupt: list[torch.Tensor]  # per layer, from ``start``, [n, pos - start, head, d_head]
    ld_clean: torch.Tensor  # [n]
    ld_corrupt: torch.Tensor  # [n]


@torch.no_grad()
def _cache_batches(model: PreTrainedModel, items: Sequence[ProbeItem], batch_size: int) -> list[_CachedBatch]:
    cached = []
    for batch in contrast_batches(items, batch_size):
        clean, corrupt = DecoderCache(), DecoderCache()
        ld_clean = batch.logit_diff(run_decoder(model, batch.clean, cache=clean))
        ld_corrupt = batch.logit_diff(run_decoder(model, batch.corrupt, cache=corrupt))
        start = batch.first_difference
        cached.append(
            _CachedBatch(
                batch=batch,
                start=start,
                hidden=clean.resid_pre[0][:, start:],
                prefix=Prefix([k[:, :, :start] for k in clean.keys], [v[:, :, :start] for v in clean.values]),
                z_corrupt=[z[:, start:] for z in corrupt.z],
                ld_clean=ld_clean,
                ld_corrupt=ld_corrupt,
            )
        )
    return cached


def _masked_logit_diff(model: PreTrainedModel, c: _CachedBatch, masks: torch.Tensor) -> torch.Tensor:
    """LD [n] of the clean run with every head's z mixed by ``masks`` [layer, head] (1 = clean)."""
    hooks = {}
    for layer, z_corrupt in enumerate(c.z_corrupt):
        m = masks[layer][None, None, :, None].to(z_corrupt.dtype)  # [1, 1, head, 1]

        def mix(z: torch.Tensor, m: torch.Tensor = m, z_corrupt: torch.Tensor = z_corrupt) -> torch.Tensor:
            return z_corrupt + m * (z - z_corrupt)

        hooks[hook_z_name(layer)] = mix
    logits = run_decoder(model, hidden=c.hidden, start_pos=c.start, prefix=c.prefix, hooks=hooks)
    return c.batch.logit_diff(logits)


def temperature(step: int, cfg: MaskConfig) -> float:
    """Geometric annealing: ``t_start`` at the first step, ``t_end`` at the last."""
    if cfg.steps == 1:
        return cfg.t_end
    return cfg.t_start * (cfg.t_end / cfg.t_start) ** (step / (cfg.steps - 1))


def learn_masks(
    model: PreTrainedModel,
    items: Sequence[ProbeItem],
    cfg: MaskConfig,
    heads: list[Head],
    batch_size: int = 16,
) -> torch.Tensor:
    """Final masks sigmoid(logit / t_end) of ``heads``, [len(heads)]; the model's weights are not touched.

    Heads outside ``heads`` stay clean (m = 1) throughout.
    """
    shape = model_shape(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    # The seed decides which items share a minibatch (and, below, the minibatch order).
    order = torch.randperm(len(items), generator=generator).tolist()
    cached = _cache_batches(model, [items[i] for i in order], batch_size)
    # D, the loss's normaliser: one number over all items (a ratio of means, as in head effects).
    gap = float(sum((c.ld_clean - c.ld_corrupt).sum() for c in cached)) / len(items)
    if not gap > 0:
        # The model does not do the task on these items (a base model that cannot, or a checkpoint that
        # forgot it): there is no behaviour to keep, so no head is in the circuit.
        warnings.warn(
            f"mask: mean LD_clean - LD_corrupt is {gap:.4g} over {len(items)} items (the clean prompts do "
            "not favour the correct answer more than the corrupted ones): every mask is 0, no circuit",
            stacklevel=2,
        )
        return torch.zeros(len(heads))
    device = next(model.parameters()).device
    layers = torch.tensor([layer for layer, _ in heads], device=device)
    head_index = torch.tensor([head for _, head in heads], device=device)
    logits = torch.full((len(heads),), cfg.logit_init, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=cfg.lr)
    batch_order: list[int] = []
    progress = tqdm(range(cfg.steps), desc="mask", leave=False, disable=None)
    for step in progress:
        if not batch_order:
            batch_order = torch.randperm(len(cached), generator=generator).tolist()
        c = cached[batch_order.pop()]
        m = torch.sigmoid(logits / temperature(step, cfg))
        masks = torch.ones(shape.n_layers, shape.n_heads, device=device).index_put((layers, head_index), m)
        ld_masked = _masked_logit_diff(model, c, masks)
        lost = (c.ld_clean - ld_masked).mean() / gap  # 1 - F of this minibatch
        loss = lost.square() + cfg.l1_penalty * m.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", on=int((m >= 0.5).sum()))
    return torch.sigmoid(logits.detach() / cfg.t_end).cpu()


def mask_effects(
    model: PreTrainedModel,
    items: Sequence[ProbeItem],
    cfg: MaskConfig,
    model_id: str,
    probe: str,
    heads: list[Head] | None = None,
    batch_size: int = 16,
) -> pl.DataFrame:
    """Learned masks of ``heads`` (default: every head) as the HEAD_EFFECTS_SCHEMA table, method ``mask``.

    effect = the final m_h in [0, 1]. The model is frozen for the call (its requires_grad flags are
    restored after) and its weights are never changed.
    """
    heads = list(heads) if heads is not None else model_shape(model).heads
    check_heads(model, heads)
    if len(set(heads)) != len(heads):
        raise ValueError(f"mask: heads repeat in {heads}; each head has one mask")
    if not items:
        raise ValueError("no probe items: learned masks need at least one contrast pair")
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        masks = learn_masks(model, items, cfg, heads, batch_size)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return pl.DataFrame(
        {
            "model": [model_id] * len(heads),
            "probe": [probe] * len(heads),
            "method": [MASK] * len(heads),
            "layer": [layer for layer, _ in heads],
            "head": [head for _, head in heads],
            "effect": masks.double().tolist(),
            "n_items": [len(items)] * len(heads),
        },
        schema=HEAD_EFFECTS_SCHEMA,
    )


def mask_circuit(table: pl.DataFrame) -> list[Head]:
    """Heads with m_h >= 0.5, by mask descending, ties by (layer, head)."""
    kept = table.filter(pl.col("effect") >= 0.5).sort(
        ["effect", "layer", "head"], descending=[True, False, False]
    )
    return list(zip(kept["layer"].to_list(), kept["head"].to_list(), strict=True))
