from __future__ import annotations

import pytest

from dcv.config import CHEMISTRY_KINDS, TargetTaskConfig
from dcv.tasks import load_target_splits
from dcv.tasks.chemistry import (
    COMPOUNDS,
    build_item,
    formula_atoms,
    load_elements,
    molar_mass,
    question_pool,
    table_position,
)
from dcv.tasks.items import LETTERS


@pytest.mark.parametrize(
    "z,expected",
    [
        (1, (1, 1, "s")),
        (2, (1, 18, "s")),
        (6, (2, 14, "p")),
        (11, (3, 1, "s")),
        (17, (3, 17, "p")),
        (26, (4, 8, "d")),
        (30, (4, 12, "d")),
        (35, (4, 17, "p")),
        (47, (5, 11, "d")),
        (58, (6, None, "f")),
        (72, (6, 4, "d")),
        (80, (6, 12, "d")),
        (86, (6, 18, "p")),
        (92, (7, None, "f")),
        (118, (7, 18, "p")),
    ],
)
def test_table_position_matches_the_periodic_table(z, expected):
    assert table_position(z) == expected


def test_molar_masses_from_real_element_data():
    assert molar_mass("H2O") == pytest.approx(18.015, abs=0.01)
    assert molar_mass("H2SO4") == pytest.approx(98.07, abs=0.01)
    assert molar_mass("Ca(OH)2") == pytest.approx(74.09, abs=0.01)
    assert len({formula for _, formula in COMPOUNDS}) == len(COMPOUNDS)


def test_splits_are_deterministic_and_disjoint():
    cfg = TargetTaskConfig(n_train=200, n_test=50, seed=3)
    train, test = load_target_splits(cfg)
    again_train, again_test = load_target_splits(cfg)
    assert [i.to_row() for i in train] == [i.to_row() for i in again_train]
    assert [i.to_row() for i in test] == [i.to_row() for i in again_test]
    assert (len(train), len(test)) == (200, 50)
    assert not {i.question for i in train} & {i.question for i in test}
    other_train, _ = load_target_splits(cfg.model_copy(update={"seed": 4}))
    assert [i.question for i in other_train] != [i.question for i in train]


def test_every_kind_appears_and_items_are_well_formed():
    train, test = load_target_splits(TargetTaskConfig(n_train=400, n_test=100))
    items = train + test
    assert {i.kind for i in items} == set(CHEMISTRY_KINDS)
    for item in items:
        assert len(item.options) == 4 and len(set(item.options)) == 4
        assert item.gold in LETTERS
        assert item.messages[0]["role"] == "system" and item.messages[1]["role"] == "user"
        assert item.question in item.messages[1]["content"]
    golds = [i.gold for i in items]
    assert all(golds.count(letter) > len(items) / 8 for letter in LETTERS)  # gold positions are shuffled


def test_gold_option_is_the_true_fact():
    elements = {e.name.lower(): e for e in load_elements()}
    train, test = load_target_splits(TargetTaskConfig(n_train=400, n_test=100))
    checked = 0
    for item in train + test:
        answer = item.options[LETTERS.index(item.gold)]
        if item.kind == "atomic_number":
            name = item.question.removeprefix("What is the atomic number of ").rstrip("?")
            assert answer == str(elements[name].number)
            checked += 1
        elif item.kind == "name_to_symbol":
            name = item.question.removeprefix("What is the chemical symbol of ").rstrip("?")
            assert answer == elements[name].symbol
            checked += 1
        elif item.kind == "molar_mass":
            formula = item.question[item.question.rindex(" (") + 2 : -2]  # "... of water (H2O)?"
            assert answer == f"{molar_mass(formula):.2f} g/mol"
            checked += 1
    assert checked > 50


def test_too_many_items_is_a_clear_error():
    pool = len(question_pool(["block"]))
    with pytest.raises(ValueError, match=r"target_task.n_train \+ target_task.n_test"):
        load_target_splits(TargetTaskConfig(kinds=["block"], n_train=pool, n_test=1))


def test_rows_carry_prompt_completion_and_gold():
    row = load_target_splits(TargetTaskConfig(n_train=1, n_test=1))[0][0].to_row()
    assert row["completion"] == [{"role": "assistant", "content": f"<answer>{row['gold']}</answer>"}]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]


def test_reading_kinds_answer_from_the_question():
    pool = question_pool(["electrons", "atom_count"])
    assert len(pool) == len(load_elements()) + sum(len(formula_atoms(f)) for _, f in COMPOUNDS)
    train, test = load_target_splits(
        TargetTaskConfig(kinds=["electrons", "atom_count"], n_train=150, n_test=50)
    )
    checked = set()
    for item in train + test:
        answer = item.options[LETTERS.index(item.gold)]
        if item.kind == "electrons":
            assert f"(atomic number {answer})" in item.question
        else:
            assert item.question.startswith("How many ") and " atoms does the formula " in item.question
        assert all(o.isdigit() and int(o) >= 1 for o in item.options)
        checked.add(item.kind)
    assert checked == {"electrons", "atom_count"}
    [index] = [
        i for i, (_, q, _) in enumerate(pool) if q.startswith("How many oxygen atoms does the formula H2SO4")
    ]
    item = build_item(TargetTaskConfig(), pool, index)
    assert item.options[LETTERS.index(item.gold)] == "4"
    assert formula_atoms("Ca(OH)2") == {"calcium": 1, "oxygen": 2, "hydrogen": 2}


def test_option_answers_train_on_the_option_text():
    cfg = TargetTaskConfig(kinds=["name_to_symbol"], n_train=4, n_test=1, answer_format="option")
    train, _ = load_target_splits(cfg)
    for item in train:
        row = item.to_row()
        answer = item.options[LETTERS.index(item.gold)]
        assert row["completion"][0]["content"] == f"<answer>{answer}</answer>"
        assert (row["options"], row["answer_format"]) == (list(item.options), "option")
        assert "text of the correct option" in row["prompt"][0]["content"]
