"""The head-effect methods of ``patching.methods``: one record each, read by the config, the patching
pipeline (work grid, cache keys, compute), the circuits stage, the curves, calibration and the analysis.
Adding a method = one record + its compute function (docs/development.md, "Recipe: a new patching method").

A method's ``kind`` says what its numbers are and so what every stage does with them:

- ``ranking``: an effect e_h per head of one model, with per-item parts (``dcv.circuits.patching``); it
  ranks heads, so its circuit is a top-k (``dcv.circuits.circuit.select_circuit``) and it has
  faithfulness curves (``dcv.circuits.curves``). Work items are chunks of heads.
- ``mask``: one mask learned over all heads of one model (``dcv.circuits.mask``): the circuit is the set
  {h : m_h >= 0.5}, not a ranking; no per-item parts (one pseudo-item of 1), so the analysis reads the
  probe's real gap elsewhere. A work item is never split (the heads are learned together).
- ``cross_model``: a checkpoint's heads patched against the base model (cmap): a change measure, not a
  circuit. Not run on the base (0 by construction); its items run as a stage of their own after the
  others, with the base model beside each checkpoint, and go to their own table (one row per head and
  direction, ``dcv.tables.CMAP_SCHEMA``).

``keys`` are the config settings (dotted paths into ``dcv.config.ExperimentConfig``) that decide the
method's numbers beyond what decides every item's (model, checkpoint, probe, heads, dtype:
``dcv.circuits.pipeline.build_item_id``). They go into the hash that names the method's stored items, so a
changed setting never reuses a stale item. A record must declare them (``keys={}`` for none), and
``dcv.config`` refuses, on import, a record whose keys name no config setting. ``fixed`` entries are
constants hashed too: change one when the method's definition changes, so stored items of the old
definition are not reused.

``cost`` is what ``dcv plan`` (and so ``dcv run``'s first line) prices the method at, per model and probe,
in the plan's units (``Passes``); a record must have one, so a new method is never left unpriced.

This module is pure (no torch, no config import: ``dcv.config`` reads it); ``compute`` names the compute
function by import path, loaded only where an item is computed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["ranking", "mask", "cross_model"]
KINDS: tuple[Kind, ...] = ("ranking", "mask", "cross_model")
# The entries every item's hash holds whatever its method (``dcv.circuits.pipeline.build_item_id``): a
# method's key may not take one of these names, or it would overwrite it.
SHARED_KEYS = (
    "probe",
    "target_task",
    "model",
    "checkpoint",
    "model_config",
    "dtype",
    "method",
    "heads",
    "head_index",
)
# Settings that never change a number (where converted weights are cached): left out of a keyed section.
UNKEYED = {"model": {"cache_dir"}}


@dataclass(frozen=True)
class Passes:
    """What ``dcv.plan.patching_seconds`` prices a method in, for one model and probe at one device."""

    full: float  # seconds of one forward of every item, whole prompts
    after: float  # the same from each item's first clean/corrupted difference on (a prefix-cached pass)
    heads: int  # the model's attention heads
    batch_share: float  # one minibatch of patching.batch_size items as a share of the probe's items


@dataclass(frozen=True)
class PatchingMethod:
    name: str  # its name in ``patching.methods`` and the tables' ``method`` column
    kind: Kind
    # Cache-key entries: name in the item hash -> the config setting(s) it holds (one path: its value;
    # several: the list of their values). Required: ``{}`` says the method has no settings of its own.
    keys: Mapping[str, str | tuple[str, ...]] = field(kw_only=True)
    # "module:function" with the signature ``(base, model, items, item, cfg) -> rows`` (base: the base
    # model beside ``model`` for a cross-model method, else None); imported only when an item is computed.
    compute: str = field(kw_only=True)
    # Seconds of its compute for one model and probe, ``(passes, cfg) -> float``, beyond the clean and
    # corrupted forwards a ranking or mask method caches first (dcv.plan adds those; a cross-model method
    # caches none and runs on every checkpoint but the base). A backward of the frozen model costs about
    # one forward (activation gradients only).
    cost: Callable[[Passes, Any], float] = field(kw_only=True)
    fixed: Mapping[str, str] = field(default_factory=dict, kw_only=True)  # constants in the hash
    about: str = field(default="", kw_only=True)  # what it measures, in a few words

    def __post_init__(self) -> None:
        where = f"patching method {self.name!r}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is unknown; choose one of {', '.join(KINDS)}")
        if not isinstance(self.keys, Mapping):
            raise TypeError(f"{where}: keys must map hash entries to config settings (got {self.keys!r})")
        clash = sorted((set(self.keys) | set(self.fixed)) & set(SHARED_KEYS))
        if clash:
            raise ValueError(f"{where}: keys {clash} would overwrite the entries every item's hash holds")
        for name, paths in self.keys.items():
            if not setting_paths(paths) or not all(isinstance(p, str) and p for p in setting_paths(paths)):
                raise ValueError(f"{where}: key {name!r} names no config setting (got {paths!r})")
        module, _, function = self.compute.partition(":")
        if not module or not function:
            raise ValueError(f"{where}: compute {self.compute!r} must be 'module:function'")
        if not callable(self.cost):
            raise TypeError(f"{where}: cost must be a function (passes, cfg) -> seconds (got {self.cost!r})")

    @property
    def ranks_heads(self) -> bool:
        """Its effects rank heads: circuits are a top-k of them, and it has faithfulness curves."""
        return self.kind == "ranking"

    @property
    def finds_circuit(self) -> bool:
        """It finds a circuit in each model (the circuits stage and the analysis read it)."""
        return self.kind != "cross_model"

    @property
    def item_parts(self) -> bool:
        """Its rows hold real per-item parts (a mask's hold one pseudo-item of 1)."""
        return self.kind != "mask"

    @property
    def whole_model(self) -> bool:
        """One work item over all heads: never split into head chunks."""
        return self.kind == "mask"

    @property
    def cross_model(self) -> bool:
        """Patched against the base model: not run on the base; its own stage and table."""
        return self.kind == "cross_model"

    def cache_entries(self, cfg: Any) -> dict[str, Any]:
        """The method's entries of an item's hash: each key's setting value(s) in ``cfg``, and ``fixed``."""
        entries: dict[str, Any] = {}
        for name, paths in self.keys.items():
            values = [setting_value(cfg, p) for p in setting_paths(paths)]
            entries[name] = values[0] if isinstance(paths, str) else values
        return entries | dict(self.fixed)

    def compute_function(self) -> Callable:
        module, _, function = self.compute.partition(":")
        return getattr(importlib.import_module(module), function)


def setting_paths(paths: str | tuple[str, ...]) -> tuple[str, ...]:
    return (paths,) if isinstance(paths, str) else tuple(paths)


def setting_value(cfg: Any, path: str) -> Any:
    """A config setting by dotted path; a section as its JSON dump (less what never changes a number)."""
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude=UNKEYED.get(path, set()))
    return value


