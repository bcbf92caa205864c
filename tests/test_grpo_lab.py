"""Tests of grpo.py's 2025-26 objectives and its sampler-trainer mismatch lab: GSPO, CISPO and DAPO's
overlong penalty against hand values (GSPO's token form against its own sequence objective, CISPO's
gradient on a token PPO would clip), dynamic sampling's choice of groups and its real runs, the
corrections (none, tis, token_mask, seq_mask) against hand values and as the identity when sampler and
trainer agree, each dose (staleness, top-p, bf16) as the ratio statistics it must give, the stale
sampler's weights and rollouts as the policy's k iterations back, and an exact resume with staleness.
Run: python -m pytest -q tests/test_grpo_lab.py"""

import math

import pytest
import torch

import grpo
import model as M
from helpers import killed_at_step
from test_grpo import args, rows, run


# --- GSPO, CISPO, DAPO's overlong penalty


def test_gspo_hand_values_and_its_sequence_objective():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.10, 0.30, 9.0], [0.05, -0.01, 0.02]], requires_grad=True)  # row 0: 2 tokens, row 1: 3
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[1.0], [-2.0]]).expand(2, 3)
    losses, stats = grpo.grpo_losses(new, old, adv, mask, 0.2, 0.2, policy_loss="gspo")
    loss = grpo.aggregate_loss(losses, mask, "seq_mean_token_mean")
    s0, s1 = math.exp(0.2), math.exp(0.02)  # exp of each answer's mean log ratio (its 9.0 is padding)
    # row 0: s0 = 1.221 > 1.2 with A > 0: clipped, -1.2; row 1: A = -2, s1 inside: 2 s1
    assert loss.item() == pytest.approx((-1.2 + 2 * s1) / 2, rel=1e-6)
    loss.backward()
    assert new.grad[0].tolist() == [0.0, 0.0, 0.0]  # the whole answer clipped, not token by token
    assert new.grad[1].tolist() == pytest.approx([2 * s1 / 3 / 2] * 3, rel=1e-6)  # -A s_i / L_i / N
    assert stats["clipfrac"][0, :2].tolist() == [1.0, 1.0] and stats["clipfrac"][1].tolist() == [0.0] * 3
    # the sequence objective itself (Zheng et al. 2025, Eq. 5), its gradient by autograd, on unclipped values
    x = new.detach().clone().requires_grad_(True)
    s = torch.exp((x * mask).sum(1) / mask.sum(1))  # (2,)
    a = torch.tensor([0.5, -2.0])
    (torch.max(-a * s, -a * s.clamp(0.8, 1.3)).mean()).backward()
    y = new.detach().clone().requires_grad_(True)
    grpo.aggregate_loss(grpo.grpo_losses(y, old, a[:, None].expand(2, 3), mask, 0.2, 0.3, policy_loss="gspo")[0],
                        mask, "seq_mean_token_mean").backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-7)


def test_cispo_hand_values_keeps_the_gradient_of_a_token_ppo_clips():
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.5, 0.0, -0.5]], requires_grad=True)  # ratios 1.649, 1, 0.607
    mask, adv = torch.ones(1, 3), torch.full((1, 3), 2.0)
    losses, stats = grpo.grpo_losses(new, old, adv, mask, 1.0, 0.28, policy_loss="cispo")  # no lower bound (MiniMax)
    w = [1.28, 1.0, math.exp(-0.5)]  # clip(r, 0, 1.28)
    assert losses[0].tolist() == pytest.approx([-2 * x for x in w], rel=1e-6)  # value -A w
    grpo.aggregate_loss(losses, mask, "token_mean").backward()
    assert new.grad[0].tolist() == pytest.approx([-2 * x / 3 for x in w], rel=1e-6)  # -A sg(w) grad log pi / 3 tokens
    assert stats["clipfrac"][0].tolist() == [1.0, 0.0, 0.0]
    # PPO's clip gives the first token no gradient at all
    ppo = new.detach().clone().requires_grad_(True)
    grpo.aggregate_loss(grpo.grpo_losses(ppo, old, adv, mask, 0.2, 0.28)[0], mask, "token_mean").backward()
    assert ppo.grad[0, 0].item() == 0.0 and new.grad[0, 0].item() != 0.0


