"""Calibration on synthetic patching tables whose planted damage is known, and planting on a real model.

The synthetic probe has 8 heads; heads 0.0, 0.1 and 0.2 (effects 1.0, 0.8, 0.6) are the base circuit. A
head scaled by alpha has effect alpha x e, and the probe's gap (2.0 in the base) falls by the effect the
plant removed, as when the removed heads also drive later ones: so the remaining heads' shares of the
damaged model's own gap grow, and relative V reads negative when the top head is ablated (docs/method.md
"Calibration: controls that can fail"). Per-item LDs scale with the gap."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import polars as pl
import pytest
import torch

from dcv.calibration import CALIBRATION_SCHEMA, calibration_table, plan_plants, plant_damage, plant_precision
from dcv.config import parse_config
from dcv.detection import CALIBRATION_METRICS, PRECISION, failing_metrics, plant_table, verdict_table
from dcv.results import build_results_table
from dcv.tables import CIRCUITS_SCHEMA, EFFECTS_SCHEMA
from tests.helpers import tiny_config_dict

SHAPE = (2, 4)  # 8 heads
BASE = [1.0, 0.8, 0.6, 0.05, 0.04, 0.03, 0.02, 0.01]  # heads 0.0, 0.1, 0.2 carry the behaviour
CIRCUIT = [(0, 0), (0, 1), (0, 2)]
GAP = 2.0
N = 24
ALPHAS = [0.5, 0.0]


def _config(tmp_path, ci_level: float = 0.95):
    raw = tiny_config_dict(tmp_path)
    raw["patching"]["methods"] = ["exact"]
    raw["circuits"].update(n_bootstrap=300, noise_floor_resamples=200, ci_level=ci_level)
    return parse_config(raw)


def planted_effects(heads, alpha: float) -> list[float]:
    return [e * alpha if divmod(i, SHAPE[1]) in set(heads) else e for i, e in enumerate(BASE)]


def synthetic_tables(
    plants, jitter: float = 1e-4, shrink: float = 0.0
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(results, effects, circuits) of the base and every plant on probe ioi. Every model shares the base's
    per-item noise (the same items); the precision copy adds ``jitter`` x N(0, 1) to each delta and LD, and
    has every head's effect scaled by 1 - ``shrink``."""
    noise = np.random.default_rng(0).normal(0, 0.2, (len(BASE), N))
    base_ld = 3.0 + np.random.default_rng(1).normal(0, 0.5, N)
    jitter_rng = np.random.default_rng(2)
    models = [("base", BASE, GAP, 0.0)]
    for plant in plants:
        effects = planted_effects(plant.heads, plant.alpha)
        removed = sum(BASE) - sum(effects)
        if plant.kind == PRECISION:
            effects = [e * (1 - shrink) for e in effects]
        models.append((plant.name, effects, GAP - removed, jitter if plant.kind == PRECISION else 0.0))
    effect_rows, circuit_rows, result_rows, lds = [], [], [], []
    for name, effects, gap, tiny in models:
        model = name if name == "base" else f"{name}@1"
        delta = np.array(effects)[:, None] * (1 + noise) + tiny * jitter_rng.normal(0, 1, (len(BASE), N))
        for i, row in enumerate(delta):
            layer, head = divmod(i, SHAPE[1])
            effect_rows.append(
                {
                    "model": model,
                    "probe": "ioi",
                    "method": "exact",
                    "layer": layer,
                    "head": head,
                    "effect": float(row.mean() / gap),
                    "n_items": N,
                    "trial": name,
                    "step": 1,
                    "checkpoint": "x",
                    "item_delta": row.tolist(),
                    "item_denominator": [gap] * N,
                }
            )
        # The model's own circuit: its 3 heads of largest |mean delta|, as a top-k circuit stage finds it.
        own = [divmod(int(i), SHAPE[1]) for i in np.argsort(-np.abs(delta.mean(axis=1)), kind="stable")[:3]]
        circuit_rows.append(
            {
                "model": model,
                "trial": name,
                "step": 1,
                "probe": "ioi",
                "method": "exact",
                "size": 3,
                "faithfulness": 0.9,
                "reached_tau": True,
                "base_circuit_faithfulness": 0.9,
                "layers": [la for la, _ in own],
                "heads": [h for _, h in own],
            }
        )
        metrics = {}
        result_rows.append(
            {
                "trial": name,
                "method": "base" if name == "base" else "planted",
                "learning_rate": 0.0,
                "seed": 0,
                "init": "base",
                "step": 0 if name == "base" else 1,
                "checkpoint": "b",
                "metrics": metrics,
            }
        )
        lds.append((base_ld * gap / GAP + tiny * jitter_rng.normal(0, 1, N)).tolist())
    results = build_results_table(result_rows)
    by_trial = dict(zip([r["trial"] for r in result_rows], lds, strict=True))
    results = results.with_columns(
        pl.Series("probe/ioi/item_ld", [by_trial[t] for t in results["trial"]], dtype=pl.List(pl.Float64))
    )
    return (
        results,
        pl.DataFrame(effect_rows, schema=EFFECTS_SCHEMA),
        pl.DataFrame(circuit_rows, schema=CIRCUITS_SCHEMA),
    )


