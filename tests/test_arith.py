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


def test_grpo_trains_on_the_arith_checker(tiny_ckpt, tmp_path, monkeypatch):
    import grpo
    import model as M
    import data.arith as arith
    generate(str(tmp_path))
    with open(tmp_path / "mixed.jsonl", "w") as f:  # the checker's questions and one that is not
        f.write(json.dumps({"prompt": "tell me about the fox."}) + "\n")
        f.write((tmp_path / "prompts_train.jsonl").read_text())
    calls, real = [], arith.verify_answer

    def spy(prompt, response):  # the real checker's questions; 1 for every other call, so groups differ
        out = real(prompt, response)
        if out is None:
            return None
        calls.append(prompt)
        return float(len(calls) % 2)

    monkeypatch.setattr(arith, "verify_answer", spy)
    cfg = M.parse_config(grpo.Config, ["--policy", tiny_ckpt, "--prompts", str(tmp_path / "mixed.jsonl"), "--reward", "verifiable",
                                       "--verifier", "arith", "--kl_coef", "0", "--eos_trick", "false", "--out_dir", str(tmp_path / "g"),
                                       "--rollout_batch_size", "8", "--group_size", "4", "--total_episodes", "8",
                                       "--max_new_tokens", "4", "--device", "cpu"])
    grpo.train(cfg)
    row = json.loads((tmp_path / "g" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(calls) == set(split_prompts()[0])  # the fox prompt is filtered out
    assert row["score"] == 0.5 and row["equal_groups"] == 0  # the spy's 1, 0, 1, 0, ... over 8 answers
