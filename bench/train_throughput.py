"""SFT and GRPO-learner throughput against the 6 x parameters FLOP limit at this machine's matmul rate.

    .venv/bin/python bench/train_throughput.py [--config configs/demo.yaml] [--sft-steps 4] [--grpo-steps 2]

Hardware: whatever runs it (CPU; the figures quoted in docs/measurements.md come from a 2-core machine, 1
torch thread as in the demo). Fixed seed. Plain TRL in one process, no Ray: SFTTrainer and GRPOTrainer (with
transformers generation, the compute dcv's ``hf`` rollout actor runs) on the config's model, target task and
``sft``/``rl`` batch settings, without evaluation or checkpoints. Each trainer runs warm-up steps, then
the timed steps.

A training step costs about 6 x parameters FLOPs per token (forward 2, backward 4; the tied unembedding
counted once, attention's sequence-length term left out), so tokens/s x 6N over the matmul rate is the
fraction of the machine's limit the step reaches. The rate is measured in the same process at the same
torch thread count, on the step's own matrix shapes (every linear layer's forward, input-gradient and
weight-gradient products at the tokens of one step), before and after the timed runs, each shape the best
of several repeats; the better of the two is the limit. No code beats that rate, so a fraction above 1
means the measurement was wrong: the script then prints both rates and no fraction.

GRPO: a step is generation plus the learner's forward and backward on prompt + completion tokens; the
learner's time is the step's less its generation calls. The last lines are ``BENCH <name> <value>``:
``sft_flop_fraction``, ``grpo_step_seconds``, ``generation_share``, ``grpo_learner_flop_fraction``, and
the rates behind them.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from datasets import Dataset
from matmul_rate import matmul_gflops
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from dcv.config import load_config
from dcv.models import load_model_and_tokenizer
from dcv.tasks import load_target_splits
from dcv.tasks.answers import reward


def step_shapes(model: torch.nn.Module, tokens: int) -> dict[tuple[int, int, int], float]:
    """A training step's matmuls on ``tokens`` rows: for each linear layer (out x in), the forward
    (tokens, in, out), the input gradient (tokens, out, in) and the weight gradient (out, tokens, in)."""
    shapes: dict[tuple[int, int, int], float] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            out, inp = module.weight.shape
            for shape in [(tokens, inp, out), (tokens, out, inp), (out, tokens, inp)]:
                shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


class StepTimes(TrainerCallback):
    def __init__(self):
        self.starts, self.ends = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def common_args(steps: int, batch: int, lr: float) -> dict:
    return {
        "output_dir": tempfile.mkdtemp(prefix="dcv-bench-"),
        "max_steps": steps,
        "learning_rate": lr,
        "per_device_train_batch_size": batch,
        "seed": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def timed_steps(times: StepTimes, warmup: int) -> list[float]:
    return [end - start for start, end in zip(times.starts, times.ends, strict=True)][warmup:]


def mean_tokens(tokenizer, conversations: list[list[dict]], generation_prompt: bool) -> float:
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt)
        for c in conversations
    ]
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)


def run_sft(model, tokenizer, rows, cfg, warmup: int, steps: int) -> tuple[float, float]:
    """(tokens, seconds) of the timed steps of one SFTTrainer run."""
    times = StepTimes()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **common_args(warmup + steps, cfg.sft.per_device_batch_size, cfg.sft.learning_rate),
            max_length=cfg.sft.max_seq_length,
            completion_only_loss=True,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[times],
    )
    trainer.train()
    seen = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    return seen[-1] - (seen[warmup - 1] if warmup else 0), sum(timed_steps(times, warmup))


def run_grpo(model, tokenizer, rows, cfg, warmup: int, steps: int) -> tuple[float, list[float], float]:
    """(learner tokens, step seconds, generation seconds) of the timed steps of one GRPOTrainer run."""
    generation: list[tuple[float, float]] = []
    generate = model.generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        generation.append((start, time.perf_counter()))
        return out

    model.generate = timed_generate

    def accuracy_reward(completions, gold, options, answer_format, **kwargs) -> list[float]:
        return reward(completions, gold, cfg.target_task.format_bonus, options, answer_format)

    r = cfg.rl
    times = StepTimes()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy_reward],
        args=GRPOConfig(
            **common_args(warmup + steps, r.per_device_batch_size, r.learning_rate),
            num_generations=r.num_generations,
            max_completion_length=r.max_completion_length,
            temperature=r.temperature,
            beta=r.beta,
            loss_type=r.loss_type,
        ),
        train_dataset=Dataset.from_list(
            [{k: row[k] for k in ("prompt", "gold", "options", "answer_format")} for row in rows]
        ),
        processing_class=tokenizer,
        callbacks=[times],
    )
    trainer.train()
    step_seconds = timed_steps(times, warmup)
    first = times.starts[warmup]
    generated = sum(end - start for start, end in generation if start >= first)
    seen = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    return seen[-1] - (seen[warmup - 1] if warmup else 0), step_seconds, generated


def flop_fraction_lines(name: str, tokens_per_s: float, n_params: int, before: float, after: float):
    """BENCH lines for one workload: its achieved rate, the limit, and the fraction unless it exceeds 1."""
    achieved = tokens_per_s * 6 * n_params / 1e9
    rate = max(before, after)
    print(
        f"{name}: {tokens_per_s:.0f} tokens/s = {achieved:.1f} GFLOP/s at 6 x {n_params / 1e6:.1f}M; "
        f"matmul rate on its shapes {before:.1f} before, {after:.1f} after the timed runs"
    )
    lines = [f"BENCH {name}_gflops {achieved:.1f}", f"BENCH {name}_matmul_gflops {rate:.1f}"]
    if achieved > rate:
        print(
            f"{name}: above the measured matmul rate, so the rate measurement is wrong; no fraction printed"
        )
    else:
        lines.append(f"BENCH {name}_flop_fraction {achieved / rate:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--sft-steps", type=int, default=4)
    parser.add_argument("--grpo-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: resources.torch_threads, else 1")
    args = parser.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or cfg.resources.torch_threads or 1)

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    grpo_model = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    train, _ = load_target_splits(cfg.target_task)
    rows = [item.to_row() for item in train]
    print(f"{cfg.model.name}: {n_params / 1e6:.1f}M parameters; torch threads {torch.get_num_threads()}")

    # The steps' shapes from the data: tokens per SFT step (prompt + answer) and per GRPO learner step
    # (prompt + completions, at most max_completion_length each).
    sft_rows = cfg.sft.per_device_batch_size * mean_tokens(
        tokenizer, [r["prompt"] + r["completion"] for r in rows], False
    )
    prompt = mean_tokens(tokenizer, [r["prompt"] for r in rows], True)
    grpo_rows = cfg.rl.per_device_batch_size * (prompt + cfg.rl.max_completion_length)
    sft_shapes, grpo_shapes = step_shapes(model, round(sft_rows)), step_shapes(model, round(grpo_rows))
    sft_before, grpo_before = matmul_gflops(sft_shapes), matmul_gflops(grpo_shapes)

    tokens, seconds = run_sft(model, tokenizer, rows, cfg, args.warmup_steps, args.sft_steps)
    print(f"SFT: {tokens:.0f} tokens in {seconds:.1f} s over {args.sft_steps} timed steps")
    learner_tokens, steps, generated = run_grpo(
        grpo_model, tokenizer, rows, cfg, args.warmup_steps, args.grpo_steps
    )
    step_seconds = sum(steps) / len(steps)
    print(
        f"GRPO: steps {[round(s, 2) for s in steps]} s, generation {generated:.1f} s of {sum(steps):.1f}; "
        f"learner {learner_tokens:.0f} prompt + completion tokens"
    )
    sft_after, grpo_after = matmul_gflops(sft_shapes), matmul_gflops(grpo_shapes)

    lines = flop_fraction_lines("sft", tokens / seconds, n_params, sft_before, sft_after)
    learner_tokens_per_s = learner_tokens / (sum(steps) - generated)
    lines += flop_fraction_lines("grpo_learner", learner_tokens_per_s, n_params, grpo_before, grpo_after)
    lines += [
        f"BENCH grpo_step_seconds {step_seconds:.2f}",
        f"BENCH generation_share {generated / sum(steps):.3f}",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
