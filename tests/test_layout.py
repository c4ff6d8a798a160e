"""The package's dependency rules (STYLE.md, "For dcv" 1, 2 and 11), checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from dcv.training.checkpoint_folders import KeepResumeStateInLatest
from dcv.training.sweep import train_trial

PACKAGE = Path(__file__).resolve().parents[1] / "dcv"
# Every dcv module is in one tier; a new module must be placed (test_every_module_is_in_one_tier).
TIERS = {
    # Pure: numbers and names from tables and configs; never Ray or a stage, even transitively.
    "pure": (
        "dcv",
        "dcv.config",
        "dcv.object_store",
        "dcv.storage",
        "dcv.results",
        "dcv.tables",
        "dcv.console",
        "dcv.tasks",
        "dcv.circuits",
        "dcv.circuits.methods",
        "dcv.circuits.chance",
        "dcv.circuits.competence",
        "dcv.circuits.vulnerability",
        "dcv.circuits.noise_floor",
        "dcv.circuits.curves",
        "dcv.metrics",
        "dcv.matched",
        "dcv.simulate",
        "dcv.detection",
        "dcv.predictors",
        "dcv.analysis",
        "dcv.report",
        "dcv.trials",
        "dcv.plan",
    ),
    # Torch: models and what runs on them in one process (patching, circuits, evaluation); no Ray.
    "torch": (
        "dcv.models",
        "dcv.evaluation",
        "dcv.circuits.decoder",
        "dcv.circuits.patching",
        "dcv.circuits.circuit",
        "dcv.circuits.mask",
    ),
    "tracking": ("dcv.tracking",),  # the only MLflow client
    # Stages: the stage runner and the stages on it; training (Ray Train, Tune, rollout actors).
    "stages": (
        "dcv.stages",
        "dcv.circuits.pipeline",
        "dcv.circuits.model_circuits",
        "dcv.circuits.weight_change",
        "dcv.benchmarks",
        "dcv.calibration",
        "dcv.external",
        "dcv.training",
    ),
    "entry": ("dcv.experiment", "dcv.cli"),  # the ordered stages, and the commands
}
PURE = TIERS["pure"]
STAGES = TIERS["stages"]
# Lower layers may not import these higher ones.
LOWER = (
    "dcv.config",
    "dcv.object_store",
    "dcv.storage",
    "dcv.results",
    "dcv.tables",
    "dcv.models",
    "dcv.tasks",
    "dcv.evaluation",
)
HIGHER = (
    "dcv.training",
    "dcv.circuits",
    "dcv.analysis",
    "dcv.report",
    "dcv.experiment",
    "dcv.cli",
    "dcv.stages",
)
# Modules allowed to import ray (everything else is testable without a cluster).
RAY_ALLOWED = (
    "dcv.stages",
    "dcv.circuits.pipeline",
    "dcv.benchmarks",
    "dcv.training",
    "dcv.cli",
    "dcv.experiment",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    # "dcv" and "dcv.circuits" name their package's __init__ only; the others cover their subpackage.
    return any(name == p or (p not in ("dcv", "dcv.circuits") and name.startswith(p + ".")) for p in prefixes)


def test_every_module_is_in_one_tier():
    tiers = {m: [t for t, names in TIERS.items() if under(m, names)] for m in modules()}
    assert {m: t for m, t in tiers.items() if len(t) != 1} == {}


def test_lower_layers_do_not_import_higher_ones():
    bad = {m: sorted(i for i in imps if under(i, HIGHER)) for m, imps in modules().items() if under(m, LOWER)}
    assert not {m: i for m, i in bad.items() if i}


def test_pure_modules_never_load_ray_or_a_stage():
    """Transitively: import every pure module in a fresh interpreter and look at what got loaded."""
    names = sorted(m for m in modules() if under(m, PURE))
    code = (
        f"import sys\nfor name in {names!r}: __import__(name)\n"
        "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow') or m.startswith("
        f"{tuple(STAGES)!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.split() == []
    assert "dcv.analysis" in names and "dcv.tasks.probes" in names  # the walk found the modules


def test_no_dcv_module_imports_ray_jobs():
    assert not [m for m, imps in modules().items() if any(i.split(".")[0] == "ray_jobs" for i in imps)]


def test_ray_is_imported_only_where_allowed():
    offenders = [
        m
        for m, imps in modules().items()
        if any(i.split(".")[0] == "ray" for i in imps) and not under(m, RAY_ALLOWED)
    ]
    assert not offenders


def test_only_tracking_imports_mlflow():
    offenders = [
        m
        for m, imps in modules().items()
        if any(i.split(".")[0] == "mlflow" for i in imps) and m != "dcv.tracking"
    ]
    assert not offenders


def test_the_rules_see_real_imports():
    """Guard against a walker that finds nothing: the checks above would then pass vacuously."""
    found = modules()
    assert "dcv.config" in found["dcv.models"]
    assert "mlflow.tracking" in found["dcv.tracking"]


def ray_work_launched(path: Path) -> set[str]:
    """How a module launches Ray work: ``ray.remote`` (decorator or call: actors and tasks) and Ray Data
    (``map_batches``, ``ActorPoolStrategy``: actor pools)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ray":
            if node.attr == "remote":
                found.add("ray.remote")
        elif isinstance(node, ast.Attribute) and node.attr in ("map_batches", "ActorPoolStrategy"):
            found.add("ray.data")
        elif isinstance(node, ast.ImportFrom) and node.module == "ray":
            found |= {"ray.remote" for a in node.names if a.name == "remote"}
    return found


