"""The dcv command: `dcv eval`, `patch`, `circuit` end to end on the tiny model (``main`` in this process:
the console script is only ``dcv.cli:main``, run as a process by the fault suite and the job tests),
`validate --set` and `--version`, the parser and its dispatch, `dcv run`'s checks from Python
(run_experiment's preflight), and the ray_jobs/ scripts that forward to the commands."""

from __future__ import annotations

import copy
import json
import re
import runpy
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dcv.cli import COMMANDS, build_parser, circuit_outputs, job_main, main, patch_work
from dcv.config import ConfigError, load_config, parse_config
from dcv.tracking import TrackingServerError
from tests.helpers import REPO, free_port, tiny_config_dict, write_sciknoweval_layout


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def dcv(capsys, monkeypatch, tmp_path):
    """``dcv ARGS`` in this process, from tmp_path, without the caller's tracking server: what it returned
    and printed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = main(list(args))
        printed = capsys.readouterr()
        return Ran(code, printed.out, printed.err)

    return run


def test_dcv_eval_tiny_prints_scores_and_logs_to_mlflow(tiny_config_file, tmp_path, dcv):
    result = dcv("eval", str(tiny_config_file))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for task in ("target", "probe:ioi", "probe:capitals", "probe:greater_than", "probe:induction"):
        assert any(line.startswith(task) for line in lines), result.stdout
    db = tmp_path / "storage" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tiny-test")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`dcv.stage` = 'eval'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["target/n_items"] == 8
    assert 0 <= metrics["probe/ioi/accuracy"] <= 1
    target_line = next(line for line in lines if line.startswith("target"))
    assert f"{metrics['target/accuracy']:.3f}" in target_line
    assert not (tmp_path / "mlruns").exists()  # nothing written to the working directory


def test_dcv_eval_of_another_model_reports_kl_to_base(tiny_config_file, tmp_path, tokenizer, dcv):
    from dcv.config import ModelConfig, TinyModelConfig
    from dcv.models import load_model, save_model

    other = save_model(
        load_model(ModelConfig(name="tiny", tiny=TinyModelConfig(seed=1)), tokenizer),
        tokenizer,
        tmp_path / "tiny-seed-1",
    )
    result = dcv("eval", str(tiny_config_file), "--model", str(other))
    assert result.returncode == 0, result.stderr
    kl_line = next(line for line in result.stdout.splitlines() if line.startswith("KL(base || model)"))
    assert float(kl_line.split()[-1]) > 0.01
    result = dcv("eval", str(tiny_config_file), "--model", str(tmp_path / "missing"))
    assert result.returncode == 2 and "model.name" in result.stderr


def test_dcv_eval_bad_config_exits_2_before_loading(tmp_path, dcv):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny}\nprobes: [{name: ioi}]\nsft: {learning_rate: -1}\n")
    result = dcv("eval", str(bad))
    assert result.returncode == 2
    assert "sft.learning_rate" in result.stderr and str(bad) in result.stderr
    result = dcv("eval", str(bad).replace("bad", "absent"))
    assert result.returncode == 2 and "no such config file" in result.stderr


def test_dcv_patch_then_circuit_reuses_the_table(tiny_config_file, tmp_path, dcv):
    result = dcv("patch", str(tiny_config_file), "--probe", "ioi", "--top", "3")
    assert result.returncode == 0, result.stderr
    assert "patched 8 heads x 8 items (exact)" in result.stdout
    cfg = load_config(tiny_config_file)
    [item] = patch_work(cfg, cfg.model, "ioi", "exact")  # the tiny model's 8 heads fit one chunk
    table = Path(item["path"])
    assert table.parent == tmp_path / "storage" / "patching" / "items"  # the pipeline's own files
    assert table.name.startswith("base__ioi__exact__h00000-00008__")
    assert table.is_file()
    stamp = table.stat().st_mtime_ns
    result = dcv("circuit", str(tiny_config_file), "--probe", "ioi")
    assert result.returncode == 0, result.stderr
    assert "reusing" in result.stdout and table.stat().st_mtime_ns == stamp  # not recomputed
    assert "faithfulness" in result.stdout
    outputs = circuit_outputs(cfg, cfg.model, "ioi", "exact")
    assert outputs.parent == tmp_path / "storage" / "circuits" / "cli"
    assert outputs.with_name(f"{outputs.name}.heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert outputs.with_name(f"{outputs.name}.circuit.parquet").is_file()


def test_dcv_patch_tables_are_keyed_by_what_decides_them(tmp_path):
    """A changed target task must not reuse chem's table (its items are the task's questions); other
    probes, which never read the task, keep theirs. The probe's seed and ig steps are in the key too."""
    raw = tiny_config_dict(tmp_path / "storage")
    raw["probes"].append({"name": "chem", "n_items": 8, "seed": 0})
    raw["target_task"]["answer_format"] = "letter"  # chem compares answer letters
    other_task, reseeded = copy.deepcopy(raw), copy.deepcopy(raw)
    other_task["target_task"]["seed"] += 1
    reseeded["probes"][0]["seed"] = 1  # ioi
    cfg, other_task, reseeded = parse_config(raw), parse_config(other_task), parse_config(reseeded)
    more_steps = cfg.model_copy(update={"patching": cfg.patching.model_copy(update={"ig_steps": 16})})

    def table(c, probe: str, method: str = "exact") -> list[str]:
        return [item["path"] for item in patch_work(c, c.model, probe, method)]

    assert table(cfg, "chem") != table(other_task, "chem")
    assert table(cfg, "ioi") == table(other_task, "ioi")
    assert table(cfg, "ioi") != table(reseeded, "ioi")
    assert table(cfg, "ioi", "ig") != table(more_steps, "ioi", "ig")
    assert table(cfg, "ioi") == table(more_steps, "ioi")


