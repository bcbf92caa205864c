"""Tests of the over-optimisation curves: ppo.py's and grpo.py's evaluation snapshots (they leave a run
bit for bit as it was, and a resumed run neither loses nor duplicates one), the exact best-of-n
expectation over one pool (against enumeration of every n-tuple, Monte Carlo, ties), Gao et al. 2022's
fits (known coefficients recovered without and with noise, the peaks against hand values, degenerate
curves), eval.py --curve / --bon_curve end to end on a tiny run, and --proxy_table's join of reward models,
best-of-n fits and RL end points.
Run: python -m pytest -q tests/test_curves.py"""

import importlib.util
import itertools
import json
import math
import os
import shutil

import pytest
import torch

import eval as E
import grpo
import model as M
import ppo
from helpers import killed_at_step

STAGES = {"ppo": (ppo, ["--max_new_tokens", "8", "--value_lr", "1e-3"]),
          "grpo": (grpo, ["--group_size", "4", "--eos_trick", "false", "--max_new_tokens", "8"])}
TIMINGS = ("s_per_it", "time_gen", "time_fwd", "time_update", "time_iter")


def run(stage, world, tiny_ckpt, tiny_rm, out, *extra):
    mod, own = STAGES[stage]
    return mod.train(M.parse_config(mod.Config, [
        "--policy", tiny_ckpt, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
        "--out_dir", str(out), "--rollout_batch_size", "8", "--num_minibatches", "2", "--update_epochs", "2",
        "--lr", "1e-3", "--sample_interval", "100", "--total_episodes", "32", "--device", "cpu", *own, *extra]))


def rows(d):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in open(d / "metrics.jsonl")]


def weights(path):
    return list(M.load_checkpoint(str(path))[0].state_dict().values())


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- snapshots along a run


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_snapshots_leave_the_run_bit_for_bit_unchanged(stage, world, tiny_ckpt, tiny_rm, tmp_path):
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "off", "--total_episodes", "24")  # the default: 0, no snapshots
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "on", "--total_episodes", "24", "--eval_snapshot_interval", "2")
    assert not os.path.exists(tmp_path / "off" / "snapshots")
    assert same(weights(tmp_path / "off"), weights(tmp_path / "on")) and rows(tmp_path / "off") == rows(tmp_path / "on")
    snaps = M.list_snapshots(str(tmp_path / "on"))
    assert [it for it, _ in snaps] == [2, 3]  # every 2 iterations and at the end (3 iterations of 8)
    assert same(weights(snaps[-1][1]), weights(tmp_path / "on"))  # the last one is the final policy
    assert not same(weights(snaps[0][1]), weights(snaps[1][1]))
    info = M.checkpoint_info(snaps[0][1])
    assert info["role"] == "policy" and info["meta"] == {"iteration": 2} and info["train"]["eval_snapshot_interval"] == 2
    assert sorted(os.listdir(snaps[0][1])) == ["config.json", "model.pt", "tokenizer.tiktoken"]  # no optimizer state
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "on", "--total_episodes", "8", "--overwrite", "true")
    assert not os.path.exists(tmp_path / "on" / "snapshots")  # starting afresh dropped them


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_resumed_run_neither_loses_nor_duplicates_snapshots(stage, world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    with killed_at_step(monkeypatch, 3):  # after iteration 3's snapshot, before its checkpoint (every 2)
        run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "b", "--eval_snapshot_interval", "1", "--ckpt_interval", "2")
    assert [it for it, _ in M.list_snapshots(str(tmp_path / "b"))] == [1, 2, 3]
    (tmp_path / "b" / "snapshots" / "it4.tmp").mkdir()  # a half-written one of a kill mid-save
    # resumed from iteration 2 with snapshots every 2 (the interval may change on resume): iteration 3's, from the
    # iterations the kill lost, is dropped, as the resumed run does not write it again; 1 and 2 stay
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "b", "--eval_snapshot_interval", "2", "--ckpt_interval", "2")
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "c", "--eval_snapshot_interval", "1")
    b, c = dict(M.list_snapshots(str(tmp_path / "b"))), dict(M.list_snapshots(str(tmp_path / "c")))
    assert sorted(b) == [1, 2, 4] and sorted(c) == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "b" / "snapshots")) == ["it1", "it2", "it4"]  # nothing else left
    assert all(same(weights(b[it]), weights(c[it])) for it in b)  # each one the uninterrupted run's, bit for bit
    if stage == "ppo":  # the rest is model.start_run's, the same for both stages
        return
    # a run killed before its first checkpoint starts afresh: its snapshots go with it
    with killed_at_step(monkeypatch, 3):
        run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "d", "--eval_snapshot_interval", "1", "--ckpt_interval", "8")
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "d", "--eval_snapshot_interval", "2", "--ckpt_interval", "8")
    assert [it for it, _ in M.list_snapshots(str(tmp_path / "d"))] == [2, 4]