def test_policy_losses_agree_at_ratio_one():
    # on the first minibatch (pi_theta = pi_old) the three give the same gradient: -A grad log pi
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([[0.7], [-1.1]]).expand(2, 3)
    grads = []
    for kind in grpo.POLICY_LOSSES:
        x = old.clone().requires_grad_(True)
        grpo.aggregate_loss(grpo.grpo_losses(x, old, adv, mask, 0.2, 0.2, policy_loss=kind)[0], mask,
                            "seq_mean_token_mean").backward()
        grads.append(x.grad)
    assert all(torch.allclose(g, grads[0], atol=1e-7) for g in grads[1:])


def test_overlong_penalty_hand_values():
    lengths = torch.tensor([10, 12, 13, 14, 16])
    assert grpo.overlong_penalty(lengths, 16, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0])
    assert grpo.overlong_penalty(lengths, 16, 4, 0.5).tolist() == pytest.approx([0, 0, -0.125, -0.25, -0.5])


# --- dynamic sampling


def test_pick_groups_unequal_first_then_fill():
    rounds = [torch.tensor([True, False, True]), torch.tensor([False, True, False])]
    assert grpo.pick_groups(rounds, 3) == ([(0, 1), (1, 0), (1, 2)], 0)
    assert grpo.pick_groups(rounds, 2) == ([(0, 1), (1, 0)], 0)
    assert grpo.pick_groups(rounds, 4) == ([(0, 1), (1, 0), (1, 2), (0, 0)], 1)


def test_merge_rounds_pads_without_changing_log_probs(tiny_ckpt):
    model = M.load_checkpoint(tiny_ckpt)[0].eval()
    a = torch.tensor([[M.PAD_ID, 5, 6, 7, 8], [3, 4, 6, 9, M.PAD_ID]])  # P = 3, R = 2
    b = torch.tensor([[2, 3, 4, 5, 6, 7]])  # P = 4, R = 2
    parts = [(a, (a != M.PAD_ID).long(), 3), (b, (b != M.PAD_ID).long(), 4)]
    seq, full_mask, P = grpo.merge_rounds(parts)
    assert P == 4 and seq.shape == (3, 6)
    assert seq[0].tolist() == [M.PAD_ID, M.PAD_ID, 5, 6, 7, 8] and full_mask[1].tolist() == [0, 1, 1, 1, 1, 0]
    with torch.no_grad():
        merged = M.response_logprobs(model, seq, full_mask, P)  # (3, 2)
        own = torch.cat([M.response_logprobs(model, s, m, p) for s, m, p in parts])
    assert torch.allclose(merged, own, atol=1e-5)


def test_dynamic_sampling_fills_the_rollout_with_unequal_groups(world, tiny_ckpt, tmp_path, monkeypatch):
    # a checker that scores an answer by the parity of its length: some groups equal, most not
    monkeypatch.setattr(grpo, "load_verifier", lambda cfg, gold: lambda p, t: float(len(t) % 2) if "?" in p else None)
    seen, real = [], grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda scores, G, *a: seen.append(scores.view(-1, G)) or real(scores, G, *a))
    common = ("--total_episodes", "32", "--reward", "verifiable", "--kl_coef", "0", "--missing_eos_penalty", "0",
              "--advantage", "dr_grpo", "--group_size", "2", "--gold", "false")
    run(world, tiny_ckpt, "no/such/rm", tmp_path / "dyn", *common, "--dynamic_sampling", "true", "--max_sample_rounds", "8")
    got = rows(tmp_path / "dyn")
    assert all(r["dyn_filled"] == 0 and r["equal_groups"] == 0 for r in got) and max(r["dyn_rounds"] for r in got) > 1
    assert all((g != g[:, :1]).any(1).all() for g in seen)  # every group that reached the advantages is unequal
    seen.clear()
    run(world, tiny_ckpt, "no/such/rm", tmp_path / "plain", *common)
    assert any((g == g[:, :1]).all(1).any() for g in seen)  # without it, equal groups are trained on


def test_dynamic_sampling_gives_up_after_its_rounds_and_fills(world, tiny_ckpt, tmp_path):
    # a random tiny model answers no fact question: every group is equal (all 0)
    run(world, tiny_ckpt, "no/such/rm", tmp_path, "--total_episodes", "16", "--reward", "verifiable", "--kl_coef", "0",
        "--missing_eos_penalty", "0", "--advantage", "dr_grpo", "--dynamic_sampling", "true", "--max_sample_rounds", "3")
    assert all(r["dyn_rounds"] == 3 and r["dyn_filled"] == 2 and r["equal_groups"] == 2 for r in rows(tmp_path))


