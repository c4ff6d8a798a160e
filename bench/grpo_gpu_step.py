"""GRPO step time and GPU memory at paper scale: a random-initialised Qwen2.5-3B on one GPU.

    python bench/grpo_gpu_step.py --tokenizer DIR [--steps 4]

The model is built from Qwen2.5-3B-Instruct's architecture (36 layers, hidden 2048, 16 query / 2 KV
heads, MLP 11008, tied embeddings) with random weights, so nothing is downloaded; the vocabulary is the
given tokenizer's (a Qwen tokenizer gives the real 151,936; SmolLM2's, 49,152, has 0.21 B fewer embedding
parameters). TRL's GRPOTrainer runs the paper config's RL settings (16 completions per prompt, 256 new
tokens, Dr. GRPO loss, KL 0, gradient accumulation 4) with transformers generation, which is what dcv's
``hf`` rollout backend runs inside its Ray actor. A random model never emits EOS, so every completion is
the full 256 tokens: the worst case for generation time.

This script needs only torch, transformers, trl and datasets (no Ray, no dcv import), so it runs on a bare
GPU machine. It ends with one line per figure: ``BENCH <name> <value>``; ``generation_share`` is the
fraction of the step spent generating, measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

QWEN25_3B = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


class StepTimes(TrainerCallback):
    def __init__(self):
        self.starts, self.ends = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a local tokenizer folder with a chat template")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = Qwen2Config(vocab_size=len(tokenizer), **QWEN25_3B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"random Qwen2.5-3B architecture: {n_params / 1e9:.2f} B parameters, vocab {len(tokenizer)}")

    questions = [
        f"Which element has atomic number {z}? A) one B) two C) three D) four. "
        "Answer with <answer>LETTER</answer>."
        for z in range(1, 129)
    ]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions]})

    def reward(completions, **kwargs) -> list[float]:
        return [float("<answer>" in c[0]["content"]) for c in completions]

    generation_seconds = []
    original_generate = model.generate

    def timed_generate(*a, **k):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = original_generate(*a, **k)
        torch.cuda.synchronize()
        generation_seconds.append(time.perf_counter() - start)
        return out

    model.generate = timed_generate
    times = StepTimes()
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=reward,
        train_dataset=data,
        args=GRPOConfig(
            output_dir="/tmp/grpo-gpu-bench",
            per_device_train_batch_size=16,
            gradient_accumulation_steps=4,
            num_generations=16,
            max_completion_length=256,
            learning_rate=1e-6,
            beta=0.0,
            loss_type="dr_grpo",
            temperature=1.0,
            max_steps=args.steps,
            bf16=True,
            gradient_checkpointing=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
        ),
        callbacks=[times],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = [end - start for start, end in zip(times.starts, times.ends, strict=True)]
    # The first step includes CUDA warm-up; report the rest.
    warm = steps[1:] or steps
    step_seconds = sum(warm) / len(warm)
    generated = sum(generation_seconds[len(generation_seconds) // len(steps) :]) / len(warm)
    tokens = 64 * 256  # completions per optimizer step x new tokens (no EOS from random weights)
    print(f"step times (s): {[round(s, 2) for s in steps]}; generation calls: {len(generation_seconds)}")
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated")
    print(f"BENCH step_seconds {step_seconds:.2f}")
    print(f"BENCH generated_tokens_per_s {tokens / generated:.0f}")
    print(f"BENCH generation_share {generated / step_seconds:.3f}")
    print(f"BENCH peak_memory_gib {torch.cuda.max_memory_allocated() / 2**30:.1f}")


if __name__ == "__main__":
    main()
