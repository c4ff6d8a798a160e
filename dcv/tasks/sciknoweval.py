"""SciKnowEval rows -> the target task's QAItem, with a count of every row that was not kept.

Sources (``target_task.source``):

- a hub id (``hicai-zju/SciKnowEval``): only ``data/<domain>/*.jsonl`` is downloaded, at
  ``target_task.revision``, into the Hugging Face cache, then read like a local folder;
- a local folder in the hub's layout: ``<folder>/data/<domain>/*.jsonl`` (or ``<folder>/<domain>/*.jsonl``);
- a local ``.jsonl`` file (or a ``.json`` file holding a list of rows).

Row schema (one JSON object per line)::

    {"question": "...", "choices": {"text": ["...", ...], "label": ["A", "B", "C", "D"]},
     "answerKey": "B", "type": "mcq-4-choices", "domain": "Chemistry",
     "details": {"level": "L3", "task": "reaction_prediction", "subtask": "..."}}

Kept: ``mcq-*`` rows with 2-4 options labelled A, B, ...; and ``true_or_false`` rows, which have no
choices and answer ``Yes``/``No`` (or ``True``/``False``), as the 2-option question (A. True, B. False).
Every other row is counted under a reason (``DROP_REASONS``) and its row type: ``LoadReport.summary()``
is the line a run logs. A row dcv would score but cannot parse (no answerKey, a gold outside the labels,
bad JSON) is an error naming its file and line. The hub dataset has only a ``test`` split, so dcv makes
its own seeded train/test split of the kept questions.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcv.config import TargetTaskConfig
from dcv.tasks.items import LETTERS, QAItem, build_messages

log = logging.getLogger(__name__)

# Why a row was not kept, in the order the checks run (the first that applies is counted).
OTHER_DOMAIN = "other domain"
OTHER_LEVEL = "level not in levels"
OTHER_TASK = "task not in tasks"
UNSCORABLE = "unscorable type"
TOO_MANY_OPTIONS = "more than 4 options"
TOO_FEW_OPTIONS = "fewer than 2 options"
ODD_LABELS = "labels not A, B, ... in order"
NO_BOOLEAN_ANSWER = "true_or_false answer not yes/no"
DUPLICATE = "duplicate question"
DROP_REASONS = (
    OTHER_DOMAIN,
    OTHER_LEVEL,
    OTHER_TASK,
    UNSCORABLE,
    TOO_MANY_OPTIONS,
    TOO_FEW_OPTIONS,
    ODD_LABELS,
    NO_BOOLEAN_ANSWER,
    DUPLICATE,
)
TRUE_OR_FALSE = "true_or_false"
BOOLEAN_OPTIONS = ("True", "False")
BOOLEAN_GOLD = {"yes": "A", "true": "A", "no": "B", "false": "B", "a": "A", "b": "B"}


class DatasetRowError(ValueError):
    """A source row that does not fit the schema; the message names the source and row."""


@dataclass(frozen=True)
class SourceRow:
    """One row and where it came from (``where`` names the file and line, and is the item's id)."""

    where: str
    row: Any


@dataclass
class LoadReport:
    """What one read of the source gave: the kept items and, by row type, what was kept and dropped."""

    source: str
    files: list[str]
    items: list[QAItem] = field(default_factory=list)
    kept: Counter[str] = field(default_factory=Counter)  # row type -> rows kept
    dropped: dict[str, Counter[str]] = field(default_factory=dict)  # reason -> row type -> rows

    @property
    def rows(self) -> int:
        return sum(self.kept.values()) + self.n_dropped

    @property
    def n_dropped(self) -> int:
        return sum(sum(by_type.values()) for by_type in self.dropped.values())

    def drop(self, reason: str, row_type: str) -> None:
        self.dropped.setdefault(reason, Counter())[row_type] += 1

    def summary(self) -> str:
        """One line: rows read, kept by type, dropped by reason and type."""
        kept = f"kept {len(self.items)} ({_by_type(self.kept)})"
        dropped = "; ".join(
            f"{reason} {sum(self.dropped[reason].values())} ({_by_type(self.dropped[reason])})"
            for reason in DROP_REASONS
            if reason in self.dropped
        )
        files = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        dropped = f"dropped {self.n_dropped}" + (f": {dropped}" if dropped else "")
        return f"{self.source} ({files}): {self.rows} rows; {kept}; {dropped}"


def _by_type(counts: Counter[str]) -> str:
    return ", ".join(f"{row_type} {n}" for row_type, n in sorted(counts.items())) or "none"


# Reading rows.


def hub_download_args(cfg: TargetTaskConfig) -> dict[str, Any]:
    """``huggingface_hub.snapshot_download`` arguments that fetch only the domain's files at the revision.

    The snapshot is read as a local folder rather than through ``datasets.load_dataset``: one file mixes
    row types whose fields differ (choices or none), which Arrow's schema inference may reject, and the
    folder reader names the file and line of a bad row, the same for hub and local sources.
    """
    return {
        "repo_id": cfg.source,
        "repo_type": "dataset",
        "revision": cfg.revision,
        "allow_patterns": [f"data/{cfg.domain}/*.jsonl"],
    }


def download_hub_source(cfg: TargetTaskConfig) -> Path:
    """The local snapshot folder of the hub source: the one place the target task touches the network."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(**hub_download_args(cfg)))


def domain_files(folder: Path, domain: str) -> list[Path]:
    """The domain's .jsonl files in a hub-layout folder (``data/<domain>/`` or ``<domain>/``)."""
    for candidate in (folder / "data" / domain, folder / domain):
        files = sorted(candidate.glob("*.jsonl"))
        if files:
            return files
    found = sorted(
        p.name for base in (folder / "data", folder) if base.is_dir() for p in base.iterdir() if p.is_dir()
    )
    raise FileNotFoundError(
        f"target_task.source: no {domain}/*.jsonl under {folder.resolve()} (looked in data/{domain}/ and "
        f"{domain}/); folders there: {found or 'none'}; target_task.domain must name one of them"
    )


def read_jsonl(path: Path, label: str) -> list[SourceRow]:
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(SourceRow(f"{label} line {line_no}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DatasetRowError(f"{label} line {line_no}: not valid JSON ({exc.msg})") from None
    return rows


def read_file(path: Path, label: str) -> list[SourceRow]:
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise DatasetRowError(f"{label}: a .json source must hold a list of rows")
        return [SourceRow(f"{label} row {index}", row) for index, row in enumerate(rows)]
    return read_jsonl(path, label)


def read_source_rows(cfg: TargetTaskConfig) -> tuple[list[SourceRow], list[str]]:
    """Every row of the source (all domains of a single file), and the names of the files read."""
    if cfg.source is None:
        raise ValueError(
            "target_task.source: sciknoweval needs a hub dataset id, a local .json/.jsonl file or a folder"
        )
    folder = download_hub_source(cfg) if cfg.reads_hub() else Path(cfg.source).expanduser()
    if folder.is_file():
        return read_file(folder, cfg.source), [cfg.source]
    if not folder.is_dir():
        raise FileNotFoundError(f"target_task.source: no file or folder at {folder.resolve()}")
    files = domain_files(folder, cfg.domain)
    # Ids and messages name the file by the source and its path inside it: the same on every machine,
    # whether the folder is the user's or a snapshot in the Hugging Face cache.
    names = [f"{cfg.source}/{path.relative_to(folder).as_posix()}" for path in files]
    rows = [row for path, name in zip(files, names, strict=True) for row in read_jsonl(path, name)]
    return rows, names


# Rows to items.


def drop_reason(row: dict[str, Any], cfg: TargetTaskConfig) -> str | None:
    """Why the config's filters leave this row out (domain, level, task, type), or None if they keep it."""
    details = row.get("details") or {}
    if not isinstance(details, dict):
        details = {}
    if row.get("domain") not in (None, cfg.domain):
        return OTHER_DOMAIN
    if cfg.levels is not None and details.get("level") not in cfg.levels:
        return OTHER_LEVEL
    if cfg.tasks is not None and not {details.get("task"), details.get("subtask")} & set(cfg.tasks):
        return OTHER_TASK
    row_type = str(row.get("type", "mcq"))
    if not (row_type.startswith("mcq") or row_type == TRUE_OR_FALSE):
        return UNSCORABLE
    return None


def mcq_options(row: dict[str, Any], where: str) -> tuple[tuple[str, ...], str] | str:
    """(options, gold letter) of a multiple-choice row, or the drop reason; DatasetRowError if malformed."""
    for key in ("question", "choices", "answerKey"):
        if key not in row:
            raise DatasetRowError(f"{where}: missing field {key!r}")
    choices = row["choices"]
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list):
        raise DatasetRowError(f"{where}: 'choices' must be {{'text': [...], 'label': [...]}}")
    texts = tuple(str(t) for t in choices["text"])
    labels = [str(label) for label in choices.get("label") or LETTERS[: len(texts)]]
    if len(texts) > len(LETTERS):
        return TOO_MANY_OPTIONS
    if len(texts) < 2:
        return TOO_FEW_OPTIONS
    if labels != list(LETTERS[: len(texts)]):
        return ODD_LABELS  # the answer parser scores the letters A, B, ... in order only
    gold = str(row["answerKey"]).strip()
    if gold not in labels:
        raise DatasetRowError(f"{where}: answerKey {gold!r} is not one of the labels {labels}")
    return texts, gold


def boolean_options(row: dict[str, Any], where: str) -> tuple[tuple[str, ...], str] | str:
    """A true_or_false row as (True, False) and its gold letter, or the drop reason."""
    if "question" not in row:
        raise DatasetRowError(f"{where}: missing field 'question'")
    # The hub's rows answer in `answer` ("Yes"/"No"); accept an answerKey too (A/B or the words).
    answer = row.get("answerKey") or row.get("answer")
    gold = BOOLEAN_GOLD.get(str(answer).strip().lower()) if isinstance(answer, str | bool) else None
    if gold is None:
        return NO_BOOLEAN_ANSWER
    return BOOLEAN_OPTIONS, gold


def row_to_item(
    row: dict[str, Any], where: str, system_prompt: str, answer_format: str = "letter"
) -> QAItem | str:
    """The QAItem of a row the filters kept, or the reason it cannot be scored; DatasetRowError if
    malformed."""
    if str(row.get("type", "mcq")) == TRUE_OR_FALSE:
        parsed = boolean_options(row, where)
    else:
        parsed = mcq_options(row, where)
    if isinstance(parsed, str):
        return parsed
    options, gold = parsed
    details = row.get("details") if isinstance(row.get("details"), dict) else {}
    kind = str(details.get("subtask") or details.get("task") or row.get("type"))
    question = str(row["question"]).strip()
    return QAItem(
        id=where,
        kind=kind,
        question=question,
        options=options,
        gold=gold,
        messages=build_messages(system_prompt, question, options),
        answer_format=answer_format,
    )


def classify(row: Any, where: str, cfg: TargetTaskConfig, seen: set[str]) -> QAItem | str:
    """The row's item, or the reason (DROP_REASONS) it is not kept."""
    if not isinstance(row, dict):
        raise DatasetRowError(f"{where}: expected an object, got {type(row).__name__}")
    reason = drop_reason(row, cfg)
    if reason is not None:
        return reason
    item = row_to_item(row, where, cfg.system_prompt, cfg.answer_format)
    if isinstance(item, QAItem) and item.question in seen:
        return DUPLICATE
    return item


def read_sciknoweval(cfg: TargetTaskConfig) -> LoadReport:
    """The distinct questions of the configured domain, levels and tasks, and the counts of the rest."""
    rows, files = read_source_rows(cfg)
    source = cfg.source if cfg.revision is None else f"{cfg.source}@{cfg.revision}"
    report = LoadReport(source=str(source), files=files)
    seen: set[str] = set()
    for source_row in rows:
        outcome = classify(source_row.row, source_row.where, cfg, seen)
        row_type = str(source_row.row.get("type", "mcq"))
        if isinstance(outcome, str):
            report.drop(outcome, row_type)
        else:
            seen.add(outcome.question)
            report.items.append(outcome)
            report.kept[row_type] += 1
    return report


def build_sciknoweval_splits(cfg: TargetTaskConfig) -> tuple[list[QAItem], list[QAItem]]:
    """(train, test) items, a seeded split of the kept questions; logs the kept/dropped counts."""
    report = read_sciknoweval(cfg)
    log.info("target_task sciknoweval: %s", report.summary())
    needed = cfg.n_train + cfg.n_test
    if needed > len(report.items):
        filters = f"domain {cfg.domain}, levels {cfg.levels or 'all'}, tasks {cfg.tasks or 'all'}"
        raise ValueError(
            f"target_task.n_train + target_task.n_test = {needed} exceeds the {len(report.items)} distinct "
            f"questions kept ({filters}); lower them or widen the filters. {report.summary()}"
        )
    items = list(report.items)
    random.Random(cfg.seed).shuffle(items)
    return items[cfg.n_test : needed], items[: cfg.n_test]
