"""Tests of ppo.py: GAE against a slow loop, masked statistics, rewards, losses against hand
computation, the KL controller, the step-0 identities of a real run, exact resume, the shard
checks (several processes: tests/test_ddp.py)."""

import json
import math

import pytest
import torch

import model as M
import ppo


def slow_gae(rewards, values, lengths, gamma, lam):
    """GAE row by row over each answer's real tokens, straight from Schulman et al. 2016."""
    B, R = rewards.shape
    adv = torch.zeros(B, R)
    for b in range(B):
        L = lengths[b]
        for t in range(L):
            a = 0.0
            for k in range(t, L):
                v_next = values[b, k + 1].item() if k + 1 < L else 0.0
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                a += (gamma * lam) ** (k - t) * delta
            adv[b, t] = a
    return adv


def test_gae_matches_slow_loop_with_padding_and_early_eos():
    torch.manual_seed(0)
    lengths = [7, 3, 1, 5]  # early EOS in rows 1-3, padding after
    mask = torch.tensor([[1.0] * L + [0.0] * (7 - L) for L in lengths])
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
        adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
        expected = slow_gae(rewards * mask, values * mask, lengths, gamma, lam)
        assert torch.allclose(adv, expected, atol=1e-5)
        assert torch.allclose(ret, (expected + values) * mask, atol=1e-5)
        assert (adv[mask == 0] == 0).all()


def test_masked_whiten_over_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    w = ppo.masked_whiten(x, mask)
    expected = (real - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8)
    assert torch.allclose(w[mask.bool()], expected, atol=1e-6) and (w[mask == 0] == 0).all()
    assert ppo.masked_var(x, mask).item() == pytest.approx(2.0)  # biased variance
    assert torch.allclose(ppo.masked_whiten(x, mask, shift_mean=False)[mask.bool()], expected + 3.0, atol=1e-6)


def test_rewards_score_at_last_token_kl_zero_on_padding():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards, kl = ppo.compute_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0], [0.05 - 1.0, 0.0, 0.0]]))


def test_missing_eos_penalty_reads_the_response_only():
    responses = torch.tensor([[5, 6, 3, M.PAD_ID], [5, 6, 7, 8]])  # eos id 3; row 1 hit the cap
    scores, ended = ppo.penalise_missing_eos(torch.tensor([0.7, 2.5]), responses, 3, -1.0)
    assert scores.tolist() == [pytest.approx(0.7), -1.0] and ended.tolist() == [True, False]


def test_ppo_losses_hand_computed():
    lp = torch.log(torch.tensor([[1.5, 0.9, 1.0]]))  # ratios 1.5, 0.9, (padding)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    vpred, old_v, ret = torch.tensor([[1.0, 0.0, 9.0]]), torch.tensor([[0.5, 0.1, 0.0]]), torch.tensor([[2.0, -1.0, 0.0]])
    pg, vf, s = ppo.ppo_losses(lp, old, adv, vpred, old_v, ret, mask, clip_coef=0.2, vf_clip=0.2)
    # token 0: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 1: max(2*0.9, 2*0.9) = 1.8
    assert pg.item() == pytest.approx((-1.2 + 1.8) / 2)
    # token 0: V_clip = 0.7, max((1-2)^2, (0.7-2)^2) = 1.69; token 1: V_clip = -0.1, max(1, 0.81) = 1
    assert vf.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert s["clipfrac"].item() == pytest.approx(0.5) and s["vf_clipfrac"].item() == pytest.approx(0.5)
    assert s["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.9) ** 2) / 2)


def test_policy_gradient_only_through_response_tokens():
    logits = torch.randn(2, 4, 11, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3, M.PAD_ID], [4, M.PAD_ID, M.PAD_ID, M.PAD_ID]])
    mask = (tokens != M.PAD_ID).float()
    lp = M.logprobs_from_logits(logits, tokens)
    pg, _, _ = ppo.ppo_losses(lp, lp.detach() - 0.1, torch.randn(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), mask, 0.2, 0.2)
    pg.backward()
    assert torch.equal(logits.grad.abs().sum(-1) > 0, mask.bool())