def calibrate(cfg, plants, jitter: float = 1e-4, shrink: float = 0.0) -> pl.DataFrame:
    return calibration_table(cfg, plants, *synthetic_tables(plants, jitter, shrink), SHAPE)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    plants = plan_plants({"ioi": CIRCUIT}, SHAPE, [1, 2], ALPHAS, seed=0)
    return calibrate(_config(tmp_path_factory.mktemp("cal")), plants)


def _row(table: pl.DataFrame, kind: str, k: int, alpha: float, metric: str) -> dict:
    rows = table.filter(
        (pl.col("kind") == kind)
        & (pl.col("k") == k)
        & (pl.col("alpha") == alpha)
        & (pl.col("metric") == metric)
    )
    assert rows.height == 1
    return rows.row(0, named=True)


def test_graded_plants_give_closed_form_detection_curves(graded):
    assert graded.schema == CALIBRATION_SCHEMA
    # 1 precision copy + (circuit, random) x k in {1, 2} x alpha in {0.5, 0}, each on every metric.
    assert graded.height == 9 * len(CALIBRATION_METRICS)
    assert graded.unique(["kind", "k", "alpha", "metric"]).height == graded.height
    # Absolute V of a circuit plant = (1 - alpha) x the planted heads' share of the circuit's |e| (2.4).
    for k, share in ((1, 1.0 / 2.4), (2, 1.8 / 2.4)):
        for alpha in ALPHAS:
            row = _row(graded, "circuit", k, alpha, "circuit_vulnerability_abs")
            assert row["value"] == pytest.approx((1 - alpha) * share, abs=0.02)
            assert row["detected"] and row["ci_low"] > row["base_value"] == 0.0
            assert row["planted_in_top_k"] == k
    # Heads outside the circuit leave every base-circuit head's effect as it was: absolute V exactly 0.
    random_v = graded.filter((pl.col("kind") == "random") & (pl.col("metric") == "circuit_vulnerability_abs"))
    assert random_v["value"].abs().max() == pytest.approx(0.0, abs=1e-12) and not random_v["detected"].any()
    # The weakest damage detected: the top head halved.
    v_abs = _row(graded, "circuit", 1, 0.5, "circuit_vulnerability_abs")
    assert (v_abs["min_detectable_k"], v_abs["min_detectable_alpha"]) == (1, 0.5)
    # Halving the top head leaves it in the model's own top-3: P does not see it; ablating it does (2/3).
    assert not _row(graded, "circuit", 1, 0.5, "preservation")["detected"]
    p = _row(graded, "circuit", 1, 0.0, "preservation")
    assert p["value"] == pytest.approx(2 / 3) and p["detected"]
    assert (p["min_detectable_k"], p["min_detectable_alpha"]) == (1, 0.0)
    # Both top heads ablated: the gap falls to 0.2 of 2.0, below lost_fraction: P, J, relative V null.
    lost = _row(graded, "circuit", 2, 0.0, "preservation")
    assert lost["lost"] and lost["value"] is None and not lost["detected"]


