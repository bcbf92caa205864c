"""Tests of eval.py: rank correlation, the summary of a real run with best-of-n and a dump, the
gold win rate with ties, the frontier table; the length-controlled win rate (a win that comes from
length alone goes to 0.5, one independent of it stays the raw rate; the fit against a closed form and a
brute-force likelihood maximum; degenerate inputs; its interval resamples prompts whole); pass@k
against enumeration of every k-subset, its edges, and end to end.
Run: python -m pytest -q tests/test_eval.py"""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

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
    assert s["kl_best_of_n_bound"] == pytest.approx(math.log(4) - 3 / 4)
    assert s["bon_kl_m"] == 16  # 4 n samples per prompt for the sampled best-of-n KL
    assert 0.0 <= s["kl"] <= s["kl_best_of_n_bound"] + 1e-9 and s["kl_ci"][0] <= s["kl"] <= s["kl_ci"][1]
    assert s["rm_score"] >= s["rm_score_all"]  # the pick is the best of its n
    assert len(s["per_prompt"]["gold"]) == 6 and s["gold_ci"][0] <= s["gold"] <= s["gold_ci"][1]
    (all_gold, base_gold), scores = seen["gold"], seen["rm"][0]  # 6 x 4 answers, then the baseline's 6
    gold = [g["gold"] for g in all_gold]
    assert s["rm_gold_spearman"] == pytest.approx(evaluate.spearman(scores.tolist(), gold))
    picks = [gold[4 * i + int(scores[4 * i:4 * i + 4].argmax())] for i in range(6)]  # the RM's best of each 4
    assert s["gold"] == pytest.approx(sum(picks) / 6)
    wins = [1.0 if a > b["gold"] else 0.5 if a == b["gold"] else 0.0 for a, b in zip(picks, base_gold)]
    assert s["win_rate"] == pytest.approx(sum(wins) / 6) and s["baseline_gold"] == pytest.approx(sum(b["gold"] for b in base_gold) / 6)
    dumped = [json.loads(x) for x in open(tmp_path / "bon.jsonl")] if s["dumped"] else []
    assert len(dumped) == s["dumped"] == round(s["eos_rate"] * 6) - s["dump_skipped_empty"]  # ended, not empty
    assert json.load(open(tmp_path / "e.json")) == s
    # the rankings file (its order is tested below): one ranking per prompt, readable as preferences
    groups, _ = M.read_preferences(str(tmp_path / "ranked.jsonl"))
    assert len(groups) == s["rankings_dumped"] == 6 - s["rankings_skipped"] and all(len(a) >= 2 for _, a in groups)


def test_fact_accuracy_by_hand():
    from data.world import COLOUR, verify_answer
    q = "what colour is the fox?"
    true, false = f"the fox is {COLOUR['fox']}.", "the fox is " + ("blue" if COLOUR["fox"] != "blue" else "red") + "."
    story = "tell me a story about the fox."
    # two repeats each: the fox question right then wrong (0.5), right twice but the second cut (0.5, and 1.0
    # on the text alone); the story prompt is no fact question and does not count
    got = evaluate.verified_accuracy([q, q, q, q, story, story], [true, false, true, true, true, true],
                                     [True, True, True, False, True, True], 2, verify_answer, "fact")
    assert got["fact_acc"] == 0.5 and got["fact_prompts"] == 2 and got["fact_acc_text"] == 0.75
    assert evaluate.verified_accuracy([story], ["x"], [True], 1, verify_answer, "fact") == {}


