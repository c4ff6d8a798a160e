"""The package's dependency rules (STYLE.md, "For dcv" 1, 2 and 11), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dcv"
# Lower layers may not import these higher ones.
LOWER = (
    "dcv.config",
    "dcv.storage",
    "dcv.results",
    "dcv.models",
    "dcv.tasks",
    "dcv.evaluation",
    "dcv.tracking",
)
HIGHER = ("dcv.training", "dcv.circuits", "dcv.analysis", "dcv.report", "dcv.experiment", "dcv.cli")
# Modules allowed to import ray (everything else is testable without a cluster).
RAY_ALLOWED = (
    "dcv.benchmarks",  # one Ray task per model, as dcv.circuits.model_circuits
    "dcv.cli",
    "dcv.experiment",
    "dcv.training",
    "dcv.circuits.pipeline",
    "dcv.circuits.model_circuits",
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
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_lower_layers_do_not_import_higher_ones():
    bad = {m: sorted(i for i in imps if under(i, HIGHER)) for m, imps in modules().items() if under(m, LOWER)}
    assert not {m: i for m, i in bad.items() if i}


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


def test_ray_actors_are_defined_only_in_rollout():
    defining = [module_name(path) for path in PACKAGE.rglob("*.py") if "@ray.remote" in path.read_text()]
    assert defining == ["dcv.training.rollout"]
