"""A functional forward pass of a Llama-family decoder with TransformerLens-named hook points.

Why not run TransformerLens's ``TransformerBridge`` here: booting the bridge replaces the HF model's
modules in place (training and evaluation would then run through wrappers), and it can only run a whole
forward. Exact patching needs two things a whole forward cannot do:

- start at layer L from a cached residual stream (the layers before a head's layer are the clean run's);
- compute only the positions from the first token where clean and corrupted prompts differ, attending to
  the clean run's cached keys and values for the earlier positions (causal attention makes every
  activation there identical in the clean and the patched run).

So this module re-states the decoder layer on the model's own modules (``input_layernorm``, ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``post_attention_layernorm``, ``mlp``, ``rotary_emb``, ``norm``,
``lm_head``): the same math as transformers' eager attention, so results match to float precision. Two
intervention points, named as in TransformerLens:

- ``blocks.{layer}.attn.hook_z``: the per-head attention output before ``o_proj``, shape
  ``[batch, pos, head_index, d_head]``; tests check it against the bridge's ``hook_z``. Activation
  patching (exact, attribution, IG) and masks act here: within one model, patching z is patching the
  head's output, since both runs share ``o_proj``.
- ``blocks.{layer}.hook_attn_out``: the attention block's output added to the residual stream
  (``o_proj(z)``, ``[batch, pos, d_model]``). Cross-model patching (cmap) acts here, because two models'
  heads differ in ``o_proj`` too: head h's output is ``z_h @ W_O[:, h].T`` (``head_output``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")

Hook = Callable[[torch.Tensor], torch.Tensor]  # the hook point's tensor -> a tensor of the same shape


def hook_z_name(layer: int) -> str:
    """TransformerLens's name for the per-head attention output of ``layer``; the only spelling dcv uses."""
    return f"blocks.{layer}.attn.hook_z"


def hook_attn_out_name(layer: int) -> str:
    """TransformerLens's name for ``layer``'s attention output as added to the residual stream."""
    return f"blocks.{layer}.hook_attn_out"


def head_output(model: PreTrainedModel, layer: int, z: torch.Tensor, head: int) -> torch.Tensor:
    """Head ``head``'s share of ``layer``'s attention output: ``z[..., head, :] @ W_O[:, head].T``
    ([..., pos, d_model]; TransformerLens's ``hook_result``). The heads' outputs sum to ``o_proj(z)`` less
    o_proj's bias, which belongs to no head (Llama with ``attention_bias`` only; Qwen2's o_proj has none)."""
    o_proj = model.model.layers[layer].self_attn.o_proj
    d_head = z.shape[-1]
    return z[..., head, :] @ o_proj.weight[:, head * d_head : (head + 1) * d_head].T


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]


def model_shape(model: PreTrainedModel) -> ModelShape:
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"circuits: model type {config.model_type!r} is not supported; head patching re-states the "
            f"decoder layer of {', '.join(SUPPORTED_MODEL_TYPES)} models"
        )
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, d_head
    )


def check_heads(model: PreTrainedModel, heads: list[tuple[int, int]]) -> None:
    """Raise a ValueError naming the first (layer, head) the model does not have."""
    shape = model_shape(model)
    for layer, head in heads:
        if not (0 <= layer < shape.n_layers and 0 <= head < shape.n_heads):
            raise ValueError(
                f"head ({layer}, {head}) does not exist: the model has {shape.n_layers} layers x "
                f"{shape.n_heads} heads"
            )


@dataclass
class DecoderCache:
    """What one full pass leaves behind, per layer (index = layer)."""

    resid_pre: list[torch.Tensor] = field(default_factory=list)  # [batch, pos, d_model]
    keys: list[torch.Tensor] = field(default_factory=list)  # rotated, [batch, kv_head, pos, d_head]
    values: list[torch.Tensor] = field(default_factory=list)  # [batch, kv_head, pos, d_head]
    z: list[torch.Tensor] = field(default_factory=list)  # [batch, pos, head, d_head]


@dataclass(frozen=True)
class Prefix:
    """Clean keys/values of the positions before ``start_pos``, shared by ``repeat`` copies of the batch."""

    keys: list[torch.Tensor]  # per layer, [batch, kv_head, start_pos, d_head]
    values: list[torch.Tensor]
    repeat: int = 1


def run_decoder(
    model: PreTrainedModel,
    input_ids: torch.Tensor | None = None,
    *,
    hidden: torch.Tensor | None = None,
    start_layer: int = 0,
    start_pos: int = 0,
    prefix: Prefix | None = None,
    hooks: Mapping[str, Hook] | None = None,
    cache: DecoderCache | None = None,
) -> torch.Tensor:
    """Logits at the last position, [batch, vocab].

    ``input_ids`` [batch, pos] start at layer 0; or ``hidden`` [batch, pos, d_model] is the residual stream
    entering ``start_layer`` (embeddings when ``start_layer`` is 0). Positions are ``start_pos`` onwards;
    with ``start_pos > 0`` the earlier positions' keys and values come from ``prefix``. ``hooks`` maps
    ``hook_z_name(layer)`` or ``hook_attn_out_name(layer)`` to a function that may replace that tensor.
    ``cache``, if given, is filled.
    """
    inner = model.model
    if hidden is None:
        if input_ids is None or start_layer != 0:
            raise ValueError(
                "run_decoder needs input_ids (from layer 0) or the hidden state entering start_layer"
            )
        hidden = inner.embed_tokens(input_ids.to(inner.embed_tokens.weight.device))
    batch, n_pos, _ = hidden.shape
    positions = torch.arange(start_pos, start_pos + n_pos, device=hidden.device).unsqueeze(0)
    cos, sin = inner.rotary_emb(hidden, positions)
    # Query position p (absolute start_pos + i) sees keys 0..p: a [n_pos, start_pos + n_pos] causal mask.
    key_pos = torch.arange(start_pos + n_pos, device=hidden.device)
    blocked = key_pos[None, :] > positions[0, :, None]
    mask = torch.zeros(blocked.shape, dtype=hidden.dtype, device=hidden.device)
    mask = mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)
    hooks = hooks or {}
    for layer_index in range(start_layer, len(inner.layers)):
        layer = inner.layers[layer_index]
        attn = layer.self_attn
        if cache is not None:
            cache.resid_pre.append(hidden)
        x = layer.input_layernorm(hidden)
        shape = (batch, n_pos, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # [batch, head, pos, d_head]
        k = attn.k_proj(x).view(shape).transpose(1, 2)  # [batch, kv_head, pos, d_head]
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            cache.keys.append(k)
            cache.values.append(v)
        if prefix is not None and start_pos > 0:
            k = torch.cat([prefix.keys[layer_index].repeat(prefix.repeat, 1, 1, 1), k], dim=2)
            v = torch.cat([prefix.values[layer_index].repeat(prefix.repeat, 1, 1, 1), v], dim=2)
        scores = (
            torch.matmul(q, repeat_kv(k, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling + mask
        )
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        z = torch.matmul(pattern, repeat_kv(v, attn.num_key_value_groups)).transpose(
            1, 2
        )  # [batch, pos, head, d_head]
        hook = hooks.get(hook_z_name(layer_index))
        if hook is not None:
            z = hook(z)
        if cache is not None:
            cache.z.append(z)
        attn_out = attn.o_proj(z.reshape(batch, n_pos, -1))
        hook = hooks.get(hook_attn_out_name(layer_index))
        if hook is not None:
            attn_out = hook(attn_out)
        hidden = hidden + attn_out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden[:, -1])).float()
