"""Faults during `dcv run`, each on the real thing: the tiny model, a local Ray, the real tracking server.

One storage root goes through every fault in turn (a fresh run per fault would cost ~4 min each):

1. `dcv run` is started; a second `dcv run` on the same root, started while it runs, must refuse.
2. The first is SIGKILLed in the sweep (one trial finished, one not), the rerun in patching (after the
   stage's first item file appeared). Benchmarks, patching, cmap, circuits and weight change are
   all `dcv.stages.run_stage`, so one kill part-way through one of them covers how each resumes; that every
   stage's finished files are found again on a rerun (their keys are stable) is checked in step 5, where
   only the damaged files may be redone.
3. The tracking server is SIGKILLed while the next run computes circuits: that run must stop with a
   clear error naming the server; the server is started again (same store).
4. The next run finishes. (The server's run stopped as the analysis began: the analysis and the report are
   whole-table stages written atomically, redone when unfinished; a SIGKILL there, as a separate run, was
   cut from the chain for time (2026-12-07): it proved nothing the stale-lock takeovers after the sweep and
   patching kills and this restart do not.)
5. Then a patching item is truncated, the base snapshot's JSON marker corrupted and the SFT trial's last
   checkpoint loses its weights file; the next run must find each, move it aside and redo it.

The config names its storage root relative to where `dcv run` runs ("store"), as configs/demo.yaml does:
Tune runs each trial in a working dir of its own, so the trials land in the right folder only if the root
was made absolute where the command ran. Each test below checks one of these from what the chain recorded
(and from the files and MLflow).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import polars.testing
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dcv.config import parse_config
from dcv.storage import HOLDER_FILE
from dcv.training.trial import TRIAL_FILE, trials_root
from tests.helpers import DCV, DcvRun, fault_env, files, stamps, tiny_run_config_dict

pytestmark = [pytest.mark.e2e, pytest.mark.ray]


@dataclass
class Chain:
    storage: Path
    config: Path
    tracking_uri: str
    runs: dict[str, DcvRun] = field(default_factory=dict)
    second: subprocess.CompletedProcess | None = None
    first_pid: int = 0
    # What each killed stage had finished when it was killed (mtimes), to compare after the reruns.
    finished_at_kill: dict[str, dict[Path, int]] = field(default_factory=dict)
    unfinished_at_kill: dict[str, int] = field(default_factory=dict)  # trials left by the sweep's kill
    before_damage: dict[str, object] = field(default_factory=dict)
    damaged: dict[str, Path] = field(default_factory=dict)


def bench_files(storage: Path) -> list[Path]:
    return files(storage / "benchmarks" / "models", "*.parquet")


def item_files(storage: Path) -> list[Path]:
    return files(storage / "patching" / "items", "*.parquet")


def circuit_files(storage: Path) -> list[Path]:
    return files(storage / "circuits" / "models", "*.parquet")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tracking_server) -> Chain:
    root = tmp_path_factory.mktemp("faults")
    storage = (root / "store").resolve()
    raw = tiny_run_config_dict(storage, tracking_server.uri)
    cfg = parse_config(raw)  # the test's own view: the absolute root
    config = root / "faults.yaml"
    config.write_text(yaml.safe_dump({**raw, "storage": {**raw["storage"], "root": "store"}}))
    # MLflow retries a failed request 7 times over about 4 minutes by default; the test needs seconds.
    env = fault_env(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        **tracking_server.credentials,
    )
    out = Chain(storage, config, tracking_server.uri)

    def start(name: str) -> DcvRun:
        out.runs[name] = DcvRun(["run", str(config)], cwd=root, env=env, log=root / f"{name}.stderr")
        return out.runs[name]

    # 1 + 2: two terminals, then a kill in the sweep.
    run = start("sweep")
    run.wait_for(lambda: run.saw("[2/9 sweep] started"), 300, "the sweep stage")
    out.first_pid = run.proc.pid
    out.second = subprocess.run(
        [DCV, "run", str(config)], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    trials = [trials_root(cfg) / name for name in ("sft-lr3e-05-seed0", "rl-lr3e-06-seed0")]
    run.wait_for(lambda: any((t / TRIAL_FILE).exists() for t in trials), 900, "the first trial to finish")
    run.kill()
    out.finished_at_kill["sweep"] = stamps(
        p for t in trials if (t / TRIAL_FILE).exists() for p in t.rglob("*")
    )
    out.unfinished_at_kill["sweep"] = sum(not (t / TRIAL_FILE).exists() for t in trials)

    # The next run is killed once patching has written its first new item file (the stage is part-way).
    run = start("patching")
    run.wait_for(
        lambda: run.saw("[4/9 patching] started") and len(item_files(storage)) > 0, 900, "a patching file"
    )
    run.kill()
    out.finished_at_kill["patching"] = stamps(item_files(storage))

    # 3: the tracking server dies while circuits are computed (no MLflow call in that stage: the next
    # one, the analysis' artifacts, meets the dead server); the run must stop with a clear error.
    run = start("server")
    run.wait_for(lambda: run.saw("[5/9 circuits] started"), 600, "the circuits stage")
    tracking_server.kill()
    run.finish(600)
    tracking_server.start()

    # 4: a run that finishes.
    run = start("final")
    assert run.finish(900) == 0, run.output()

    # 5: damage, then a run that repairs it.
    out.before_damage = {
        "effects": pl.read_parquet(storage / "patching" / "effects.parquet"),
        "results": pl.read_parquet(storage / "results" / "checkpoints.parquet"),
        "circuits": pl.read_parquet(storage / "circuits" / "circuits.parquet"),
        "trial_stamps": stamps(trials[1].rglob("*")),  # the RL trial's: not damaged
        "item_stamps": stamps(item_files(storage)),
        "circuit_stamps": stamps(circuit_files(storage)),
        "bench_stamps": stamps(bench_files(storage)),
        # The files of the trial finished before the sweep's kill, as the reruns left them (step 5 then
        # retrains that trial, the SFT one).
        "sweep_kill_stamps": stamps(out.finished_at_kill["sweep"]),
    }
    item = next(p for p in item_files(storage) if p.name.startswith("base__"))
    item.write_bytes(item.read_bytes()[: item.stat().st_size // 2])
    marker = storage / "base" / "dcv_source.json"
    marker.write_text(marker.read_text()[:10])
    # The SFT trial's (its retraining, ~1 min, is the cheaper of the two; the mechanism is the same).
    weights = trials[0] / "checkpoint_000002" / "model.safetensors"
    weights.unlink()
    out.damaged = {"item": item, "marker": marker, "weights": weights}
    run = start("repaired")
    assert run.finish(900) == 0, run.output()
    return out


@pytest.fixture(autouse=True)
def _credentials(monkeypatch, tracking_server):
    """This process reads the server too (MlflowClient)."""
    for name, value in tracking_server.credentials.items():
        monkeypatch.setenv(name, value)


def client_runs(chain: Chain) -> list:
    client = MlflowClient(chain.tracking_uri)
    experiment = client.get_experiment_by_name("tiny-faults")
    return client.search_runs([experiment.experiment_id])


def test_a_second_run_on_the_same_root_refuses_at_once(chain):
    second = chain.second
    assert second.returncode == 2, second.stderr[-3000:]
    message = second.stderr.strip().splitlines()[0]
    assert message.startswith(f"dcv run: storage {chain.storage} is in use by pid {chain.first_pid} on ")
    assert f"(command dcv run {chain.config})" in message
    assert "[1/9 base]" not in second.stdout  # it never started a stage


def test_every_rerun_after_a_kill_takes_the_stale_lock_over(chain):
    for killed, rerun in zip(("sweep", "patching"), ("patching", "server"), strict=True):
        assert "taking over the lock of pid" in chain.runs[rerun].stderr, (killed, chain.runs[rerun].output())
    assert not (chain.storage / HOLDER_FILE).exists()  # the last run ended cleanly


def test_killed_in_the_sweep_the_rerun_does_not_retrain_the_finished_trial(chain):
    assert chain.unfinished_at_kill["sweep"] == 1  # killed with one trial done and one not
    finished = chain.finished_at_kill["sweep"]
    assert finished and chain.before_damage["sweep_kill_stamps"] == finished
    assert "1 finished before (skipped), 1 to train" in chain.runs["patching"].stdout
    # The trials landed under the root resolved where the command ran ("store" in the config), not in Tune's
    # per-trial working dirs: the chain found them there.
    assert yaml.safe_load(chain.config.read_text())["storage"]["root"] == "store"


def test_items_finished_before_a_kill_are_not_computed_again(chain):
    finished = chain.finished_at_kill["patching"]
    assert finished
    # The rerun counts them as finished and computes only the rest...
    match = re.search(
        r"patching: (\d+) items, (\d+) finished before \(skipped\), (\d+) to compute",
        chain.runs["server"].stdout,
    )
    assert match, chain.runs["server"].output()
    total, skipped, pending = map(int, match.groups())
    assert skipped == len(finished) and pending == total - skipped > 0
    # ...and the final tables hold them unchanged, up to the damage of step 5 (compared before it).
    later = chain.before_damage["item_stamps"]
    assert {p: later[p] for p in finished} == finished


def test_killed_in_every_stage_the_run_finishes_with_every_table(chain):
    final = chain.runs["final"]
    for stage in ("base", "sweep", "benchmarks", "patching", "circuits", "calibration", "analysis", "report"):
        assert f"{stage}] done in" in final.stdout
    assert "2 finished before (skipped), 0 to train" in final.stdout
    assert (chain.storage / "report" / "report.html").is_file()
    table = pl.read_parquet(chain.storage / "results" / "checkpoints.parquet")
    assert table["bench/dcv_winogrande/acc"].is_not_null().all()


def test_a_tracking_server_gone_mid_run_stops_it_with_an_error_naming_the_server(chain):
    run = chain.runs["server"]
    assert run.proc.returncode == 1, run.output()
    assert (
        f"dcv run: [tracking] uri={chain.tracking_uri}: the MLflow tracking server stopped answering"
        in run.stderr
    )
    assert "start the server again (mlflow/serve) and rerun the same command" in run.stderr
    assert "[5/9 circuits] done in" in run.stdout  # the circuits it computed are kept for the rerun
    # It stops at the first MLflow request after the kill (the analysis' artifacts; weight change and
    # calibration are off in this config), once MLflow's retries (1 here) are spent: it neither carries on
    # without tracking nor hangs waiting for the server.
    assert "[8/9 analysis] started" in run.stdout and "[8/9 analysis] done in" not in run.stdout
    assert "[9/9 report]" not in run.stdout


def test_mlflow_holds_one_run_per_trial_and_stage(chain):
    runs = client_runs(chain)
    keys = sorted((r.data.tags.get("dcv.stage", "parent"), r.data.tags.get("dcv.run_key", "")) for r in runs)
    assert keys == [
        ("parent", ""),
        ("patch", "patch-all"),
        ("train", "rl-lr3e-06-seed0"),
        ("train", "sft-lr3e-05-seed0"),
    ]
    parent = next(r for r in runs if "dcv.stage" not in r.data.tags)
    assert parent.info.status == "FINISHED"


def test_damaged_files_are_moved_aside_and_redone(chain):
    run = chain.runs["repaired"]
    item, marker, weights = chain.damaged["item"], chain.damaged["marker"], chain.damaged["weights"]
    trial = weights.parent.parent
    assert (
        f"{item}: unreadable parquet" in run.stderr
        and len(list(item.parent.glob(f"{item.name}.corrupt-*"))) == 1
    )
    assert f"{marker}: not valid JSON" in run.stderr
    [old_base] = marker.parent.parent.glob("base.corrupt-*")  # the snapshot, moved aside whole
    assert (
        len(list(old_base.glob("dcv_source.json.corrupt-*"))) == 1
        and "base snapshot: no valid marker" in run.stderr
    )
    assert f"trial {trial.name}: checkpoint checkpoint_000002: no weights file" in run.stderr
    [moved] = trial.parent.glob(f"{trial.name}.corrupt-*")
    assert not (moved / "checkpoint_000002" / "model.safetensors").exists()  # kept as found
    # Redone: the item is whole again, the base snapshot has its marker, the trial its weights.
    assert pl.read_parquet(item).height > 0
    assert json.loads(marker.read_text())["name"] == "tiny"
    assert json.loads((trial / TRIAL_FILE).read_text())["checkpoints"][-1]["step"] == 2
    assert weights.is_file()
    # Nothing else was redone: the RL trial and every file not made from the SFT trial are untouched.
    before = chain.before_damage
    assert stamps(before["trial_stamps"]) == before["trial_stamps"]
    own = f"{trial.name}_"
    for key in ("item_stamps", "circuit_stamps", "bench_stamps"):
        kept = {p: t for p, t in before[key].items() if p != item and not p.name.startswith(own)}
        assert kept and stamps(kept) == kept, key
    # The redone numbers equal the first ones where the inputs are the same (base model, RL trial).
    effects = pl.read_parquet(chain.storage / "patching" / "effects.parquet")
    same = pl.col("trial") != trial.name
    columns = ["model", "probe", "method", "layer", "head", "effect"]
    assert effects.filter(same).select(columns).equals(before["effects"].filter(same).select(columns))
    # The SFT trial's old MLflow run is retired (deleted, restorable); its new one is the only active one.
    runs = [r for r in client_runs(chain) if r.data.tags.get("dcv.run_key") == trial.name]
    assert len(runs) == 1
    deleted = MlflowClient(chain.tracking_uri).search_runs(
        [runs[0].info.experiment_id], filter_string=f"tags.`dcv.run_key` = '{trial.name}'", run_view_type=2
    )
    assert len(deleted) == 1 and "moved aside" in deleted[0].data.tags["dcv.retired"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_run) -> Path:
    """The same config run once without a fault (the session's tiny_run: its own root, MLflow in SQLite
    there; tests/test_console.py reads its console)."""
    assert tiny_run.run.proc.returncode == 0, tiny_run.run.output()
    return tiny_run.storage


def without_paths(table: pl.DataFrame) -> pl.DataFrame:
    return table.drop([c for c in ("checkpoint",) if c in table.columns])


def test_the_tables_equal_an_uninterrupted_runs(chain, uninterrupted):
    """After three kills and a dead tracking server (before the damage of step 5), the run's results,
    effects and circuits tables are those of a run that was never interrupted."""
    before = chain.before_damage
    for name, path in (
        ("results", "results/checkpoints.parquet"),
        ("effects", "patching/effects.parquet"),
        ("circuits", "circuits/circuits.parquet"),
    ):
        expected = without_paths(pl.read_parquet(uninterrupted / path))
        got = without_paths(before[name])
        assert got.columns == expected.columns, name
        pl.testing.assert_frame_equal(got, expected, check_exact=False, rel_tol=1e-5, abs_tol=1e-7)
