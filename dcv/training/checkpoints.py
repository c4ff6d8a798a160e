"""Evaluated checkpoints, the same for SFT and GRPO: the contract later stages read.

Every ``eval_every`` optimizer steps (and at step 0, the base model) each worker hands Ray Train its part
of an HF Trainer checkpoint (rank 0: model, tokenizer, optimizer, scheduler, trainer state; every rank:
its RNG state) with ``ray.train.report``; Ray merges the parts into one checkpoint folder under
``<storage>/trials/<trial>/`` with the step in its metadata. Rank 0 evaluates the model first (target
accuracy, probe scores, KL to base from `dcv.evaluation`) and reports those metrics with the train loss
or mean reward since the previous checkpoint, and logs them to the trial's MLflow run. The checkpoint's
``dcv_checkpoint.json`` holds them too, with the per-item scores behind them (``item_scores``:
``target/correct`` and ``probe/<name>/ld`` lists, for the analysis' bootstrap; never sent to MLflow), and
where they were computed (``evaluation``: the device, and when the process's evaluation kit was built).

Rank 0 evaluates with its ``EvaluationKit`` (test items, probes, the base model, the base model's KL
continuations) on Ray Train's device for the worker, built at the process's first evaluation and reused
after it (``evaluation_kit``); the KL continuations are sampled once per storage root and kept beside the
base scores (``kl_reference_file``), so only the first trial of a root samples them. Weights are saved in
the model's dtype (``SavesInModelDtype``: bf16 stays bf16 under FSDP2, whose master weights are fp32).

A restarted worker resumes from ``ray.train.get_checkpoint()``: the HF Trainer restores model, optimizer,
scheduler, RNG and step from the merged folder. Only a trial's latest checkpoint keeps that resume state
(AdamW's is twice the fp32 weights): `dcv.training.checkpoint_folders` deletes the older ones' once Ray
has registered a newer checkpoint that has its own, and the latest's once the trial has finished. Analysis
reads only the weights, tokenizer and ``dcv_checkpoint.json``, which every evaluated checkpoint keeps.

Under FSDP (``sft.distributed`` / ``rl.distributed: fsdp``) each rank holds a shard of every weight, and a
forward pass on rank 0 alone would wait forever for the other ranks' all-gathers. So at every checkpoint
all ranks gather the full weights (``full_state_dict``, a collective), and rank 0 evaluates and saves a
plain copy of the model holding them (``EvaluationKit.plain_model``); the HF Trainer itself saves whole
weights (``FULL_STATE_DICT``), so an FSDP checkpoint folder reads like a DDP one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from dcv.config import ExperimentConfig, RLConfig, SFTConfig
from dcv.evaluation import KLReference, ModelScores, evaluate_model, sample_kl_reference
from dcv.models import load_model
from dcv.storage import (
    atomic_path,
    base_scores_dir,
    content_hash,
    read_json,
    set_aside,
    storage_root,
)
from dcv.tasks import load_target_splits
from dcv.tasks.items import ProbeSet, QAItem
from dcv.tasks.probes import build_probes
from dcv.tracking import RunLogger
from dcv.training.checkpoint_folders import METADATA_FILE, has_resume_state

# Bumped when the base scores file changes shape, so files written before are never read back.
BASE_SCORES_FORMAT = 2  # 2: {"metrics", "item_scores"}; 1 (no key): metrics only
KL_REFERENCE_FORMAT = 1  # {"input_ids", "attention_mask", "completion_mask"}: integer lists


def evaluation_key(cfg: ExperimentConfig) -> dict:
    """Everything that decides the base model's scores and KL reference: the key of their cached files
    and of a worker's evaluation kit."""
    return {
        "model": cfg.model.model_dump(mode="json", exclude={"cache_dir"}),
        "evaluation": cfg.evaluation.model_dump(mode="json"),
        "target_task": cfg.target_task.model_dump(mode="json"),
        "probes": [p.model_dump(mode="json") for p in cfg.probes],
    }


def kl_reference_file(cfg: ExperimentConfig) -> Path:
    """Where the base model's KL continuations are kept, beside its scores: sampled by the first trial that
    needs them and read back by the others (and by their later evaluations), so every trial of a storage
    root measures KL on the same tokens."""
    decides = {"format": KL_REFERENCE_FORMAT, **evaluation_key(cfg)}
    return base_scores_dir(storage_root(cfg)) / f"{content_hash(decides, 16)}.kl_reference.json"


