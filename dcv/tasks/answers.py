"""One answer parser and one reward function, shared by RL training and evaluation.

>>> parse_answer("Iron is Fe, so <answer>C</answer>")
'C'
>>> parse_answer("The answer is (B).")
'B'
>>> parse_answer("C. Terbium")
'C'
>>> parse_answer("A. Be\\nB. Mg\\nC. F\\nD. Ca") is None
True
>>> parse_answer("I cannot decide") is None
True
>>> reward(["<answer>A</answer>", "B"], gold=["A", "A"])
[1.0, 0.0]
>>> chosen_letter("<answer> fe </answer>", options=("Mn", "Fe", "Co", "Ni"), answer_format="option")
'B'
>>> chosen_letter("<answer>C</answer>", options=("B", "C", "N", "O"), answer_format="option")
'B'
>>> chosen_letter("<answer>C</answer>", options=("B", "C", "N", "O"))
'C'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dcv.tasks.items import LETTERS

ANSWER_TAG = re.compile(r"<answer>\s*([A-Za-z])\s*</answer>", re.IGNORECASE)
ANSWER_CONTENT = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
# "The correct answer is D." / "Answer: (B)": small instruct models state their choice this way.
ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is|:)\s*(?:option\s*)?[(*]*([A-Z])\b", re.IGNORECASE)
# A line that starts with an option marker: "C. Terbium", "(B) 29", "D) Ca".
OPTION_LINE = re.compile(r"^\s*[(*]*([A-Z])[.):](?:\s|$)", re.MULTILINE)
# The tolerant fallback: the text ends in a lone capital letter, maybe wrapped or punctuated: "C", "(C).",
# "Answer: **C**". Capitals only, so that a trailing article ("a") is not read as option A.
LONE_FINAL_LETTER = re.compile(r"(?:^|[\s(\[*:])([A-Z])[\s)\].*:!]*$")


def parse_answer(text: str, letters: str = LETTERS) -> str | None:
    """The chosen option letter, or None when the text commits to none of ``letters``.

    In order of precedence: the last ``<answer>X</answer>`` tag (a model may revise itself); the last
    "answer is X" / "answer: X"; a reply whose only option-marked line is its first ("C. Terbium"; a reply
    that lists several options chose none); a lone capital letter at the very end. The fallbacks exist
    because a small base model answers "C. Terbium" and never a tag: without them its reward is always 0
    and GRPO has no signal. A letter outside ``letters`` counts as no answer.
    """
    tags = ANSWER_TAG.findall(text)
    if tags:
        letter = tags[-1].upper()
        return letter if letter in letters else None
    phrases = ANSWER_PHRASE.findall(text)
    if phrases:
        letter = phrases[-1].upper()
        return letter if letter in letters else None
    option_lines = OPTION_LINE.findall(text)
    if len(option_lines) == 1 and OPTION_LINE.match(text):
        return option_lines[0] if option_lines[0] in letters else None
    if option_lines:
        return None
    match = LONE_FINAL_LETTER.search(text.strip())
    if match and match.group(1) in letters:
        return match.group(1)
    return None


def chosen_letter(text: str, options: Sequence[str] = (), answer_format: str = "letter") -> str | None:
    """The letter of the option ``text`` commits to, or None.

    With ``answer_format="option"`` the last answer tag names an option by its text (case and surrounding
    space ignored); its text wins over a letter, since an option may itself be a letter (the symbol C).
    Without tags, a reply that names exactly one option's text as a whole word chose it ("C. Es" chose Es,
    whatever C is): a small model states what it knows but binds letters at chance, and without this its
    reward carries no signal of what it knows. Anything else is read as a letter by ``parse_answer``.
    """
    if answer_format == "option":
        tags = ANSWER_CONTENT.findall(text)
        if tags:
            said = tags[-1].strip().casefold()
            for letter, option in zip(LETTERS, options, strict=False):
                if option.strip().casefold() == said:
                    return letter
        else:
            named = [
                letter
                for letter, option in zip(LETTERS, options, strict=False)
                if option.strip() and re.search(rf"(?<!\w){re.escape(option.strip())}(?!\w)", text)
            ]
            if len(named) == 1:
                return named[0]
    return parse_answer(text, LETTERS[: len(options)] if options else LETTERS)


def has_answer_tag(text: str) -> bool:
    return ANSWER_CONTENT.search(text) is not None


def completion_text(completion: Any) -> str:
    """TRL passes completions as strings, or as conversations (a list of message dicts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


def score_answer(
    text: str,
    gold: str,
    format_bonus: float = 0.0,
    options: Sequence[str] = (),
    answer_format: str = "letter",
) -> float:
    """1 if the chosen option is ``gold`` else 0, plus ``format_bonus`` when the answer tags are used."""
    correct = float(chosen_letter(text, options, answer_format) == gold)
    return correct + (format_bonus if has_answer_tag(text) else 0.0)


def reward(
    completions: Sequence[Any],
    gold: Sequence[str],
    format_bonus: float = 0.0,
    options: Sequence[Sequence[str]] | None = None,
    answer_format: Sequence[str] | None = None,
    **_: Any,
) -> list[float]:
    """TRL reward function: ``gold``, ``options`` and ``answer_format`` arrive as the dataset's columns."""
    if len(completions) != len(gold):
        raise ValueError(f"{len(completions)} completions but {len(gold)} gold answers")
    n = len(gold)
    options = options if options is not None else [()] * n
    answer_format = answer_format if answer_format is not None else ["letter"] * n
    return [
        score_answer(completion_text(c), g, format_bonus, o, f)
        for c, g, o, f in zip(completions, gold, options, answer_format, strict=True)
    ]