def test_adaptive_kl_controller():
    assert ppo.adaptive_kl_update(0.1, 12.0, 6.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))  # clipped
    assert ppo.adaptive_kl_update(0.1, 6.6, 6.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert ppo.adaptive_kl_update(0.1, 0.0, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_explained_variance():
    mask = torch.ones(1, 4)
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert ppo.explained_variance(r, r, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros(1, 4) + 2.5, r, mask) == pytest.approx(0.0)


def run(world, tiny_ckpt, tiny_rm, out, *extra):
    cfg = M.parse_config(ppo.Config, ["--policy", tiny_ckpt, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
                                      "--out_dir", str(out), "--rollout_batch_size", "8", "--num_minibatches", "2", "--grad_accum", "2",
                                      "--update_epochs", "2", "--max_new_tokens", "12", "--lr", "1e-3", "--value_lr", "1e-3",
                                      "--sample_interval", "100", *extra])
    return ppo.train(cfg)


def test_step0_identities_and_zero_initial_kl(world, tiny_ckpt, tiny_rm, tmp_path):
    # a tiny model's tokens often miss EOS: the penalty, the adaptive controller and ptx all run
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "16", "--adaptive_kl", "true",
        "--ptx_coef", "0.1", "--ptx_data", str(world / "pretrain.txt"))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    first = rows[0]
    assert first["approx_kl_first_mb"] < 1e-10  # ratio == 1 on the first minibatch of the first epoch (item 3)
    assert first["kl"] == 0.0  # the policy is the reference at the start
    assert abs(first["non_score_reward"]) == 0.0
    assert rows[1]["kl"] != 0.0 and rows[1]["kl_coef"] != rows[0]["kl_coef"]  # it moved; the controller reacted
    assert all(math.isfinite(v) for r in rows for v in r.values())


def test_resume_after_kill_equals_uninterrupted_run(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    real = ppo.adaptive_kl_update
    calls = {"n": 0}

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # during iteration 3, after the iteration-2 checkpoint
        return real(*a, **k)

    monkeypatch.setattr(ppo, "adaptive_kl_update", killed)
    with pytest.raises(KeyboardInterrupt):
        run(world, tiny_ckpt, tiny_rm, tmp_path / "b", "--total_episodes", "32", "--ckpt_interval", "2", "--adaptive_kl", "true")
    monkeypatch.setattr(ppo, "adaptive_kl_update", real)
    run(world, tiny_ckpt, tiny_rm, tmp_path / "b", "--total_episodes", "32", "--ckpt_interval", "2", "--adaptive_kl", "true")
    run(world, tiny_ckpt, tiny_rm, tmp_path / "c", "--total_episodes", "32", "--ckpt_interval", "2", "--adaptive_kl", "true")
    b, _, _ = M.load_checkpoint(str(tmp_path / "b"))
    c, _, _ = M.load_checkpoint(str(tmp_path / "c"))
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), c.state_dict().values()))
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "s_per_it"} for x in open(d / "metrics.jsonl")]  # noqa: E731
    assert rows(tmp_path / "b") == rows(tmp_path / "c") and len(rows(tmp_path / "c")) == 4


def test_rollout_shards_must_split_the_rollout(world, tiny_ckpt, tiny_rm, tmp_path):
    with pytest.raises(M.ConfigError, match="rollout_batch_size 8 must split into 3 equal shards"):
        run(world, tiny_ckpt, tiny_rm, tmp_path, "--rollout_shards", "3")
    with pytest.raises(M.ConfigError, match="rollout_shards -1"):
        run(world, tiny_ckpt, tiny_rm, tmp_path, "--rollout_shards", "-1")
