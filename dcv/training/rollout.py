"""Rollout actors: the Ray actors that generate GRPO completions, and the one seam for weight sync.

A ``RolloutPool`` is a set of ``RolloutActor``s, each holding one generation backend and asking Ray for
its own ``num_cpus`` / ``num_gpus`` (``rl.rollout``). Backends share one interface (`RolloutBackend`):

- ``hf``: transformers ``generate`` with plain sampling (CPU or GPU);
- ``vllm``: a vLLM ``LLM`` engine (GPU, the ``gpu`` extra; imported only when chosen).

Weight sync is two calls: the learner ``publish``es ``(version, state_dict)`` and every actor
``load_weights(state_dict, version)``s it before the next generation; a generation request names the
version it needs and a stale actor refuses it. The state dict travels through Ray's object store (one
``ray.put``, read by every actor), which suits models up to a few GB. For large models an NCCL broadcast
from the learner to the actors' GPUs implements the same ``publish`` / ``load_weights`` pair (as verl's
checkpoint engine and OpenRLHF's ``vllm_worker_wrap.py`` do); nothing else needs to change.
"""

from __future__ import annotations

from typing import Any, Protocol

import ray
import torch

from dcv.config import ExperimentConfig, parse_config
from dcv.training.checkpoints import set_torch_threads


class StaleWeightsError(RuntimeError):
    """A rollout actor was asked to generate with weights it has not received."""


class RolloutBackend(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float, seed: int
    ) -> tuple[list[list[int]], list[list[float]]]:
        """``n`` sampled completions per prompt (prompt-major order) and their per-token log-probs."""

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def weight_signature(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of every weight, to check an incoming state dict against."""


class HFRolloutBackend:
    """transformers generate; the model is the config's base model (weights arrive by sync)."""

    def __init__(self, cfg: ExperimentConfig):
        from dcv.models import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.device = next(self.model.parameters()).device

    @torch.inference_mode()
    def generate(self, prompt_ids, n, max_new_tokens, temperature, seed):
        completions, logprobs = [], []
        torch.manual_seed(seed)
        pad = self.tokenizer.pad_token_id
        for ids in prompt_ids:  # one prompt at a time: no padding, so sampling sees exactly the prompt
            inputs = torch.tensor([ids], device=self.device).repeat(n, 1)
            out = self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
                output_scores=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[:, inputs.shape[1] :]
            scores = (
                torch.stack(out.scores, dim=1).float().log_softmax(-1)
            )  # [n, new, vocab], after temperature
            token_lp = scores.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for row in range(n):
                tokens = new[row].tolist()
                length = (
                    tokens.index(self.tokenizer.eos_token_id) + 1
                    if self.tokenizer.eos_token_id in tokens
                    else len(tokens)
                )
                completions.append(tokens[:length])
                logprobs.append(token_lp[row, :length].tolist())
        return completions, logprobs

    def load_weights(self, state_dict):
        self.model.load_state_dict({k: v.to(self.device) for k, v in state_dict.items()}, strict=True)

    def weight_signature(self):
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in self.model.state_dict().items()}

    @torch.inference_mode()
    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        return self.model(torch.tensor(input_ids, device=self.device)).logits.float().cpu()


class VLLMRolloutBackend:
    """vLLM engine on the actor's GPU. Written against vLLM's documented ``LLM`` / ``SamplingParams`` API
    (the ``gpu`` extra pins the range TRL 1.16 supports). Never run on a machine without a GPU, so neither
    dcv's test suite nor CI runs it."""

    def __init__(self, cfg: ExperimentConfig):
        try:
            from vllm import LLM
        except ImportError as exc:  # the gpu extra is not installed
            raise ImportError("rl.rollout.backend=vllm needs vLLM: pip install -e .[gpu]") from exc
        from dcv.models import resolve_model_source

        self.llm = LLM(
            model=resolve_model_source(cfg.model),
            dtype=cfg.model.dtype,
            gpu_memory_utilization=cfg.rl.rollout.gpu_memory_utilization,
            trust_remote_code=False,
        )

    def generate(self, prompt_ids, n, max_new_tokens, temperature, seed):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            n=n, temperature=temperature, max_tokens=max_new_tokens, logprobs=0, seed=seed
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params)
        completions, logprobs = [], []
        for output in outputs:
            for sample in output.outputs:
                completions.append(list(sample.token_ids))
                logprobs.append([next(iter(lp.values())).logprob for lp in sample.logprobs])
        return completions, logprobs

    def load_weights(self, state_dict):
        # vLLM's model runner accepts (name, tensor) pairs in HF naming; with the V1 engine the call goes
        # through collective_rpc to each worker. Unverified here: see the training issue's closing note.
        items = list(state_dict.items())

        def load(worker: Any) -> None:
            worker.model_runner.model.load_weights(items)

        self.llm.collective_rpc(load)

    def weight_signature(self):
        return {}  # vLLM fuses weights (qkv_proj); its loader checks names itself


