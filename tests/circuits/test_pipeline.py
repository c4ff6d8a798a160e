"""The Ray Data patching pipeline on the tiny model: same numbers as a plain loop, survives a killed actor,
and a rerun computes only the unfinished items (a killed `dcv run` in patching: tests/faults/)."""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
import torch
import yaml

from dcv.circuits.decoder import model_shape
from dcv.circuits.patching import head_effects
from dcv.circuits.pipeline import (
    build_item_id,
    build_work_items,
    item_path,
    patching_stage,
    read_item,
    run_pipeline,
)
from dcv.cli import main as dcv_main
from dcv.config import ModelConfig, parse_config
from dcv.models import load_model, save_model
from dcv.results import write_results
from dcv.stages import split_done
from dcv.storage import items_dir
from dcv.tables import EFFECTS_SCHEMA
from dcv.tasks.probes import build_probe
from tests.helpers import chem_configs, results_of, tiny_config_dict

PROBES = ("ioi", "capitals")
METHODS = ("exact", "attribution")
CHUNK = 3  # 8 heads -> chunks of 3, 3, 2: a short last chunk is exercised
KEYS = ["model", "probe", "method", "layer", "head"]
# 3 models x 2 probes x 2 methods x 3 chunks
N_ITEMS = 36


def pipeline_config_dict(storage: Path, **patching) -> dict:
    raw = tiny_config_dict(storage)
    raw["probes"] = [{"name": name, "n_items": 8, "seed": 0} for name in PROBES]
    raw["patching"] = {
        "methods": list(METHODS),
        "batch_size": 4,
        "head_chunk_size": CHUNK,
        "num_actors": 2,
        "num_cpus_per_actor": 1,
        **patching,
    }
    return raw


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tokenizer, tmp_path_factory) -> pl.DataFrame:
    """Two perturbed copies of the tiny model as HF folders, listed in a results table."""
    folder = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for index, (trial, step) in enumerate([("sft-lr1e-05-seed0", 10), ("rl-lr1e-06-seed0", 10)]):
        model = copy.deepcopy(tiny_model)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        path = save_model(model, tokenizer, folder / f"{trial}-step{step}")
        folders[(trial, step)] = path
    return results_of(folders)


def make_store(root: Path, results: pl.DataFrame, **patching):
    """A config whose storage holds the results table; returns (config, config file)."""
    raw = pipeline_config_dict(root / "store", **patching)
    write_results(results, root / "store")
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return parse_config(raw), path


@pytest.fixture(scope="module")
def reference(checkpoints, tokenizer) -> pl.DataFrame:
    """The plain loop: head_effects item by item (one chunk of heads at a time) in this process."""
    cfg = parse_config(pipeline_config_dict(Path("unused")))
    models = [("base", "base", 0, "tiny")] + [
        (f"{trial}@{step}", trial, step, checkpoint)
        for trial, step, checkpoint in checkpoints.select("trial", "step", "checkpoint").iter_rows()
    ]
    tables = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each actor (num_cpus_per_actor=1), so the sums run in the same order
    for model_id, trial, step, checkpoint in models:
        model = load_model(ModelConfig(name=checkpoint), tokenizer)
        heads = model_shape(model).heads
        for probe in PROBES:
            items = build_probe(cfg.probe(probe), tokenizer, cfg.target_task).items
            for method in METHODS:
                for start in range(0, len(heads), CHUNK):
                    table = head_effects(
                        model,
                        items,
                        model_id,
                        probe,
                        method,
                        heads=heads[start : start + CHUNK],
                        batch_size=4,
                    )
                    tables.append(
                        table.with_columns(
                            trial=pl.lit(trial), step=pl.lit(step, pl.Int64), checkpoint=pl.lit(checkpoint)
                        )
                    )
    torch.set_num_threads(threads)
    return pl.concat(tables).sort(KEYS)