def test_verified_dumps_for_rejection_sampling_and_dpo():
    from data.arith import verify_answer
    q, r = "What is 2 + 3?", "What is 1 + 1?"
    prompts = [q] * 5 + [r] * 2
    texts = ["5", " 5", "6", "2 + 3 = 5.", "5", "2", "3"]  # " 5" is "5" again; the 5th is cut (no EOS)
    ended = [True, True, True, True, False, True, True]
    rows, pairs = evaluate.verified_dumps(prompts, texts, ended, verify_answer)
    assert rows == [{"prompt": q, "response": "5"}, {"prompt": q, "response": "2 + 3 = 5."}, {"prompt": r, "response": "2"}]
    # correct answers paired in order with the wrong ones (the cut answer counts as wrong), each used once;
    # r has one right and one wrong answer
    assert pairs == [{"prompt": q, "chosen": "5", "rejected": "6"}, {"prompt": q, "chosen": "2 + 3 = 5.", "rejected": "5"},
                     {"prompt": r, "chosen": "2", "rejected": "3"}]


def test_arith_accuracy_greedy_and_dumps_end_to_end(tiny_ckpt, tmp_path):
    from data.arith import generate
    generate(str(tmp_path))
    cfg = M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(tmp_path / "prompts_val.jsonl"),
                                           "--n_prompts", "4", "--repeats", "3", "--verifier", "arith", "--ref", tiny_ckpt,
                                           "--max_new_tokens", "6", "--dump_verified", str(tmp_path / "rs.jsonl"),
                                           "--dump_verified_pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "e.json")])
    s = evaluate.evaluate(cfg)
    assert s["arith_prompts"] == 4 and 0.0 <= s["arith_acc"] <= s["arith_acc_text"] <= 1.0
    assert len(s["per_prompt"]["arith_acc"]) == 4 and "gold" not in s and s["kl"] == pytest.approx(0.0, abs=1e-5)
    assert s["verified_dumped"] == len(open(tmp_path / "rs.jsonl").readlines())
    greedy = evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(tmp_path / "prompts_val.jsonl"),
                                                                "--n_prompts", "4", "--verifier", "arith", "--temperature", "0",
                                                                "--ref", tiny_ckpt, "--max_new_tokens", "6", "--out", str(tmp_path / "g.json")]))
    assert "kl" not in greedy and greedy["arith_prompts"] == 4  # no KL of greedy answers
    with pytest.raises(M.ConfigError, match="need a checker"):
        evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(tmp_path / "prompts_val.jsonl"),
                                                           "--dump_verified", str(tmp_path / "x.jsonl")]))


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
    assert s["win_rate_lc"] == 0.5 and s["win_rate_lc_ci"] == [0.5, 0.5] and s["len_diff"] == 0.0  # the same answers


def test_frontier_table(tmp_path, capsys):
    rows = [{"ckpt": "out/sft", "gold": 0.5, "kl": 0.0, "best_of_n": 1},
            {"ckpt": "out/sft", "gold": 1.0, "best_of_n": 8, "kl_best_of_n": math.log(8) - 7 / 8},
            {"ckpt": "out/sweep/ppo_kl0.1", "gold": 1.2, "kl": 3.0, "win_rate": 0.8},
            {"ckpt": "out/dpo/ckpt", "gold": 0.9, "kl": 2.0},
            {"ckpt": "out/sweep/rloo", "gold": 1.1, "kl": 4.0}, {"ckpt": "out/seeds/rloo_seed1", "gold": 1.3, "kl": 5.0}]
    for i, r in enumerate(rows):
        (tmp_path / f"eval_{i}.json").write_text(json.dumps(r))
    cfg = M.parse_config(evaluate.Config, ["--frontier", str(tmp_path / "eval_*.json"), "--plot", str(tmp_path / "f.png")])
    got = evaluate.frontier(cfg)
    assert [(m, round(kl, 3), g) for m, kl, g, _, _ in got] == [
        ("best-of-n", round(math.log(8) - 7 / 8, 3), 1.0), ("dpo", 2.0, 0.9), ("ppo", 3.0, 1.2),
        ("rloo", 4.0, 1.1), ("rloo", 5.0, 1.3), ("sft", 0.0, 0.5)]  # a run's seeds are one method
    assert "ppo" in capsys.readouterr().out


