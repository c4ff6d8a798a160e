"""What a researcher sees while dcv runs (dcv.console): dcv's lines on the terminal, the rest in a log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from dcv.console import PROGRESS_EVERY_S, Console
from dcv.experiment import STAGES
from dcv.training.trial import RUNTIME_ENV_DEFAULTS, runtime_env_vars
from tests.helpers import REPO

# A line of `dis` output: "  12     4 LOAD_GLOBAL   0 (x)", ">>   22 RETURN_VALUE".
BYTECODE = re.compile(r"^\s*(\d+\s+)?(>>\s+)?\d+\s+[A-Z][A-Z_]{3,}\b", re.MULTILINE)


def test_progress_is_one_line_per_stage_off_a_terminal(capsys):
    now = [0.0]
    console = Console(live=False, clock=lambda: now[0])
    console.line("[1/2 sweep] started")
    for done in range(1, 4):
        now[0] += 1
        console.progress(f"sweep: {done}/9 trials finished")
    now[0] += PROGRESS_EVERY_S  # a long stage still shows that it moves
    console.progress("sweep: 4/9 trials finished")
    console.line("[1/2 sweep] done in 70 s")
    console.progress("patching: 1/5 items done")  # the next stage's first progress line is shown
    assert capsys.readouterr().out.splitlines() == [
        "[1/2 sweep] started",
        "sweep: 1/9 trials finished",
        "sweep: 4/9 trials finished",
        "[1/2 sweep] done in 70 s",
        "patching: 1/5 items done",
    ]


def test_progress_on_a_terminal_is_rewritten_in_place(capsys):
    console = Console(live=True)
    console.progress("patching: 1/2 items done")
    console.progress("patching: 2/2 items done")
    console.line("[4/8 patching] done in 3 s")
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # the progress lines left no line of their own
    assert out.endswith("\r\x1b[K[4/8 patching] done in 3 s\n")


# Run in a fresh process: the console repoints the process's own stdout and stderr.
CONSOLE_SCRIPT = """
import os, subprocess, sys, warnings
from pathlib import Path
from dcv.console import Console

# A function compiled as if it were dcv's own code (a file in the dcv package).
source = "def dcv_code_warns():\\n    import warnings\\n    warnings.warn('dcv needs you to see this')\\n"
exec(compile(source, str(Path(__import__("dcv").__file__).with_name("fake.py")), "exec"))
with Console() as console:
    print("before the log: on the terminal")
    console.start_log(Path(sys.argv[1]), "test")
    console.line("[1/1 stage] started")
    print("python print: log")
    print("python stderr: log", file=sys.stderr)
    os.write(1, b"fd 1 write: log\\n")
    os.write(2, b"fd 2 write: log\\n")  # as Ray's C++ logging does
    subprocess.run(["echo", "child process: log"], check=True)
    warnings.warn("another library's warning: log")
    dcv_code_warns()
    console.line(console.log_line())
    if len(sys.argv) > 2:
        raise RuntimeError("boom")