def read_kl_reference(path: Path) -> KLReference | None:
    """The KL reference kept at ``path``, or None when it is absent or invalid (then moved aside)."""
    data = read_json(path, ("input_ids", "attention_mask", "completion_mask"))
    if data is None:
        return None
    try:
        ref = KLReference(
            *(torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "completion_mask"))
        )
    except (TypeError, ValueError) as exc:  # ragged or non-integer lists
        set_aside(path, f"not a KL reference ({type(exc).__name__})")
        return None
    rows, width = ref.input_ids.shape if ref.input_ids.dim() == 2 else (-1, -1)
    if (
        ref.attention_mask.shape != (rows, width)
        or ref.completion_mask.dim() != 2
        or ref.completion_mask.shape[0] != rows
        or ref.completion_mask.shape[1] > width
    ):
        set_aside(path, "a KL reference whose tensors do not fit together")
        return None
    return ref


def kl_reference(
    cfg: ExperimentConfig,
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test_items: list[QAItem],
) -> KLReference:
    """The base model's KL reference for ``cfg``: read back from ``kl_reference_file``, or sampled
    (``sample_kl_reference``, on the base model's device) and written there."""
    path = kl_reference_file(cfg)
    reference = read_kl_reference(path)
    if reference is not None:
        return reference
    reference = sample_kl_reference(base_model, tokenizer, test_items, cfg.evaluation)
    data = {k: getattr(reference, k).tolist() for k in ("input_ids", "attention_mask", "completion_mask")}
    # replace=False: a trial that finished sampling first wrote the same seeded continuations.
    with atomic_path(path, replace=False) as tmp:
        tmp.write_text(json.dumps(data))
    # What the file holds, which another trial may have written first: every trial uses the same tokens.
    return read_kl_reference(path) or reference


