"""The patching-method registry (dcv.circuits.methods): its records key the work items' cache and are the
only source of the method names the config accepts."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dcv.circuits import methods
from dcv.circuits.methods import (
    CIRCUIT_METHODS,
    METHODS,
    RANKING_METHODS,
    PatchingMethod,
    build_registry,
    check_keys,
    setting_paths,
)
from dcv.circuits.pipeline import build_item_id
from dcv.config import PATCHING_METHODS, ConfigError, ExperimentConfig, parse_config
from dcv.storage import content_hash, file_slug, probe_key
from tests.helpers import tiny_config_dict

# A change of every setting some method keys. A new key needs an entry here (the first test says so).
CHANGES: dict[str, Callable[[Any], Any]] = {
    "patching.ig_steps": lambda steps: steps + 1,
    "patching.batch_size": lambda size: size + 1,
    "circuits.mask": lambda mask: mask.model_copy(update={"seed": mask.seed + 1}),
    "model.name": lambda name: name + "-other",
    "model": lambda model: model.model_copy(update={"revision": "other"}),
}
CHECKPOINT = ("sft-lr1e-05-seed0@10", "/ckpt/sft")  # a checkpoint: its ids do not hold the base's config


def with_setting(cfg, path: str, change: Callable[[Any], Any]):
    """``cfg`` with the setting at dotted ``path`` replaced by ``change(old value)``."""
    head, _, rest = path.partition(".")
    value = getattr(cfg, head)
    return cfg.model_copy(update={head: with_setting(value, rest, change) if rest else change(value)})


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    raw = tiny_config_dict(Path("unused"))
    raw["patching"]["methods"] = list(METHODS)
    return parse_config(raw)


def item_id(cfg: ExperimentConfig, method: str) -> str:
    return build_item_id(cfg, *CHECKPOINT, "ioi", method, (0, 8))


def test_a_keyed_setting_changes_the_item_ids_of_the_methods_that_key_it_only(cfg):
    keyed = {path for m in METHODS.values() for paths in m.keys.values() for path in setting_paths(paths)}
    assert keyed - set(CHANGES) == set(), "add a change of each new key's setting to CHANGES"
    for path, change in CHANGES.items():
        changed = with_setting(cfg, path, change)
        for method in METHODS.values():
            keys = {p for paths in method.keys.values() for p in setting_paths(paths)}
            assert (item_id(changed, method.name) != item_id(cfg, method.name)) == (path in keys), (
                method.name,
                path,
            )


def test_a_fixed_entry_changes_its_methods_item_ids(cfg, monkeypatch):
    """A method's definition changed: bumping its fixed entry must retire the stored items."""
    for method in METHODS.values():
        before = item_id(cfg, method.name)
        monkeypatch.setitem(METHODS, method.name, replace(method, fixed={**method.fixed, "version": "2"}))
        assert item_id(cfg, method.name) != before, method.name


def test_settings_that_change_no_number_leave_the_ids(cfg):
    moved = cfg.model_copy(update={"model": cfg.model.model_copy(update={"cache_dir": Path("/elsewhere")})})
    wider = with_setting(cfg, "patching.head_chunk_size", lambda n: n + 1)
    for method in METHODS:
        assert item_id(moved, method) == item_id(wider, method) == item_id(cfg, method), method


def legacy_item_id(cfg, model, checkpoint, probe, method, heads, head_index=()) -> str:
    """``build_item_id`` as it was written before the registry (2026-12-07, c8bd805)."""
    decides = {
        **probe_key(cfg, probe),
        "model": model,
        "checkpoint": checkpoint,
        "model_config": (
            cfg.model.model_dump(mode="json", exclude={"cache_dir"}) if model == "base" else None
        ),
        "dtype": cfg.model.dtype,
        "method": method,
        "heads": list(heads),
        **({"head_index": [int(i) for i in head_index]} if len(head_index) else {}),
        "ig_steps": cfg.patching.ig_steps if method == "ig" else None,
        "mask": cfg.circuits.mask.model_dump(mode="json") if method == "mask" else None,
    }
    if method == "cmap":
        decides["base"] = [cfg.model.name, cfg.model.model_dump(mode="json", exclude={"cache_dir"})]
        decides["hook"] = "hook_attn_out"
    span = f"top{len(head_index)}" if len(head_index) else f"h{heads[0]:05d}-{heads[1]:05d}"
    return f"{file_slug(model)}__{probe}__{method}__{span}__{content_hash(decides)}"


def test_item_ids_are_those_stored_before_the_registry(cfg):
    """Stored patching items stay valid: the registry's keys give every method its old id, but mask's,
    renamed once when it came to key patching.batch_size (its minibatches)."""
    for model, checkpoint in [("base", "tiny"), CHECKPOINT]:
        for method in ("exact", "attribution", "ig", "mask", "cmap"):  # the methods of that time
            if method == "mask":
                assert build_item_id(cfg, model, checkpoint, "ioi", method, (0, 8)) != legacy_item_id(
                    cfg, model, checkpoint, "ioi", method, (0, 8)
                )
                continue
            for heads, index in [((0, 8), ()), ((1, 6), (1, 3, 5))]:
                args = (cfg, model, checkpoint, "ioi", method, heads, index)
                assert build_item_id(*args) == legacy_item_id(*args)


