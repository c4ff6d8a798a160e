"""Head effects: how much each attention head carries a probe's behaviour.

Clean run: the model on the clean prompts. Corrupted run: the same model on the corrupted prompts (same
token length, the information the task needs removed). Patching head h means running the clean prompts
with h's output (``blocks.L.attn.hook_z[:, :, h]``) taken from the corrupted run. With LD the logit
difference (correct - wrong answer token) at the last position, the effect of h on a set of items is

    e_h = mean_i(LD_clean_i - LD_patched_i) / mean_i(LD_clean_i - LD_corrupt_i)

1 means patching h alone removes the whole clean-vs-corrupted difference; 0 means h does not matter. The
ratio of means (not the mean of per-item ratios) keeps items whose clean and corrupted LDs nearly agree
from dominating; per-item numerators and denominators are kept (`item_effects`) so that confidence
intervals can resample items.

Three methods, one table shape:
- ``exact``: activation patching. Heads of one layer are patched in one forward by expanding the batch
  (one copy of the items per head); the run starts at the head's layer from the cached clean residual
  stream and computes only positions from the first clean/corrupted difference, attending to cached clean
  keys and values before it (`dcv.circuits.decoder`). Numerically the naive per-head loop.
- ``attribution``: first-order estimate, (z_clean - z_corrupt) . dLD/dz at the clean run; one forward on
  each prompt set and one backward per batch.
- ``ig``: integrated gradients over the same node activations (EAP-IG style): the gradient is averaged
  over ``steps`` points on the straight line from the corrupted to the clean input embeddings.

Cross-model activation patching (``cmap_item_effects``, method ``cmap``) reuses the exact loop with two
models: head h's *output* (``z_h @ W_O[:, h].T``, after o_proj: the two models' o_proj differ) comes from
the other model's clean run (base <-> checkpoint), over the base's gap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import polars as pl
import torch
from transformers import PreTrainedModel

from dcv.circuits.decoder import (
    DecoderCache,
    Prefix,
    check_heads,
    head_output,
    hook_attn_out_name,
    hook_z_name,
    model_shape,
    run_decoder,
)
from dcv.circuits.methods import CMAP_DIRECTIONS
from dcv.evaluation import ContrastBatch, contrast_batches
from dcv.tables import HEAD_EFFECTS_SCHEMA, Head
from dcv.tasks.items import ProbeItem

# The ranking methods ``item_effects`` computes (``dcv.circuits.methods`` registers them): a new one needs
# its estimator below, or a compute function of its own.
ESTIMATORS = ("exact", "attribution", "ig")

# Per-item parts of an effect (for bootstrap over items): effect = mean(delta) / mean(denominator).
ITEM_SCHEMA = {
    "layer": pl.Int32,
    "head": pl.Int32,
    "item": pl.Int32,
    "delta": pl.Float64,
    "denominator": pl.Float64,
}


@dataclass(frozen=True)
class ItemEffects:
    """Per-item parts of the head effects: delta[h, i] = LD_clean_i - LD_patched_hi; denominator[i]."""

    heads: list[Head]
    delta: torch.Tensor  # [n_heads, n_items]
    denominator: torch.Tensor  # [n_items]

    def effects(self) -> torch.Tensor:
        """e_h = mean_i delta[h, i] / mean_i denominator[i], [n_heads]."""
        return self.delta.mean(dim=1) / self.denominator.mean()


HeadEdit = Callable[[int, int, torch.Tensor], None]  # (layer, head, one copy's tensor), edited in place


@torch.inference_mode()
def _exact_batch(model: PreTrainedModel, batch: ContrastBatch, heads: list[Head], chunk: int) -> torch.Tensor:
    """delta [n_heads, n] for one batch; heads are grouped by layer, ``chunk`` heads per forward."""
    clean, corrupt = DecoderCache(), DecoderCache()
    ld_clean = batch.logit_diff(run_decoder(model, batch.clean, cache=clean))
    run_decoder(model, batch.corrupt, cache=corrupt)
    start = batch.first_difference

    def corrupt_z(layer: int, head: int, z: torch.Tensor) -> None:
        z[:, :, head] = corrupt.z[layer][:, start:, head]

    return _patched_delta(model, batch, heads, chunk, clean, ld_clean, start, hook_z_name, corrupt_z)


@torch.inference_mode()
def _patched_delta(
    model: PreTrainedModel,
    batch: ContrastBatch,
    heads: list[Head],
    chunk: int,
    target: DecoderCache,
    ld_target: torch.Tensor,
    start: int,
    hook_name: Callable[[int], str],
    edit: HeadEdit,
) -> torch.Tensor:
    """delta [n_heads, n] = LD_target - LD_patched: ``model``'s run cached in ``target`` (LD ``ld_target``)
    with ``edit(layer, head, x)`` applied to the tensor at ``hook_name(layer)`` for each head. Positions
    before ``start`` are identical in both runs (their keys and values come from ``target``); heads of one
    layer are patched ``chunk`` at a time in one forward by expanding the batch (one copy per head)."""
    prefix = Prefix([k[:, :, :start] for k in target.keys], [v[:, :, :start] for v in target.values])
    n = len(batch.correct)
    delta = torch.empty(len(heads), n)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for row, (layer, _) in enumerate(heads):
        by_layer[layer].append(row)
    for layer, rows in by_layer.items():
        for part in range(0, len(rows), chunk):
            chunk_rows = rows[part : part + chunk]
            patched_heads = [heads[r][1] for r in chunk_rows]

            def patch(
                x: torch.Tensor, patched_heads: list[int] = patched_heads, layer: int = layer
            ) -> torch.Tensor:
                x = x.clone().view(len(patched_heads), n, *x.shape[1:])  # [copy, n, ...]
                for copy, head in enumerate(patched_heads):
                    edit(layer, head, x[copy])
                return x.view(-1, *x.shape[2:])

            logits = run_decoder(
                model,
                hidden=target.resid_pre[layer][:, start:].repeat(len(chunk_rows), 1, 1),
                start_layer=layer,
                start_pos=start,
                prefix=Prefix(prefix.keys, prefix.values, repeat=len(chunk_rows)),
                hooks={hook_name(layer): patch},
            )
            ld_patched = batch.logit_diff(logits).view(len(chunk_rows), n).cpu()
            delta[chunk_rows] = ld_target.cpu() - ld_patched
    return delta


def _integrated_gradients_batch(
    model: PreTrainedModel,
    batch: ContrastBatch,
    heads: list[Head],
    steps: int,
) -> torch.Tensor:
    """delta [n_heads, n] ~ (z_clean - z_corrupt) . mean over alpha of dLD/dz at embeddings
    corrupt + alpha (clean - corrupt), alpha = 1/steps .. 1. ``steps=1`` is attribution patching."""
    with torch.no_grad():
        clean, corrupt = DecoderCache(), DecoderCache()
        run_decoder(model, batch.clean, cache=clean)
        run_decoder(model, batch.corrupt, cache=corrupt)
        embed = model.model.embed_tokens
        emb_clean = embed(batch.clean.to(embed.weight.device))
        emb_corrupt = embed(batch.corrupt.to(embed.weight.device))
    grads = [torch.zeros_like(z) for z in clean.z]
    for step in range(1, steps + 1):
        alpha = step / steps
        # Zero leaves added to every z: their gradient is the total derivative of LD with respect to z.
        leaves = [torch.zeros_like(z, requires_grad=True) for z in clean.z]
        hooks = {hook_z_name(layer): (lambda z, leaf=leaf: z + leaf) for layer, leaf in enumerate(leaves)}
        with torch.enable_grad():
            hidden = (emb_corrupt + alpha * (emb_clean - emb_corrupt)).clone()
            ld = batch.logit_diff(run_decoder(model, hidden=hidden, hooks=hooks))
            step_grads = torch.autograd.grad(ld.sum(), leaves)
        for total, grad in zip(grads, step_grads, strict=True):
            total += grad.detach() / steps
    delta = torch.empty(len(heads), len(batch.correct))
    for row, (layer, head) in enumerate(heads):
        diff = clean.z[layer][:, :, head] - corrupt.z[layer][:, :, head]  # [n, pos, d_head]
        delta[row] = (grads[layer][:, :, head] * diff).sum(dim=(1, 2)).float().cpu()
    return delta


def item_effects(
    model: PreTrainedModel,
    items: Sequence[ProbeItem],
    method: str = "exact",
    heads: list[Head] | None = None,
    batch_size: int = 16,
    head_chunk_size: int = 32,
    ig_steps: int = 8,
) -> ItemEffects:
    """Per-item effect parts of ``heads`` (default: every head) on ``items`` by ``method``."""
    if method not in ESTIMATORS:
        choices = ", ".join(ESTIMATORS)
        raise ValueError(f"patching method {method!r} is unknown; choose one of {choices}")
    heads = list(heads) if heads is not None else model_shape(model).heads
    check_heads(model, heads)
    delta = torch.empty(len(heads), len(items))
    denominator = torch.empty(len(items))
    for batch in contrast_batches(items, batch_size):
        with torch.inference_mode():
            ld_clean = batch.logit_diff(run_decoder(model, batch.clean)).cpu()
            ld_corrupt = batch.logit_diff(run_decoder(model, batch.corrupt)).cpu()
        denominator[batch.index] = ld_clean - ld_corrupt
        if method == "exact":
            delta[:, batch.index] = _exact_batch(model, batch, heads, head_chunk_size)
        else:
            steps = 1 if method == "attribution" else ig_steps
            delta[:, batch.index] = _integrated_gradients_batch(model, batch, heads, steps)
    return ItemEffects(heads, delta, denominator)


@torch.inference_mode()
def cmap_item_effects(
    base: PreTrainedModel,
    checkpoint: PreTrainedModel,
    items: Sequence[ProbeItem],
    heads: list[Head] | None = None,
    batch_size: int = 16,
    head_chunk_size: int = 32,
) -> dict[str, ItemEffects]:
    """Cross-model activation patching (CMAP) of ``heads`` on the probe's clean prompts, per direction
    (CMAP_DIRECTIONS):

    - ``ckpt_into_base``: delta[h, i] = LD_base_i - LD_i(base, h's output from the checkpoint's clean run);
    - ``base_into_ckpt``: delta[h, i] = LD_ckpt_i - LD_i(checkpoint, h's output from the base's clean run);

    both over the base's gap only, denominator[i] = LD_base_clean_i - LD_base_corrupt_i, so a checkpoint
    whose behaviour shrank evenly still shows. A head's output is its z times its own model's o_proj
    columns (``head_output``), swapped at ``hook_attn_out``: a change to the head's q, k, v *or* o weights
    shows at the head itself. The exact-patching loop of ``item_effects``; the prompts are the same but the
    models differ at every position, so the patched run starts at position 0. The models must have the
    same shape."""
    shape = model_shape(base)
    if model_shape(checkpoint) != shape:
        raise ValueError(f"cmap: the checkpoint's shape {model_shape(checkpoint)} is not the base's {shape}")
    heads = list(heads) if heads is not None else shape.heads
    check_heads(base, heads)
    delta = {d: torch.empty(len(heads), len(items)) for d in CMAP_DIRECTIONS}
    denominator = torch.empty(len(items))
    for batch in contrast_batches(items, batch_size):
        on_base, on_ckpt = DecoderCache(), DecoderCache()
        ld_base = batch.logit_diff(run_decoder(base, batch.clean, cache=on_base))
        ld_ckpt = batch.logit_diff(run_decoder(checkpoint, batch.clean, cache=on_ckpt))
        ld_corrupt = batch.logit_diff(run_decoder(base, batch.corrupt)).cpu()
        denominator[batch.index] = ld_base.cpu() - ld_corrupt
        for direction, (target, source, on_target, on_source, ld_target) in {
            "ckpt_into_base": (base, checkpoint, on_base, on_ckpt, ld_base),
            "base_into_ckpt": (checkpoint, base, on_ckpt, on_base, ld_ckpt),
        }.items():

            def swap_output(
                layer: int,
                head: int,
                out: torch.Tensor,
                target=target,
                source=source,
                on_target=on_target,
                on_source=on_source,
            ) -> None:
                # The difference first: equal outputs then add exactly 0 (a model against itself is 0).
                out += head_output(source, layer, on_source.z[layer], head) - head_output(
                    target, layer, on_target.z[layer], head
                )

            delta[direction][:, batch.index] = _patched_delta(
                target,
                batch,
                heads,
                head_chunk_size,
                on_target,
                ld_target,
                0,
                hook_attn_out_name,
                swap_output,
            )
    return {d: ItemEffects(heads, delta[d], denominator) for d in CMAP_DIRECTIONS}


def effects_table(effects: ItemEffects, model_id: str, probe: str, method: str) -> pl.DataFrame:
    """The tidy head-effect table (HEAD_EFFECTS_SCHEMA) of one (model, probe, method)."""
    values = effects.effects().tolist()
    return pl.DataFrame(
        {
            "model": [model_id] * len(values),
            "probe": [probe] * len(values),
            "method": [method] * len(values),
            "layer": [layer for layer, _ in effects.heads],
            "head": [head for _, head in effects.heads],
            "effect": values,
            "n_items": [effects.delta.shape[1]] * len(values),
        },
        schema=HEAD_EFFECTS_SCHEMA,
    )


def item_table(effects: ItemEffects) -> pl.DataFrame:
    """Per-item parts (ITEM_SCHEMA), long format: one row per (head, item)."""
    n_heads, n_items = effects.delta.shape
    return pl.DataFrame(
        {
            "layer": [layer for layer, _ in effects.heads for _ in range(n_items)],
            "head": [head for _, head in effects.heads for _ in range(n_items)],
            "item": list(range(n_items)) * n_heads,
            "delta": effects.delta.flatten().tolist(),
            "denominator": effects.denominator.repeat(n_heads).tolist(),
        },
        schema=ITEM_SCHEMA,
    )


def head_effects(
    model: PreTrainedModel,
    items: Sequence[ProbeItem],
    model_id: str,
    probe: str,
    method: str = "exact",
    heads: list[Head] | None = None,
    batch_size: int = 16,
    head_chunk_size: int = 32,
    ig_steps: int = 8,
) -> pl.DataFrame:
    """Head effects of ``model`` on a probe's items as the tidy HEAD_EFFECTS_SCHEMA table."""
    effects = item_effects(model, items, method, heads, batch_size, head_chunk_size, ig_steps)
    return effects_table(effects, model_id, probe, method)