@dataclass
class EvaluationKit:
    """What rank 0 needs to evaluate a checkpoint, on the trainer's device: the test items, the probes,
    the base model (KL to it, and under FSDP the architecture of ``plain_model``) and its KL reference.

    Built by ``evaluation_kit``: once per worker process, at its first evaluation."""

    cfg: ExperimentConfig
    tokenizer: PreTrainedTokenizerBase
    test_items: list[QAItem]
    probes: list[ProbeSet]
    base_model: PreTrainedModel
    kl_reference: KLReference
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The optimizer step at whose evaluation it was built (None: built outside training).
    built_at_step: int | None = None
    # FSDP only: the plain model that holds the gathered weights (a copy of base_model, made once).
    _plain: PreTrainedModel | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        cfg: ExperimentConfig,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device | str = "cpu",
        step: int | None = None,
    ) -> EvaluationKit:
        device = torch.device(device)
        _, test_items = load_target_splits(cfg.target_task)
        base_model = load_model(cfg.model, tokenizer).to(device)
        reference = kl_reference(cfg, base_model, tokenizer, test_items)
        # The reference's tensors live beside the models that read them (no copy per evaluation).
        reference = KLReference(
            reference.input_ids.to(device),
            reference.attention_mask.to(device),
            reference.completion_mask.to(device),
        )
        probes = build_probes(cfg.probes, tokenizer, cfg.target_task)
        return cls(cfg, tokenizer, test_items, probes, base_model, reference, device, step)

    def base_scores_file(self) -> Path:
        """Where the base model's scores are kept, keyed by everything that decides them."""
        decides = {"format": BASE_SCORES_FORMAT, **evaluation_key(self.cfg)}
        return base_scores_dir(storage_root(self.cfg)) / f"{content_hash(decides, 16)}.json"

    def evaluate_base(self, model: PreTrainedModel) -> ModelScores:
        """Step 0's scores: the base model's, the same in every trial that starts from it, so evaluated
        by the first such trial and read back by the others (greedy decoding: nothing is random)."""
        path = self.base_scores_file()
        data = read_json(path, ("metrics", "item_scores"))  # unreadable: moved aside, evaluated again
        if data is not None:
            return ModelScores(data["metrics"], data["item_scores"])
        scores = self.evaluate(model)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"metrics": scores.metrics, "item_scores": scores.item_scores}))
        return scores

    def plain_model(self, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
        """A plain (unsharded) model holding ``state_dict``, on the kit's device: the base model's
        architecture, which every trial's policy shares (GRPO after SFT starts from an SFT checkpoint of
        the same base)."""
        if self._plain is None:
            self._plain = copy.deepcopy(self.base_model)
        self._plain.load_state_dict(state_dict, strict=True)  # casts to the base's dtype where they differ
        return self._plain

    def evaluate(self, model: PreTrainedModel) -> ModelScores:
        was_training = model.training
        model.eval()
        try:
            return evaluate_model(
                model,
                self.tokenizer,
                self.cfg.evaluation,
                self.test_items,
                self.probes,
                self.base_model,
                self.kl_reference,
            )
        finally:
            model.train(was_training)


# This process's evaluation kit, under the key of what decides it (``evaluation_kit``).
_KIT: dict[str, EvaluationKit] = {}
_KIT_BUILDS = [0]  # kits this process has built


def kits_built() -> int:
    """How many evaluation kits this process has built (one per worker process, unless its config changes)."""
    return _KIT_BUILDS[0]


def evaluation_kit(
    cfg: ExperimentConfig,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device | str,
    step: int | None = None,
) -> EvaluationKit:
    """This process's kit for ``cfg`` on ``device``: built at the first call, the same object after it,
    across evaluations and across trials that Ray runs in this process, as long as nothing that decides
    it changes (``evaluation_key``, the storage root, the device). Only the latest kit is kept: a kit
    holds a base model, on the trainer's GPU where there is one. ``step``: the evaluation that asks."""
    device = torch.device(device)
    key = content_hash({**evaluation_key(cfg), "storage": str(storage_root(cfg)), "device": str(device)})
    kit = _KIT.get(key)
    if kit is None:
        _KIT.clear()  # first, so the old kit's memory is free before the new one loads
        kit = _KIT[key] = EvaluationKit.build(cfg, tokenizer, device, step)
        _KIT_BUILDS[0] += 1
    return kit


def is_rank_zero() -> bool:
    return ray.train.get_context().get_world_rank() == 0


def train_metric_since(log_history: list[dict[str, Any]], key: str, after_step: int) -> float | None:
    """Mean of a logged train metric (``loss``, ``reward``) over steps after ``after_step``."""
    values = [e[key] for e in log_history if key in e and e.get("step", 0) > after_step]
    return sum(values) / len(values) if values else None


class EvaluatedCheckpoints(TrainerCallback):
    """HF Trainer callback: on every save, evaluate (rank 0) and report the checkpoint to Ray Train.

    Rank 0 builds its evaluation kit (``evaluation_kit``, on Ray Train's device for this worker) at its
    first evaluation, not before training: there every rank has passed the trainer's set-up collectives
    and, under FSDP, the weights' gather, and the other ranks wait for rank 0 in ``ray.train.report``,
    whose barrier is Ray Train's own and has no timeout (``RAY_TRAIN_COLLECTIVE_TIMEOUT_S`` unset), not in
    a torch collective, which would fail after the process group's timeout (1,800 s).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        tokenizer: PreTrainedTokenizerBase,
        method: str,
        trial: str,
        train_metric: str,
        resuming: bool,
        log_run=None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.evaluates = is_rank_zero()  # rank 0 evaluates and writes the metadata; the others only report
        self.method = method
        self.trial = trial
        self.train_metric = train_metric  # "loss" for SFT, "reward" for GRPO
        # HF calls on_train_begin before it restores the trainer state, so the callback must be told.
        self.resuming = resuming
        self.log_run = log_run  # RunLogger on rank 0, None elsewhere

    def kit(self, step: int) -> EvaluationKit:
        """Rank 0's evaluation kit, built at the first evaluation of this process (``step``)."""
        from ray.train.torch import get_device

        return evaluation_kit(self.cfg, self.tokenizer, get_device(), step)

    def whole_model(self, model: PreTrainedModel, step: int) -> PreTrainedModel | None:
        """The model to evaluate and save: ``model`` itself, or under FSDP a plain copy on rank 0 of the
        weights gathered from every rank (so every rank must call this; ranks > 0 get None)."""
        if not is_sharded(model):
            return model
        state = full_state_dict(model)
        return self.kit(step).plain_model(state) if self.evaluates else None

    def report(self, step: int, folder: Path, model: PreTrainedModel, extra: dict[str, float]) -> None:
        metrics: dict[str, float] = {"step": float(step), **extra}
        if self.evaluates:
            kit = self.kit(step)
            from_base = step == 0 and (self.method == "sft" or self.cfg.rl.init == "base")
            scores = kit.evaluate_base(model) if from_base else kit.evaluate(model)
            metrics.update(scores.metrics)
            meta = {"step": step, "method": self.method, "trial": self.trial, "metrics": metrics}
            # Where it was evaluated: the device, and the kit's reuse (built once per worker process).
            meta["evaluation"] = {
                "device": str(kit.device),
                "kit_built_at_step": kit.built_at_step,
                "kits_built_by_process": kits_built(),
            }
            (folder / METADATA_FILE).write_text(json.dumps({**meta, "item_scores": scores.item_scores}))
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:06d}")
        # After the report: a step is logged once its checkpoint is persisted (a worker killed in between
        # re-evaluates that step after resuming, and MLflow then holds it twice).
        if self.log_run is not None:
            self.log_run.log_metrics(metrics, step=step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resuming:
            return
        # Step 0 is the base model: a weights-only checkpoint, evaluated like the others.
        whole = self.whole_model(model, 0)
        folder = Path(tempfile.mkdtemp(prefix="dcv-step0-"))
        try:
            if self.evaluates:
                whole.save_pretrained(folder)
                self.tokenizer.save_pretrained(folder)
            self.report(0, folder, whole, {})
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def on_save(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)  # ranks > 0 may have written nothing but their RNG state
        extra = {}
        value = train_metric_since(state.log_history, self.train_metric, step - args.save_steps)
        if value is not None:
            extra[f"train/{self.train_metric}"] = value
        self.report(step, folder, self.whole_model(model, step), extra)
        # Ray holds the persisted copy; the local one only costs disk.
        shutil.rmtree(folder, ignore_errors=True)


class SavesInModelDtype:
    """HF Trainer mixin: checkpoints hold the weights in the dtype the model was loaded in
    (``model.dtype`` of the config), like step 0's, which the callback saves from the model itself.

    Under FSDP2 with bf16, accelerate upcasts the parameters to fp32 master weights (``fsdp2_prepare_model``
    in accelerate/utils/fsdp_utils.py, 1.15), so the Trainer's save of the gathered FULL_STATE_DICT would
    write fp32 tensors, and ``save_pretrained`` would write the parameters' dtype, float32, into
    config.json; lm-eval's ``dtype="auto"`` would then score step 0 in bf16 and later steps in fp32. The
    resume state (accelerate's ``pytorch_model_fsdp*`` copy, optimizer) keeps the fp32 master weights.
    """

    def __init__(self, *args, save_dtype: torch.dtype, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_dtype = save_dtype

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None:
            state_dict = {
                name: t.to(self.save_dtype) if t.is_floating_point() and t.dtype != self.save_dtype else t
                for name, t in state_dict.items()
            }
        super()._save(output_dir, state_dict=state_dict)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and (folder / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(folder)
            if config.dtype != self.save_dtype:
                config.dtype = self.save_dtype
                config.save_pretrained(folder)


def shared_trainer_args(
    cfg: ExperimentConfig, method: SFTConfig | RLConfig, seed: int, output_dir: Path
) -> dict:
    """HF TrainingArguments that SFT and GRPO share: schedule, seed, checkpoint cadence, device."""
    return {
        "output_dir": str(output_dir),
        "max_steps": method.max_steps,
        "learning_rate": method.learning_rate,
        "lr_scheduler_type": method.lr_scheduler,
        "warmup_steps": method.warmup_ratio,  # a float < 1 is a ratio of max_steps
        "per_device_train_batch_size": method.per_device_batch_size,
        "gradient_accumulation_steps": method.gradient_accumulation_steps,
        "seed": seed,
        "data_seed": seed,
        "logging_steps": 1,
        # Every save is an evaluated checkpoint (EvaluatedCheckpoints.on_save).
        "save_strategy": "steps",
        "save_steps": method.eval_every,
        "report_to": "none",
        "use_cpu": not cfg.resources.use_gpu,
        "ddp_backend": "nccl" if cfg.resources.use_gpu else "gloo",
        "bf16": cfg.model.dtype == "bfloat16",
        "dataloader_num_workers": 0,
        "disable_tqdm": not is_rank_zero(),
    }


def distributed_args(distributed: str, model: PreTrainedModel) -> dict:
    """HF TrainingArguments for ``sft.distributed`` / ``rl.distributed``. ddp needs none: Ray Train's
    process group is there and the HF Trainer wraps the model in DDP. fsdp is FSDP2 through accelerate
    (FSDP1 is deprecated there): each decoder layer its own unit, named by the model's
    ``_no_split_modules`` (LlamaDecoderLayer, Qwen2DecoderLayer), so one rule fits every family; whole
    weights in checkpoints (FULL_STATE_DICT: gathered on rank 0, saved as plain HF weights)."""
    if distributed == "ddp":
        return {}
    layers = list(getattr(model, "_no_split_modules", None) or [])
    if not layers:
        raise ValueError(
            f"distributed=fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules), "
            "so FSDP cannot shard it layer by layer; use distributed: ddp"
        )
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "transformer_layer_cls_to_wrap": layers,
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
        },
    }


def keep_fsdp_on_cpu(args: Any) -> None:
    """Make the HF Trainer built next with ``args`` shard on CPU as it would on GPUs (no-op unless
    ``args`` asks for FSDP on CPU).

    accelerate 1.15 turns FSDP on only for GPU-like process groups: ``AcceleratorState.__init__``
    (accelerate/state.py) sets ``DistributedType.FSDP`` and keeps the ``fsdp_plugin`` only when the
    distributed type is MULTI_GPU, MULTI_NPU, MULTI_XPU, ...; on CPU (MULTI_CPU, gloo) it drops the
    plugin without a word and the Trainer trains plain DDP. torch's FSDP2 (``fully_shard``) itself runs
    on CPU over gloo. accelerate's state is one shared object, and the Trainer's Accelerator keeps it
    when it is already set up: so set it up here, with FSDP on and the plugin the Trainer would build.
    """
    if not getattr(args, "fsdp", None) or not args.use_cpu:
        return
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    mixed = "bf16" if args.bf16 else "no"
    state = Accelerator(cpu=True, mixed_precision=mixed).state
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if mixed != "no":
        plugin.set_mixed_precision(mixed)
    state.fsdp_plugin = plugin
    # Every AcceleratorState() re-reads the distributed type from the process-wide PartialState.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP


def check_sharded(trainer: Any, distributed: str) -> None:
    """Refuse to train plain DDP where FSDP was asked for: accelerate drops an FSDP plugin it cannot use
    without a word (see ``keep_fsdp_on_cpu``), and the Trainer then says nothing either."""
    if distributed == "fsdp" and not trainer.is_fsdp_enabled:
        state = trainer.accelerator.state
        raise RuntimeError(
            f"distributed=fsdp: the HF Trainer did not turn FSDP on (accelerate's distributed type is "
            f"{state.distributed_type}); it would train plain DDP. Set distributed: ddp, or check the "
            "accelerate version against dcv.training.checkpoints.keep_fsdp_on_cpu"
        )


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP2 shards a model in place (``fully_shard`` makes it an FSDPModule); DDP and a single worker
    hold it whole."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# Module names wrappers put into parameter names (activation checkpointing, torch.compile, FSDP1);
# the rollout models and saved checkpoints use the plain HF names.
WRAPPER_NAMES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def full_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's whole weights as CPU tensors under their plain HF names, floating ones in ``dtype``
    if given (FSDP with bf16 trains fp32 master weights; the rollout models hold the config's dtype).

    Sharded (FSDP2) this is a collective: every rank must call it, and only rank 0 gets the weights
    (the others get {}; ``cpu_offload`` gathers layer by layer into rank 0's memory, never a full copy
    on any GPU). Otherwise it is this process's own copy (a DDP module is unwrapped first).
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    whole = {}
    for name, tensor in state.items():
        for wrapper in WRAPPER_NAMES:
            name = name.replace(wrapper, "")
        cast = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
        whole[name] = tensor.to(dtype) if cast else tensor
    return whole


def restore_latest(output_dir: Path) -> str | None:
    """Copy Ray Train's latest checkpoint into ``output_dir`` for the HF Trainer; None when starting fresh."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        meta_file = Path(folder) / METADATA_FILE
        step = int(json.loads(meta_file.read_text())["step"]) if meta_file.exists() else 0
        if step == 0 or not (Path(folder) / "trainer_state.json").exists():
            return None  # the base-model checkpoint: nothing to resume
        if not has_resume_state(Path(folder)):
            # HF Trainer would resume with a fresh optimizer and RNG without a word.
            raise ValueError(
                f"{checkpoint.path}: the latest checkpoint (step {step}) holds no optimizer state, so the "
                "trial cannot resume exactly; delete the trial folder to retrain it"
            )
        target = output_dir / f"checkpoint-{step}"
        shutil.copytree(folder, target, dirs_exist_ok=True)
    return str(target)


def worker_output_dir(trial: str) -> Path:
    """A local scratch folder per worker (rank in the name: each rank writes its own RNG state)."""
    rank = ray.train.get_context().get_world_rank()
    root = Path(os.environ.get("DCV_SCRATCH", tempfile.gettempdir())) / "dcv-train" / trial / f"rank{rank}"
    root.mkdir(parents=True, exist_ok=True)
    return root


def trial_logger(loop_config: dict[str, Any]) -> RunLogger | None:
    """Rank 0 logs to the trial's MLflow run (created by the driver); other ranks log nothing."""
    if not is_rank_zero() or not loop_config.get("run_id"):
        return None
    return RunLogger.attach(loop_config["tracking_uri"], loop_config["run_id"])


def set_torch_threads(threads: int | None) -> None:
    """``resources.torch_threads`` if set (several workers on one node should not oversubscribe it)."""
    if threads:
        torch.set_num_threads(threads)