def assert_same_effects(
    table: pl.DataFrame, reference: pl.DataFrame, probes: tuple[str, ...] = PROBES
) -> None:
    reference = reference.filter(pl.col("probe").is_in(probes))
    assert table.schema == EFFECTS_SCHEMA
    assert table.height == reference.height == 3 * len(probes) * len(METHODS) * 8
    table = table.sort(KEYS)
    key_columns = [c for c in EFFECTS_SCHEMA if c not in ("effect", "item_delta", "item_denominator")]
    assert table.select(key_columns).equals(reference.select(key_columns))
    difference = (table["effect"] - reference["effect"]).abs().max()
    assert difference < 1e-5, difference
    # The stored per-item parts give back the effect (the analysis bootstraps items from them).
    from_parts = table.select(
        (pl.col("item_delta").list.mean() / pl.col("item_denominator").list.mean()).alias("e")
    )["e"]
    # float32 on the model side, float64 here: equal to float32 rounding.
    assert ((from_parts - table["effect"]).abs() / (1 + table["effect"].abs())).max() < 1e-5
    assert (table["item_delta"].list.len() == table["n_items"]).all()
    assert table["effect"].is_finite().all() and table["effect"].n_unique() > table.height // 2


def item_stamps(storage: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in items_dir(storage).glob("*.parquet")}


def test_pipeline_equals_the_plain_loop_and_a_rerun_skips_everything(
    ray_cluster, tmp_path, checkpoints, reference
):
    cfg, _ = make_store(tmp_path, checkpoints)
    run = run_pipeline(cfg)
    assert (run.total, run.skipped, run.computed) == (N_ITEMS, 0, N_ITEMS)
    # Items are sorted by checkpoint: each of the 2 actors loads each of the 3 models at most once.
    assert 3 <= run.model_loads <= 3 * 2
    assert_same_effects(run.table, reference)
    assert pl.read_parquet(run.path).equals(run.table)
    assert set(run.table["model"]) == {"base", "sft-lr1e-05-seed0@10", "rl-lr1e-06-seed0@10"}

    stamps = item_stamps(tmp_path / "store")
    assert len(stamps) == N_ITEMS
    again = run_pipeline(cfg)
    assert (again.total, again.skipped, again.computed) == (N_ITEMS, N_ITEMS, 0)
    assert again.table.equals(run.table)
    assert item_stamps(tmp_path / "store") == stamps


def _patch_actor_pids(marker: str, value: str) -> list[int]:
    """PIDs of the stage runner's actor processes whose environment carries ``marker=value`` (ours only)."""
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if not any("StageWorker" in part for part in process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get(marker) == value:
                pids.append(process.info["pid"])
        except psutil.Error:
            continue
    return pids


def test_a_killed_actor_is_restarted_and_the_table_is_the_same(ray_cluster, tmp_path, checkpoints, reference):
    cfg, _ = make_store(tmp_path, checkpoints)
    folder = items_dir(tmp_path / "store")
    killed: dict = {}

    def kill_an_actor_mid_run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0
            pids = _patch_actor_pids("DCV_TEST_RAY_SESSION", ray_cluster) if done else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.update(pid=pids[0], done=len(list(folder.glob("*.parquet"))))
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_an_actor_mid_run)
    killer.start()
    run = run_pipeline(cfg, probes=["ioi"])  # half the grid: room enough to kill an actor part-way
    killer.join()
    n_items = N_ITEMS // len(PROBES)
    assert killed, "no StageWorker actor of this session was found while items were being computed"
    assert 0 < killed["done"] < n_items, killed  # killed mid-run
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == "zombie"
    assert (run.total, run.skipped, run.computed) == (n_items, 0, n_items)
    assert_same_effects(run.table, reference, probes=("ioi",))