def test_negative_snapshot_interval_is_refused():
    for mod in (ppo, grpo):
        with pytest.raises(M.ConfigError, match="eval_snapshot_interval -1 must be >= 0"):
            mod.check_config(M.parse_config(mod.Config, ["--eval_snapshot_interval", "-1"]), 1)


# --- best-of-n exactly over one pool


def brute_force_best_of_n(scores, values, n):
    """Every n-tuple of draws from the pool, equally likely; the pick among the draws tied at the top score is
    uniform, so a tuple contributes the mean value of its top-scoring draws."""
    total = 0.0
    for t in itertools.product(range(len(scores)), repeat=n):
        top = max(scores[i] for i in t)
        best = [values[i] for i in t if scores[i] == top]
        total += sum(best) / len(best)
    return total / len(scores) ** n


def test_best_of_n_expected_equals_enumeration_of_every_n_tuple_with_ties():
    scores = [0.3, -1.0, 0.3, 2.0, 0.3]  # three answers tied at 0.3
    values = [1.0, 4.0, -2.0, 0.5, 7.0]
    for n in range(1, 6):
        exact = E.best_of_n_expected(torch.tensor([scores]), torch.tensor([values]), n).item()
        assert exact == pytest.approx(brute_force_best_of_n(scores, values, n), abs=1e-12)
    # n = 1 is the pool's mean; the order of the pool does not matter
    assert E.best_of_n_expected(torch.tensor([scores]), torch.tensor([values]), 1).item() == pytest.approx(sum(values) / 5)
    perm = [4, 2, 0, 3, 1]
    a = E.best_of_n_expected(torch.tensor([scores]), torch.tensor([values]), 3)
    b = E.best_of_n_expected(torch.tensor([[scores[i] for i in perm]]), torch.tensor([[values[i] for i in perm]]), 3)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_best_of_n_ties_by_hand_and_the_untied_rank_formula():
    # scores [0, 1, 1], gold [5, 0, 1]: the top level wins with 1 - (1/3)^2 = 8/9 at n = 2, its pick uniform
    got = E.best_of_n_expected(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([[5.0, 0.0, 1.0]]), 2).item()
    assert got == pytest.approx(1 / 9 * 5 + 8 / 9 * 0.5, abs=1e-12)
    # ranking the tied pair arbitrarily would give an order-dependent 5/9 + 3/9 * 0 + 5/9 * 1 (or * 0 and * 1 swapped)
    assert got != pytest.approx(5 / 9 + 5 / 9) and got != pytest.approx(5 / 9 + 3 / 9)
    # untied: rank i of N is the max with probability (i/N)^n - ((i-1)/N)^n
    N, n = 6, 4
    s, v = torch.arange(N, dtype=torch.float64)[None], torch.randn(1, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rank = sum(((i / N) ** n - ((i - 1) / N) ** n) * v[0, i - 1].item() for i in range(1, N + 1))
    assert E.best_of_n_expected(s, v, n).item() == pytest.approx(rank, abs=1e-12)


def test_best_of_n_expected_against_monte_carlo_batched_over_prompts():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 8), generator=g).double()  # (P, N) many ties
    values = torch.randn(3, 8, generator=g, dtype=torch.float64)
    n, draws = 5, 200_000
    exact = E.best_of_n_expected(scores, values, n)  # (P,)
    for p in range(3):
        idx = torch.randint(0, 8, (draws, n), generator=g)  # (draws, n) with replacement
        s = scores[p][idx] + 1e-3 * torch.rand(draws, n, generator=g, dtype=torch.float64)  # uniform tie-break
        pick = idx.gather(1, s.argmax(1, keepdim=True))[:, 0]
        mc = values[p][pick]
        assert abs(mc.mean().item() - exact[p].item()) < 4 * mc.std().item() / math.sqrt(draws)


def test_best_of_n_kl_bound_values():
    assert E.best_of_n_kl_bound(1) == 0.0
    assert E.best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)


# --- Gao et al. 2022's forms


