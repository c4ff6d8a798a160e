from __future__ import annotations

import copy

import pytest
import torch

from dcv.config import EvaluationConfig, ModelConfig, ProbeConfig, TargetTaskConfig
from dcv.evaluation import (
    KLReference,
    evaluate_model,
    evaluate_probe,
    generate_completions,
    kl_to_base,
    probe_logit_diffs,
    sample_kl_reference,
    stop_token_ids,
    until_stop,
)
from dcv.models import load_model
from dcv.tasks import load_target_splits
from dcv.tasks.probes import build_probe

EVAL = EvaluationConfig(batch_size=4, max_new_tokens=6, kl_prompts=6, kl_max_new_tokens=8, kl_seed=0)


@pytest.fixture(scope="module")
def test_items():
    return load_target_splits(TargetTaskConfig(n_train=8, n_test=6))[1]


def test_logit_diffs_match_one_prompt_at_a_time(tiny_model, tokenizer):
    probe = build_probe(ProbeConfig(name="ioi", n_items=10), tokenizer, TargetTaskConfig())
    batched = probe_logit_diffs(tiny_model, probe.items, batch_size=3)
    for item, ld in zip(probe.items, batched, strict=True):
        with torch.inference_mode():
            logits = tiny_model(torch.tensor([item.clean_ids])).logits[0, -1]
        assert ld == pytest.approx(float(logits[item.correct_id] - logits[item.wrong_id]), abs=1e-4)
    corrupted = probe_logit_diffs(tiny_model, probe.items, batch_size=3, corrupted=True)
    assert not torch.allclose(batched, corrupted)
    score = evaluate_probe(tiny_model, probe, batch_size=3)
    assert score.accuracy == pytest.approx(float((batched > 0).float().mean()))
    assert score.n_items == len(probe)


def test_kl_of_a_model_with_itself_is_zero(tiny_model, tokenizer, test_items):
    twin = load_model(ModelConfig(name="tiny"), tokenizer)  # a separate instance with the same weights
    ref = sample_kl_reference(tiny_model, tokenizer, test_items, EVAL)
    assert ref.completion_mask.sum() > 0
    assert kl_to_base(tiny_model, twin, ref, batch_size=4) == pytest.approx(0.0, abs=1e-6)


def test_kl_grows_with_the_change_and_is_seeded(tiny_model, tokenizer, test_items):
    ref = sample_kl_reference(tiny_model, tokenizer, test_items, EVAL)
    assert torch.equal(ref.input_ids, sample_kl_reference(tiny_model, tokenizer, test_items, EVAL).input_ids)
    kls = []
    for scale in (0.01, 0.1):
        changed = copy.deepcopy(tiny_model)
        with torch.no_grad():
            for p in changed.parameters():
                p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(0)) * scale)
        kls.append(kl_to_base(tiny_model, changed, ref, batch_size=4))
    assert 0 < kls[0] < kls[1]


def test_padding_does_not_change_kl(tiny_model, tokenizer, test_items):
    """Rows are left-padded to the longest prompt; the same rows without padding must score the same."""
    ref = sample_kl_reference(tiny_model, tokenizer, test_items, EVAL)
    assert (ref.attention_mask[:, 0] == 0).any(), "the test needs at least one padded row"
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.lm_head.weight.mul_(1.5)
    padded = [
        kl_to_base(
            tiny_model,
            changed,
            KLReference(
                ref.input_ids[i : i + 1], ref.attention_mask[i : i + 1], ref.completion_mask[i : i + 1]
            ),
            batch_size=1,
        )
        for i in range(len(ref.input_ids))
    ]
    unpadded = []
    for i in range(len(ref.input_ids)):
        start = int((ref.attention_mask[i] == 0).long().argmin())  # first real token
        row = KLReference(
            ref.input_ids[i : i + 1, start:],
            ref.attention_mask[i : i + 1, start:],
            ref.completion_mask[i : i + 1],
        )
        unpadded.append(kl_to_base(tiny_model, changed, row, batch_size=1))
    assert padded == pytest.approx(unpadded, rel=1e-4)
    assert kl_to_base(tiny_model, changed, ref, batch_size=6) > 0


