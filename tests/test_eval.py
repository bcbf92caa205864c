"""Tests of eval.py: rank correlation, the summary of a real run with best-of-n and a dump, the
gold win rate with ties, and the frontier table."""

import json
import math

import pytest
import torch

import eval as evaluate
import model as M


def test_spearman_with_ties():
    assert evaluate.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert evaluate.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert evaluate.ranks([3, 1, 3, 2]) == [2.5, 0.0, 2.5, 1.0]
    # hand-computed: ranks a = [0, 1, 2], b = [0.5, 0.5, 2] -> pearson = 0.866...
    assert evaluate.spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(math.sqrt(3) / 2, abs=1e-6)


def test_best_of_n_summary_and_dump(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    seen = {"gold": [], "rm": []}  # what evaluate computed, to check its summary against by hand
    real_gold, real_rm = evaluate.gold_scores, evaluate.rm_scores
    monkeypatch.setattr(evaluate, "gold_scores", lambda *a: seen["gold"].append(real_gold(*a)) or seen["gold"][-1])
    monkeypatch.setattr(evaluate, "rm_scores", lambda *a: seen["rm"].append(real_rm(*a)) or seen["rm"][-1])
    cfg = M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(world / "prompts_val.jsonl"), "--n_prompts", "6",
                                           "--reward_model", tiny_rm, "--best_of_n", "4", "--ref", tiny_ckpt, "--baseline", tiny_ckpt,
                                           "--max_new_tokens", "12", "--dump", str(tmp_path / "bon.jsonl"),
                                           "--dump_rankings", str(tmp_path / "ranked.jsonl"), "--out", str(tmp_path / "e.json")])
    s = evaluate.evaluate(cfg)
    assert s["kl_best_of_n"] == pytest.approx(math.log(4) - 3 / 4)
    assert s["rm_score"] >= s["rm_score_all"]  # the pick is the best of its n
    assert "kl" not in s  # picks are not samples of the policy: only the analytic KL is reported
    (all_gold, base_gold), (scores,) = seen["gold"], seen["rm"]  # 6 x 4 answers, then the baseline's 6
    gold = [g["gold"] for g in all_gold]
    assert s["rm_gold_spearman"] == pytest.approx(evaluate.spearman(scores.tolist(), gold))
    picks = [gold[4 * i + int(scores[4 * i:4 * i + 4].argmax())] for i in range(6)]  # the RM's best of each 4
    assert s["gold"] == pytest.approx(sum(picks) / 6)
    wins = [1.0 if a > b["gold"] else 0.5 if a == b["gold"] else 0.0 for a, b in zip(picks, base_gold)]
    assert s["win_rate"] == pytest.approx(sum(wins) / 6) and s["baseline_gold"] == pytest.approx(sum(b["gold"] for b in base_gold) / 6)
    dumped = [json.loads(x) for x in open(tmp_path / "bon.jsonl")] if s["dumped"] else []
    assert len(dumped) == s["dumped"] == round(s["eos_rate"] * 6)  # only answers that ended
    assert json.load(open(tmp_path / "e.json")) == s
    # the rankings file (its order is tested below): one ranking per prompt, readable as preferences
    groups, _ = M.read_preferences(str(tmp_path / "ranked.jsonl"))
    assert len(groups) == s["rankings_dumped"] == 6 - s["rankings_skipped"] and all(len(a) >= 2 for _, a in groups)


def test_rm_rankings_order_duplicates_and_skips():
    # prompt "p": "b" twice (kept once, at its best place); prompt "q": one distinct answer, no preference
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.0, 0.3, 0.2]])
    rows, skipped = evaluate.rm_rankings(["p", "q"], ["b", "a", "b", "x", " x", "x "], scores)
    assert rows == [{"prompt": "p", "responses": ["a", "b"]}] and skipped == 1


def test_win_rate_counts_ties_half(world, tiny_ckpt, tmp_path):
    # the policy against itself with the same seed: identical answers, every comparison a tie
    cfg = M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(world / "prompts_val.jsonl"), "--n_prompts", "5",
                                           "--baseline", tiny_ckpt, "--max_new_tokens", "8", "--out", str(tmp_path / "e.json")])
    real = evaluate.sample
    evaluate.sample = lambda model, tok, prompts, cfg, device, seed: real(model, tok, prompts, cfg, device, 0)
    try:
        s = evaluate.evaluate(cfg)
    finally:
        evaluate.sample = real
    assert s["win_rate"] == 0.5 and s["baseline_gold"] == s["gold"]


def test_frontier_table(tmp_path, capsys):
    rows = [{"ckpt": "out/sft", "gold": 0.5, "kl": 0.0, "best_of_n": 1},
            {"ckpt": "out/sft", "gold": 1.0, "best_of_n": 8, "kl_best_of_n": math.log(8) - 7 / 8},
            {"ckpt": "out/sweep/ppo_kl0.1", "gold": 1.2, "kl": 3.0, "win_rate": 0.8},
            {"ckpt": "out/dpo/ckpt", "gold": 0.9, "kl": 2.0}]
    for i, r in enumerate(rows):
        (tmp_path / f"eval_{i}.json").write_text(json.dumps(r))
    cfg = M.parse_config(evaluate.Config, ["--frontier", str(tmp_path / "eval_*.json"), "--plot", str(tmp_path / "f.png")])
    got = evaluate.frontier(cfg)
    assert [(m, round(kl, 3), g) for m, kl, g, _, _ in got] == [
        ("best-of-n", round(math.log(8) - 7 / 8, 3), 1.0), ("dpo", 2.0, 0.9), ("ppo", 3.0, 1.2), ("sft", 0.0, 0.5)]
    assert "ppo" in capsys.readouterr().out