def test_ray_work_is_launched_only_by_the_stage_runner_and_the_rollout_actors():
    """Stages compute on ``dcv.stages.run_stage``; the only actors of their own are GRPO's rollout actors
    (Ray Train and Tune launch training through their own APIs)."""
    launched = {module_name(p): ray_work_launched(p) for p in PACKAGE.rglob("*.py")}
    assert {m: sorted(w) for m, w in launched.items() if w} == {
        "dcv.stages": ["ray.data"],
        "dcv.training.rollout": ["ray.remote"],
    }


def test_the_ray_work_walker_sees_calls_and_decorators(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import ray\ntask = ray.remote(print).options(num_cpus=1)\n")
    assert ray_work_launched(source) == {"ray.remote"}
    source.write_text("import ray\n@ray.remote\nclass A: ...\nray.data.from_items([]).map_batches(A)\n")
    assert ray_work_launched(source) == {"ray.remote", "ray.data"}


TESTS = Path(__file__).resolve().parent


def test_test_modules_import_no_other_test_module():
    """Shared test code is plain functions in tests/helpers.py; fixtures live in conftest.py files. A test
    module (or conftest) that imports another test module or a conftest runs that module's import-time
    code and couples files pytest treats as independent."""
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        bad = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bad += [
                    a.name
                    for a in node.names
                    if a.name.split(".")[0] == "tests" and a.name != "tests.helpers"
                ]
            elif isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                if node.level or (name.split(".")[0] == "tests" and name != "tests.helpers"):
                    bad.append(name)
        if bad:
            offenders[str(path.relative_to(TESTS.parent))] = bad
    assert not offenders
    # The walker sees the imports it checks (else the test above would pass vacuously).
    assert "tests.helpers" in {
        n.module
        for n in ast.walk(ast.parse((TESTS / "conftest.py").read_text()))
        if isinstance(n, ast.ImportFrom)
    }


# What a Ray process of a trial imports before the trial can start, by process: Ray Train's controller
# unpickles the run config's callbacks, every Tune trial process imports the trainable's module. Neither
# trains, so neither needs torch's model stack: each import of transformers, TRL or dcv's training loop
# there cost about 5-10 s of CPU per trial on 2 cores (2026-12-07; bench/startup_imports.py).
# The modules are read off the objects Ray pickles, so a callback or trainable moved elsewhere is followed.
STARTUP_IMPORTS = {
    "Train controller": KeepResumeStateInLatest.__module__,
    "Tune trial": train_trial.__module__,
}
TRAINING_STACK = (
    "transformers",
    "trl",
    "datasets",
    "dcv.training.checkpoints",
    "dcv.evaluation",
    "dcv.models",
)


@pytest.mark.parametrize("process", sorted(STARTUP_IMPORTS))
def test_a_trials_driver_processes_do_not_load_the_training_stack(process):
    code = (
        f"import sys\nimport {STARTUP_IMPORTS[process]}\n"
        f"print('\\n'.join(m for m in {TRAINING_STACK!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.split() == [], process