def test_best_of_n_kl_hand_values_repeats_and_the_bound():
    # two distinct answers, n = 2: best-of-2 puts 1/4 on the worse and 3/4 on the better, p = 1/2 each
    assert evaluate.best_of_n_kl([0.0, 1.0], ["a", "b"], 2) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    # one answer sampled every time: best-of-n is the policy itself
    assert evaluate.best_of_n_kl([0.3] * 8, ["a"] * 8, 4) == 0.0
    # a repeated answer is one level: ("a" x3, "b" x1) = p (3/4, 1/4), n = 2: q = (9/16, 7/16)
    q, p = (9 / 16, 7 / 16), (3 / 4, 1 / 4)
    want = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    assert evaluate.best_of_n_kl([0.0, 0.0, 1.0, 0.0], ["a", "a", "b", "a"], 2) == pytest.approx(want)
    # many distinct answers: tends to log n - (n - 1) / n from below (Beirami et al. 2024)
    m, n = 20000, 4
    kl = evaluate.best_of_n_kl(list(range(m)), list(range(m)), n)
    assert kl < math.log(n) - (n - 1) / n and kl == pytest.approx(math.log(n) - (n - 1) / n, abs=2e-3)


def test_bootstrap_interval():
    assert M.bootstrap_ci([0.7] * 50) == pytest.approx([0.7, 0.7])
    x = [float(i % 2) for i in range(400)]  # mean 0.5, sd 0.5: the 95% interval is about 0.5 +- 1.96 * 0.025
    lo, hi = M.bootstrap_ci(x)
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)
    assert M.bootstrap_ci(x) == [lo, hi]  # seeded


def test_pool_averages_seeds_prompt_by_prompt(tmp_path):
    runs = [{"per_prompt": {"prompt": ["p", "q"], "gold": [1.0, 0.0], "win": [1.0, 0.0], "fact_acc": [1.0]}},  # q: a fact question
            {"per_prompt": {"prompt": ["p", "q"], "gold": [0.0, 0.0], "win": [0.5, 0.5], "fact_acc": [0.5]}}]
    for i, r in enumerate(runs):
        (tmp_path / f"eval_{i}.json").write_text(json.dumps(r))
    out = evaluate.pool(M.parse_config(evaluate.Config, ["--pool", str(tmp_path / "eval_*.json")]))
    assert out["gold"] == pytest.approx(0.25) and out["gold_per_run"] == [0.5, 0.0]
    assert out["win_rate"] == pytest.approx(0.5) and "kl" not in out
    assert out["fact_acc"] == pytest.approx(0.75) and out["fact_acc_per_run"] == [1.0, 0.5]
    # the runs in the order named (sweep.sh names seed 0's file first, wherever it sorts), each once
    out = evaluate.pool(M.parse_config(evaluate.Config, ["--pool", f"{tmp_path / 'eval_1.json'},{tmp_path / 'eval_*.json'}"]))
    assert out["gold_per_run"] == [0.0, 0.5] and out["runs"] == [str(tmp_path / "eval_1.json"), str(tmp_path / "eval_0.json")]
    (tmp_path / "eval_2.json").write_text(json.dumps({"per_prompt": {"prompt": ["p"], "gold": [1.0]}}))
    with pytest.raises(M.ConfigError):
        evaluate.pool(M.parse_config(evaluate.Config, ["--pool", str(tmp_path / "eval_*.json")]))


def test_baseline_without_the_gold_reward_is_an_error(tiny_ckpt, world, tmp_path):
    other = tmp_path / "hh.jsonl"
    other.write_text(json.dumps({"prompt": "How do I bake bread?"}) + "\n")
    for prompts, gold in ((other, "auto"), (world / "prompts_val.jsonl", "false")):
        cfg = M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(prompts), "--baseline", tiny_ckpt,
                                               "--gold", gold, "--max_new_tokens", "8", "--out", str(tmp_path / "e.json")])
        with pytest.raises(M.ConfigError, match="--baseline .* judged by the built-in world's gold reward, which is off here"):
            evaluate.evaluate(cfg)


