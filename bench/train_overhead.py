"""SFT throughput under Ray Train (1 worker) against TRL's SFTTrainer alone in one process.

    .venv/bin/python bench/train_overhead.py [--model smollm2-135m-instruct] [--steps 12] [--threads 1]

Both run the same SFT on the same data, steps, batch size and seed; neither evaluates or checkpoints (the
Ray run saves once at the end, as the plain one does not). Tokens/s counts the tokens of the trained
batches (TRL's ``num_tokens``) over the ``train()`` wall time, so model loading and Ray start-up are
excluded from both; Ray Train's cost that remains is the process group, the worker process and reporting.
The worker uses as many torch threads as the driver (Ray would otherwise pin OMP_NUM_THREADS) and runs at
the driver's OS priority (Ray otherwise nices its workers to 15, which on a shared machine measures the
other tenants, not Ray Train).
Run on an otherwise idle machine; the figure is a ratio of two runs made one after the other.

``--threads`` sets both runs' torch threads (default: one fewer than the machine's cores, at least 1), as
dcv's demo runs each trial on 1 thread. With as many threads as cores, Ray's own processes (GCS, raylet,
the Train controller) compete with torch for the cores. On the 2-core development machine: 2 threads gave
0.685 on 2026-11-25 and 0.921 on 2026-11-30; 1 thread gave 1.013 on 2026-11-30.

The last line is ``BENCH ray_train_vs_trl <ratio>`` (>= 0.9 means Ray Train costs under 10%).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray
import torch
from datasets import Dataset
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from trl import SFTConfig, SFTTrainer

from dcv.config import ModelConfig, TargetTaskConfig
from dcv.models import load_model_and_tokenizer
from dcv.tasks import load_target_splits
from dcv.training.checkpoints import set_torch_threads


def sft_run(model_name: str, steps: int, batch: int, output_dir: str) -> tuple[float, float]:
    """(tokens trained, seconds in train()) of one plain SFTTrainer run."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=model_name))
    model.train()
    train, _ = load_target_splits(TargetTaskConfig(n_train=256, n_test=8))
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        learning_rate=1e-5,
        per_device_train_batch_size=batch,
        completion_only_loss=True,
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([i.to_row() for i in train]),
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return float(max(e.get("num_tokens", 0) for e in trainer.state.log_history)), seconds


def ray_worker(config: dict) -> None:
    set_torch_threads(config["threads"])  # as dcv's workers do (resources.torch_threads)
    sft_run(config["model"], 2, config["batch"], tempfile.mkdtemp())  # the same warm-up as the plain run
    tokens, seconds = sft_run(config["model"], config["steps"], config["batch"], tempfile.mkdtemp())
    # Ray Train V2 keeps the metrics of reports that carry a checkpoint.
    folder = tempfile.mkdtemp()
    ray.train.report(
        {"tokens": tokens, "seconds": seconds}, checkpoint=ray.train.Checkpoint.from_directory(folder)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sft_run(args.model, 2, args.batch, tempfile.mkdtemp())  # warm-up: caches, kernels
    tokens, seconds = sft_run(args.model, args.steps, args.batch, tempfile.mkdtemp())
    plain = tokens / seconds
    print(f"TRL SFTTrainer alone: {tokens:.0f} tokens in {seconds:.1f} s = {plain:.0f} tokens/s")

    # Ray starts its workers at OS niceness 15 (so its own daemons stay responsive). The plain run above has
    # niceness 0; on a machine with any other load that gap, not Ray Train, would decide the ratio.
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _system_config={"worker_niceness": 0},
    )
    result = TorchTrainer(
        ray_worker,
        train_loop_config={
            "model": args.model,
            "steps": args.steps,
            "batch": args.batch,
            "threads": args.threads,
        },
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=False, resources_per_worker={"CPU": args.threads}
        ),
        run_config=RunConfig(name="bench-train-overhead", storage_path=tempfile.mkdtemp()),
    ).fit()
    ray.shutdown()
    under_ray = result.metrics["tokens"] / result.metrics["seconds"]
    print(
        f"SFTTrainer in a Ray Train worker: {result.metrics['tokens']:.0f} tokens in "
        f"{result.metrics['seconds']:.1f} s = {under_ray:.0f} tokens/s"
    )
    print(f"torch threads: {args.threads} in both runs")
    print(f"BENCH ray_train_vs_trl {under_ray / plain:.3f}")


if __name__ == "__main__":
    main()
