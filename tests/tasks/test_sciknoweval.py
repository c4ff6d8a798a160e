"""SciKnowEval rows from local files in the hub dataset's own schema and layout; the hub path is checked by
the arguments it would download with, never by a download."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest

from dcv.config import ConfigError, TargetTaskConfig, parse_config
from dcv.tasks import load_target_splits
from dcv.tasks.sciknoweval import (
    DUPLICATE,
    NO_BOOLEAN_ANSWER,
    ODD_LABELS,
    OTHER_DOMAIN,
    OTHER_LEVEL,
    OTHER_TASK,
    TOO_FEW_OPTIONS,
    TOO_MANY_OPTIONS,
    UNSCORABLE,
    DatasetRowError,
    hub_download_args,
    read_sciknoweval,
)
from tests.helpers import write_sciknoweval_layout

HUB = "hicai-zju/SciKnowEval"
COMMIT = "3284f6fbf3b8063ab8a0408a65fb00157dbdc9fa"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def sciknoweval(source, **fields) -> TargetTaskConfig:
    return TargetTaskConfig(name="sciknoweval", source=str(source), **{"n_train": 1, "n_test": 1, **fields})


def config_problems(target_task: dict) -> list[str]:
    raw = {"model": {"name": "tiny"}, "target_task": target_task}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="x.yaml")
    return info.value.problems


def test_local_jsonl_maps_to_items(tmp_path):
    rows = [sciknoweval_row(i) for i in range(20)]
    rows += [sciknoweval_row(99, type="open-ended-qa", choices={}, answerKey="")]  # counted, not an error
    rows += [sciknoweval_row(98, domain="Biology")]  # another domain
    source = write_jsonl(tmp_path / "chem.jsonl", rows)
    cfg = sciknoweval(source, n_train=15, n_test=5)
    train, test = load_target_splits(cfg)
    assert (len(train), len(test)) == (15, 5)
    assert not {i.question for i in train} & {i.question for i in test}
    item = next(i for i in train + test if i.question == rows[6]["question"])
    assert item.gold == "C" and item.options[2] == "compound 6-2" and item.kind == "iupac"
    assert item.id == f"{source} line 7"
    assert load_target_splits(cfg)[1] == test  # deterministic


def test_two_choice_rows_are_kept(tmp_path):
    rows = [
        sciknoweval_row(
            i, choices={"text": ["yes", "no"], "label": ["A", "B"]}, answerKey="B", type="mcq-2-choices"
        )
        for i in range(4)
    ]
    train, _ = load_target_splits(sciknoweval(write_jsonl(tmp_path / "a.jsonl", rows), n_train=3))
    assert all(len(i.options) == 2 and i.gold == "B" for i in train)


def test_every_row_type_is_kept_or_counted_by_reason(tmp_path):
    five = {"text": [f"o{k}" for k in range(5)], "label": list("ABCDE")}
    two = {"text": ["yes", "no"], "label": ["A", "B"]}
    numbered = {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]}
    rows = [
        *[sciknoweval_row(i) for i in range(6)],
        sciknoweval_row(6, type="mcq-2-choices", choices=two, answerKey="A"),
        # The hub's true_or_false rows: no choices, the answer in `answer`; an answerKey works too.
        sciknoweval_row(7, type="true_or_false", choices=None, answerKey="", answer="Yes"),
        sciknoweval_row(8, type="true_or_false", choices=None, answerKey="", answer="No"),
        sciknoweval_row(9, type="true_or_false", choices=None, answerKey="B", answer=""),
        sciknoweval_row(10, type="true_or_false", choices=None, answerKey="", answer="Maybe"),
        sciknoweval_row(11, type="open-ended-qa", choices=None, answerKey="", answer="a paragraph"),
        sciknoweval_row(12, type="filling", choices=None, answerKey="", answer="C6H6"),
        sciknoweval_row(13, type="relation_extraction", choices=None, answerKey="", answer=[["a", "r", "b"]]),
        sciknoweval_row(14, type="mcq-5-choices", choices=five, answerKey="E"),
        sciknoweval_row(15, choices={"text": ["only"], "label": ["A"]}, answerKey="A"),
        sciknoweval_row(16, choices=numbered, answerKey="1"),
        sciknoweval_row(0),  # the same question again
        sciknoweval_row(17, domain="Biology"),
    ]
    report = read_sciknoweval(sciknoweval(write_jsonl(tmp_path / "mix.jsonl", rows)))
    assert report.kept == Counter({"mcq-4-choices": 6, "mcq-2-choices": 1, "true_or_false": 3})
    assert report.dropped == {
        NO_BOOLEAN_ANSWER: Counter({"true_or_false": 1}),
        UNSCORABLE: Counter({"open-ended-qa": 1, "filling": 1, "relation_extraction": 1}),
        TOO_MANY_OPTIONS: Counter({"mcq-5-choices": 1}),
        TOO_FEW_OPTIONS: Counter({"mcq-4-choices": 1}),
        ODD_LABELS: Counter({"mcq-4-choices": 1}),
        DUPLICATE: Counter({"mcq-4-choices": 1}),
        OTHER_DOMAIN: Counter({"mcq-4-choices": 1}),
    }
    assert (len(report.items), report.n_dropped, report.rows) == (10, 9, len(rows))
    booleans = {i.question: i for i in report.items if i.options == ("True", "False")}
    assert [booleans[rows[k]["question"]].gold for k in (7, 8, 9)] == ["A", "B", "B"]
    assert report.summary() == (
        f"{tmp_path / 'mix.jsonl'} (1 file): 19 rows; "
        "kept 10 (mcq-2-choices 1, mcq-4-choices 6, true_or_false 3); dropped 9: "
        "other domain 1 (mcq-4-choices 1); "
        "unscorable type 3 (filling 1, open-ended-qa 1, relation_extraction 1); "
        "more than 4 options 1 (mcq-5-choices 1); "
        "fewer than 2 options 1 (mcq-4-choices 1); "
        "labels not A, B, ... in order 1 (mcq-4-choices 1); "
        "true_or_false answer not yes/no 1 (true_or_false 1); "
        "duplicate question 1 (mcq-4-choices 1)"
    )


def test_hub_layout_folder_and_level_filter(tmp_path):
    folder = write_sciknoweval_layout(tmp_path / "ske")
    every = read_sciknoweval(sciknoweval(folder))
    assert every.kept == Counter({"mcq-4-choices": 120, "mcq-2-choices": 12, "true_or_false": 12})
    assert every.dropped == {UNSCORABLE: Counter({"open-ended-qa": 12, "filling": 6})}
    assert every.files == [f"{folder}/data/Chemistry/sciknoweval_chemistry_test.jsonl"]
    l3 = read_sciknoweval(sciknoweval(folder, levels=["L3"]))
    assert l3.kept == Counter({"mcq-4-choices": 40, "mcq-2-choices": 4, "true_or_false": 4})
    assert l3.dropped[OTHER_LEVEL] == Counter(
        {"mcq-4-choices": 80, "mcq-2-choices": 8, "true_or_false": 8, "open-ended-qa": 8, "filling": 4}
    )
    assert l3.dropped[UNSCORABLE] == Counter({"open-ended-qa": 4, "filling": 2})
    assert {i.kind for i in l3.items} == {"reaction_pred_qa"}
    # The lead's end-to-end size: the Qwen config's filters on this folder.
    train, test = load_target_splits(sciknoweval(folder, levels=["L3"], n_train=24, n_test=8))
    assert (len(train), len(test)) == (24, 8)


def test_task_filter_matches_task_or_subtask(tmp_path):
    folder = write_sciknoweval_layout(tmp_path / "ske", n_mcq=10)
    by_task = read_sciknoweval(sciknoweval(folder, tasks=["reaction_prediction"]))
    by_subtask = read_sciknoweval(sciknoweval(folder, tasks=["reaction_pred_qa", "i2s"]))
    assert sum(by_task.kept.values()) == 12 and {i.kind for i in by_task.items} == {"reaction_pred_qa"}
    assert sum(by_task.dropped[OTHER_TASK].values()) == 2 * (10 + 1 + 1 + 1 + 1)
    assert {i.kind for i in by_subtask.items} == {"reaction_pred_qa", "i2s"}


def test_folder_without_data_and_several_files(tmp_path):
    # <folder>/<Domain>/*.jsonl works as well as <folder>/data/<Domain>/; every file of the domain is read.
    write_jsonl(tmp_path / "Chemistry" / "part1.jsonl", [sciknoweval_row(i) for i in range(3)])
    write_jsonl(tmp_path / "Chemistry" / "part2.jsonl", [sciknoweval_row(i) for i in range(3, 5)])
    write_jsonl(tmp_path / "Biology" / "bio.jsonl", [sciknoweval_row(9, domain="Biology")])
    report = read_sciknoweval(sciknoweval(tmp_path))
    assert len(report.items) == 5 and report.dropped == {}
    assert report.items[4].id == f"{tmp_path}/Chemistry/part2.jsonl line 2"
    folders = r"folders there: \['Biology', 'Chemistry'\]"
    with pytest.raises(FileNotFoundError, match=rf"no Physics/\*\.jsonl under .*{folders}"):
        read_sciknoweval(sciknoweval(tmp_path, domain="Physics"))


def test_hub_source_downloads_only_the_domain_at_the_revision(tmp_path, monkeypatch):
    cfg = sciknoweval(HUB, revision=COMMIT, levels=["L3"])
    assert cfg.reads_hub()
    assert hub_download_args(cfg) == {
        "repo_id": HUB,
        "repo_type": "dataset",
        "revision": COMMIT,
        "allow_patterns": ["data/Chemistry/*.jsonl"],
    }
    # A folder on disk spelled like an owner/name id is local, and so is anything spelled like a path.
    monkeypatch.chdir(tmp_path)
    write_sciknoweval_layout(tmp_path / "org" / "ske", n_mcq=2)
    assert not sciknoweval("org/ske").reads_hub()
    assert len(read_sciknoweval(sciknoweval("org/ske")).items) == 3 * (2 + 1 + 1)  # 3 levels


@pytest.mark.parametrize(
    "target_task,expected",
    [
        ({"source": "./no/such/folder"}, "x.yaml: target_task.source: no file or folder at"),
        ({"source": "./missing.jsonl"}, "x.yaml: target_task.source: no file at"),
        ({"source": HUB, "levels": ["L6"]}, "x.yaml: target_task.levels[0]: Input should be 'L1', 'L2'"),
        ({"source": HUB, "levels": []}, "x.yaml: target_task.levels: List should have at least 1"),
        ({"source": HUB, "levels": ["L3", "L3"]}, "x.yaml: target_task.levels: duplicates"),
        ({"source": "a/b/c/d"}, "x.yaml: target_task.source: no file or folder at"),
    ],
)
def test_bad_source_and_filters_name_the_field(target_task, expected):
    problems = config_problems({"name": "sciknoweval", **target_task})
    assert any(p.startswith(expected) for p in problems), problems


def test_revision_and_filters_need_their_source(tmp_path):
    local = write_jsonl(tmp_path / "a.jsonl", [sciknoweval_row(0)])
    problems = config_problems({"name": "sciknoweval", "source": str(local), "revision": COMMIT})
    assert any(p.startswith("x.yaml: target_task.revision: only a hub source") for p in problems), problems
    problems = config_problems({"name": "chemistry", "levels": ["L3"]})
    assert any(p.startswith("x.yaml: target_task.levels: only the sciknoweval task") for p in problems)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"answerKey": "E"}, "answerKey 'E'"),
        ({"choices": "A or B"}, "'choices' must be"),
        ({"question": None, "choices": None}, "'choices' must be"),
    ],
)
def test_malformed_row_names_the_file_and_line(tmp_path, bad, message):
    rows = [sciknoweval_row(i) for i in range(5)]
    rows[3] = {**rows[3], **bad}
    cfg = sciknoweval(write_jsonl(tmp_path / "data" / "Chemistry" / "b.jsonl", rows))
    with pytest.raises(DatasetRowError, match=rf"b.jsonl line 4: .*{message}"):
        load_target_splits(cfg)
    # The same row read through the folder layout names the file inside the folder.
    with pytest.raises(DatasetRowError, match=rf"{tmp_path}/data/Chemistry/b.jsonl line 4: "):
        read_sciknoweval(sciknoweval(tmp_path))


def test_missing_field_and_bad_json_are_named(tmp_path):
    row = sciknoweval_row(0)
    del row["answerKey"]
    with pytest.raises(DatasetRowError, match="line 1: missing field 'answerKey'"):
        load_target_splits(sciknoweval(write_jsonl(tmp_path / "c.jsonl", [row])))
    broken = tmp_path / "d.jsonl"
    broken.write_text(json.dumps(sciknoweval_row(0)) + "\n{not json\n")
    with pytest.raises(DatasetRowError, match="d.jsonl line 2: not valid JSON"):
        load_target_splits(sciknoweval(broken))
    with pytest.raises(DatasetRowError, match="line 1: expected an object, got list"):
        load_target_splits(sciknoweval(write_jsonl(tmp_path / "e.jsonl", [[1, 2]])))


def test_too_few_rows_is_a_clear_error_with_the_counts(tmp_path):
    rows = [sciknoweval_row(i) for i in range(3)] + [sciknoweval_row(9, type="filling", choices=None)]
    cfg = sciknoweval(write_jsonl(tmp_path / "e.jsonl", rows), n_train=3, levels=["L1"])
    with pytest.raises(ValueError, match="exceeds the 3 distinct questions kept") as info:
        load_target_splits(cfg)
    assert "levels ['L1']" in str(info.value)
    assert "kept 3 (mcq-4-choices 3); dropped 1: unscorable type 1 (filling 1)" in str(info.value)


def test_the_counts_are_logged(tmp_path, caplog):
    folder = write_sciknoweval_layout(tmp_path / "ske", n_mcq=10, levels=("L3",))
    with caplog.at_level(logging.INFO, logger="dcv.tasks.sciknoweval"):
        load_target_splits(sciknoweval(folder, levels=["L3"]))
    [record] = [r for r in caplog.records if r.name == "dcv.tasks.sciknoweval"]
    assert "kept 12 (mcq-2-choices 1, mcq-4-choices 10, true_or_false 1)" in record.getMessage()
