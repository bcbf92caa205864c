"""Tests of ppo.py: GAE against a slow loop, masked statistics, rewards, losses against hand
computation, the KL controller, the step-0 identities of a real run, exact resume, the shard
checks (several processes: tests/test_ddp.py); reward-model ensembles (one member, or two copies of one, equal
the single model bit for bit; their config errors; a member with another tokenizer is refused).
Run: python -m pytest -q tests/test_ppo.py"""

import json
import math

import pytest
import torch

import model as M
import ppo
from helpers import byte_spelled, count_compiled_forwards, other_reward_model, same_distribution_model, spy_entropy_graphs


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
    w = M.masked_whiten(x, mask)
    expected = (real - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8)
    assert torch.allclose(w[mask.bool()], expected, atol=1e-6) and (w[mask == 0] == 0).all()
    assert M.masked_var(x, mask).item() == pytest.approx(2.0)  # biased variance
    assert torch.allclose(M.masked_whiten(x, mask, shift_mean=False)[mask.bool()], expected + 3.0, atol=1e-6)


def test_rewards_score_at_last_token_kl_zero_on_padding():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards, kl = ppo.compute_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1 + 2.0, 0.0], [0.05 - 1.0, 0.0, 0.0]]))


def test_missing_eos_penalty_reads_the_response_only():
    responses = torch.tensor([[5, 6, 3, M.PAD_ID], [5, 6, 7, 8]])  # eos id 3; row 1 hit the cap
    scores, ended = M.penalise_missing_eos(torch.tensor([0.7, 2.5]), responses, 3, -1.0)
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
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "24", "--adaptive_kl", "true", "--target_kl", "0.5",
        "--ptx_coef", "0.1", "--ptx_data", str(world / "pretrain.txt"))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    first = rows[0]
    assert first["approx_kl_first_mb"] < 1e-10  # ratio == 1 on the first minibatch of the first epoch (item 3)
    assert first["kl"] == 0.0  # the policy is the reference at the start
    assert rows[1]["kl"] != 0.0  # it moved
    # the controller is fed each rollout's logged KL (KL 0 at step 0 always lowers beta: check every step's value)
    for a, b in zip(rows, rows[1:]):
        assert b["kl_coef"] == pytest.approx(ppo.adaptive_kl_update(a["kl_coef"], a["kl"], 0.5, 8, 10000), rel=1e-12)
    assert all(math.isfinite(v) for r in rows for v in r.values())
    for r in rows:  # the profile of each iteration: its phases fit in it
        assert 0 < r["time_gen"] + r["time_fwd"] + r["time_update"] <= r["time_iter"]


def test_reference_is_the_start_from_a_lora_sft_checkpoint(world, tiny_lora_sft, tiny_rm, tmp_path, monkeypatch):
    # full fine-tuning from an SFT checkpoint with unmerged adapters: the policy merges them, so must
    # the reference, or step-0 log-probs differ by float rounding (4.8e-7 in fp32, 3.5e-3 under bf16)
    real, seen = ppo.rollout_forward, []
    monkeypatch.setattr(ppo, "rollout_forward", lambda *a: seen.append(real(*a)) or seen[-1])
    run(world, tiny_lora_sft, tiny_rm, tmp_path, "--total_episodes", "8")
    assert torch.equal(seen[0]["logprobs"], seen[0]["ref_logprobs"])  # max |logp - logp_ref| = 0 exactly
    assert json.loads(open(tmp_path / "metrics.jsonl").readline())["kl"] == 0.0


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
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "s_per_it" and not k.startswith("time_")} for x in open(d / "metrics.jsonl")]  # noqa: E731
    assert rows(tmp_path / "b") == rows(tmp_path / "c") and len(rows(tmp_path / "c")) == 4


def test_rollout_shards_must_split_the_rollout(world, tiny_ckpt, tiny_rm, tmp_path):
    with pytest.raises(M.ConfigError, match="rollout_batch_size 8 must split into 3 equal shards"):
        run(world, tiny_ckpt, tiny_rm, tmp_path, "--rollout_shards", "3")
    with pytest.raises(M.ConfigError, match="rollout_shards -1"):
        run(world, tiny_ckpt, tiny_rm, tmp_path, "--rollout_shards", "-1")


