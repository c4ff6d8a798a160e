"""SciKnowEval rows -> the target task's QAItem.

Row schema (hub ``hicai-zju/SciKnowEval``, one JSON object per line)::

    {"question": "...", "choices": {"text": ["...", ...], "label": ["A", "B", "C", "D"]},
     "answerKey": "B", "type": "mcq-4-choices", "domain": "Chemistry",
     "details": {"level": "L1", "task": "...", "subtask": "..."}}

Only multiple-choice rows (``type`` starting with ``mcq``) with 2-4 options become items; the others
(open-ended, true/false, filling) are counted and skipped. A malformed row is an error naming its line.
The hub dataset has only a ``test`` split, so dcv makes its own seeded train/test split of it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from dcv.config import TargetTaskConfig
from dcv.tasks.items import LETTERS, QAItem, build_messages


class DatasetRowError(ValueError):
    """A source row that does not fit the schema; the message names the source and row."""


def read_rows(source: str, domain: str) -> list[dict[str, Any]]:
    """Rows from a local .json/.jsonl file, or from the hub (only when ``source`` is a hub id)."""
    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"target_task.source: no file at {path.resolve()}")
        text = path.read_text()
        if path.suffix == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise DatasetRowError(f"{path}: a .json source must hold a list of rows")
            return rows
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetRowError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
        return rows
    # A hub id: the one place the target task may touch the network, because the config asked for it.
    from datasets import load_dataset

    return list(load_dataset(source, domain, split="test"))


def row_to_item(
    row: dict[str, Any], where: str, system_prompt: str, answer_format: str = "letter"
) -> QAItem | None:
    """The QAItem of one row, None for a non-multiple-choice row; DatasetRowError if malformed."""
    if not isinstance(row, dict):
        raise DatasetRowError(f"{where}: expected an object, got {type(row).__name__}")
    if not str(row.get("type", "mcq")).startswith("mcq"):
        return None
    for key in ("question", "choices", "answerKey"):
        if key not in row:
            raise DatasetRowError(f"{where}: missing field {key!r}")
    choices = row["choices"]
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list):
        raise DatasetRowError(f"{where}: 'choices' must be {{'text': [...], 'label': [...]}}")
    texts = [str(t) for t in choices["text"]]
    labels = [str(label) for label in choices.get("label", LETTERS[: len(texts)])]
    if labels != list(LETTERS[: len(texts)]) or not 2 <= len(texts) <= len(LETTERS):
        return None  # more than four options or unusual labels: outside what the answer parser scores
    gold = str(row["answerKey"]).strip()
    if gold not in labels:
        raise DatasetRowError(f"{where}: answerKey {gold!r} is not one of the labels {labels}")
    details = row.get("details") or {}
    kind = str(details.get("subtask") or details.get("task") or row.get("type"))
    question = str(row["question"]).strip()
    return QAItem(
        id=where,
        kind=kind,
        question=question,
        options=tuple(texts),
        gold=gold,
        messages=build_messages(system_prompt, question, tuple(texts)),
        answer_format=answer_format,
    )


def build_sciknoweval_splits(cfg: TargetTaskConfig) -> tuple[list[QAItem], list[QAItem]]:
    if cfg.source is None:
        raise ValueError(
            "target_task.source: sciknoweval needs a local .json/.jsonl file or a hub dataset id"
        )
    rows = read_rows(cfg.source, cfg.domain)
    items: list[QAItem] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if isinstance(row, dict) and row.get("domain") not in (None, cfg.domain):
            continue
        item = row_to_item(row, f"{cfg.source} row {index}", cfg.system_prompt, cfg.answer_format)
        if item is not None and item.question not in seen:
            seen.add(item.question)
            items.append(item)
    needed = cfg.n_train + cfg.n_test
    if needed > len(items):
        raise ValueError(
            f"target_task.n_train + target_task.n_test = {needed} exceeds the {len(items)} distinct "
            f"multiple-choice {cfg.domain} questions in {cfg.source} ({len(rows)} rows)"
        )
    random.Random(cfg.seed).shuffle(items)
    return items[cfg.n_test : needed], items[: cfg.n_test]
