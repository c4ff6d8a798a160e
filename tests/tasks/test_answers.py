from __future__ import annotations

import pytest

from dcv.tasks.answers import chosen_letter, completion_text, parse_answer, reward, score_answer

PARSES = [
    ("<answer>C</answer>", "C"),
    ("<answer> b </answer>", "B"),  # case and spaces inside the tag are tolerated
    ("<answer>A</answer> wait, no: <answer>D</answer>", "D"),  # the last tag wins
    ("<answer>E</answer>", None),  # not an option
    ("<answer>E</answer> The answer is B", None),  # a tag beats a phrase, even an invalid tag
    ("<ANSWER>c</ANSWER>", "C"),
    ("<answer>CD</answer>", None),
    ("The correct answer is D.", "D"),
    ("C. Terbium\n\nThe correct answer is D. Lutetium.", "D"),  # the stated answer beats the first line
    ("Answer: (B)", "B"),
    ("answer: **c**", "C"),
    ("C. Terbium", "C"),
    ("(B) 29", "B"),
    ("A. Be\nB. Mg\nC. F\nD. Ca", None),  # listing the options is not choosing one
    ("It must be C", "C"),
    ("So the option is B.", "B"),
    ("I think this is a tricky one", None),  # a trailing lowercase "a" is not option A
    ("ABCD", None),
    ("Vitamin E", None),  # a final capital outside A-D
    ("", None),
    ("   \n  ", None),
]


@pytest.mark.parametrize("text,expected", PARSES)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_letters_restrict_the_options():
    assert parse_answer("<answer>C</answer>", letters="AB") is None
    assert parse_answer("B", letters="AB") == "B"


def test_reward_is_one_for_correct_zero_otherwise():
    completions = ["<answer>A</answer>", "<answer>B</answer>", "nothing", "The answer is A"]
    assert reward(completions, gold=["A", "A", "A", "A"]) == [1.0, 0.0, 0.0, 1.0]


def test_format_bonus_only_with_the_tag():
    assert score_answer("<answer>B</answer>", "A", format_bonus=0.1) == pytest.approx(0.1)
    assert score_answer("<answer>A</answer>", "A", format_bonus=0.1) == pytest.approx(1.1)
    assert score_answer("The answer is A", "A", format_bonus=0.1) == pytest.approx(1.0)


def test_reward_accepts_conversational_completions_and_extra_columns():
    completions = [
        [{"role": "assistant", "content": "<answer>D</answer>"}],
        [{"role": "assistant", "content": "A"}],
    ]
    assert reward(completions, gold=["D", "B"], prompts=["p1", "p2"], kind=["x", "y"]) == [1.0, 0.0]
    assert completion_text("plain") == "plain"


def test_reward_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        reward(["A", "B"], gold=["A"])


def test_docstring_examples_hold():
    import doctest

    import dcv.tasks.answers

    assert doctest.testmod(dcv.tasks.answers).failed == 0


SYMBOLS = ("B", "C", "N", "O")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<answer>C</answer>", "B"),  # an option's text wins over the letter of the same name
        ("<answer> o </answer>", "D"),  # case and spaces are ignored
        ("<answer>N</answer> no: <answer>B</answer>", "A"),  # the last tag wins
        ("<answer>Fe</answer>", None),  # not an option, not a letter
        ("The answer is D", "D"),  # no tags, no option named: read as a letter
        ("<answer>Fe</answer> so O", None),  # a tag that names no option is not rescued by the text
    ],
)
def test_option_answers_name_an_option_by_its_text(text, expected):
    assert chosen_letter(text, SYMBOLS, answer_format="option") == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("C. Fe", "B"),  # no tags: the one option named wins over the letter
        ("The chemical symbol for iron is Fe.", "B"),
        ("Iron (Fe), not cobalt", "B"),  # whole words, case as written: "cobalt" is not Co
        ("Fe or Co? The answer is D", "D"),  # two options named: read as a letter
        ("Fermium", None),  # Fe inside a word is not Fe
    ],
)
def test_untagged_option_answers_are_read_by_the_option_named(text, expected):
    assert chosen_letter(text, ("Mn", "Fe", "Co", "Ni"), answer_format="option") == expected


def test_letter_answers_ignore_option_text():
    assert chosen_letter("<answer>C</answer>", SYMBOLS) == "C"
    assert chosen_letter("<answer>Fe</answer>", ("Mn", "Fe", "Co", "Ni")) is None


def test_reward_reads_option_columns():
    options = [["24", "26", "25", "28"], ["24", "26", "25", "28"], SYMBOLS]
    completions = ["<answer>26</answer>", "<answer>B</answer>", "<answer>B</answer>"]
    formats = ["option", "letter", "option"]
    assert reward(completions, gold=["B", "B", "B"], options=options, answer_format=formats) == [
        1.0,
        1.0,
        0.0,
    ]
    assert score_answer("<answer>26</answer>", "B", 0.1, options[0], "option") == pytest.approx(1.1)