def test_bad_input_is_a_clear_error_before_any_compute(ray_cluster, tmp_path, checkpoints, capsys):
    cfg, config_file = make_store(tmp_path, checkpoints)
    (tmp_path / "store" / "results" / "checkpoints.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"results/checkpoints\.parquet: no results table"):
        run_pipeline(cfg)
    assert dcv_main(["patch-all", str(config_file)]) == 2
    assert "no results table" in capsys.readouterr().err

    missing = checkpoints.with_columns(
        pl.when(pl.col("trial") == "rl-lr1e-06-seed0")
        .then(pl.lit(str(tmp_path / "gone")))
        .otherwise(pl.col("checkpoint"))
        .alias("checkpoint")
    )
    write_results(missing, tmp_path / "store")
    with pytest.raises(
        FileNotFoundError, match=rf"trial='rl-lr1e-06-seed0' step=10: checkpoint='{tmp_path}/gone'"
    ):
        run_pipeline(cfg)

    write_results(checkpoints, tmp_path / "store")
    with pytest.raises(
        ValueError, match=r"\['greater_than'\] are not in the config's probes; choose from ioi"
    ):
        run_pipeline(cfg, probes=["ioi", "greater_than"])
    with pytest.raises(
        ValueError, match=r"patching.num_actors=64 x patching.num_cpus_per_actor=1.0 needs 64"
    ):
        run_pipeline(cfg.model_copy(update={"patching": cfg.patching.model_copy(update={"num_actors": 64})}))
    assert not (tmp_path / "store" / "patching").exists()


def test_work_grid_ids_are_stable_and_follow_the_config(tmp_path, checkpoints):
    cfg, _ = make_store(tmp_path, checkpoints)
    work = build_work_items(cfg, checkpoints)
    assert work.height == N_ITEMS and work["item_id"].n_unique() == N_ITEMS
    assert work.equals(build_work_items(cfg, checkpoints))
    # Sorted by checkpoint: each checkpoint's items are contiguous, so an actor rarely reloads.
    assert work["checkpoint"].rle_id().n_unique() == 3
    assert sorted(set(zip(work["head_start"], work["head_end"], strict=True))) == [(0, 3), (3, 6), (6, 8)]
    changed = cfg.model_copy(update={"probes": [p.model_copy(update={"n_items": 9}) for p in cfg.probes]})
    assert not set(build_work_items(changed, checkpoints)["item_id"]) & set(work["item_id"])
    only_ioi = build_work_items(cfg, checkpoints, probes=["ioi"])
    assert set(only_ioi["item_id"]) < set(work["item_id"]) and only_ioi.height == N_ITEMS // 2


def test_item_ids_cover_the_target_task_only_for_the_chem_probe(tmp_path, tokenizer):
    """chem's items are the target task's questions: its patching files must not survive a changed task."""
    cfg, other = chem_configs(tmp_path / "store")
    chem = [build_probe(c.probe("chem"), tokenizer, c.target_task).items for c in (cfg, other)]
    ioi = [build_probe(c.probe("ioi"), tokenizer, c.target_task).items for c in (cfg, other)]
    assert chem[0] != chem[1] and ioi[0] == ioi[1]  # what the ids must follow
    for model, checkpoint in [("base", "tiny"), ("sft-lr1e-05-seed0@10", "/ckpt/sft")]:
        for method in ("exact", "ig"):
            ids = [build_item_id(c, model, checkpoint, "chem", method, (0, 8)) for c in (cfg, other)]
            assert ids[0] != ids[1]
            ids = [build_item_id(c, model, checkpoint, "ioi", method, (0, 8)) for c in (cfg, other)]
            assert ids[0] == ids[1]


def test_an_invalid_item_file_counts_as_unfinished(tmp_path, checkpoints, tiny_model, tokenizer):
    cfg, _ = make_store(tmp_path, checkpoints)
    storage = tmp_path / "store"
    work = build_work_items(cfg, checkpoints, probes=["ioi"]).head(3)
    items = build_probe(cfg.probe("ioi"), tokenizer, cfg.target_task).items
    good = head_effects(
        tiny_model, items, "base", "ioi", "exact", heads=[(0, 0), (0, 1), (0, 2)]
    ).with_columns(
        pl.lit("base").alias("trial"),
        pl.lit(0, pl.Int64).alias("step"),
        pl.lit("tiny").alias("checkpoint"),
        pl.Series("item_delta", [[0.0]] * 3, dtype=pl.List(pl.Float64)),
        pl.Series("item_denominator", [[1.0]] * 3, dtype=pl.List(pl.Float64)),
    )
    ids = work["item_id"].to_list()
    items_dir(storage).mkdir(parents=True)
    good.write_parquet(item_path(storage, ids[0]))  # valid
    good.head(2).write_parquet(item_path(storage, ids[1]))  # a row short
    item_path(storage, ids[2]).write_bytes(b"PAR1 truncated")  # unreadable
    assert read_item(item_path(storage, ids[0]), 3) is not None
    assert read_item(item_path(storage, ids[0]).with_name("absent.parquet"), 3) is None
    good.write_parquet(tmp_path / "three_rows.parquet")
    assert read_item(tmp_path / "three_rows.parquet", 4) is None
    good.drop("trial").write_parquet(tmp_path / "wrong_schema.parquet")
    assert read_item(tmp_path / "wrong_schema.parquet", 3) is None
    pending, done = split_done(patching_stage(cfg, work))
    assert done["item_id"].to_list() == ids[:1] and pending["item_id"].to_list() == ids[1:]
    # The invalid files were moved aside (kept, to inspect), so their items are patched again.
    moved = sorted(p.name.split(".parquet.corrupt-")[0] for p in items_dir(storage).glob("*.corrupt-*"))
    assert moved == sorted(ids[1:])
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 2


def test_cmap_through_the_pipeline_equals_the_direct_computation(
    ray_cluster, tmp_path, checkpoints, tiny_model, tokenizer
):
    """cmap items (checkpoints only, 2 rows per head) go to their own stage and table; one actor loads the
    base once beside each checkpoint, and the numbers are cmap_item_effects' on the same models."""
    from dcv.circuits.patching import cmap_item_effects
    from dcv.config import CMAP_DIRECTIONS
    from dcv.storage import CMAP_FILE
    from dcv.tables import CMAP_SCHEMA

    cfg, _ = make_store(tmp_path, checkpoints, methods=["attribution", "cmap"], num_actors=1)
    work = build_work_items(cfg, checkpoints, ["ioi"])
    cmap_work = work.filter(pl.col("method") == "cmap")
    assert set(cmap_work["model"]) == {"sft-lr1e-05-seed0@10", "rl-lr1e-06-seed0@10"}  # no base items
    assert cmap_work["n_rows"].to_list() == [6, 6, 4] * 2
    run = run_pipeline(cfg, probes=["ioi"])
    assert set(run.table["method"]) == {"attribution"}  # the effects table holds no cmap rows
    assert (run.total, run.computed) == (work.height, work.height)
    table = pl.read_parquet(run.path.with_name(CMAP_FILE))
    assert table.schema == CMAP_SCHEMA and table.height == 2 * 2 * 8
    # attribution: 3 models; cmap: the base once and each checkpoint once, on one actor.
    assert run.model_loads == 3 + 3
    items = build_probe(cfg.probe("ioi"), tokenizer, cfg.target_task).items
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actor, so the sums run in the same order
    try:
        for trial, step, checkpoint in checkpoints.select("trial", "step", "checkpoint").iter_rows():
            tuned = load_model(ModelConfig(name=checkpoint), tokenizer)
            direct = cmap_item_effects(tiny_model, tuned, items, batch_size=4, head_chunk_size=CHUNK)
            for direction in CMAP_DIRECTIONS:
                rows = table.filter(
                    (pl.col("model") == f"{trial}@{step}") & (pl.col("direction") == direction)
                ).sort("layer", "head")
                expected = direct[direction].effects()
                assert (rows["effect"].to_torch() - expected.double()).abs().max() < 1e-5
                assert expected.abs().max() > 1e-3  # perturbed checkpoints: not a comparison of zeros
    finally:
        torch.set_num_threads(threads)

    # patching.cmap_top_heads: the attribution items are reused, and cmap runs again on the base's top 2
    # heads only (explicit head lists through Ray Data), each head as the all-heads run gave it.
    top_cfg = cfg.model_copy(
        update={
            "patching": cfg.patching.model_copy(update={"cmap_top_heads": 2}),
            "circuits": cfg.circuits.model_copy(update={"selection": "top_k", "top_k": 2}),
        }
    )
    again = run_pipeline(top_cfg, probes=["ioi"])
    attribution = work.filter(pl.col("method") == "attribution").height
    assert (again.skipped, again.computed) == (attribution, 2)  # one cmap item per checkpoint
    top = pl.read_parquet(again.path.with_name(CMAP_FILE))
    base = run.table.filter((pl.col("model") == "base") & (pl.col("method") == "attribution"))
    chosen = base.with_columns(pl.col("effect").abs()).sort("effect", descending=True).head(2)
    assert set(zip(top["layer"], top["head"], strict=True)) == set(
        zip(chosen["layer"], chosen["head"], strict=True)
    )
    assert top.height == 2 * 2 * 2  # checkpoints x heads x directions
    keys = ["model", "direction", "layer", "head"]
    joined = top.join(table, on=keys, suffix="_all")
    # The same heads' values as in the all-heads item, up to float32 rounding: the patched batch holds other
    # heads (measured 2026-12-07: 1.8e-6 on effects of 0.8-5; tests/circuits/test_cmap.py holds 1e-6 in one
    # process).
    assert joined.height == top.height and (joined["effect"] - joined["effect_all"]).abs().max() < 1e-5