def test_entropy_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))  # (1, 1, 3)
    assert M.entropy_from_logits(logits, 1.0).item() == pytest.approx(1.5 * math.log(2))
    q = [math.sqrt(x) for x in (0.5, 0.25, 0.25)]  # temperature 2: softmax(log p / 2) is proportional to sqrt(p)
    q = [x / sum(q) for x in q]
    assert M.entropy_from_logits(logits, 2.0).item() == pytest.approx(-sum(x * math.log(x) for x in q))


@pytest.mark.parametrize("ent_coef", ["0", "0.01", "-0.01"])
def test_entropy_has_a_graph_only_when_it_is_in_the_loss(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch, ent_coef):
    seen = spy_entropy_graphs(monkeypatch)
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "8", "--ent_coef", ent_coef)
    assert len(seen) == 2 * 2 * 2 and set(seen) == {ent_coef != "0"}  # epochs x minibatches x micro-batches


def test_values_are_read_at_the_token_before_each_response_token(tiny_rm):
    # V(s_t) for response token y_t is the value model's output at the last token of s_t = prompt + y_<t
    vm, _, _ = M.load_checkpoint(tiny_rm)
    torch.manual_seed(0)
    seq = torch.tensor([[M.PAD_ID, 5, 6, 7, 8, 9, 3], [4, 5, 6, 10, 11, M.PAD_ID, M.PAD_ID]])  # P = 3, R = 4
    full_mask = (seq != M.PAD_ID).long()
    P, R = 3, 4
    cfg = ppo.Config(temperature=1.0)
    out = ppo.rollout_forward(vm.backbone, vm.backbone, vm, [vm], seq, full_mask, P, cfg, 2, torch.no_grad(), [seq])
    with torch.no_grad():
        for b in range(2):
            for t in range(R):
                if full_mask[b, P + t]:
                    prefix, m = seq[b:b + 1, :P + t], full_mask[b:b + 1, :P + t]
                    assert out["values"][b, t].item() == pytest.approx(vm(prefix, m)[0, -1].item(), abs=1e-5)


def test_ptx_windows_and_loss_hand_computed():
    stream = torch.arange(100, 200)
    x = M.ptx_windows(stream, 5, 3, torch.Generator().manual_seed(0))  # (3, 6): contiguous slices of the stream
    assert x.shape == (3, 6) and all((row - row[0] == torch.arange(6)).all() and row[-1] < 200 for row in x)
    model = same_distribution_model([0.5, 0.25, 0.25])  # the same next-token distribution everywhere
    loss = M.ptx_loss(model, torch.tensor([[0, 1, 2, 0], [2, 2, 2, 2]]))  # targets 1, 2, 0 and 2, 2, 2
    assert loss.item() == pytest.approx(-(2 * math.log(0.25) + math.log(0.5) + 3 * math.log(0.25)) / 6)


def test_load_ptx_splits_documents_and_refuses_text_shorter_than_a_window(tokenizer, tmp_path):
    (tmp_path / "p.txt").write_text("the box is red.\n\n\n\nthe cave is violet.\n")
    ids = M.load_ptx(tmp_path / "p.txt", tokenizer, 1)
    docs = [tokenizer.encode("the box is red."), tokenizer.encode("the cave is violet.\n")]  # the empty piece between is dropped
    assert ids.tolist() == docs[0] + [tokenizer.eot_id] + docs[1] + [tokenizer.eot_id]
    with pytest.raises(M.ConfigError, match=f"p.txt: {len(ids)} tokens of pretraining text"):
        M.load_ptx(tmp_path / "p.txt", tokenizer, len(ids) - 1)