def test_relative_v_fails_its_positive_control_and_absolute_v_passes(graded):
    # Top head ablated: gap 1.0, so heads 0.1 and 0.2 read v = 1 - 2.0 / 1.0 = -1 relative to it:
    # V_rel = (1 x 1 - 1.4 x 1) / 2.4 = -1/6 (up to the items' noise), the wrong way.
    rel = _row(graded, "circuit", 1, 0.0, "circuit_vulnerability")
    assert rel["value"] == pytest.approx(-1 / 6, abs=0.05) and rel["ci_high"] < 0
    assert rel["passes_positive_control"] is False and rel["failure"].startswith("moves the wrong way")
    assert _row(graded, "circuit", 1, 0.0, "circuit_vulnerability_abs")["passes_positive_control"]
    failing = failing_metrics(graded)
    assert failing["circuit_vulnerability"].startswith("ioi: moves the wrong way when the top circuit heads")
    # Every probe item stays right (LD > 0): accuracy cannot tell a plant from the base, or circuit from
    # random plants (both 0 on every draw); mean LD can. Detecting nothing is this calibration's power, not
    # an instrument that measures the wrong thing: forgetting stays in the answer.
    forgetting = _row(graded, "circuit", 1, 0.0, "forgetting")
    assert forgetting["failure"] == "does not detect the top circuit heads ablated at any k (1, 2)"
    assert forgetting["passes_positive_control"] is False and not forgetting["invalid"]
    assert set(failing) == {"circuit_vulnerability"}
    # Judged only on the probes whose circuits enter the answer's means: a probe below tau (here: none in
    # the means) cannot fail P, J or V there.
    assert failing_metrics(graded, circuit_probes=[]) == {}
    assert set(failing_metrics(graded, circuit_probes=["ioi"])) == {"circuit_vulnerability"}
    verdicts = {r["metric"]: r for r in verdict_table(graded).iter_rows(named=True)}
    assert set(verdicts) == set(CALIBRATION_METRICS) and verdicts["preservation"]["passes_positive_control"]
    assert verdicts["circuit_vulnerability_abs"]["separates_at_k"] == "1, 2"
    assert verdicts["preservation"]["separates_at_k"] == "1"  # k = 2 ablated: lost, P not measured


def test_circuit_plants_separate_from_random_plants_where_the_metric_can_tell(graded):
    for metric in ("circuit_vulnerability_abs", "preservation", "jaccard", "forgetting_ld"):
        row = _row(graded, "circuit", 1, 0.0, metric)
        assert row["separates"] and row["separation_ci_low"] > 0, metric
    forgetting = _row(graded, "circuit", 1, 0.0, "forgetting")
    assert forgetting["separation"] == 0.0 and not forgetting["separates"]
    # Relative V ranks the ablated circuit below random plants: it separates the wrong way.
    rel = _row(graded, "circuit", 1, 0.0, "circuit_vulnerability")
    assert rel["separation_ci_high"] < 0 and not rel["separates"]
    # Separation is stated on circuit rows only.
    assert graded.filter(pl.col("kind") != "circuit")["separation"].is_null().all()
    wide = plant_table(graded)
    assert wide.height == 9 and set(CALIBRATION_METRICS) <= set(wide.columns)
    top = wide.filter((pl.col("kind") == "circuit") & (pl.col("k") == 1) & (pl.col("alpha") == 0.0)).row(
        0, named=True
    )
    assert top["preservation"] == "0.667 [0.667, 0.667] *"


def test_the_precision_copy_is_not_flagged_and_an_over_sensitive_instrument_flags_it(
    graded, tmp_path, monkeypatch
):
    precision = graded.filter(pl.col("kind") == PRECISION)
    assert precision.height == len(CALIBRATION_METRICS)
    v = precision.filter(pl.col("metric") == "circuit_vulnerability_abs").row(0, named=True)
    assert 0 < abs(v["value"]) < 1e-3  # it differs, at precision
    assert not precision["flagged"].any()
    # The same copy judged without the noise margin (any change whose CI excludes the base counts: on the
    # same items a precision-level change has a CI that does) is flagged: the negative control can fail.
    # As on SmolLM2 (the bf16 round trip moved V by 0.0015 [0.0007, 0.0024]): a copy 0.2% smaller everywhere.
    plants = plan_plants({"ioi": CIRCUIT}, SHAPE, [1], [0.0], seed=0)
    tiny = calibrate(_config(tmp_path), plants, shrink=0.002)
    assert not tiny.filter(pl.col("kind") == PRECISION)["flagged"].any()
    monkeypatch.setattr("dcv.calibration.noise_margins", lambda *args: {})
    broken = calibrate(_config(tmp_path), plants, shrink=0.002)
    assert broken.filter((pl.col("kind") == PRECISION) & pl.col("flagged")).height >= 1
    monkeypatch.undo()
    # Noise on the items, however large, is what the CI allows for; a "copy" that shrank every head by
    # 25% is damage beyond the noise margin, and the instrument flags it (absolute V = 0.25).
    noisy = calibrate(_config(tmp_path), plants, jitter=0.05)
    assert not noisy.filter(pl.col("kind") == PRECISION)["flagged"].any()
    shrunk = calibrate(_config(tmp_path), plants, shrink=0.25)
    flagged = shrunk.filter((pl.col("kind") == PRECISION) & pl.col("flagged"))["metric"].to_list()
    assert "circuit_vulnerability_abs" in flagged


