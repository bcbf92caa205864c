"""data/arith.py, the verifiable addition task: the checker against hand-written right, wrong, hedged,
negated and restated answers, the fixed train/held-out split, and the prompt files.
Run: python -m pytest -q tests/test_arith.py"""

import json

import pytest

from data.arith import generate, parse_prompt, split_prompts, verify_answer

Q = "What is 7 + 6?"


@pytest.mark.parametrize("answer", [
    "13", "The answer is 13.", "7 + 6 = 13", "To add 7 and 6, you simply add them together: 7 + 6 = 13.",
    "7 + 6 is 13. 13 is the sum.", "13.0", "It's 13!",
])
def test_right_answers(answer):
    assert verify_answer(Q, answer) == 1.0


@pytest.mark.parametrize("answer", [
    "12", "7 + 6 = 12", "", "The answer is thirteen.", "-13", "13 or 14", "It is 13, or maybe 14.",
    "14, 13, 12", "7 + 3 = 10, 10 + 3 = 13", "The answer is not 13.", "It isn't 13.", "never 13",
    "7 + 6 = 13 + 0 = 13", "7 + 6 = 13\n\nThis is like 2 + 2 = 4.",
])
def test_wrong_hedged_negated_answers(answer):
    assert verify_answer(Q, answer) == 0.0


def test_operands_may_repeat_and_non_questions_are_none():
    assert verify_answer("What is 5 + 5?", "5 + 5 = 10") == 1.0
    assert verify_answer("What is 5 + 5?", "5 + 5 = 55") == 0.0
    assert verify_answer("what is 5 + 5? ", "10") == 1.0  # case and spaces of the question
    assert verify_answer("What colour is the fox?", "10") is None
    assert parse_prompt("What is 12 + 3?") == (12, 3) and parse_prompt("What is 12 - 3?") is None


def test_fixed_split_and_files(tmp_path):
    train, held = split_prompts()
    assert len(train) == 300 and len(held) == 100 and not set(train) & set(held)
    assert split_prompts() == (train, held)  # fixed
    sums = [sum(parse_prompt(q)) for q in held]
    assert min(sums) >= 2 and max(sums) <= 40
    assert generate(str(tmp_path)) == {"prompts_train": 300, "prompts_val": 100}
    rows = [json.loads(line) for line in (tmp_path / "prompts_val.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == held
