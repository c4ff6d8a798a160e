"""The circuits stage's cache keys."""

from __future__ import annotations

from dcv.circuits.model_circuits import model_file
from tests.helpers import chem_configs


def test_circuit_files_cover_the_target_task_when_chem_is_probed(tmp_path):
    cfg, other = chem_configs(tmp_path / "store")
    for model, checkpoint in [("base", "tiny"), ("noise_floor", "tiny"), ("rl-lr1e-06-seed0@10", "/ckpt/rl")]:
        paths = [model_file(c, tmp_path, model, checkpoint, None) for c in (cfg, other)]
        assert paths[0] != paths[1]
    # Without chem, no probe reads the target task: its files are shared.
    no_chem = [
        c.model_copy(update={"probes": [p for p in c.probes if p.name != "chem"]}) for c in (cfg, other)
    ]
    paths = [model_file(c, tmp_path, "base", "tiny", None) for c in no_chem]
    assert paths[0] == paths[1]


def test_adding_cmap_keeps_the_circuit_files(tmp_path):
    """cmap is a change measure, never a circuit method: a run that adds it reuses its circuits."""
    cfg, _ = chem_configs(tmp_path / "store")
    with_cmap = cfg.model_copy(
        update={"patching": cfg.patching.model_copy(update={"methods": [*cfg.patching.methods, "cmap"]})}
    )
    exact = cfg.model_copy(update={"patching": cfg.patching.model_copy(update={"methods": ["exact"]})})
    path = model_file(cfg, tmp_path, "base", "tiny", None)
    assert model_file(with_cmap, tmp_path, "base", "tiny", None) == path
    assert cfg.patching.methods == ["attribution"]
    assert model_file(exact, tmp_path, "base", "tiny", None) != path  # a circuit method does change them