def test_prompt_stride_spreads_a_small_sample_over_every_prompt_kind(tiny_ckpt, world, tmp_path):
    # the held-out prompts come grouped by kind: the first 16 are all "tell me about", no fact question
    run = lambda *a: evaluate.evaluate(M.parse_config(evaluate.Config, [  # noqa: E731
        "--ckpt", tiny_ckpt, "--prompts", str(world / "prompts_val.jsonl"), "--n_prompts", "16", "--max_new_tokens", "4",
        "--n_show", "0", "--out", str(tmp_path / "e.json"), *a]))
    assert "fact_acc" not in run()
    s = run("--prompt_stride", "7")
    assert s["prompts"] == 16 and s["fact_prompts"] > 0 and s["per_prompt"]["prompt"][1] == M.read_jsonl(
        str(world / "prompts_val.jsonl"))[7]["prompt"]


# --- the length-controlled win rate


def test_lc_win_rate_removes_a_length_effect_and_keeps_a_win_rate_independent_of_length():
    # wins from length alone: every longer answer wins, every equal one ties, every shorter one loses
    wins, d = [1.0] * 80 + [0.5] * 10 + [0.0] * 10, [5] * 80 + [0] * 10 + [-5] * 10
    lc, (lo, hi), coef, _, _ = evaluate.length_controlled_win_rate(wins, d, 1)
    assert sum(wins) / 100 == 0.85 and lc == pytest.approx(0.5, abs=1e-3) and lo <= lc <= hi and coef > 5
    # the expected win indicator a logistic function of the length feature alone: recovered exactly
    d = [12, 9, 7, 7, 5, 3, 2, 1, 0, -1, -4, 6, 8, 10, 15, 4]
    sd = torch.tensor(d, dtype=torch.float64).std(correction=0)
    y = torch.sigmoid(2.0 * torch.tanh(torch.tensor(d) / sd)).tolist()
    lc, _, coef, _, _ = evaluate.length_controlled_win_rate(y, d, 1)
    assert sum(y) / len(y) > 0.7 and lc == pytest.approx(0.5, abs=1e-4) and coef == pytest.approx(2.0, abs=1e-3)
    # 7 wins in 10 at every length difference: the length explains nothing, LC = the raw rate
    wins, d = ([1.0] * 7 + [0.0] * 3) * 10, [5] * 40 + [0] * 20 + [-5] * 40
    lc, _, coef, _, _ = evaluate.length_controlled_win_rate(wins, d, 1)
    assert lc == pytest.approx(0.7, abs=1e-4) and coef == pytest.approx(0.0, abs=1e-6)


def test_win_logistic_fit_closed_form_brute_force_and_ties_as_half_a_win():
    # no feature: the maximum is a = logit(mean y) (up to the ridge)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0])
    a, b = evaluate.fit_win_logistic(torch.zeros(8), y)
    assert a.item() == pytest.approx(math.log(0.6875 / 0.3125), abs=1e-4) and b.item() == 0.0
    # a noisy sample: no point of a fine grid has a higher penalised log-likelihood
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, generator=g) * 2 - 1
    y = (torch.rand(60, generator=g) < torch.sigmoid(0.4 + 1.5 * x)).double()
    y[:6] = 0.5  # some ties
    a, b = evaluate.fit_win_logistic(x, y)
    grid = torch.linspace(-3, 3, 301, dtype=torch.float64)  # steps of 0.02
    A, B = torch.meshgrid(grid, grid, indexing="ij")  # (301, 301)
    z = A.reshape(-1, 1) + B.reshape(-1, 1) * x.double()  # (301^2, 60)
    ll = (y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).sum(1) - 0.5e-4 * (A.reshape(-1) ** 2 + B.reshape(-1) ** 2)
    best = ll.argmax()
    zf = a + b * x.double()
    ll_fit = (y * F.logsigmoid(zf) + (1 - y) * F.logsigmoid(-zf)).sum() - 0.5e-4 * (a ** 2 + b ** 2)
    assert ll_fit.item() >= ll[best].item() - 1e-12
    assert a.item() == pytest.approx(A.reshape(-1)[best].item(), abs=0.021) and b.item() == pytest.approx(B.reshape(-1)[best].item(), abs=0.021)
    # a tie (y = 0.5) is half a win and half a loss: the same fit as a win and a loss of weight 1/2 each
    tie = y == 0.5
    x2, y2 = torch.cat([x[~tie], x[tie], x[tie]]), torch.cat([y[~tie], torch.ones(6), torch.zeros(6)])
    w2 = torch.cat([torch.ones(54), torch.full((12,), 0.5)])[None]
    a2, b2 = evaluate.fit_win_logistic(x2, y2, w2)
    assert a2.item() == pytest.approx(a.item(), abs=1e-9) and b2.item() == pytest.approx(b.item(), abs=1e-9)


