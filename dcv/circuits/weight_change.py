"""The weight-change stage: how far each attention head's weights moved from the base model, per checkpoint.

No forward passes: per checkpoint of the results table (``dcv.results.list_models``, the base model left
out) it reads the attention tensors of the checkpoint and of the base model (two safetensors files, only
the ``self_attn.{q,k,v,o}_proj`` tensors) and, per (layer, head), compares them (docs/method.md "What predicts
forgetting"; RL Finetunes Small Subnetworks, Mukherjee et al. 2025):

- ``q_change``, ``k_change``, ``v_change``, ``o_change``: the relative Frobenius change
  ||W_ckpt - W_base||_F / ||W_base||_F of the head's block: its ``head_dim`` rows of q_proj, of k_proj
  and of v_proj (with their biases where the model has them: qwen2), and its ``head_dim`` input columns
  of o_proj (0/0 = 0: a block that is zero in both models did not change);
- ``change``: the same over the head's four blocks together (one relative change per head);
- ``changed_share``: the share of those parameters whose absolute change exceeds
  ``weight_change.tolerance`` (or ``tolerance * |W_base|`` with ``weight_change.relative``).

**GQA attribution.** Under grouped-query attention a k/v head (k_proj and v_proj rows) is shared by
``num_heads / num_kv_heads`` query heads (the ``kv_shared_by`` column; transformers' ``repeat_kv``: query
head h reads k/v head h // kv_shared_by). dcv attributes the group's whole k/v change to *every* head of
the group: k_change and v_change are equal across a group, and ``change`` and ``changed_share`` count the
shared rows once per head. So a k/v update moves every head that reads it, and summing ``n_params`` over a
layer's heads counts each k/v row kv_shared_by times.

**Dtype.** Tensors are compared as stored, each in its checkpoint's own dtype, upcast exactly to float64
for the arithmetic: a bf16 checkpoint whose update fell below bf16's resolution at that weight stored the
same value, and the parameter counts as unchanged (the ``dtype`` column says which). With fp32 Adam every
parameter moves by about the learning rate per step, far above 1e-5, so there ``changed_share`` is near 1
for every head and only the relative changes separate heads; the share is informative for bf16
checkpoints (Mukherjee et al.'s setting) or with a larger tolerance.

One item per checkpoint on the stage runner (``dcv.stages``; CPU only: ``patching``'s actors and CPUs, no
GPU). Each item's rows go to ``<storage>/weight_change/models/<model>__<hash>.parquet`` (WEIGHT_CHANGE_SCHEMA,
one row per head), the hash covering the checkpoint, the base model config and ``weight_change``; the
assembled table is ``<storage>/weight_change/weight_change.parquet``. ``dcv.analysis`` sets it beside v_h
(``weight_vs_function``) and uses the mean ``change`` per checkpoint as a predictor of forgetting.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import polars as pl
import torch

from dcv.config import ExperimentConfig
from dcv.results import list_models
from dcv.stages import WORK_COLUMNS, Progress, Resources, Stage, StageRun, run_stage
from dcv.storage import (
    BASE_MODEL,
    SAFETENSORS_INDEX,
    WEIGHT_CHANGE_FILE,
    WEIGHT_FILES,
    content_hash,
    file_slug,
    local_model_folder,
    weight_change_dir,
    write_parquet,
)

# Per-head numbers of one checkpoint against the base (``head_weight_change``).
HEAD_CHANGE_SCHEMA = {
    "layer": pl.Int32,
    "head": pl.Int32,
    "kv_shared_by": pl.Int32,  # query heads sharing this head's k/v rows (GQA), each attributed all of them
    "n_params": pl.Int64,  # q rows + k rows + v rows (+ biases) + o columns of the head
    "dtype": pl.String,  # the checkpoint's attention dtype, as compared
    "q_change": pl.Float64,  # ||dW||_F / ||W_base||_F of the head's q_proj rows (and bias)
    "k_change": pl.Float64,  # of its group's k_proj rows (and bias): shared by kv_shared_by heads
    "v_change": pl.Float64,  # of its group's v_proj rows (and bias): shared likewise
    "o_change": pl.Float64,  # of its o_proj input columns
    "change": pl.Float64,  # of the four blocks together
    "changed_share": pl.Float64,  # share of the n_params whose |dW| exceeds the tolerance
}
# The stage's table: one row per (checkpoint, layer, head).
WEIGHT_CHANGE_SCHEMA = {
    "model": pl.String,
    "trial": pl.String,
    "method": pl.String,
    "seed": pl.Int64,
    "step": pl.Int64,
    **HEAD_CHANGE_SCHEMA,
}
PROJECTIONS = ("q", "k", "v", "o")
_ATTENTION_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$")


@dataclass(frozen=True)
class Attention:
    """A model's attention tensors, keyed (layer, projection, "weight" | "bias"), and their shape."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    tensors: dict[
        tuple[int, str, str], torch.Tensor
    ]  # q/k/v weight [heads*d_head, d_model], o [d_model, ...]
    dtype: str


