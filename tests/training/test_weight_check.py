"""The pure half of the weight-sync check: which tensors are read back, their checksums, the HF->vLLM name
map and the comparison (no Ray, no vLLM: the collective_rpc wrapper in rollout.py is the only part left)."""

from __future__ import annotations

import pytest
import torch

from dcv.training.weight_check import (
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
    tensor_checksum,
    vllm_name,
)


def test_checksum_names_are_the_unfused_tensors_of_the_first_and_last_layers(tiny_model):
    names = checksum_names(tiny_model.state_dict())
    last = tiny_model.config.num_hidden_layers - 1
    assert last > 0  # two distinct ends
    expected = ["model.norm.weight"] + [
        f"model.layers.{layer}.{suffix}"
        for layer in (0, last)
        for suffix in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.o_proj.weight",
            "mlp.down_proj.weight",
        )
    ]
    assert names == sorted(expected)
    assert [vllm_name(name) for name in names] == names  # vLLM keeps these whole, under the same name


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",  # fused into qkv_proj
        "model.layers.3.self_attn.v_proj.bias",
        "model.layers.0.mlp.gate_proj.weight",  # fused into gate_up_proj
        "model.embed_tokens.weight",  # vocabulary rows padded to a multiple of 64
        "lm_head.weight",
    ],
)
def test_vllm_name_refuses_tensors_vllm_fuses_or_pads(name):
    with pytest.raises(ValueError, match="fuses or renames"):
        vllm_name(name)


def test_checksum_sees_a_transpose_and_a_small_change():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    same = tensor_checksum(w.clone())
    assert same == tensor_checksum(w)
    transposed = tensor_checksum(w.t().contiguous())
    assert transposed[0] == pytest.approx(same[0]) and transposed[2] == pytest.approx(same[2])
    assert transposed[1] != pytest.approx(same[1])  # only the position-weighted sum sees it
    compare_checksums({"w": same}, [{"w": tensor_checksum(w)}], version=1)
    nudged = w.clone()
    nudged[3, 5] += 1e-4  # about what one AdamW step at lr 1e-4 does to one weight
    with pytest.raises(ValueError, match=r"replica 0 .* 1 of the 1 checked tensors"):
        compare_checksums({"w": same}, [{"w": tensor_checksum(nudged)}], version=1)


def test_compare_names_the_stale_replica_and_the_missing_tensor():
    a, b = torch.ones(4), torch.arange(4.0)
    sent = {"a": tensor_checksum(a), "b": tensor_checksum(b)}
    good = {"a": tensor_checksum(a), "b": tensor_checksum(b)}
    with pytest.raises(ValueError, match=r"v7: .*replica 1 .*'b'.* None\)"):
        compare_checksums(sent, [good, {"a": tensor_checksum(a)}], version=7)
    with pytest.raises(ValueError, match=r"replica 0 .*\('a'"):
        compare_checksums(sent, [{"a": tensor_checksum(a + 1), "b": good["b"]}], version=7)


def test_learner_checksums_round_to_the_rollout_dtype(tiny_model):
    """A bfloat16 engine holds the learner's float32 weights rounded: compared as sent they differ, compared
    after the same rounding they agree exactly."""
    state = tiny_model.state_dict()
    names = checksum_names(state)
    engine = {k: v.to(torch.bfloat16) for k, v in state.items()}
    read = [engine_checksums(engine, names)]
    compare_checksums(learner_checksums(state, names, state_signature(engine)), read, version=1)
    with pytest.raises(ValueError, match="checked tensors"):
        compare_checksums(learner_checksums(state, names, state_signature(state)), read, version=1)


def test_config_signature_is_the_models_own(tiny_model):
    """What the vLLM backend checks against (built on the meta device from the config) is exactly what an
    HF model of that config holds, in the engine's dtype."""
    assert config_signature(tiny_model.config, torch.float32) == state_signature(tiny_model.state_dict())
    as_bf16 = config_signature(tiny_model.config, torch.bfloat16)
    assert {dtype for _, dtype in as_bf16.values()} == {"torch.bfloat16"}
    with pytest.raises(ValueError, match=r"\(name, rollout, learner\)"):
        check_signature(as_bf16, state_signature(tiny_model.state_dict()), version=2)


def test_forward_check_compares_mean_logprob_differences():
    reference = [-1.0, -2.0, -3.0]
    assert compare_logprobs(reference, [-1.0005, -2.0, -2.9995], 1e-3, 3) == pytest.approx(1e-3 / 3)
    with pytest.raises(ValueError, match=r"weight sync v4: .* differ from HF's .* by 0\.1 per token"):
        compare_logprobs(reference, [-1.1, -2.1, -3.1], 1e-3, 4)
    with pytest.raises(ValueError, match="by nan"):
        compare_logprobs(reference, [float("nan"), -2.0, -3.0], 1e-3, 5)
    with pytest.raises(ValueError, match="2 engine log-probs for 3 tokens"):
        compare_logprobs(reference, [-1.0, -2.0], 1e-3, 6)


def test_vllm_cpu_reads_back_only_the_norms(tiny_model):
    names = checksum_names(tiny_model.state_dict())
    on_cpu = readback_names(names, on_cpu=True)
    assert on_cpu and all(name.endswith("norm.weight") for name in on_cpu)
    assert set(names) - set(on_cpu) == {n for n in names if n.endswith(("o_proj.weight", "down_proj.weight"))}
    assert readback_names(names, on_cpu=False) == names


def test_sequence_logprobs_are_teacher_forced(tiny_model):
    ids = [1, 5, 9, 2]
    logps = sequence_logprobs(tiny_model, ids)
    with torch.inference_mode():
        full = tiny_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert logps == pytest.approx([full[i, ids[i + 1]].item() for i in range(3)])


def test_tied_weights_are_written_once_each(tiny_model, tmp_path):
    """A tied model's state dict holds one tensor under two names, which safetensors refuses to write; the
    vllm backend's file gets a copy under the second name."""
    from safetensors.torch import load_file, save_file

    from dcv.training.rollout import unshared

    state = tiny_model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(state, str(tmp_path / "shared.safetensors"))
    save_file(unshared(state), str(tmp_path / "model.safetensors"))
    back = load_file(str(tmp_path / "model.safetensors"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