def test_value_init_modes(tiny_ckpt, tiny_rm, tmp_path, tokenizer):
    # a reward model whose normalisation is far from identity (the HH measurement: gain 0.287, bias 1.33)
    rm, _, _ = M.load_checkpoint(tiny_rm)
    rm.reward_gain.fill_(0.287)
    rm.reward_bias.fill_(1.33)
    M.save_checkpoint(str(tmp_path / "rm"), rm, tokenizer, {})
    policy, _, _ = M.load_checkpoint(tiny_ckpt)
    vm = ppo.init_value_model("reward", policy, str(tmp_path / "rm"), "cpu")
    rows = M.pad_right([[4, 5, 6, 7, 3], [4, 8, 3], [9, 9, 9, 9, 9, 9, 3]])  # right-padded rows ending in EOS
    with torch.no_grad():
        values = vm(rows)  # (B, T)
        at_eos = values.gather(1, M.last_index(rows != M.PAD_ID)[:, None]).squeeze(1)
        assert torch.allclose(at_eos, rm.score(rows), atol=1e-5)  # the normalised scores, the units of the returns
        assert not torch.allclose(rm(rows).gather(1, M.last_index(rows != M.PAD_ID)[:, None]).squeeze(1), rm.score(rows))
        assert vm.reward_gain.item() == 1.0 and vm.reward_bias.item() == 0.0
        assert torch.equal(vm.score(rows), at_eos)
        vm = ppo.init_value_model("policy", policy, str(tmp_path / "rm"), "cpu")
        assert torch.equal(vm(rows), torch.zeros(3, 7))  # zero head: every first value 0
        assert all(torch.equal(a, b) for a, b in zip(vm.backbone.state_dict().values(), policy.state_dict().values()))


def test_vf_coef_acts_through_the_joint_clip(world, tiny_ckpt, tiny_rm, tmp_path):
    # one AdamW over both models with a joint gradient clip (N+): when the clip is active, a larger
    # vf_coef makes the value gradients a larger share of the norm and shrinks the policy's step
    weights = []
    for vf_coef in ("0.1", "10"):
        run(world, tiny_ckpt, tiny_rm, tmp_path / vf_coef, "--total_episodes", "8", "--vf_coef", vf_coef, "--max_grad_norm", "1e-3")
        weights.append(M.load_checkpoint(str(tmp_path / vf_coef))[0].state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values()))
    state = M.load_train_state(str(tmp_path / "10"))
    # the policy's matrices and vectors, then the value model's (configure_optimizer's extra group pair);
    # anneal: lr * (1 - 0 / 1) at the one step
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-3] * 4