def _shape(config: dict) -> tuple[int, int, int, int]:
    heads = int(config["num_attention_heads"])
    d_head = config.get("head_dim") or int(config["hidden_size"]) // heads
    return (
        int(config["num_hidden_layers"]),
        heads,
        int(config.get("num_key_value_heads") or heads),
        int(d_head),
    )


def _attention(config: dict, named) -> Attention:
    tensors = {}
    for name, tensor in named:
        match = _ATTENTION_KEY.search(name)
        if match:
            tensors[(int(match[1]), match[2], match[3])] = tensor
    if not tensors:
        raise ValueError("no self_attn.{q,k,v,o}_proj tensors found: not a Llama/Qwen2-style decoder")
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    return Attention(*_shape(config), tensors, dtype)


def model_attention(model) -> Attention:
    """The attention tensors of a loaded HF model (the tiny model, a model already in memory)."""
    return _attention(model.config.to_dict(), model.state_dict().items())


def read_attention(folder: Path) -> Attention:
    """The attention tensors of an HF folder, reading only them from its safetensors (one file or the
    shards of an index); a ``pytorch_model.bin`` folder is read whole."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if (folder / SAFETENSORS_INDEX).is_file():
        index = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
        shards = sorted({file for name, file in index.items() if _ATTENTION_KEY.search(name)})
    elif (folder / WEIGHT_FILES[0]).is_file():
        shards = [WEIGHT_FILES[0]]
    elif (folder / WEIGHT_FILES[1]).is_file():
        state = torch.load(folder / WEIGHT_FILES[1], map_location="cpu", weights_only=True)
        return _attention(config, state.items())
    else:
        raise FileNotFoundError(f"{folder}: no {' or '.join(WEIGHT_FILES)} or {SAFETENSORS_INDEX}")
    named = []
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            named += [(name, f.get_tensor(name)) for name in f.keys() if _ATTENTION_KEY.search(name)]
    try:
        return _attention(config, named)
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from exc


def head_weight_change(base: Attention, tuned: Attention, tolerance: float, relative: bool) -> pl.DataFrame:
    """HEAD_CHANGE_SCHEMA rows, one per (layer, head), of ``tuned`` against ``base``.

    Per block the sums of dW^2, W_base^2 and of changed entries are taken per head: q rows reshape to
    [n_heads, ...], k/v rows to [n_kv_heads, ...] and are then read by every query head of their group
    (head h -> k/v head h // kv_shared_by), o columns reshape to [d_model, n_heads, d_head]. An o_proj
    bias (not per head) is left out."""
    shape = (base.n_layers, base.n_heads, base.n_kv_heads, base.d_head)
    if shape != (tuned.n_layers, tuned.n_heads, tuned.n_kv_heads, tuned.d_head):
        other = (tuned.n_layers, tuned.n_heads, tuned.n_kv_heads, tuned.d_head)
        raise ValueError(
            f"attention shapes (layers, heads, kv heads, head dim) differ: base {shape}, checkpoint {other}"
        )
    n_layers, n_heads, n_kv, d_head = shape
    shared = n_heads // n_kv
    group = torch.arange(n_heads) // shared  # the k/v head each query head reads
    rows = []
    for layer in range(n_layers):
        # [4 blocks, n_heads] sums: dW^2, W_base^2, entries changed, entries
        sums = torch.zeros(4, len(PROJECTIONS), n_heads, dtype=torch.float64)
        for p, proj in enumerate(PROJECTIONS):
            for kind in ("weight", "bias"):
                key = (layer, proj, kind)
                if proj == "o" and kind == "bias":
                    continue
                if (key in base.tensors) != (key in tuned.tensors):
                    raise ValueError(f"layer {layer} {proj}_proj.{kind} is in one model only")
                if key not in base.tensors:
                    continue
                w0, w1 = base.tensors[key].double(), tuned.tensors[key].double()
                if w0.shape != w1.shape:
                    raise ValueError(f"layer {layer} {proj}_proj.{kind}: shapes {w0.shape} and {w1.shape}")
                delta = w1 - w0
                changed = delta.abs() > (tolerance * w0.abs() if relative else tolerance)
                for s, part in enumerate((delta.square(), w0.square(), changed.double())):
                    if proj == "o":  # [d_model, n_heads * d_head]: the head's input columns
                        per_head = part.reshape(part.shape[0], n_heads, d_head).sum(dim=(0, 2))
                    else:  # [n * d_head, d_model] rows or [n * d_head] bias
                        per_head = part.reshape(n_heads if proj == "q" else n_kv, -1).sum(dim=1)
                        per_head = per_head if proj == "q" else per_head[group]
                    sums[s, p] += per_head
                sums[3, p] += w0.numel() / (n_kv if proj in "kv" else n_heads)  # entries per head
        delta_sq, base_sq, changed, count = sums
        block = _ratio(delta_sq.sqrt(), base_sq.sqrt())  # [4, n_heads]
        whole = _ratio(delta_sq.sum(0).sqrt(), base_sq.sum(0).sqrt())
        share = changed.sum(0) / count.sum(0)
        for head in range(n_heads):
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "kv_shared_by": shared,
                    "n_params": int(count[:, head].sum()),
                    "dtype": tuned.dtype,
                    **{f"{proj}_change": float(block[p, head]) for p, proj in enumerate(PROJECTIONS)},
                    "change": float(whole[head]),
                    "changed_share": float(share[head]),
                }
            )
    return pl.DataFrame(rows, schema=HEAD_CHANGE_SCHEMA)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 / 0 = 0 (a block zero in both models did not change) and x / 0 = inf."""
    return torch.where(num == 0, torch.zeros_like(num), num / den)


@lru_cache(maxsize=1)
def _cached_folder(folder: str) -> Attention:
    # An actor computes one checkpoint per item against the same base: read the base once per actor.
    return read_attention(Path(folder))


def load_attention(cfg: ExperimentConfig, model: str, checkpoint: str) -> Attention:
    """A model's attention tensors: read from its HF folder, or (``model.name: tiny``, a hub id) from
    the loaded model."""
    # A folder on an object store is read from its node-local copy; a local one is itself.
    folder = local_model_folder(os.path.expanduser(checkpoint))
    if (folder / "config.json").is_file():
        return _cached_folder(str(folder.resolve())) if model == BASE_MODEL else read_attention(folder)
    from dcv.stages import load_stage_model

    return model_attention(load_stage_model(cfg, model, checkpoint))


def weight_change_item(worker, item: dict, context: dict) -> pl.DataFrame:
    """The stage's compute (``dcv.stages``): one checkpoint's WEIGHT_CHANGE_SCHEMA rows."""
    cfg = worker.cfg
    base = load_attention(cfg, BASE_MODEL, context["base"])
    tuned = load_attention(cfg, item["model"], item["checkpoint"])
    w = cfg.weight_change
    heads = head_weight_change(base, tuned, w.tolerance, w.relative)
    keys = {k: item[k] for k in ("model", "trial", "method", "seed", "step")}
    return heads.select(*[pl.lit(v, WEIGHT_CHANGE_SCHEMA[k]).alias(k) for k, v in keys.items()], pl.all())


def weight_change_file(cfg: ExperimentConfig, storage_root: Path, model: str, checkpoint: str) -> Path:
    decides = {
        "checkpoint": checkpoint,
        "base": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
        "weight_change": cfg.weight_change.model_dump(mode="json", exclude={"enabled"}),
    }
    return weight_change_dir(storage_root) / "models" / f"{file_slug(model)}__{content_hash(decides)}.parquet"


def weight_change_work(cfg: ExperimentConfig, results: pl.DataFrame, storage_root: Path) -> pl.DataFrame:
    """One work row per checkpoint (every model of the results table but the base model)."""
    from dcv.models import model_head_grid

    n_layers, n_heads = model_head_grid(cfg.model)
    runs = {t: (m, s) for t, m, s in results.select("trial", "method", "seed").unique().iter_rows()}
    rows = []
    for model, trial, step, checkpoint in list_models(cfg, results).iter_rows():
        if model == BASE_MODEL:
            continue
        path = weight_change_file(cfg, storage_root, model, checkpoint)
        method, seed = runs[trial]
        rows.append(
            {
                "item_id": path.stem,
                "path": str(path),
                "n_rows": n_layers * n_heads,
                "model": model,
                "trial": trial,
                "method": method,
                "seed": seed,
                "step": step,
                "checkpoint": checkpoint,
            }
        )
    schema = {
        **WORK_COLUMNS,
        **{k: WEIGHT_CHANGE_SCHEMA[k] for k in ("model", "trial", "method", "seed", "step")},
        "checkpoint": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def run_weight_change(
    cfg: ExperimentConfig, results: pl.DataFrame, storage_root: Path, progress: Progress = print
) -> StageRun:
    """Every checkpoint's per-head weight change on the stage runner (needs Ray); the assembled table is
    written to ``<storage>/weight_change/weight_change.parquet`` (``StageRun.path``)."""
    p = cfg.patching
    fields = ("patching.num_actors", "patching.num_cpus_per_actor", "weight_change (no GPU)")
    resources = Resources(p.num_actors, p.num_cpus_per_actor, 0.0, fields)
    work = weight_change_work(cfg, results, storage_root)
    context = {"base": cfg.model.name}
    stage = Stage("weight change", cfg, work, WEIGHT_CHANGE_SCHEMA, weight_change_item, resources, context)
    run = run_stage(stage, progress)
    path = write_parquet(
        run.table.sort("model", "layer", "head"), weight_change_dir(storage_root) / WEIGHT_CHANGE_FILE
    )
    return StageRun(run.table, run.total, run.skipped, run.computed, run.model_loads, run.seconds, path)