def test_dynamic_sampling_without_equal_groups_is_the_plain_run(world, tiny_ckpt, tiny_rm, tmp_path):
    # reward-model scores are never equal: one round, the plain run's rollout, bitwise
    a = run(world, tiny_ckpt, tiny_rm, tmp_path / "a", "--total_episodes", "16", "--dynamic_sampling", "true")
    b = run(world, tiny_ckpt, tiny_rm, tmp_path / "b", "--total_episodes", "16")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [r["dyn_rounds"] for r in rows(tmp_path / "a")] == [1, 1]


# --- the mismatch lab: corrections


def test_corrections_hand_values():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.2, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    e = math.exp
    weights, keep, w = grpo.mismatch_correction(trainer, sampler, mask, "tis", cap=1.5)
    assert w.flatten().tolist() == pytest.approx([e(0.5), e(-1.0), 1.0, e(-0.1), e(-0.1), 1.0], rel=1e-6)
    assert weights.flatten().tolist() == pytest.approx([1.5, e(-1.0), 1.0, e(-0.1), e(-0.1), 1.0], rel=1e-6)
    assert torch.equal(keep, mask)
    weights, keep, _ = grpo.mismatch_correction(trainer, sampler, mask, "token_mask", low=0.5, high=1.5)
    assert keep.tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]] and weights.eq(1).all()  # 1.65 and 0.37 out
    # geometric means: exp(-0.5 / 3) = 0.846 and exp(-0.2 / 2) = 0.905
    _, keep, _ = grpo.mismatch_correction(trainer, sampler, mask, "seq_mask", low=0.85, high=1.2)
    assert keep.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    _, keep, _ = grpo.mismatch_correction(trainer, sampler, mask, "none")
    assert torch.equal(keep, mask)


@pytest.mark.parametrize("correction", grpo.CORRECTIONS)
def test_every_correction_is_the_identity_without_mismatch(correction):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.7, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights, keep, w = grpo.mismatch_correction(logp, logp.clone(), mask, correction)
    assert w.eq(1).all() and weights.eq(1).all() and torch.equal(keep, mask)


@pytest.mark.parametrize("correction", ["tis", "token_mask", "seq_mask"])
def test_a_correction_without_a_dose_trains_the_plain_run(world, tiny_ckpt, tiny_rm, tmp_path, correction):
    # the lab on (the sampler's log-probs computed, the correction applied) at dose 0: the ratio is
    # exactly 1 on every token and the run is the plain one, bitwise
    a = run(world, tiny_ckpt, tiny_rm, tmp_path / "a", "--total_episodes", "16", "--is_correction", correction)
    b = run(world, tiny_ckpt, tiny_rm, tmp_path / "b", "--total_episodes", "16")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for r in rows(tmp_path / "a"):
        assert r["mis_ratio_mean"] == r["mis_ratio_max"] == r["mis_ratio_min"] == r["mis_kept"] == 1.0
        assert r["mis_out_0.1"] == 0.0


# --- the mismatch lab: doses


def test_top_p_sampler_ratio_is_at_most_one(world, tiny_ckpt, tiny_rm, tmp_path):
    # mu is pi renormalised on its nucleus, so pi / mu = the nucleus' mass <= 1, and < 1 on many tokens
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "16", "--sampler_top_p", "0.7")
    for r in rows(tmp_path):
        assert r["mis_ratio_max"] <= 1 + 1e-6 and r["mis_ratio_min"] < 0.75 and r["mis_out_0.1"] > 0.3, r


def test_bf16_sampler_is_a_small_dose_both_ways(world, tiny_ckpt, tiny_rm, tmp_path):
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "16", "--sampler_dtype", "bfloat16")
    for r in rows(tmp_path):
        assert r["mis_ratio_min"] < 1 < r["mis_ratio_max"] < 1.5 and abs(r["mis_ratio_mean"] - 1) < 0.05, r