def test_dcv_patch_items_are_the_pipelines(tmp_path):
    """One patch cache: `dcv patch` on the base model reads and writes patch-all's item files; another
    model (--model) gets items of its own, keyed by its name."""
    from dcv.circuits.pipeline import build_work_items

    raw = tiny_config_dict(tmp_path / "storage")
    raw["patching"].update(methods=["exact", "attribution"], head_chunk_size=3)  # 8 heads: 3 chunks
    cfg = parse_config(raw)
    no_checkpoints = pl.DataFrame(
        schema={"trial": pl.String, "step": pl.Int64, "checkpoint": pl.String, "init": pl.String}
    )
    pipeline = build_work_items(cfg, no_checkpoints, ["ioi"]).filter(pl.col("method") == "attribution")
    work = patch_work(cfg, cfg.model, "ioi", "attribution")
    assert [item["path"] for item in work] == pipeline["path"].to_list()
    assert [(i["head_start"], i["head_end"]) for i in work] == [(0, 3), (3, 6), (6, 8)]
    checkpoint = tmp_path / "checkpoint"  # only its config.json is read
    checkpoint.mkdir()
    shape = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama", **shape}))
    other = cfg.model.model_copy(update={"name": str(checkpoint)})
    assert not {i["item_id"] for i in patch_work(cfg, other, "ioi", "attribution")} & set(pipeline["item_id"])


def test_dcv_patch_unknown_probe_exits_2(tiny_config_file, dcv):
    result = dcv("patch", str(tiny_config_file), "--probe", "sarcasm")
    assert result.returncode == 2
    assert "--probe 'sarcasm' is not one of the config's probes" in result.stderr


def test_dcv_validate_checks_the_overridden_config(tiny_config_file, capsys):
    assert main(["validate", str(tiny_config_file), "--set", "circuits.tau=0.9"]) == 0
    assert f"{tiny_config_file} with circuits.tau=0.9: ok" in capsys.readouterr().out
    code = main(
        ["validate", str(tiny_config_file), "--set", "circuits.tau=3", "--set", "patching.methods=[x]"]
    )
    assert code == 2
    err = capsys.readouterr().err
    # Each problem names its dotted field and the override that caused it.
    assert re.search(r"circuits\.tau: .*\(got 3\) \[--set circuits\.tau=3\]", err), err
    assert re.search(r"patching\.methods\[0\]: .*\[--set patching\.methods=\[x\]\]", err), err
    assert main(["validate", str(tiny_config_file), "--set", "sft.learning_rat=1"]) == 2
    assert "sft.learning_rat: unknown key [--set sft.learning_rat=1]" in capsys.readouterr().err
    assert main(["validate", str(tiny_config_file), "--set", "no-equals-sign"]) == 2
    assert "is not of the form dotted.key=value" in capsys.readouterr().err


