"""The sweep's trials: one ``TrialSpec`` per point of methods x learning rates x grid x seeds, named as its
folder and MLflow run are, and which trial an RL-after-SFT trial starts from. Pure (no Ray): ``dcv plan``
counts them without importing the sweep.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, replace
from typing import Any

from dcv.config import ExperimentConfig, apply_overrides, config_to_dict, parse_config


@dataclass(frozen=True)
class TrialSpec:
    """One point of the sweep: what a trial trains, and the name its folder and MLflow run carry."""

    name: str
    method: str
    learning_rate: float
    seed: int
    overrides: tuple[tuple[str, Any], ...]  # (dotted path, value), applied on top of the sweep's config

    def config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        raw = config_to_dict(cfg)
        lr_field = f"{self.method}.learning_rate={self.learning_rate!r}"
        raw = apply_overrides(raw, [lr_field, *(f"{k}={json.dumps(v)}" for k, v in self.overrides)])
        return parse_config(raw, source=f"sweep trial {self.name}")


def _grid_suffix(overrides: tuple[tuple[str, Any], ...]) -> str:
    parts = [f"{path.rsplit('.', 1)[-1]}{value}" for path, value in overrides]
    return "".join(f"-{re.sub(r'[^A-Za-z0-9_.-]', '_', p)}" for p in parts)


def plan_trials(cfg: ExperimentConfig) -> list[TrialSpec]:
    """Every trial of the sweep, in a fixed order (method, lr, grid, seed).

    With ``rl.init=sft`` and no ``rl.init_trial``, each RL trial starts from the sweep's SFT trial of its
    seed and shared grid values at ``rl.init_sft_learning_rate`` (which the config requires when there are
    several SFT rates), named in its overrides so its config says where it starts; its name ends in
    ``-after-sft``.
    """
    specs = []
    for method in cfg.sweep.methods:
        rates = cfg.sweep.sft_learning_rates if method == "sft" else cfg.sweep.rl_learning_rates
        other = "rl." if method == "sft" else "sft."
        grid = {k: v for k, v in cfg.sweep.grid.items() if not k.startswith(other)}
        for lr, values in itertools.product(rates, itertools.product(*grid.values())):
            overrides = tuple(zip(grid, values, strict=True))
            for seed in cfg.sweep.seeds:
                name = f"{method}-lr{lr:g}-seed{seed}{_grid_suffix(overrides)}"
                specs.append(TrialSpec(name, method, lr, seed, overrides))
    return [_with_start(cfg, spec, specs) for spec in specs]


def _with_start(cfg: ExperimentConfig, spec: TrialSpec, specs: list[TrialSpec]) -> TrialSpec:
    trial_cfg = spec.config(cfg)
    if spec.method != "rl" or trial_cfg.rl.init != "sft":
        return spec
    if trial_cfg.rl.init_trial is not None:
        return replace(spec, name=f"{spec.name}-after-sft")
    # The config validator made the rate explicit when the sweep has several (rl.init_sft_learning_rate).
    rate = trial_cfg.rl.init_sft_learning_rate or cfg.sweep.sft_learning_rates[0]
    shared = {k: v for k, v in spec.overrides if not k.startswith("rl.")}  # grid values SFT also varies by
    candidates = [
        s
        for s in specs
        if s.method == "sft"
        and s.seed == spec.seed
        and s.learning_rate == rate
        and {k: v for k, v in s.overrides if not k.startswith("sft.")} == shared
    ]
    if len(candidates) != 1:
        found = f"{len(candidates)} SFT trials" if candidates else "no SFT trial"
        raise ValueError(
            f"rl.init_trial: rl.init=sft, but the sweep has {found} of seed {spec.seed} at learning rate "
            f"{rate:g} for trial {spec.name} to start from; add 'sft' to sweep.methods, set "
            "rl.init_sft_learning_rate to one of sweep.sft_learning_rates, or name a finished SFT trial in "
            "rl.init_trial"
        )
    overrides = (*spec.overrides, ("rl.init_trial", candidates[0].name))
    return replace(spec, name=f"{spec.name}-after-sft", overrides=overrides)


def start_trial(cfg: ExperimentConfig, spec: TrialSpec) -> str | None:
    """The SFT trial of this sweep that ``spec`` starts from (it must finish first), else None."""
    trial_cfg = spec.config(cfg)
    if spec.method != "rl" or trial_cfg.rl.init != "sft":
        return None
    return trial_cfg.rl.init_trial


def sweep_phases(cfg: ExperimentConfig, specs: list[TrialSpec]) -> list[list[TrialSpec]]:
    """Trials that start from the base model first; then those that start from one of them (RL after SFT).

    Two Tune runs rather than one where RL trials wait: a waiting trial would hold a concurrency slot
    its own SFT trial may need, and could not tell that SFT trial failed.
    """
    names = {s.name for s in specs}
    later = [s for s in specs if start_trial(cfg, s) in names]
    first = [s for s in specs if s not in later]
    return [phase for phase in (first, later) if phase]