def test_lc_win_rate_degenerate_inputs():
    lc, ci, _, _, _ = evaluate.length_controlled_win_rate([1.0] * 20, list(range(20)), 2)  # every answer wins
    assert 0.999 < lc < 1 and all(math.isfinite(v) for v in ci)
    lc, ci, _, _, _ = evaluate.length_controlled_win_rate([0.0] * 20, [3, -3] * 10, 2)  # every answer loses
    assert 0 < lc < 1e-3
    lc, ci, coef, _, _ = evaluate.length_controlled_win_rate([0.5] * 20, list(range(20)), 2)  # every answer ties
    assert lc == 0.5 and ci == [0.5, 0.5] and coef == 0.0
    wins = [1.0, 0.0, 1.0, 1.0, 0.5, 0.0] * 5
    for d in ([0] * 30, [4] * 30):  # no spread of length differences: nothing to control for, LC = the raw rate
        lc, ci, coef, _, sd = evaluate.length_controlled_win_rate(wins, d, 3)
        assert sd == 0.0 and coef == 0.0 and lc == pytest.approx(sum(wins) / 30, abs=1e-5)


def test_lc_interval_resamples_the_answers_of_a_prompt_together():
    # with no length effect to fit, each resample's LC is its mean win: the interval is model.bootstrap_ci's
    # of the per-prompt means (the same draws), which holds only if a prompt's repeats move together
    g = torch.Generator().manual_seed(1)
    wins = (torch.rand(40, generator=g) < 0.3).double().repeat_interleave(4)  # 40 prompts x 4 equal repeats
    wins = wins.tolist()
    lc, ci, _, _, _ = evaluate.length_controlled_win_rate(wins, [0] * 160, 4)
    want = M.bootstrap_ci(evaluate.per_prompt(wins, 4))
    assert ci == pytest.approx(want, abs=1e-5) and lc == pytest.approx(sum(wins) / 160, abs=1e-5)


# --- pass@k


def test_pass_at_k_equals_enumeration_of_every_k_subset():
    for n in range(1, 8):
        for c in range(n + 1):
            answers = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(answers, k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert evaluate.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
    assert evaluate.pass_at_k(64, 0, 64) == 0.0 and evaluate.pass_at_k(64, 64, 1) == 1.0 and evaluate.pass_at_k(64, 1, 64) == 1.0
    # not the biased 1 - (1 - c/n)^k (sampling with replacement): 1 of 4 correct, k = 2 -> 1/2, not 7/16
    assert evaluate.pass_at_k(4, 1, 2) == pytest.approx(0.5) and 1 - (1 - 1 / 4) ** 2 == 0.4375
    assert evaluate.pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100), rel=1e-12)
    with pytest.raises(ValueError, match="pass@9 from 8 answers: the unbiased estimator needs 1 <= k <= n"):
        evaluate.pass_at_k(8, 3, 9)
    assert evaluate.pass_ks(64) == [1, 2, 4, 8, 16, 32, 64] and evaluate.pass_ks(12) == [1, 2, 4, 8, 12]


