"""A Ray actor that holds dcv's vllm rollout backend in .venv-vllm's interpreter, for
tests/training/test_vllm.py. Not a test module: it runs inside the vLLM interpreter, which has dcv,
torch, Ray and vLLM but neither pytest nor dcv's training stack, so it imports only those."""

from __future__ import annotations

from typing import Any

import ray
import torch

from dcv.config import parse_config
from dcv.training.rollout import VLLMRolloutBackend, receive_weights


@ray.remote
class VLLMProbe:
    """The backend and the real `receive_weights`, plus two ways to make a publish go wrong inside the actor
    (the engine loads other tensors than the learner sent, or none)."""

    def __init__(self, config: dict[str, Any]):
        self.backend = VLLMRolloutBackend(parse_config(config))

    def receive(
        self, state: dict[str, torch.Tensor], version: int, forward_check: bool = True
    ) -> float | None:
        receive_weights(self.backend, state, version, forward_check)
        return self.backend.last_check

    def receive_altered(
        self,
        state: dict[str, torch.Tensor],
        version: int,
        name: str | None,
        noise: float,
        forward_check: bool,
    ) -> float | None:
        """`receive_weights` of ``state`` while the engine loads it with ``name`` moved by seeded noise of
        std ``noise`` (``name`` None: the engine loads nothing and keeps its old weights)."""
        load = self.backend.load_weights
        if name is None:
            self.backend.load_weights = lambda state_dict: None
        else:
            wrong = dict(state)
            generator = torch.Generator().manual_seed(7)
            wrong[name] = state[name] + noise * torch.randn(state[name].shape, generator=generator)
            self.backend.load_weights = lambda state_dict: load(wrong)
        try:
            receive_weights(self.backend, state, version, forward_check)
        finally:
            del self.backend.load_weights  # the class's method again
        return self.backend.last_check

    def generate(self, *args: Any) -> tuple[list[list[int]], list[list[float]]]:
        return self.backend.generate(*args)

    def sequence_logprobs(self, ids: list[int]) -> list[float]:
        return self.backend.sequence_logprobs(ids)