def test_stale_sampler_is_the_policy_k_iterations_back(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    k, calls, trainer = 2, [], []
    real_sample, real_fwd = M.sample_rollout, grpo.rollout_forward

    def spy_sample(sampler, *a):
        calls.append(({n: v.clone() for n, v in sampler.state_dict().items()}, a, real_sample(sampler, *a)))
        return calls[-1][2]

    def spy_fwd(policy, *a):
        trainer.append({n: v.clone() for n, v in policy.state_dict().items()})
        return real_fwd(policy, *a)

    monkeypatch.setattr(M, "sample_rollout", spy_sample)
    monkeypatch.setattr(grpo, "rollout_forward", spy_fwd)
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "40", "--staleness", str(k))
    assert len(calls) == len(trainer) == 5
    model = M.load_checkpoint(tiny_ckpt)[0].eval()
    for i, (weights, a, (seq, _, _)) in enumerate(calls):
        back = trainer[max(i - k, 0)]
        assert all(torch.equal(weights[n], back[n]) for n in back), i  # the weights of iteration i - k
        model.load_state_dict(back)
        assert torch.equal(real_sample(model, *a)[0], seq), i  # its rollout, exactly
    assert not all(torch.equal(trainer[4][n], trainer[2][n]) for n in trainer[2])  # the policy did move


def test_staleness_ratio_is_one_until_the_policy_moves(world, tiny_ckpt, tiny_rm, tmp_path):
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "32", "--staleness", "1")
    got = rows(tmp_path)
    assert got[0]["mis_ratio_max"] == got[0]["mis_ratio_min"] == 1.0  # iteration 0: the sampler is the start
    assert all(r["mis_ratio_max"] > 1 > r["mis_ratio_min"] for r in got[1:])


def test_each_correction_changes_the_update_under_a_dose(world, tiny_ckpt, tiny_rm, tmp_path):
    # one iteration stale: w != 1 from iteration 1, so truncating or masking must change the weights
    common = ("--total_episodes", "24", "--staleness", "1", "--is_low", "0.999", "--is_high", "1.001", "--is_cap", "1")
    final = {c: run(world, tiny_ckpt, tiny_rm, tmp_path / c, *common, "--is_correction", c).state_dict()
             for c in grpo.CORRECTIONS}
    for c in ("tis", "token_mask", "seq_mask"):
        assert not all(torch.equal(final[c][n], v) for n, v in final["none"].items()), c
        assert rows(tmp_path / c)[0]["mis_kept"] == 1.0 and rows(tmp_path / c)[1]["mis_out_0.1"] >= 0.0
    assert rows(tmp_path / "token_mask")[1]["mis_kept"] < 1 and rows(tmp_path / "tis")[1]["mis_kept"] == 1.0


def test_resume_with_staleness_equals_uninterrupted_run(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    extra = ("--total_episodes", "40", "--ckpt_interval", "2", "--staleness", "2", "--is_correction", "tis")
    with killed_at_step(monkeypatch, 3):  # after the iteration-2 checkpoint, which holds the stale weights
        run(world, tiny_ckpt, tiny_rm, tmp_path / "b", *extra)
    b = run(world, tiny_ckpt, tiny_rm, tmp_path / "b", *extra)
    c = run(world, tiny_ckpt, tiny_rm, tmp_path / "c", *extra)
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), c.state_dict().values()))
    assert rows(tmp_path / "b") == rows(tmp_path / "c")


def test_lab_config_errors(world, tiny_ckpt, tiny_rm, tmp_path):
    bad = [(["--policy_loss", "sapo"], "policy_loss must be one of"), (["--is_correction", "clip"], "is_correction must be one of"),
           (["--sampler_dtype", "fp8"], "sampler_dtype must be one of"),
           (["--policy_loss", "gspo", "--loss_agg", "token_mean"], "gspo.*seq_mean_token_mean"),
           (["--dynamic_sampling", "true", "--advantage", "reinforce_pp"], "dynamic_sampling with advantage = 'reinforce_pp'"),
           (["--overlong_buffer", "11"], "overlong_buffer 11 must be in \\[0, max_new_tokens 10\\]"),
           (["--sampler_top_p", "0"], "sampler_top_p 0.0 must be in"), (["--is_cap", "0.5"], "is_cap 0.5 must be >= 1"),
           (["--is_low", "1.2"], "is_low 1.2 <= 1 <= is_high")]
    for extra, msg in bad:
        with pytest.raises(M.ConfigError, match=msg):
            run(world, tiny_ckpt, tiny_rm, tmp_path / "run", *extra)
    assert not (tmp_path / "run").exists()