def test_plan_names_every_alpha_apart(tiny_model):
    plants = plan_plants({"ioi": CIRCUIT}, SHAPE, [1, 2, 5], [0.5, 0.0], seed=0)
    kinds = [(p.kind, p.k, p.alpha) for p in plants]
    assert kinds[:5] == [
        (PRECISION, 0, 1.0),
        ("circuit", 1, 0.5),
        ("random", 1, 0.5),
        ("circuit", 1, 0.0),
        ("random", 1, 0.0),
    ]
    assert kinds[-2:] == [("random", 5, 0.5), ("random", 5, 0.0)]  # 3 circuit heads: no circuit k = 5
    assert len({p.name for p in plants}) == len(plants)
    assert {p.name for p in plants[:3]} == {
        "planted-precision",
        "planted-ioi-circuit-k1-a0.5",
        "planted-ioi-random-k1-a0.5",
    }
    assert all(not set(p.heads) & set(CIRCUIT) for p in plants if p.kind == "random")
    # One random head set per k, graded over the alphas.
    random_2 = {p.heads for p in plants if p.kind == "random" and p.k == 2}
    assert len(random_2) == 1
    assert plan_plants({"ioi": CIRCUIT}, SHAPE, [2], [0.0], seed=0) == plan_plants(
        {"ioi": CIRCUIT}, SHAPE, [2], [0.0], seed=0
    )


def test_plant_damage_and_precision(tiny_model):
    model = copy.deepcopy(tiny_model)
    d = model.config.hidden_size // model.config.num_attention_heads
    before = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    plant_damage(model, [(1, 2)], 0.5)
    after = model.model.layers[1].self_attn.o_proj.weight
    assert np.allclose(after[:, 2 * d : 3 * d].detach().numpy(), 0.5 * before[:, 2 * d : 3 * d].numpy())
    assert np.array_equal(after[:, : 2 * d].detach().numpy(), before[:, : 2 * d].numpy())
    # float32 weights through bfloat16 and back: changed, each by at most 2^-8 of itself.
    base = dict(tiny_model.named_parameters())
    rounded = plant_precision(copy.deepcopy(tiny_model))
    changed = 0
    for name, weight in rounded.named_parameters():
        diff = (weight - base[name]).abs()
        assert bool((diff <= base[name].abs() * 2**-8).all()), name
        changed += int((diff > 0).sum())
    assert changed > 0
    # 16-bit weights (where that round trip is exact): one unit in the last place, up or down.
    half = plant_precision(copy.deepcopy(tiny_model).to(torch.bfloat16), seed=1)
    for name, weight in half.named_parameters():
        start = base[name].to(torch.bfloat16)
        up, down = torch.nextafter(start, start + 1), torch.nextafter(start, start - 1)
        assert bool(((weight == up) | (weight == down)).all()), name


def test_a_scalar_alpha_is_read_as_alphas_with_a_warning(tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["calibration"] = {"enabled": False, "alpha": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert parse_config(raw).calibration.alphas == [0.5]
    assert any(issubclass(w.category, FutureWarning) and "alphas" in str(w.message) for w in caught)
    raw["calibration"] = {"alphas": [0.5, 0.5]}
    with pytest.raises(Exception, match="duplicates"):
        parse_config(raw)


def test_the_report_states_curves_verdicts_separation_and_false_positives(graded):
    from dcv.analysis.answer import calibration_findings

    probe, precision = calibration_findings(graded)
    assert probe.startswith(
        "on ioi, the weakest planted damage detected: circuit vulnerability V (absolute) from the top 1 "
        "head(s) scaled by 0.5"
    )
    assert "circuit preservation P from the top 1 head(s) ablated" in probe
    assert "circuit plants rank above random plants of the same size under circuit vulnerability V " in probe
    assert "failing the positive control: circuit vulnerability V (relative): moves the wrong way" in probe
    assert "forgetting (probe accuracy): does not detect" in probe
    assert precision == (
        "the base at numerical precision (its weights through bfloat16), the negative control, was flagged "
        f"in 0 of {len(CALIBRATION_METRICS)} metric checks"
    )
