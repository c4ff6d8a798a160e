"""Supervised fine-tuning on the target task: TRL's SFTTrainer inside Ray Train workers.

Run one trial with ``dcv train configs/demo.yaml --method sft``. Each worker builds, in order: model and
tokenizer (the config's base model), the train split as prompt/completion conversations (so the loss
covers the assistant's answer only, rendered with the model's own chat template), the TRL config (built
here, inside the worker, because its ``__post_init__`` reads the world size), the trainer with the
evaluated-checkpoint callback, and then trains, resuming from Ray Train's latest checkpoint if there is
one. DDP over gloo on CPU and NCCL on GPU come from Ray Train's process group. ``sft.distributed: fsdp``
shards the model instead (FSDP2 through accelerate, one unit per decoder layer: see
`dcv.training.checkpoints.distributed_args`), for models too big for one GPU; checkpoints still hold whole
HF weights, gathered on rank 0, and rank 0 evaluates a plain copy of them. On CPU it runs over gloo too
(``keep_fsdp_on_cpu``), which is how the tests run it.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from ray.train.huggingface.transformers import prepare_trainer
from trl import SFTConfig, SFTTrainer

from dcv.config import parse_config
from dcv.models import DTYPES, load_model_and_tokenizer
from dcv.tasks import load_target_splits
from dcv.training.checkpoints import (
    EvaluatedCheckpoints,
    SavesInModelDtype,
    check_sharded,
    distributed_args,
    keep_fsdp_on_cpu,
    restore_latest,
    set_torch_threads,
    shared_trainer_args,
    trial_logger,
    worker_output_dir,
)


class DcvSFTTrainer(SavesInModelDtype, SFTTrainer):
    """TRL's SFTTrainer saving checkpoints in the model's dtype (bf16 under FSDP too)."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = parse_config(loop_config["config"])
    trial, seed = loop_config["trial"], loop_config["seed"]
    set_torch_threads(cfg.resources.torch_threads)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model.train()
    train_items, _ = load_target_splits(cfg.target_task)
    train_dataset = Dataset.from_list([item.to_row() for item in train_items])

    output_dir = worker_output_dir(trial)
    args = SFTConfig(
        **shared_trainer_args(cfg, cfg.sft, seed, output_dir),
        weight_decay=cfg.sft.weight_decay,
        max_length=cfg.sft.max_seq_length,
        completion_only_loss=True,  # loss on the assistant's answer only
        **distributed_args(cfg.sft.distributed, model),
    )
    keep_fsdp_on_cpu(args)
    resume_from = restore_latest(output_dir)
    # Rank 0 builds its evaluation kit at the first evaluation (EvaluatedCheckpoints), not here.
    callback = EvaluatedCheckpoints(
        cfg,
        tokenizer,
        "sft",
        trial,
        "loss",
        resuming=resume_from is not None,
        log_run=trial_logger(loop_config),
    )
    trainer = DcvSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[callback],
        save_dtype=DTYPES[cfg.model.dtype],
    )
    trainer = prepare_trainer(trainer)
    check_sharded(trainer, cfg.sft.distributed)
    trainer.train(resume_from_checkpoint=resume_from)