print("after the log: on the terminal")
"""


def run_console_script(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CONSOLE_SCRIPT, str(tmp_path / "logs"), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_the_log_takes_everything_but_the_console_lines(tmp_path):
    done = run_console_script(tmp_path)
    assert done.returncode == 0, done.stderr
    (log,) = (tmp_path / "logs").glob("test-*.log")
    assert done.stdout.splitlines() == [
        "before the log: on the terminal",
        "[1/1 stage] started",
        f"log: {log}",
        "after the log: on the terminal",
    ]
    assert done.stderr.splitlines() == ["warning: dcv needs you to see this (UserWarning, fake.py:3)"]
    text = log.read_text()
    for written in ("python print", "python stderr", "fd 1 write", "fd 2 write", "child process"):
        assert f"{written}: log" in text
    assert "another library's warning: log" in text
    assert "] [1/1 stage] started" in text and "warning: dcv needs you to see this" in text
    assert "on the terminal" not in text


def test_an_error_reaches_the_terminal_and_its_traceback_the_log(tmp_path):
    done = run_console_script(tmp_path, "fail")
    assert done.returncode == 1
    (log,) = (tmp_path / "logs").glob("test-*.log")
    assert "RuntimeError: boom" in done.stderr  # the interpreter's traceback, on the restored stderr
    assert f"(full log, with the workers' output: {log})" in done.stderr
    assert "RuntimeError: boom" in log.read_text()


def test_verbose_redirects_nothing(tmp_path, capsys):
    with Console(verbose=True) as console:
        assert console.start_log(tmp_path / "logs", "run") is None
        console.line("a stage line")
        print("a worker line")
        assert console.log_line() == ""
    assert capsys.readouterr().out == "a stage line\na worker line\n"
    assert not (tmp_path / "logs").exists()


def test_runtime_env_turns_ray_trains_print_patch_off_and_user_values_win():
    assert runtime_env_vars({})["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert runtime_env_vars({"RAY_TRAIN_ENABLE_PRINT_PATCH": "1"})["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"
    assert runtime_env_vars({"TQDM_DISABLE": "0"})["TQDM_DISABLE"] == "0"
    assert set(runtime_env_vars({})) == set(RUNTIME_ENV_DEFAULTS)


def _hash_in_a_worker(config):
    """In a Ray Train worker: fingerprint a function as datasets does for TRL's maps, and record what
    reaches the root logger meanwhile (where Ray Train's print patch sends prints)."""
    import builtins
    import json
    import logging

    from datasets.fingerprint import Hasher

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    def tokenize(row):
        return {"n": [len(text) for text in row["text"]]}

    logging.getLogger().addHandler(handler := Keep())
    try:
        Hasher.hash(tokenize)
    finally:
        logging.getLogger().removeHandler(handler)
    Path(config["out"]).write_text(json.dumps({"print": builtins.print.__module__, "logged": records}))


def test_fingerprinting_in_a_ray_train_worker_logs_no_bytecode(ray_cluster, tmp_path):
    """The source of the bytecode on the console: dill disassembles each function datasets fingerprints
    into a captured stdout, and Ray Train's print patch logged every captured line. The runtime env
    turns the patch off (the session's Ray uses dcv's runtime env)."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "seen.json"
    TorchTrainer(
        _hash_in_a_worker,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(storage_path=str(tmp_path / "train")),
    ).fit()
    seen = json.loads(out.read_text())
    assert seen["print"] == "builtins"
    assert not [line for line in seen["logged"] if BYTECODE.search(line)]


def test_dcv_run_console_has_stage_lines_only_and_the_log_the_rest(tiny_run):
    """A tiny `dcv run` (the session's tiny_run: every stage, lm-eval included), its console captured: no
    bytecode, no Ray chatter, every stage's done line, the summary names the log, and the log holds the
    workers' output."""
    run = tiny_run.run
    console = run.stdout + run.stderr
    assert run.proc.returncode == 0, console[-4000:]
    assert not BYTECODE.search(console), BYTECODE.search(console)
    for noise in ("PlacementGroupCleaner", "core_worker.cc", "Loading weights", "pid=", "Trial status"):
        assert noise not in console, noise
    for i, stage in enumerate(STAGES, start=1):
        assert re.search(rf"^\[{i}/{len(STAGES)} {stage}\] done in \d+ s", run.stdout, re.MULTILINE), stage
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    assert len(lines) < 60, run.stdout
    (log,) = (tiny_run.storage / "logs").glob("run-*.log")
    assert f"log: {log}" in lines
    text = log.read_text()
    assert "(RayTrainWorker pid=" in text and "(TrainController pid=" in text  # the workers' output
    assert "[9/9 report] done in" in text  # and the console's lines, in order with it
    assert not BYTECODE.search(text)  # stopped at the source, not hidden in the log
