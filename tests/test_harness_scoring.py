"""Answer extraction of `nora eval`: GSM8K final numbers and multiple-choice answers (LLM-Adapters protocol)."""

from __future__ import annotations

import pytest

from nora.harness.data import gsm8k_final_answer, parse_options
from nora.harness.scoring import extract_choice, extract_number, numbers_match


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("The answer is $1,234.50.", "1234.5"),
        ("So the total is 42.", "42"),
        ("It drops to -7 degrees", "-7"),
        ("#### -3", "-3"),
        ("a loss of $-5", "-5"),
        ("costs $5.00", "5"),
        ("half is 0.5 and then 2.25", "2.25"),
        ("pages 3-5", "5"),
        ("#### 12 apples, not 13", "12"),  # the number after '####' wins over later numbers
        ("50% of them", "50"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numbers_match_is_format_tolerant():
    assert numbers_match("18", "18")
    assert numbers_match("18.0", "18")
    assert numbers_match("1000", "1,000")
    assert not numbers_match("17", "18")
    assert not numbers_match(None, "18")


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("step 1\nstep 2\n#### 1,250") == "1250"


ARC = ["answer1", "answer2", "answer3", "answer4"]


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("the correct answer is answer3", ARC, "answer3"),
        ("Answer2: rubber gloves. answer1 is wrong", ARC, "answer2"),  # first occurrence, case-insensitive
        ("The correct answer is Answer 4.", ARC, "answer4"),  # "Answer 4" counts as answer4
        ("answer10 is not an option", ARC, None),  # no partial-token matches
        ("xanswer1", ARC, None),
        ("I cannot tell.", ARC, None),
        ("the correct answer is true", ["true", "false"], "true"),
        ("False, because ...", ["true", "false"], "false"),
        ("untrue", ["true", "false"], None),
        ("solution2 is better than solution1", ["solution1", "solution2"], "solution2"),
        ("Negative.", ["negative", "neutral", "positive"], "negative"),
    ],
)
def test_extract_choice(text, options, expected):
    assert extract_choice(text, options) == expected


def test_parse_options_from_answer_format_line():
    text = "Question?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"
    assert parse_options(text) == ["answer1", "answer2", "answer3"]
    assert parse_options("Question? Answer format: true/false") == ["true", "false"]


def test_parse_options_inferred_from_answer():
    assert parse_options("Is it? yes or no", "true") == ["true", "false"]
    assert parse_options("Solution1: x Solution2: y", "solution1") == ["solution1", "solution2"]
    assert parse_options("Answer1: x Answer2: y Answer3: z", "answer2") == ["answer1", "answer2", "answer3"]
    assert parse_options("free text", "Paris") is None
