"""SciKnowEval rows from a local JSONL file in the hub dataset's own schema."""

from __future__ import annotations

import json

import pytest

from dcv.config import TargetTaskConfig
from dcv.tasks import load_target_splits
from dcv.tasks.sciknoweval import DatasetRowError


def sciknoweval_row(i: int, **overrides) -> dict:
    row = {
        "question": f"Which of these compounds is number {i}?",
        "choices": {"text": [f"compound {i}-{k}" for k in range(4)], "label": ["A", "B", "C", "D"]},
        "answerKey": "ABCD"[i % 4],
        "type": "mcq-4-choices",
        "domain": "Chemistry",
        "details": {"level": "L1", "task": "molecule_name", "subtask": "iupac"},
        "answer": "",
    }
    row.update(overrides)
    return row


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_local_jsonl_maps_to_items(tmp_path):
    rows = [sciknoweval_row(i) for i in range(20)]
    rows += [sciknoweval_row(99, type="open-ended-qa", choices={}, answerKey="")]  # skipped, not an error
    rows += [sciknoweval_row(98, domain="Biology")]  # another domain
    source = write_jsonl(tmp_path / "chem.jsonl", rows)
    cfg = TargetTaskConfig(name="sciknoweval", source=str(source), n_train=15, n_test=5)
    train, test = load_target_splits(cfg)
    assert (len(train), len(test)) == (15, 5)
    assert not {i.question for i in train} & {i.question for i in test}
    item = next(i for i in train + test if i.question == rows[6]["question"])
    assert item.gold == "C" and item.options[2] == "compound 6-2" and item.kind == "iupac"
    assert load_target_splits(cfg)[1] == test  # deterministic


def test_two_choice_rows_are_kept(tmp_path):
    rows = [
        sciknoweval_row(
            i, choices={"text": ["yes", "no"], "label": ["A", "B"]}, answerKey="B", type="mcq-2-choices"
        )
        for i in range(4)
    ]
    cfg = TargetTaskConfig(
        name="sciknoweval", source=str(write_jsonl(tmp_path / "a.jsonl", rows)), n_train=3, n_test=1
    )
    train, _ = load_target_splits(cfg)
    assert all(len(i.options) == 2 and i.gold == "B" for i in train)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"answerKey": "E"}, "answerKey 'E'"),
        ({"choices": "A or B"}, "'choices' must be"),
        ({"question": None, "choices": None}, "'choices' must be"),
    ],
)
def test_malformed_row_names_the_row(tmp_path, bad, message):
    rows = [sciknoweval_row(i) for i in range(5)]
    rows[3] = {**rows[3], **bad}
    cfg = TargetTaskConfig(
        name="sciknoweval", source=str(write_jsonl(tmp_path / "b.jsonl", rows)), n_train=2, n_test=1
    )
    with pytest.raises(DatasetRowError, match=rf"b.jsonl row 3: .*{message}"):
        load_target_splits(cfg)


def test_missing_field_and_bad_json_are_named(tmp_path):
    row = sciknoweval_row(0)
    del row["answerKey"]
    cfg = TargetTaskConfig(
        name="sciknoweval", source=str(write_jsonl(tmp_path / "c.jsonl", [row])), n_train=1, n_test=1
    )
    with pytest.raises(DatasetRowError, match="row 0: missing field 'answerKey'"):
        load_target_splits(cfg)
    broken = tmp_path / "d.jsonl"
    broken.write_text(json.dumps(sciknoweval_row(0)) + "\n{not json\n")
    cfg = TargetTaskConfig(name="sciknoweval", source=str(broken), n_train=1, n_test=1)
    with pytest.raises(DatasetRowError, match="d.jsonl line 2"):
        load_target_splits(cfg)


def test_too_few_rows_is_a_clear_error(tmp_path):
    source = write_jsonl(tmp_path / "e.jsonl", [sciknoweval_row(i) for i in range(3)])
    cfg = TargetTaskConfig(name="sciknoweval", source=str(source), n_train=3, n_test=1)
    with pytest.raises(ValueError, match="exceeds the 3 distinct"):
        load_target_splits(cfg)