BACKENDS = {"hf": HFRolloutBackend, "vllm": VLLMRolloutBackend}


@ray.remote
class RolloutActor:
    def __init__(self, config: dict[str, Any]):
        cfg = parse_config(config)
        set_torch_threads(cfg.resources.torch_threads)
        self.backend = BACKENDS[cfg.rl.rollout.backend](cfg)
        self.version = 0

    def generate(self, prompt_ids, n, max_new_tokens, temperature, seed, version):
        if version != self.version:
            raise StaleWeightsError(
                f"rollout actor holds weights version {self.version}, asked for {version}"
            )
        return self.backend.generate(prompt_ids, n, max_new_tokens, temperature, seed)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        expected = self.backend.weight_signature()
        if expected:
            incoming = {k: (tuple(v.shape), str(v.dtype)) for k, v in state_dict.items()}
            if incoming != expected:
                missing = sorted(set(expected) - set(incoming))[:3]
                extra = sorted(set(incoming) - set(expected))[:3]
                differ = [
                    (k, expected[k], incoming[k])
                    for k in expected
                    if k in incoming and expected[k] != incoming[k]
                ]
                raise ValueError(
                    f"weight sync v{version}: learner and rollout weights differ: missing {missing}, "
                    f"unexpected {extra}, (name, rollout, learner) {differ[:3]}"
                )
        self.backend.load_weights(state_dict)
        self.version = version
        return version

    def get_version(self) -> int:
        return self.version

    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        return self.backend.logits(input_ids)


class RolloutPool:
    """The rollout actors of one trial, named so every training worker finds the same ones."""

    def __init__(self, cfg: ExperimentConfig, trial: str):
        rollout = cfg.rl.rollout
        config = cfg.model_dump(mode="json")
        self.actors = [
            RolloutActor.options(
                name=f"dcv-rollout-{trial}-{i}",
                get_if_exists=True,
                num_cpus=rollout.num_cpus,
                num_gpus=rollout.num_gpus,
                # Not inside the learner's placement group: under Tune the learner's group captures its
                # children, and a rollout actor would wait forever for a CPU its learner already holds.
                scheduling_strategy="DEFAULT",
            ).remote(config)
            for i in range(rollout.num_actors)
        ]
        self.version: int | None = None

    def publish(self, model: torch.nn.Module, version: int) -> None:
        """Send the learner's weights to every actor and wait until all hold them."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        ref = ray.put(state)
        ray.get([actor.load_weights.remote(ref, version) for actor in self.actors])
        self.version = version

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        version: int,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """``n`` completions per prompt, prompts spread over the actors, results in prompt order."""
        k = len(self.actors)
        shares = [(i, prompt_ids[i::k]) for i in range(k) if prompt_ids[i::k]]
        futures = [
            self.actors[i].generate.remote(share, n, max_new_tokens, temperature, seed + i, version)
            for i, share in shares
        ]
        per_prompt: dict[int, tuple[list[list[int]], list[list[float]]]] = {}
        for (i, share), (share_completions, share_logprobs) in zip(shares, ray.get(futures), strict=True):
            for j in range(len(share)):
                per_prompt[i + j * k] = (
                    share_completions[j * n : (j + 1) * n],
                    share_logprobs[j * n : (j + 1) * n],
                )
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        for index in range(len(prompt_ids)):
            completions += per_prompt[index][0]
            logprobs += per_prompt[index][1]
        return completions, logprobs

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
