"""The ``chem`` probe: counterfactual pairs of the target task's own questions (real SmolLM2 tokenizer)."""

from __future__ import annotations

import random

import pytest

from dcv.config import CHEMISTRY_KINDS, ProbeConfig, TargetTaskConfig
from dcv.evaluation import chat_prompts
from dcv.tasks.chemistry import build_chemistry_splits, build_counterfactual_pairs, question_pool
from dcv.tasks.items import LETTERS, ProbeItem
from dcv.tasks.probes import ANSWER_OPEN, build_probe

TASK = TargetTaskConfig()
SMALL_TASK = TargetTaskConfig(kinds=["period", "molar_mass"], n_train=64, n_test=32)


@pytest.fixture(scope="module")
def facts() -> dict[str, tuple[str, str]]:
    """question -> (kind, correct answer), straight from the pool: the ground truth the probe must match."""
    return {q: (kind, make(random.Random(0))[0]) for kind, q, make in question_pool(list(CHEMISTRY_KINDS))}


@pytest.fixture(scope="module")
def chem64(tokenizer):
    return build_probe(ProbeConfig(name="chem", n_items=64), tokenizer, TASK)


def question_and_options(text: str) -> tuple[str, tuple[str, ...]]:
    """The question line and option texts of a chat-templated prompt's user turn."""
    user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    question, _, *options = user.split("\n")
    return question, tuple(line[len("A. ") :] for line in options)


def gold_letter(options: tuple[str, ...], answer: str) -> str:
    return LETTERS[options.index(answer)]


def test_pairs_ask_the_same_options_about_another_entity(tokenizer, chem64, facts):
    for item in chem64.items:
        assert len(item.clean_ids) == len(item.corrupt_ids)
        assert list(item.clean_ids) == tokenizer(item.clean_text, add_special_tokens=False)["input_ids"]
        assert list(item.corrupt_ids) == tokenizer(item.corrupt_text, add_special_tokens=False)["input_ids"]
        question, options = question_and_options(item.clean_text)
        cf_question, cf_options = question_and_options(item.corrupt_text)
        assert cf_options == options and len(set(options)) == 4
        assert cf_question != question
        (kind, answer), (cf_kind, cf_answer) = facts[question], facts[cf_question]
        assert cf_kind == kind  # same template, another entity
        correct, wrong = gold_letter(options, answer), gold_letter(options, cf_answer)
        assert correct != wrong
        assert tokenizer.decode([item.correct_id]) == correct
        assert tokenizer.decode([item.wrong_id]) == wrong
        # The letter is the very next token, as when the model writes <answer>X</answer> itself.
        with_letter = tokenizer(item.clean_text + correct, add_special_tokens=False)["input_ids"]
        assert with_letter == [*item.clean_ids, item.correct_id]


def test_prompts_are_exactly_what_evaluation_sees(tokenizer, chem64):
    items = {item.question: item for item, _ in build_counterfactual_pairs(TASK)}
    for probe_item in chem64.items:
        question, _ = question_and_options(probe_item.clean_text)
        assert probe_item.clean_text == chat_prompts(tokenizer, [items[question]])[0] + ANSWER_OPEN


def test_no_chem_question_is_in_the_train_split(tokenizer):
    # Enough items to take every usable question, and a task whose train split is most of the pool.
    task = TargetTaskConfig(seed=5, n_train=500, n_test=64)
    train, test = build_chemistry_splits(task)
    probe = build_probe(ProbeConfig(name="chem", n_items=1000), tokenizer, task)
    questions = {question_and_options(item.clean_text)[0] for item in probe.items}
    assert not questions & {item.question for item in train}
    # Both sources are used: the test split and the questions neither split drew.
    assert questions & {item.question for item in test}
    assert questions - {item.question for item in test}


def test_counterfactuals_are_every_other_entity_answered_by_an_option(facts):
    for item, counterfactuals in build_counterfactual_pairs(SMALL_TASK):
        expected = {
            q
            for q, (kind, answer) in facts.items()
            if kind == item.kind and answer in item.options and answer != facts[item.question][1]
        }
        assert {cf.question for cf in counterfactuals} == expected
        for cf in counterfactuals:
            assert cf.options == item.options and cf.gold != item.gold
            assert cf.options[LETTERS.index(cf.gold)] == facts[cf.question][1]


def test_chem_probe_is_deterministic_by_both_seeds(tokenizer):
    def build(probe_seed: int, task_seed: int) -> tuple[ProbeItem, ...]:
        cfg = ProbeConfig(name="chem", n_items=16, seed=probe_seed)
        return build_probe(cfg, tokenizer, TASK.model_copy(update={"seed": task_seed})).items

    first = build(1, 0)
    assert first == build(1, 0)
    assert first != build(2, 0)
    assert first != build(1, 1)


def test_default_task_gives_a_full_probe_over_many_kinds(chem64, facts):
    # About 400 of the 481 held-out questions find a same-length counterfactual, so 64 must all be kept.
    assert len(chem64) == 64, f"only {len(chem64)} of {chem64.n_candidates} candidates kept"
    assert chem64.n_candidates >= len(chem64)
    kinds = {facts[question_and_options(item.clean_text)[0]][0] for item in chem64.items}
    assert len(kinds) >= 6, kinds


def test_with_sciknoweval_the_chem_probe_asks_generated_questions_in_its_prompt(tmp_path, tokenizer):
    """The paper config's target is SciKnowEval chemistry: the chem probe's pairs are dcv's generated
    chemistry questions (none of which that model trains on), rendered with the target's system prompt."""
    from dcv.config import ProbeConfig, TargetTaskConfig
    from dcv.tasks.probes import build_probe
    from tests.helpers import write_sciknoweval_layout

    target = TargetTaskConfig(
        name="sciknoweval",
        source=str(write_sciknoweval_layout(tmp_path / "ske")),
        n_train=8,
        n_test=4,
        system_prompt="You answer chemistry questions. Reply as <answer>X</answer>.",
    )
    probe = build_probe(ProbeConfig(name="chem", n_items=8), tokenizer, target)
    assert len(probe.items) == 8
    assert all("You answer chemistry questions." in item.clean_text for item in probe.items)
    assert all(
        item.clean_ids != item.corrupt_ids and item.correct_id != item.wrong_id for item in probe.items
    )
