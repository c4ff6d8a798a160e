from __future__ import annotations

import pytest

from dcv.config import PROBE_NAMES, ProbeConfig, TargetTaskConfig
from dcv.tasks.probes import CAPITALS_SHOTS, build_probe

TASK = TargetTaskConfig()  # only the chem probe reads it


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_probe_items_are_valid_contrast_pairs(tokenizer, name):
    probe = build_probe(ProbeConfig(name=name, n_items=32, seed=0), tokenizer, TASK)
    assert len(probe) >= 24, f"{name}: only {len(probe)} of {probe.n_candidates} candidates kept"
    assert probe.n_candidates >= len(probe)
    for item in probe.items:
        assert len(item.clean_ids) == len(item.corrupt_ids)
        assert item.clean_ids != item.corrupt_ids
        assert item.correct_id != item.wrong_id
        if name != "induction":  # text probes: the ids are exactly the tokenized text
            assert list(item.clean_ids) == tokenizer(item.clean_text, add_special_tokens=False)["input_ids"]
            assert (
                list(item.corrupt_ids) == tokenizer(item.corrupt_text, add_special_tokens=False)["input_ids"]
            )
    assert len({item.clean_text for item in probe.items}) == len(probe)


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_probes_are_deterministic_by_seed(tokenizer, name):
    first = build_probe(ProbeConfig(name=name, n_items=16, seed=1), tokenizer, TASK)
    again = build_probe(ProbeConfig(name=name, n_items=16, seed=1), tokenizer, TASK)
    other = build_probe(ProbeConfig(name=name, n_items=16, seed=2), tokenizer, TASK)
    assert first == again
    assert first.items != other.items


def test_ioi_answer_is_the_indirect_object(tokenizer):
    for item in build_probe(ProbeConfig(name="ioi", n_items=16), tokenizer, TASK).items:
        correct, wrong = tokenizer.decode([item.correct_id]), tokenizer.decode([item.wrong_id])
        clean_words = item.clean_text.replace(",", " ").replace(".", " ").split()
        assert clean_words.count(correct.strip()) == 1  # the indirect object is named once
        assert clean_words.count(wrong.strip()) == 2  # the subject twice
        assert item.corrupt_text.replace(",", " ").replace(".", " ").split().count(wrong.strip()) == 1


def test_capitals_do_not_repeat_the_prompt_shots(tokenizer):
    probe = build_probe(ProbeConfig(name="capitals", n_items=64), tokenizer, TASK)
    shot_capitals = {capital for _, capital in CAPITALS_SHOTS}
    assert not {tokenizer.decode([i.correct_id]).strip() for i in probe.items} & shot_capitals


def test_greater_than_answers_bracket_the_start_year(tokenizer):
    for item in build_probe(ProbeConfig(name="greater_than", n_items=16), tokenizer, TASK).items:
        tens = int(item.clean_text.split("year ")[1][2])
        assert tokenizer.decode([item.correct_id]) == str(tens + 1)
        assert tokenizer.decode([item.wrong_id]) == str(tens - 1)