def build_registry(records: Iterable[PatchingMethod]) -> dict[str, PatchingMethod]:
    registry: dict[str, PatchingMethod] = {}
    for record in records:
        if record.name in registry:
            raise ValueError(f"patching method {record.name!r} is registered twice")
        registry[record.name] = record
    return registry


PATCH = "dcv.circuits.pipeline:compute_patched_item"
# The names the mask's and cmap's own code writes into its rows.
MASK = "mask"
CMAP = "cmap"
CMAP_DIRECTIONS = ("ckpt_into_base", "base_into_ckpt")  # cmap's two rows per head, in this order

METHODS: dict[str, PatchingMethod] = build_registry(
    (
        PatchingMethod(
            "exact",
            "ranking",
            keys={},
            compute=PATCH,
            # Per head a forward of the positions after the first difference, from the head's layer on
            # (half the model on average).
            cost=lambda p, cfg: p.after * p.heads * 0.5,
            about="exact activation patching",
        ),
        PatchingMethod(
            "attribution",
            "ranking",
            keys={},
            compute=PATCH,
            cost=lambda p, cfg: p.full,  # one backward
            about="attribution (first order)",
        ),
        PatchingMethod(
            "ig",
            "ranking",
            keys={"ig_steps": "patching.ig_steps"},
            compute=PATCH,
            cost=lambda p, cfg: 2 * p.full * cfg.patching.ig_steps,  # ig_steps forward-backward passes
            about="integrated gradients",
        ),
        PatchingMethod(
            MASK,
            "mask",
            # Its minibatches are patching.batch_size items, so its numbers follow that too (unkeyed, and
            # stale items reused, before 2026-12-07).
            keys={"mask": "circuits.mask", "batch_size": "patching.batch_size"},
            compute="dcv.circuits.pipeline:compute_mask_item",
            # circuits.mask.steps forward-backward passes of one minibatch, after the first difference.
            cost=lambda p, cfg: 2 * p.after * cfg.circuits.mask.steps * p.batch_share,
            about="learned masks",
        ),
        PatchingMethod(
            CMAP,
            "cross_model",
            # cmap's numbers also depend on the base model it is patched against.
            keys={"base": ("model.name", "model")},
            compute="dcv.circuits.pipeline:compute_cmap_item",
            # Per checkpoint, about 4 x exact per head from position 0 (its description in dcv.config), on
            # every head or patching.cmap_top_heads.
            cost=lambda p, cfg: p.full * min(cfg.patching.cmap_top_heads or p.heads, p.heads) * 0.5 * 4,
            # cmap swapped hook_z until 2026-12-02; a stored item of that definition must not be reused.
            fixed={"hook": "hook_attn_out"},
            about="cross-model activation patching",
        ),
    )
)
METHOD_NAMES = tuple(METHODS)
# The methods whose effects rank heads, so that "the top k" exists: not learned masks (a set, no ranking)
# and not cross-model patching (a change between models, not a head's role in one).
RANKING_METHODS = tuple(m.name for m in METHODS.values() if m.ranks_heads)
CIRCUIT_METHODS = tuple(m.name for m in METHODS.values() if m.finds_circuit)
CROSS_MODEL_METHODS = tuple(m.name for m in METHODS.values() if m.cross_model)
MASK_METHODS = tuple(m.name for m in METHODS.values() if m.kind == "mask")
ITEM_PARTS_METHODS = tuple(m.name for m in METHODS.values() if m.item_parts)


def patching_method(name: str) -> PatchingMethod:
    if name not in METHODS:
        raise ValueError(f"patching method {name!r} is unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def circuit_methods(names: Sequence[str]) -> list[str]:
    """The methods of ``names`` that find circuits, in their order."""
    return [n for n in names if patching_method(n).finds_circuit]


def check_keys(schema: type, records: Iterable[PatchingMethod] | None = None) -> None:
    """Refuse a record whose key names no setting of ``schema`` (``dcv.config.ExperimentConfig``, whose
    module calls this on import): a misspelt key would otherwise fail only when an item is named."""
    for record in METHODS.values() if records is None else records:
        for name, paths in record.keys.items():
            for path in setting_paths(paths):
                section = schema
                for part in path.split("."):
                    fields = getattr(section, "model_fields", {})
                    if part not in fields:
                        raise ValueError(
                            f"patching method {record.name!r}: key {name!r} names {path!r}, which is not a "
                            "config setting"
                        )
                    section = fields[part].annotation