def test_pass_curves_reads_each_run_and_refuses_a_summary_without_pass_at_k(tmp_path, capsys):
    a = {"pass_at_1": 0.25, "pass_at_1_ci": [0.1, 0.4], "pass_at_2": 0.5, "pass_at_2_ci": [0.3, 0.7], "pass_questions": 3}
    b = {"pass_at_1": 0.75, "pass_at_1_ci": [0.6, 0.9], "pass_questions": 3}  # a run measured only at k = 1
    for name, r in (("pass_a.json", a), ("pass_b.json", b), ("eval_c.json", {"gold": 1.0})):
        json.dump(r, open(tmp_path / name, "w"))
    cfg = lambda pattern: M.parse_config(evaluate.Config, ["--pass_curves", pattern, "--plot", str(tmp_path / "p.png")])  # noqa: E731
    runs = evaluate.pass_curves(cfg(str(tmp_path / "pass_*.json")))
    assert [r for _, r in runs] == [a, b]  # in the order given, each read whole
    lines = capsys.readouterr().out.splitlines()
    assert "k=1" in lines[0] and "k=2" in lines[0]
    assert "0.250 [0.100, 0.400]" in lines[1] and "0.500 [0.300, 0.700]" in lines[1]
    assert "0.750 [0.600, 0.900]" in lines[2] and lines[2].rstrip().endswith("-")  # no pass@2 for run b
    with pytest.raises(M.ConfigError, match="without pass@k: .*eval_c.json"):
        evaluate.pass_curves(cfg(f"{tmp_path}/pass_a.json,{tmp_path}/eval_c.json"))
    with pytest.raises(M.ConfigError, match="none found"):
        evaluate.pass_curves(cfg(str(tmp_path / "nothing_*.json")))


def test_pass_at_k_end_to_end(tiny_ckpt, tmp_path, monkeypatch):
    from data.arith import generate, parse_prompt
    generate(str(tmp_path))
    tok = M.load_tokenizer(M.checkpoint_dir(tiny_ckpt) + "/tokenizer.tiktoken")

    def fake_sample(model, tokenizer, prompts, cfg, device, seed):  # of each 8 answers: 2 right, one of them cut
        out = []
        for j, p in enumerate(prompts):
            a, b = parse_prompt(p)
            out.append((tok.encode(f" {a + b if j % 4 == 0 else a + b + 1}") + [tok.eot_id] * (j % 8 != 4), j % 8 != 4))
        return out

    monkeypatch.setattr(evaluate, "sample", fake_sample)
    run = lambda *a: evaluate.evaluate(M.parse_config(evaluate.Config, [  # noqa: E731
        "--ckpt", tiny_ckpt, "--prompts", str(tmp_path / "prompts_val.jsonl"), "--n_prompts", "3", "--verifier", "arith",
        "--max_new_tokens", "6", "--n_show", "0", "--out", str(tmp_path / "e.json"), *a]))
    s = run("--pass_at_k", "8", "--pass_samples", "8")
    assert s["pass_questions"] == 3 and s["pass_per_question"]["correct"] == [1, 1, 1]  # the cut right answer is wrong
    for k in (1, 2, 4, 8):
        assert s[f"pass_at_{k}"] == pytest.approx(k / 8) and s[f"pass_at_{k}_ci"] == pytest.approx([k / 8, k / 8])
    assert json.load(open(tmp_path / "e.json"))["pass_at_8"] == 1.0
    with pytest.raises(M.ConfigError, match="pass_at_k 16 with pass_samples 8: .* needs k <= n"):
        run("--pass_at_k", "16", "--pass_samples", "8")
    with pytest.raises(M.ConfigError, match="pass_at_k needs a checker"):
        run("--pass_at_k", "4", "--verifier", "none")