def hand_kl(p_model, q_model, ref: KLReference) -> float:
    """Token-mean KL(p || q) over the reference's continuation tokens, one unpadded row at a time:
    sum_v p(v | prefix) (log p(v | prefix) - log q(v | prefix)) at each token the completion mask keeps."""
    n_new = ref.completion_mask.shape[1]
    total, count = 0.0, 0
    for i in range(ref.input_ids.shape[0]):
        start = int(ref.attention_mask[i].argmax())  # the first real token (rows are left-padded)
        ids = ref.input_ids[i : i + 1, start:]
        with torch.inference_mode():
            log_p = torch.log_softmax(p_model(ids).logits[0].double(), -1)
            log_q = torch.log_softmax(q_model(ids).logits[0].double(), -1)
        for j in range(n_new):
            if ref.completion_mask[i, j]:
                at = ids.shape[1] - n_new + j - 1  # the logits that predict continuation token j
                total += float((log_p[at].exp() * (log_p[at] - log_q[at])).sum())
                count += 1
    return total / count


def test_kl_to_base_is_kl_of_base_to_model_not_the_reverse(tiny_model, tokenizer, test_items):
    ref = sample_kl_reference(tiny_model, tokenizer, test_items, EVAL)
    assert (ref.attention_mask[:, 0] == 0).any() and ref.completion_mask.sum() > 0
    # An untied, sharpened unembedding: the changed model is far more peaked than the near-uniform base,
    # so the two directions differ (here KL(base || sharp) is about 0.74, KL(sharp || base) about 1.26).
    sharp = copy.deepcopy(tiny_model)
    with torch.no_grad():
        sharp.lm_head.weight = torch.nn.Parameter(sharp.lm_head.weight * 8)
    assert sharp.lm_head.weight.data_ptr() != sharp.model.embed_tokens.weight.data_ptr()
    forward, reverse = hand_kl(tiny_model, sharp, ref), hand_kl(sharp, tiny_model, ref)
    assert kl_to_base(tiny_model, sharp, ref, batch_size=4) == pytest.approx(forward, rel=1e-4)
    assert abs(forward - reverse) > 0.2 * max(forward, reverse), (forward, reverse)


def test_until_stop_masks_after_the_first_of_any_stop_id():
    completion = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [2, 4, 2, 4, 4], [5, 0, 6, 2, 2]])
    assert until_stop(completion, [2]).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0],
    ]
    assert until_stop(completion, [0, 2]).tolist()[3] == [1, 1, 0, 0, 0]


def test_stop_ids_join_the_tokenizer_and_the_generation_config(tiny_model, tokenizer):
    """Qwen2.5-Instruct's shape: the tokenizer's EOS is <|im_end|>, the generation config lists a second."""
    model = copy.deepcopy(tiny_model)
    second = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert second not in (None, tokenizer.eos_token_id)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    assert stop_token_ids(tokenizer, model.generation_config) == sorted({tokenizer.eos_token_id, second})
    model.generation_config.eos_token_id = second
    assert stop_token_ids(tokenizer, model.generation_config) == sorted({tokenizer.eos_token_id, second})


def test_a_completion_ends_at_the_generation_configs_second_eos(tiny_model, tokenizer, test_items):
    """Make the token the model greedily writes first a second EOS: the completion must end on it, with
    nothing after it in the mask or the text, where before the cut only knew the tokenizer's EOS."""
    items = test_items[:2]
    ids, mask, texts = generate_completions(tiny_model, tokenizer, items, batch_size=2, max_new_tokens=6)
    prompt_width = ids.shape[1] - 6
    first = int(ids[0, prompt_width])
    assert first != tokenizer.eos_token_id and int(mask[0, prompt_width:].sum()) > 1
    model = copy.deepcopy(tiny_model)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    ids2, mask2, texts2 = generate_completions(model, tokenizer, items, batch_size=2, max_new_tokens=6)
    completion = ids2[0, ids2.shape[1] - 6 :]
    assert int(completion[0]) == first
    assert mask2[0, ids2.shape[1] - 6 :].tolist() == [1, 0, 0, 0, 0, 0]
    assert texts2[0] == tokenizer.decode([first], skip_special_tokens=True)


def test_evaluate_model_reports_every_metric(tiny_model, tokenizer, test_items):
    probes = [
        build_probe(ProbeConfig(name=n, n_items=4), tokenizer, TargetTaskConfig())
        for n in ("ioi", "induction")
    ]
    ref = sample_kl_reference(tiny_model, tokenizer, test_items, EVAL)
    metrics = evaluate_model(tiny_model, tokenizer, EVAL, test_items, probes, tiny_model, ref).metrics
    assert set(metrics) == {
        "target/accuracy",
        "target/format_rate",
        "target/n_items",
        "kl_to_base",
        "probe/ioi/accuracy",
        "probe/ioi/mean_ld",
        "probe/ioi/n_items",
        "probe/induction/accuracy",
        "probe/induction/mean_ld",
        "probe/induction/n_items",
    }
    assert 0 <= metrics["target/accuracy"] <= 1 and metrics["target/n_items"] == 6
    assert metrics["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