def test_gao_fit_recovers_known_coefficients_exactly_then_within_noise():
    d = torch.linspace(0, 3, 10, dtype=torch.float64)
    log_d = torch.log(d.clamp(min=1e-300))  # d log d -> 0 at d = 0
    for form, alpha, beta in (("bon", 0.8, 0.3), ("rl", 0.5, 0.2)):
        r = d * (alpha - beta * d) if form == "bon" else d * (alpha - beta * log_d)  # Gao et al. 2022, Eq. 1 and 2
        a, b = E.fit_gao(d, r, form)
        assert a.item() == pytest.approx(alpha, abs=1e-10) and b.item() == pytest.approx(beta, abs=1e-10)
        noisy = r + 0.01 * torch.randn(10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        a, b = E.fit_gao(d, noisy, form)
        assert a.item() == pytest.approx(alpha, abs=0.03) and b.item() == pytest.approx(beta, abs=0.03)
    # the RL form at d = 0: d log d is taken as its limit 0, not nan
    assert E.gao_design(torch.zeros(1, dtype=torch.float64), "rl").tolist() == [[0.0, 0.0]]


def test_gao_peaks_against_hand_values_and_degenerate_curves():
    # bon: R = d (1 - 0.25 d): d* = 1 / 0.5 = 2, R* = 2 (1 - 0.5) = 1
    assert E.gao_peak(1.0, 0.25, "bon") == ((2.0, 1.0), None)
    # rl: R = d (1 - 0.5 log d): d* = exp(1 / 0.5 - 1) = e, R* = e (1 - 0.5) = e / 2 = beta d*
    (dd, rr), _ = E.gao_peak(1.0, 0.5, "rl")
    assert dd == pytest.approx(math.e) and rr == pytest.approx(math.e / 2)
    assert rr == pytest.approx(dd * (1.0 - 0.5 * math.log(dd)))
    for form in ("bon", "rl"):
        peak, why = E.gao_peak(1.0, -0.1, form)
        assert peak is None and "never turns down" in why
        assert E.gao_peak(1.0, 0.0, form)[0] is None
    peak, why = E.gao_peak(-0.5, 0.2, "bon")
    assert peak is None and "falls from d = 0" in why


def per_prompt_curve(form, alpha, beta, P=300, noise=0.05, seed=0):
    """Synthetic per-prompt gains on the form (each prompt the curve plus noise; 0 at the start) and KLs."""
    g = torch.Generator().manual_seed(seed)
    d = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0], dtype=torch.float64)  # (K,)
    r = E.gao_design(d, form) @ torch.tensor([alpha, beta], dtype=torch.float64)  # (K,)
    gain = r + noise * torch.randn(P, len(d), generator=g, dtype=torch.float64)  # (P, K)
    gain[:, 0] = 0.0
    return gain, (d * d).expand(P, -1).clone(), d


