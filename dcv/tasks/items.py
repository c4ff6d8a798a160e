"""The two item types every stage shares: target-task questions and probe contrast pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

from dcv.config import ANSWER_FORMATS

LETTERS = "ABCD"


@dataclass(frozen=True)
class QAItem:
    """A multiple-choice question of the target task, ready for a chat template.

    ``messages`` is the prompt (system + user turns); the model answers ``<answer>X</answer>`` where X
    is ``gold``, the letter of the right entry of ``options``, or with ``answer_format="option"`` that
    entry's text.
    """

    id: str
    kind: str
    question: str
    options: tuple[str, ...]
    gold: str
    messages: tuple[dict[str, str], ...] = field(compare=False)
    answer_format: str = "letter"

    def __post_init__(self) -> None:
        if not 2 <= len(self.options) <= len(LETTERS):
            raise ValueError(f"item {self.id}: {len(self.options)} options; dcv supports 2 to {len(LETTERS)}")
        if self.gold not in LETTERS[: len(self.options)]:
            raise ValueError(
                f"item {self.id}: gold {self.gold!r} is not one of {LETTERS[: len(self.options)]}"
            )
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"item {self.id}: answer_format {self.answer_format!r} is not one of {ANSWER_FORMATS}"
            )

    @property
    def target(self) -> str:
        """The assistant turn SFT trains on."""
        answer = self.gold if self.answer_format == "letter" else self.options[LETTERS.index(self.gold)]
        return f"<answer>{answer}</answer>"

    def to_row(self) -> dict:
        """A row for TRL datasets: conversational ``prompt``/``completion`` plus what the reward reads."""
        return {
            "id": self.id,
            "kind": self.kind,
            "prompt": [dict(m) for m in self.messages],
            "completion": [{"role": "assistant", "content": self.target}],
            "gold": self.gold,
            "options": list(self.options),
            "answer_format": self.answer_format,
        }


def build_messages(system_prompt: str, question: str, options: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    lines = [question, ""] + [f"{letter}. {text}" for letter, text in zip(LETTERS, options, strict=False)]
    return (
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": "\n".join(lines)},
    )


@dataclass(frozen=True)
class ProbeItem:
    """A contrast pair: clean and corrupted prompts of equal token length, and two answer tokens.

    The metric is the logit difference LD = logit(correct_id) - logit(wrong_id) at the last position.
    """

    probe: str
    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    correct_id: int
    wrong_id: int
    clean_text: str
    corrupt_text: str

    def __post_init__(self) -> None:
        if len(self.clean_ids) != len(self.corrupt_ids):
            raise ValueError(
                f"{self.probe}: clean and corrupted prompts differ in length "
                f"({len(self.clean_ids)} vs {len(self.corrupt_ids)} tokens): {self.clean_text!r}"
            )
        if self.correct_id == self.wrong_id:
            raise ValueError(
                f"{self.probe}: correct and wrong answers are the same token in {self.clean_text!r}"
            )


@dataclass(frozen=True)
class ProbeSet:
    """The kept items of one probe, and how many candidates were generated to find them."""

    name: str
    items: tuple[ProbeItem, ...]
    n_candidates: int

    def __len__(self) -> int:
        return len(self.items)