def test_dcv_validate_counts_the_sciknoweval_rows_it_keeps_and_drops(tmp_path, capsys):
    """The paper config on a local folder in the hub's layout: validate names what L3 keeps and drops."""
    source = write_sciknoweval_layout(tmp_path / "ske")
    paper = str(REPO / "configs" / "qwen2.5-3b.yaml")
    assert (
        main(
            [
                "validate",
                paper,
                "--set",
                f"target_task.source={source}",
                "--set",
                "target_task.revision=null",
                "--set",
                "target_task.n_train=24",
                "--set",
                "target_task.n_test=8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("target_task: "))
    assert "kept 48 (mcq-2-choices 4, mcq-4-choices 40, true_or_false 4)" in line, line
    assert "level not in levels 108" in line and "unscorable type 6 (filling 2, open-ended-qa 4)" in line, (
        line
    )


def test_every_command_that_reads_a_config_takes_set():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps no public list
    for name, command in commands.items():
        if name == "report":  # reads a run folder's stored config, not a config file
            continue
        options = {o for action in command._actions for o in action.option_strings}
        assert "--set" in options, name
        # validate and plan only read the config: nothing runs whose output --verbose could show.
        assert name in ("validate", "plan") or "--verbose" in options, name


def test_every_command_of_the_parser_is_dispatched():
    commands = build_parser()._subparsers._group_actions[0].choices  # argparse keeps no public list
    assert set(commands) == set(COMMANDS)


@pytest.mark.parametrize("broken", ["tracking server", "benchmark file"])
def test_run_experiment_runs_dcv_runs_checks_first(tmp_path, broken):
    """Called from Python, run_experiment checks what `dcv run` checks before anything starts: the
    error names the field, nothing is connected, written or loaded."""
    from dcv.experiment import run_experiment

    raw = tiny_config_dict(tmp_path / "storage")
    if broken == "tracking server":
        port = free_port()  # nothing listens there
        raw["tracking"]["uri"] = f"http://127.0.0.1:{port}"
        expected = TrackingServerError, rf"\[tracking\] uri=http://127\.0\.0\.1:{port}: .* does not answer"
    else:
        folder = shutil.copytree(REPO / "configs" / "benchmarks", tmp_path / "benchmarks")
        (folder / "mmlu.jsonl").unlink()
        raw["benchmarks"] = {"tasks": ["dcv_mmlu"], "include_path": str(folder), "limit": 2}
        expected = ConfigError, r"\[benchmarks\] tasks\[0\]='dcv_mmlu'.*mmlu\.jsonl: no such file"
    connected = []
    with pytest.raises(expected[0], match=expected[1]):
        run_experiment(parse_config(raw), connect=lambda: connected.append(True))
    assert not connected
    assert not (tmp_path / "storage").exists()


def test_ray_jobs_name_the_config_with_dash_dash_config(tiny_config_file, capsys):
    """`ray_jobs/<job>.py --config PATH ...` is `dcv COMMAND PATH ...` (job_main), in either spelling."""
    assert job_main("validate", ["--set", "circuits.tau=0.9", "--config", str(tiny_config_file)]) == 0
    assert f"{tiny_config_file} with circuits.tau=0.9: ok" in capsys.readouterr().out
    assert job_main("validate", [f"--config={tiny_config_file}", "--set=circuits.tau=3"]) == 2
    assert "circuits.tau" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "command", "error"),
    [
        ("ray_jobs/experiment.py", "run", "[tracking] uri="),
        ("ray_jobs.sweep", "sweep", "[tracking] uri="),
        ("ray_jobs/patch.py", "patch-all", "no results table"),
    ],
)
def test_ray_job_scripts_forward_to_their_command(tmp_path, monkeypatch, capsys, script, command, error):
    """Each script as `ray job submit` runs it (from the repository root, as `python SCRIPT` or `python -m`;
    here in this process, as __main__): the command's own checks fail fast with its exit code and message,
    before Ray starts. tests/test_two_nodes.py runs ray_jobs/experiment.py as a real job."""
    raw = tiny_config_dict(tmp_path / "storage")
    raw["tracking"]["uri"] = f"http://127.0.0.1:{free_port()}"  # down: run and sweep stop there
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(sys, "argv", [script, "--config", str(config), "--set", "circuits.tau=0.9"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # a script puts the repository root first
    with pytest.raises(SystemExit) as exited:
        if script.endswith(".py"):
            runpy.run_path(str(REPO / script), run_name="__main__")
        else:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err[-3000:]
    assert f"dcv {command}: " in err and error in err, err[-3000:]


def test_dcv_version_names_dcv_and_its_libraries(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert re.match(r"dcv \d+\.\d+\.\d+ \(python 3\.\d+\.\d+, ray \S+, torch \S+", out), out


def test_a_local_ray_that_misses_rays_startup_deadline_is_started_again(monkeypatch, capsys):
    """Ray's 30 s startup deadline (ray/_private/node.py) is retried; any other failure is not."""
    import ray

    from dcv import cli

    attempts = []

    def init(**kwargs):
        attempts.append(kwargs)
        if len(attempts) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    cli.start_local_ray({})
    assert len(attempts) == 2 and attempts[1]["address"] == "local"
    assert "attempt 1 of 3" in capsys.readouterr().err

    def refused(**kwargs):
        attempts.append(kwargs)
        raise ValueError("some other failure")

    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ValueError, match="some other failure"):
        cli.start_local_ray({})
    assert len(attempts) == 3