def test_a_record_must_declare_its_keys_and_its_cost_and_name_real_settings():
    compute = "dcv.circuits.pipeline:compute_patched_item"

    def cost(passes, cfg):
        return passes.full

    with pytest.raises(TypeError, match="keys"):
        PatchingMethod("new", "ranking", compute=compute, cost=cost)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="cost"):  # unpriced, `dcv plan` and `dcv run` would fail
        PatchingMethod("new", "ranking", keys={}, compute=compute)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="cost must be a function"):
        PatchingMethod("new", "ranking", keys={}, compute=compute, cost=1.0)  # type: ignore[arg-type]
    typo = PatchingMethod("new", "ranking", keys={"steps": "patching.ig_stepz"}, compute=compute, cost=cost)
    with pytest.raises(ValueError, match=r"'new': key 'steps' names 'patching.ig_stepz'"):
        check_keys(ExperimentConfig, [typo])
    check_keys(ExperimentConfig, [replace(typo, keys={"steps": "patching.ig_steps"})])
    with pytest.raises(ValueError, match="overwrite"):
        PatchingMethod("new", "ranking", keys={"heads": "patching.ig_steps"}, compute=compute, cost=cost)
    with pytest.raises(ValueError, match="kind 'ranked' is unknown"):
        PatchingMethod("new", "ranked", keys={}, compute=compute, cost=cost)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module:function"):
        PatchingMethod(
            "new", "ranking", keys={}, compute="dcv.circuits.pipeline.compute_patched_item", cost=cost
        )
    with pytest.raises(ValueError, match="registered twice"):
        build_registry([typo, typo])


def test_every_compute_takes_base_model_items_item_cfg():
    for method in METHODS.values():
        params = list(inspect.signature(method.compute_function()).parameters)
        assert params == ["base", "model", "items", "item", "cfg"], method.name


def test_the_config_accepts_exactly_the_registered_methods(tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["patching"]["methods"] = list(METHODS)
    assert parse_config(raw).patching.methods == list(METHODS)
    raw["patching"]["methods"] = ["exact", "nope"]
    names = [repr(m) for m in METHODS]
    listed = ", ".join(names[:-1]) + f" or {names[-1]}"
    with pytest.raises(ConfigError, match=rf"patching.methods\[1\].*{listed}"):
        parse_config(raw)
    # What each kind does, as the stages read it.
    assert RANKING_METHODS == PATCHING_METHODS and {"exact", "attribution", "ig"} <= set(RANKING_METHODS)
    assert "mask" in CIRCUIT_METHODS and "mask" not in RANKING_METHODS and "cmap" not in CIRCUIT_METHODS
    assert methods.CROSS_MODEL_METHODS == ("cmap",) and methods.MASK_METHODS == ("mask",)
    assert [m for m in METHODS.values() if m.whole_model] == [METHODS["mask"]]


def numeric_settings(section, prefix: str) -> dict[str, Any]:
    """Every numeric setting under ``section``, by dotted path."""
    out: dict[str, Any] = {}
    for name, value in section:
        path = f"{prefix}.{name}"
        if hasattr(value, "model_fields"):
            out |= numeric_settings(value, path)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[path] = value
    return out


def test_every_setting_that_changes_a_methods_numbers_is_in_its_key(cfg, planted_model, planted_items):
    """The other direction: a setting that changes a method's numbers but is not in its key would let a
    changed config reuse stale items. Each method is computed on the planted model (cmap: against a
    damaged copy) with each numeric setting of the sections the computes read changed, one at a time."""
    from dcv.calibration import plant_damage
    from dcv.circuits.decoder import model_shape
    from tests.helpers import PLANTED

    # Small and sensitive: 6 items in minibatches of 2; masks that move far in 3 steps (Adam's first
    # steps are about lr whatever the gradient) and are not annealed, so they stay off 0 and 1.
    mask = {"steps": 3, "t_end": 1.0, "lr": 1.0, "logit_init": 0.5}
    small = with_setting(cfg, "circuits.mask", lambda m: m.model_copy(update=mask))
    small = with_setting(small, "patching", lambda p: p.model_copy(update={"batch_size": 2, "ig_steps": 2}))
    items = planted_items[:6]
    checkpoint = plant_damage(copy.deepcopy(planted_model), [min(PLANTED)], 0.5)
    shape = model_shape(planted_model)
    item = {"model": CHECKPOINT[0], "trial": "t", "step": 1, "checkpoint": CHECKPOINT[1], "probe": "ioi"}
    item |= {"head_start": 0, "head_end": 2, "n_layers": shape.n_layers, "n_heads": shape.n_heads}
    settings = numeric_settings(small.patching, "patching") | numeric_settings(
        small.circuits.mask, "circuits.mask"
    )

    def effects(c: ExperimentConfig, method: str) -> list[float]:
        compute = METHODS[method].compute_function()
        return compute(planted_model, checkpoint, items, item | {"method": method}, c)["effect"].to_list()

    moved = set()
    for method in METHODS:
        before = effects(small, method)
        for path in settings:
            changed = with_setting(small, path, lambda v: v + 1 if isinstance(v, int) else v / 2)
            if effects(changed, method) != pytest.approx(before, rel=1e-4, abs=1e-6):
                moved.add((method, path))
                assert item_id(changed, method) != item_id(small, method), (method, path)
    assert {("ig", "patching.ig_steps"), ("mask", "circuits.mask.seed")} <= moved  # the check can see