def test_bf16_path_keeps_step0_kl_zero_and_reward_gain_fp32(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    # CPU bf16 autocast stands in for CUDA's: the reward model is then stored in bf16 (the frozen-in-bf16 branch)
    bf16 = lambda device, dtype="bfloat16": torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setattr(M, "autocast", bf16)
    real, seen = ppo.rollout_forward, {}

    def spy(policy, ref, value_model, rms, *a):
        seen.update(ref=ref, rm=rms[0])
        return real(policy, ref, value_model, rms, *a)

    monkeypatch.setattr(ppo, "rollout_forward", spy)
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "8")
    first = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert first["kl"] == 0.0 and first["approx_kl_first_mb"] < 1e-10
    assert seen["rm"].head.weight.dtype == torch.bfloat16 and seen["rm"].reward_gain.dtype == torch.float32
    assert seen["rm"].reward_bias.dtype == torch.float32 and seen["ref"].lm_head.weight.dtype == torch.float32
    # what the reference used to be on CUDA (bf16 weights beside a policy autocast from fp32): not the same function
    policy, _, _ = M.load_checkpoint(tiny_ckpt)
    ref16, _, _ = M.load_checkpoint(tiny_ckpt)
    ref16.to(torch.bfloat16)
    seq = torch.tensor([[4, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(M.response_logprobs(policy, seq, start=3), M.response_logprobs(ref16, seq, start=3))


def test_compile_scores_old_and_new_log_probs_with_one_module(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    # every log-prob forward of the policy and the reference (rollout and update) must go through a
    # compiled module, never through the eager one beside it
    calls = count_compiled_forwards(monkeypatch)
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "8", "--compile", "true")
    assert calls["outside"] == 0 and calls["inside"] == 4 * 2 + 2 * 2 * 2  # rollout: 4 chunks x (policy, ref); update: 8


@pytest.mark.slow
def test_real_compile_step0_ratio_is_exactly_one(world, tiny_ckpt, tiny_rm, tmp_path):
    pytest.importorskip("torch._inductor")
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "8", "--compile", "true")
    first = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert first["approx_kl_first_mb"] == 0.0 and first["kl"] == 0.0


def test_reward_model_reads_the_canonical_ids_of_a_sampled_answer(tokenizer, tiny_rm):
    # an answer sampled as one token per byte is scored like the same text encoded, as the RM was trained
    import eval as evaluate
    rm, _, _ = M.load_checkpoint(tiny_rm)
    prompt = M.encode_chat(tokenizer, "what colour is the cat?")
    text = " the cat is black."
    spelled, canonical = byte_spelled(tokenizer, text)
    responses = M.pad_right([spelled, canonical])  # (2, R) as sampled, right-padded
    rows = M.rm_rows(tokenizer, [prompt, prompt], responses, 96)
    assert rows.tolist() == [prompt + canonical] * 2
    s = evaluate.rm_scores(rm, tokenizer, ["what colour is the cat?"] * 2, [spelled, canonical], 2, "cpu")
    assert s[0].item() == s[1].item()
    with torch.no_grad():  # the sampled ids themselves would score differently
        raw = rm.score(torch.tensor([prompt + spelled]))
    assert raw.item() != s[0].item()


def test_resuming_an_optimizer_of_another_layout_is_a_clear_error():
    # ppo.py's optimizer: the policy's and the value model's matrices and vectors, four groups; a checkpoint
    # written with two (an older ppo.py's) is refused with a message, not torch's ValueError
    policy, value = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opt = M.configure_optimizer(policy, 1e-3, extra=[(value, 3e-4)])
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 3e-4, 3e-4]
    old = torch.optim.AdamW([{"params": list(policy.parameters())}, {"params": list(value.parameters())}])
    with pytest.raises(M.ConfigError, match="out/ppo/ckpt: its optimizer has 2 parameter groups"):
        M.load_optimizer_state(opt, old.state_dict(), "out/ppo/ckpt")
    M.load_optimizer_state(opt, opt.state_dict(), "out/ppo/ckpt")


def test_ensemble_of_one_or_of_two_copies_is_the_single_reward_model(world, tiny_ckpt, tiny_rm, tmp_path):
    def metrics(d):
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("time") and k != "s_per_it"}
                for x in open(d / "metrics.jsonl")]
    single = run(world, tiny_ckpt, tiny_rm, tmp_path / "single", "--total_episodes", "16")
    one = run(world, tiny_ckpt, tiny_rm, tmp_path / "one", "--total_episodes", "16", "--ensemble", "min")
    two = run(world, tiny_ckpt, f"{tiny_rm},{tiny_rm}", tmp_path / "two", "--total_episodes", "16", "--ensemble", "uwo",
              "--ensemble_lambda", "1")
    for other in (one, two):  # the same run: every weight bit for bit
        assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(), other.state_dict().values()))
    assert metrics(tmp_path / "one") == metrics(tmp_path / "single")
    for a, b in zip(metrics(tmp_path / "single"), metrics(tmp_path / "two")):
        assert b.pop("score_rm0") == b.pop("score_rm1") == pytest.approx(a["score"]) and b.pop("ensemble_std") == 0.0
        assert b == a
    other = other_reward_model(tiny_rm, tmp_path / "rm2", seed=3)  # two members that disagree: each scored, then combined
    run(world, tiny_ckpt, f"{tiny_rm},{other}", tmp_path / "mean", "--total_episodes", "8")
    r = metrics(tmp_path / "mean")[0]
    assert r["ensemble_std"] > 0 and r["score"] == pytest.approx((r["score_rm0"] + r["score_rm1"]) / 2, abs=1e-5)


def test_ensemble_config_errors_and_a_member_with_another_tokenizer(world, tiny_ckpt, tiny_rm, tmp_path):
    def cfg(*extra):
        return M.parse_config(ppo.Config, ["--policy", tiny_ckpt, "--reward_model", tiny_rm, "--prompts",
                                           str(world / "prompts_train.jsonl"), *extra])
    with pytest.raises(M.ConfigError, match="ensemble must be one of mean, min, uwo, not 'avg'"):
        ppo.check_config(cfg("--ensemble", "avg"), 1)
    with pytest.raises(M.ConfigError, match="ensemble_lambda -1.0 must be >= 0"):
        ppo.check_config(cfg("--ensemble_lambda", "-1"), 1)
    with pytest.raises(M.ConfigError, match="no/such/rm"):
        ppo.check_inputs(cfg("--reward_model", f"{tiny_rm},no/such/rm"))
    odd = other_reward_model(tiny_rm, tmp_path / "odd", swap_tokens=True)
    with pytest.raises(M.ConfigError, match=f"{odd} and {tiny_ckpt} use different tokenizers"):
        ppo.load_models(cfg("--reward_model", f"{tiny_rm},{odd}"), "cpu", torch.no_grad())
