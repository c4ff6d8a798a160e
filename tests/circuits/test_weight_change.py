"""Per-head weight change: closed-form numbers, the GQA attribution, the dtype rule, and a planted model
whose weights moved where the probe never reads (big weight change, function unchanged)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import item_effects
from dcv.circuits.weight_change import (
    WEIGHT_CHANGE_SCHEMA,
    Attention,
    head_weight_change,
    model_attention,
    run_weight_change,
    weight_change_item,
)
from dcv.config import ModelConfig, ProbeConfig, TargetTaskConfig, parse_config
from dcv.models import load_model
from dcv.storage import weight_change_dir
from dcv.tasks.probes import build_probe
from tests.helpers import results_of, tiny_config_dict

H, KV, D, MODEL = 4, 2, 2, 3  # query heads, k/v heads (2 query heads each), head size, residual width


def attention(bias: bool = False, seed: int = 0) -> Attention:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        (0, "q", "weight"): torch.randn(H * D, MODEL, generator=g),
        (0, "k", "weight"): torch.randn(KV * D, MODEL, generator=g),
        (0, "v", "weight"): torch.randn(KV * D, MODEL, generator=g),
        (0, "o", "weight"): torch.randn(MODEL, H * D, generator=g),
    }
    if bias:
        for proj, n in (("q", H), ("k", KV), ("v", KV)):
            tensors[(0, proj, "bias")] = torch.randn(n * D, generator=g)
    return Attention(1, H, KV, D, tensors, "float32")


def changed(base: Attention, **tensors) -> Attention:
    new = {k: v.clone() for k, v in base.tensors.items()}
    for name, value in tensors.items():  # "<layer>_<proj>_<weight|bias>"
        layer, proj, kind = name.split("_")
        new[(int(layer), proj, kind)] = value
    return Attention(base.n_layers, base.n_heads, base.n_kv_heads, base.d_head, new, base.dtype)


def rows(table: pl.DataFrame) -> dict[int, dict]:
    return {r["head"]: r for r in table.iter_rows(named=True)}


def test_relative_frobenius_change_of_each_block_in_closed_form():
    base = attention()
    t = {k: v.clone() for k, v in base.tensors.items()}
    q, o = t[(0, "q", "weight")], t[(0, "o", "weight")]
    q[1 * D : 2 * D] *= 1.5  # head 1's q rows: ||dW|| / ||W|| = 0.5
    o[:, 3 * D : 4 * D] = 0  # head 3's o columns removed: 1.0
    tuned = changed(base, **{"0_q_weight": q, "0_o_weight": o})
    got = rows(head_weight_change(base, tuned, tolerance=1e-5, relative=False))
    assert got[1]["q_change"] == pytest.approx(0.5)
    assert got[3]["o_change"] == pytest.approx(1.0)
    for head in range(H):
        assert got[head]["k_change"] == got[head]["v_change"] == 0.0
        assert got[head]["n_params"] == 4 * D * MODEL
    assert got[0]["change"] == got[2]["change"] == 0.0 and got[0]["changed_share"] == 0.0
    # The whole head: ||dW|| over its four blocks / ||W|| over them (its k/v rows are its group's).
    blocks = base.tensors
    group = slice(0, D)  # head 1 reads k/v head 0
    norm_sq = (
        blocks[(0, "q", "weight")][D : 2 * D].square().sum()
        + blocks[(0, "k", "weight")][group].square().sum()
        + blocks[(0, "v", "weight")][group].square().sum()
        + blocks[(0, "o", "weight")][:, D : 2 * D].square().sum()
    )
    delta_sq = (0.5 * blocks[(0, "q", "weight")][D : 2 * D]).square().sum()
    assert got[1]["change"] == pytest.approx(float((delta_sq / norm_sq).sqrt()))
    assert got[1]["changed_share"] == pytest.approx(D * MODEL / (4 * D * MODEL))  # its q rows only
    assert got[3]["changed_share"] == pytest.approx(0.25)


def test_gqa_k_and_v_changes_go_to_every_head_of_the_group():
    base = attention(bias=True)
    k = base.tensors[(0, "k", "weight")].clone()
    v_bias = base.tensors[(0, "v", "bias")].clone()
    k[D : 2 * D] += 0.1  # k/v head 1: read by query heads 2 and 3
    v_bias[D : 2 * D] *= 3.0
    tuned = changed(base, **{"0_k_weight": k, "0_v_bias": v_bias})
    table = head_weight_change(base, tuned, tolerance=1e-5, relative=False)
    got = rows(table)
    assert set(table["kv_shared_by"]) == {H // KV}
    w_k = base.tensors[(0, "k", "weight")][D : 2 * D]
    b_k = base.tensors[(0, "k", "bias")][D : 2 * D]
    expected_k = 0.1 * np.sqrt(D * MODEL) / float((w_k.square().sum() + b_k.square().sum()).sqrt())
    w_v, b_v = base.tensors[(0, "v", "weight")][D : 2 * D], base.tensors[(0, "v", "bias")][D : 2 * D]
    expected_v = float(2 * b_v.norm() / (w_v.square().sum() + b_v.square().sum()).sqrt())
    for head in (2, 3):  # the group shares the change, each head attributed all of it
        assert got[head]["k_change"] == pytest.approx(expected_k)
        assert got[head]["v_change"] == pytest.approx(expected_v)
        assert got[head]["q_change"] == 0.0 and got[head]["o_change"] == 0.0
        # q rows + bias, k rows + bias, v rows + bias, o columns; changed: k rows (D x MODEL) and v bias (D)
        assert got[head]["n_params"] == 4 * D * MODEL + 3 * D
        assert got[head]["changed_share"] == pytest.approx((D * MODEL + D) / (4 * D * MODEL + 3 * D))
    for head in (0, 1):
        assert got[head]["change"] == 0.0


def test_bf16_compares_as_stored_and_the_tolerance_decides_the_share():
    base = attention()
    small = {f"0_{p}_weight": base.tensors[(0, p, "weight")] + 1e-6 for p in "qkvo"}
    tuned = changed(base, **small)
    assert set(head_weight_change(base, tuned, 1e-5, False)["changed_share"]) == {0.0}  # below tolerance
    assert set(head_weight_change(base, tuned, 1e-7, False)["changed_share"]) == {1.0}
    # In bf16 the same update is below the stored values' resolution: nothing changed at all.
    bf = Attention(1, H, KV, D, {k: v.bfloat16() for k, v in base.tensors.items()}, "bfloat16")
    bf_small = {f"0_{p}_weight": (bf.tensors[(0, p, "weight")].float() + 1e-6).bfloat16() for p in "qkvo"}
    bf_tuned = changed(bf, **bf_small)
    table = head_weight_change(bf, bf_tuned, 1e-7, False)
    assert set(table["change"]) == {0.0} and set(table["changed_share"]) == {0.0}
    # Relative tolerance: |dW| > tol |W_base|.
    scaled = changed(base, **{"0_q_weight": base.tensors[(0, "q", "weight")] * 1.01})
    relative = head_weight_change(base, scaled, 0.005, True)
    assert rows(relative)[0]["changed_share"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def planted(tokenizer):
    """(base, checkpoint, (layer, head)): the tiny model with one head's o_proj columns zeroed in both, and
    in the checkpoint that head's q rows moved by a large random matrix. The head's output never reaches the
    residual stream, so nothing the probe reads can change."""
    base = load_model(ModelConfig(name="tiny"), tokenizer)
    layer, head = 1, 2
    d_head = model_shape(base).d_head
    cols = slice(head * d_head, (head + 1) * d_head)
    with torch.no_grad():
        base.model.layers[layer].self_attn.o_proj.weight[:, cols] = 0
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        q = tuned.model.layers[layer].self_attn.q_proj.weight
        q[cols] += 3.0 * torch.randn(q[cols].shape, generator=g)
    return base, tuned, (layer, head)


def test_planted_weight_change_where_the_probe_never_reads(planted, tokenizer):
    base, tuned, moved = planted
    table = head_weight_change(model_attention(base), model_attention(tuned), 1e-5, False)
    at = table.filter((pl.col("layer") == moved[0]) & (pl.col("head") == moved[1])).row(0, named=True)
    assert at["q_change"] > 1.0 and at["change"] > 0.3 and at["changed_share"] == pytest.approx(0.25)
    others = table.filter((pl.col("layer") != moved[0]) | (pl.col("head") != moved[1]))
    columns = ("q_change", "k_change", "v_change", "o_change", "change", "changed_share")
    assert max(others.select(pl.col(*columns).abs().max()).row(0)) < 1e-7
    # The function did not move: every head's per-item patching parts (and the gaps) agree in both models.
    items = build_probe(ProbeConfig(name="ioi", n_items=8, seed=0), tokenizer, TargetTaskConfig()).items
    before, after = item_effects(base, items, "exact"), item_effects(tuned, items, "exact")
    assert (before.denominator - after.denominator).abs().max() < 1e-6
    assert (before.delta - after.delta).abs().max() < 1e-6
    index = before.heads.index(moved)
    assert before.delta[index].abs().max() < 1e-6  # it never did anything: v_h is undefined, cmap_h 0


def saved_config(planted, folder: Path) -> dict:
    """The planted base and checkpoint as HF folders under ``folder`` (base/, ckpt/), and a config whose
    base model is that folder, with the weight-change stage on."""
    base, tuned, _ = planted
    base.save_pretrained(folder / "base")
    tuned.save_pretrained(folder / "ckpt")
    raw = tiny_config_dict(folder / "storage")
    raw["model"] = {"name": str(folder / "base")}
    raw["weight_change"] = {"enabled": True}
    return raw


def test_compute_function_reads_the_safetensors_of_both_folders(planted, tmp_path):
    base, tuned, _ = planted
    worker = SimpleNamespace(cfg=parse_config(saved_config(planted, tmp_path)))
    item = {"model": "sft-a@4", "trial": "sft-a", "method": "sft", "seed": 0, "step": 4}
    item["checkpoint"] = str(tmp_path / "ckpt")
    table = weight_change_item(worker, item, {"base": str(tmp_path / "base")})
    assert table.schema == WEIGHT_CHANGE_SCHEMA and table.height == 2 * 4
    assert set(table["model"]) == {"sft-a@4"} and set(table["dtype"]) == {"float32"}
    in_memory = head_weight_change(model_attention(base), model_attention(tuned), 1e-5, False)
    assert table.drop("model", "trial", "method", "seed", "step").equals(in_memory)


def test_stage_computes_each_checkpoint_once(ray_cluster, planted, tmp_path):
    raw = saved_config(planted, tmp_path)
    raw["patching"].update(num_actors=1, num_cpus_per_actor=1)
    cfg = parse_config(raw)
    results = results_of({("sft-a", 0): tmp_path / "base", ("sft-a", 4): tmp_path / "ckpt"})
    storage = Path(cfg.storage.root)
    messages: list[str] = []
    run = run_weight_change(cfg, results, storage, messages.append)
    assert run.computed == 1 and set(run.table["model"]) == {"sft-a@4"}  # step 0 is the base model
    assert pl.read_parquet(weight_change_dir(storage) / "weight_change.parquet").height == 8
    again = run_weight_change(cfg, results, storage, messages.append)
    assert again.computed == 0 and again.skipped == 1 and again.table.equals(run.table)