def test_gao_fit_with_bootstrap_intervals_peak_and_residuals():
    gain, kl, d = per_prompt_curve("rl", 0.5, 0.3)
    fit = E.gao_fit(gain, kl, "rl", n_boot=500)
    assert fit["alpha_ci"][0] < 0.5 < fit["alpha_ci"][1] and fit["beta_ci"][0] < 0.3 < fit["beta_ci"][1]
    assert fit["fits"] and fit["p_value"] > 0.05 and fit["dof"] == 4 and fit["peak"]
    assert fit["d_star_ci"][0] < math.exp(0.5 / 0.3 - 1) < fit["d_star_ci"][1] and not fit["beyond_range"]
    assert fit["kl_star"] == pytest.approx(fit["d_star"] ** 2)
    # the analytic KL of best-of-n: one KL per point, the same in every resample
    gain, _, d = per_prompt_curve("bon", 0.8, 0.2)
    fit = E.gao_fit(gain, d * d, "bon", n_boot=500)
    assert fit["alpha_ci"][0] < 0.8 < fit["alpha_ci"][1] and fit["d_star"] == pytest.approx(2.0, abs=0.2)
    # a curve of the other shape (gold flat, then a cliff) is not called a fit
    gain = torch.zeros(300, 7, dtype=torch.float64)
    gain[:, 1:6], gain[:, 6] = 0.5, -1.0
    fit = E.gao_fit(gain + 0.01 * torch.randn(300, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                    d * d, "bon", n_boot=200)
    assert not fit["fits"]


def test_gao_fit_degenerate_curves_are_reported_not_crashed():
    gain, kl, d = per_prompt_curve("bon", 0.5, -0.1, noise=0.01)  # still rising: beta < 0
    fit = E.gao_fit(gain, d * d, "bon", n_boot=200)
    assert fit["beta"] < 0 and fit["peak"] is None and "no peak" in fit["why"] and "d_star" not in fit
    assert "no peak" in E.describe_fit("bon", fit)
    two = E.gao_fit(gain[:, :3], d[:3] ** 2, "bon", n_boot=200)  # the start and 2 points: an exact fit, nothing to judge
    assert two["fits"] is None and two["p_value"] is None and "too few points" in E.describe_fit("bon", two)
    flat = E.gao_fit(torch.zeros(10, 3), torch.zeros(10, 3), "rl", n_boot=50)  # a run that never moved
    assert flat["alpha"] is None and "nothing to fit" in flat["why"] and "nothing to fit" in E.describe_fit("rl", flat)


# --- eval.py --curve and --bon_curve end to end


def test_curve_and_bon_curve_end_to_end(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    run("grpo", world, tiny_ckpt, tiny_rm, tmp_path / "run", "--eval_snapshot_interval", "2", "--lr", "3e-3")
    common = ["--prompts", str(world / "prompts_val.jsonl"), "--n_prompts", "8", "--max_new_tokens", "8",
              "--n_show", "0", "--device", "cpu"]
    res = E.curve(M.parse_config(E.Config, ["--curve", str(tmp_path / "run"), *common]))
    assert [r["iteration"] for r in res["rows"]] == [0, 2, 4]
    start = res["rows"][0]
    assert start["kl"] == 0.0 and start["gold_gain"] == 0.0 and start["ckpt"] == tiny_ckpt  # the run's policy
    for r in res["rows"]:  # each point is evaluate()'s summary of that snapshot
        point = json.load(open(r["eval"]))
        assert point["gold"] == r["gold"] and point["kl"] == r["kl"] and point["rm_score_ci"] == r["rm_score_ci"]
    assert json.load(open(tmp_path / "run" / "curve.json"))["fit_rl"]["form"] == "rl"
    # a rerun of the same run with snapshots every iteration, killed after 2: one trajectory, merged by iteration
    with killed_at_step(monkeypatch, 2):
        run("grpo", world, tiny_ckpt, tiny_rm, tmp_path / "early", "--eval_snapshot_interval", "1", "--lr", "3e-3")
    train, snaps = E.curve_runs([str(tmp_path / "run"), str(tmp_path / "early")])  # it2 in both: the same weights
    assert [it for it, _ in snaps] == [1, 2, 4] and train["out_dir"] == str(tmp_path / "run")
    shutil.copytree(tmp_path / "early", tmp_path / "other")
    config = json.load(open(tmp_path / "other" / "config.json"))
    json.dump({**config, "lr": 2e-3}, open(tmp_path / "other" / "config.json", "w"))
    with pytest.raises(M.ConfigError, match="differ in lr"):  # another lr: another trajectory
        E.curve_runs([str(tmp_path / "run"), str(tmp_path / "other")])
    M.save_snapshot(str(tmp_path / "early"), 2, M.load_checkpoint(tiny_ckpt)[0], M.load_checkpoint(tiny_ckpt)[1], config)
    with pytest.raises(M.ConfigError, match="not one trajectory"):  # iteration 2 with other weights
        E.curve_runs([str(tmp_path / "run"), str(tmp_path / "early")])
    out = tmp_path / "bon.json"
    res = E.bon_curve(M.parse_config(E.Config, ["--ckpt", tiny_ckpt, "--reward_model", tiny_rm, "--bon_curve", "8",
                                                "--bon_pool", "4", "--out", str(out), *common]))
    assert [r["n"] for r in res["rows"]] == [1, 2, 4, 8] and res["rows"][0]["gold_gain"] == 0.0
    assert res["rows"][0]["kl"] == 0.0 and res["rows"][3]["kl"] == pytest.approx(math.log(8) - 7 / 8)
    proxy = [r["rm_score"] for r in res["rows"]]
    assert all(a <= b + 1e-12 for a, b in zip(proxy, proxy[1:]))  # the proxy's best-of-n never falls with n
    assert all(r["kl_pool"] <= r["kl"] + 1e-9 for r in res["rows"])  # the bound bounds the pool's exact KL
    assert [r["beyond_pool"] for r in res["rows"]] == [False, False, False, True]
    saved = json.load(open(out))["fit_bon"]
    assert saved["form"] == "bon" and saved["n_max"] == 4 and saved["points"] == 3  # fitted over n <= the pool
    with pytest.raises(M.ConfigError, match="no snapshots"):
        E.curve(M.parse_config(E.Config, ["--curve", str(tmp_path / "run" / "ckpt"), *common]))


# --- eval.py --proxy_table


def fake_reward_run(d, tiny_rm, rankings, val_acc):
    """A reward.py run directory: the tiny reward model's checkpoint, its data_stats.json and metrics.jsonl."""
    shutil.copytree(tiny_rm, d / "ckpt")
    json.dump({"train": {"rows": rankings, "groups": rankings}, "val": {"rows": 10}}, open(d / "data_stats.json", "w"))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_acc": 0.5}) + "\n" + json.dumps({"step": 2, "val_acc": val_acc}) + "\n")
    return str(d)


def test_proxy_table_joins_each_reward_model_with_its_fit_and_its_rl_runs(tiny_ckpt, tiny_rm, tmp_path):
    big = fake_reward_run(tmp_path / "rm_full", tiny_rm, 1200, 0.65)
    small = fake_reward_run(tmp_path / "rm_quarter", tiny_rm, 300, 0.60)
    fit = lambda a: {"form": "bon", "alpha": a, "beta": 0.1, "alpha_ci": [a - 0.1, a + 0.1], "beta_ci": [0.05, 0.15],  # noqa: E731
                     "d_star": a / 0.2, "d_star_ci": [1.0, 9.0], "r_star": a * a / 0.4, "r_star_ci": [0.1, 9.0], "p_value": 0.5}
    for name, rm, a in (("bon_full.json", big + "/ckpt", 0.8), ("bon_quarter.json", small + "/", 0.4)):  # the same models
        json.dump({"reward_model": rm, "fit_bon": fit(a), "rows": []}, open(tmp_path / name, "w"))
    policy, tok, _ = M.load_checkpoint(tiny_ckpt)
    M.save_checkpoint(str(tmp_path / "rl_quarter" / "ckpt"), policy, tok, {"reward_model": small})
    summary = {"ckpt": str(tmp_path / "rl_quarter"), "gold": 0.9, "gold_ci": [0.8, 1.0], "kl": 4.0, "kl_ci": [3.5, 4.5]}
    json.dump(summary, open(tmp_path / "eval_rl_quarter.json", "w"))
    cfg = M.parse_config(E.Config, ["--proxy_table", f"{tmp_path}/bon_*.json,{tmp_path}/eval_*.json", "--plot", str(tmp_path / "p.png")])
    table = E.proxy_table(cfg)
    assert [x["rankings"] for x in table] == [1200, 300]  # more data first
    full, quarter = table
    assert full["bon"]["alpha"] == 0.8 and full["val_acc"] == 0.65 and full["rl"] == []  # the last val_acc
    assert quarter["bon"]["alpha"] == 0.4 and quarter["val_acc"] == 0.60
    assert [e["gold"] for e in quarter["rl"]] == [0.9]  # matched through the run's reward_model
    assert full["trunk"] == "2x32" and full["params"] == sum(p.numel() for p in M.load_checkpoint(tiny_rm)[0].parameters())
    assert (tmp_path / "p.png").exists() or importlib.util.find_spec("matplotlib") is None
    M.save_checkpoint(str(tmp_path / "rl_full" / "ckpt"), policy, tok, {"reward_model": big})
    json.dump({**summary, "ckpt": str(tmp_path / "rl_full"), "gold": 1.1},  # outside its interval: the plot still draws
              open(tmp_path / "eval_rl_full.json", "w"))
    assert [e["gold"] for e in E.proxy_table(cfg)[0]["rl"]] == [1.1]  # its checkpoint dir and its run dir: one row
    M.save_checkpoint(str(tmp_path / "rl_ens" / "ckpt"), policy, tok, {"reward_model": f"{big},{small}"})
    json.dump({**summary, "ckpt": str(tmp_path / "rl_ens")}, open(tmp_path / "eval_rl_ens.json", "w"))
    with pytest.raises(M.ConfigError, match="not one reward model"):  # an ensemble is no single proxy
        E.proxy_table(cfg)
    json.dump({"gold": 1.0}, open(tmp_path / "other.json", "w"))
    with pytest.raises(M.ConfigError, match="neither"):
        E.proxy_table(M.parse_config(E.Config, ["--proxy_table", str(tmp_path / "other.json")]))
