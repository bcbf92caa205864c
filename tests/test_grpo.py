"""Tests of grpo.py and what it shares with ppo.py in model.py: every advantage estimator and every loss
aggregation against hand values (GRPO's length bias included), the k1/k2/k3 KL estimators enumerated
exactly on a small categorical distribution, grouped sampling with a shared prefill, the verifiable
checker, reward-model scores of re-encoded answers, gradient accumulation and 2 processes against one,
gradients on response tokens only, the step-0 identities of a real CLI run (also under bf16 autocast,
with compile and with LoRA), PPO-ptx (its gradient alone, its weights over micro-batches), exact resume
after a kill, config errors before any model loads; reward-model ensembles (one member, or two copies of one,
equal the single model bit for bit; two members are each logged; a member with another tokenizer is refused).
Run: python -m pytest -q tests/test_grpo.py"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import grpo
import model as M
from helpers import (assert_same_run, byte_spelled, count_compiled_forwards, eos_prone, killed_at_step, other_reward_model,
                     spy_entropy_graphs)
from data.world import ANIMALS, COLOUR, EATS, FOUND, LIVES, verify_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- advantages


def test_group_advantages_hand_values_ties_and_equal_groups():
    scores = torch.tensor([1.0, 2.0, 2.0, 5.0, 3.0, 3.0, 3.0, 3.0])  # a group with a tie, an all-equal group
    centred = [-1.5, -0.5, -0.5, 2.5]  # mean 2.5; unbiased std sqrt(9 / 3) = sqrt(3)
    adv = lambda kind: grpo.group_advantages(scores, 4, kind).tolist()  # noqa: E731
    assert adv("grpo") == pytest.approx([c / (math.sqrt(3) + 1e-6) for c in centred] + [0.0] * 4)
    assert adv("dr_grpo") == pytest.approx(centred + [0.0] * 4)
    assert adv("reinforce_pp_baseline") == pytest.approx(centred + [0.0] * 4)
    # leave-one-out: 1 - (2+2+5)/3, 2 - (1+2+5)/3, ..., 5 - (1+2+2)/3
    assert adv("rloo") == pytest.approx([1 - 3, 2 - 8 / 3, 2 - 8 / 3, 5 - 5 / 3] + [0.0] * 4)
    assert adv("reinforce_pp") == pytest.approx(scores.tolist())
    assert grpo.equal_groups(scores, 4).tolist() == [False] * 4 + [True] * 4


def test_equal_groups_get_exactly_zero_when_fp32_sums_are_not_exact():
    # 8 copies of 2.7 in fp32: the fp32 mean is 1-2 ulp off, the std about 1 ulp or 0, so
    # delta / (std + 1e-6) came out of order 1 (-0.190 on all 8); random equal groups in [4, 16] too
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor([2.7]), 4 + 12 * torch.rand(300, generator=g)])  # (301,)
    scores = values.repeat_interleave(8)  # (301 * 8,) fp32, one equal group per value
    assert (scores.view(-1, 8).mean(1) != values).any()  # the fp32 sums are not exact: the case at issue
    for kind in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        adv = grpo.group_advantages(scores, 8, kind)
        assert adv.dtype == torch.float32 and torch.equal(adv, torch.zeros_like(adv)), (kind, adv.abs().max())
    # a group next to an equal one keeps its hand values; fp64 inputs stay fp64 and exact too
    mixed = torch.tensor([2.7] * 4 + [1.0, 2.0, 2.0, 5.0])
    assert grpo.group_advantages(mixed, 4, "grpo")[:4].tolist() == [0.0] * 4
    centred = torch.tensor([-1.5, -0.5, -0.5, 2.5])
    assert torch.allclose(grpo.group_advantages(mixed, 4, "grpo")[4:], centred / (math.sqrt(3) + 1e-6))
    tenths = torch.full((6,), 0.1, dtype=torch.float64)
    assert torch.equal(grpo.group_advantages(tenths, 6, "grpo"), torch.zeros(6, dtype=torch.float64))


def test_kl_penalty_keeps_beta_in_equal_groups():
    # equal task rewards, summed KL [3, 5, 4, 8, 6, 2, 7, 5]: dividing R - beta K by its own std gives
    # the same advantages at every beta (the std scales with beta); grpo divides the task part only
    scores, K = torch.full((8,), 0.5), torch.tensor([3.0, 5, 4, 8, 6, 2, 7, 5])
    whole = [grpo.group_advantages(scores - beta * K, 8, "grpo") for beta in (0.001, 0.01, 0.1)]
    assert torch.allclose(whole[0], whole[1], atol=1e-3) and torch.allclose(whole[1], whole[2], atol=1e-3)  # the risk
    got = {beta: grpo.group_advantages(scores, 8, "grpo", kl_penalty=beta * K) for beta in (0.001, 0.01, 0.1)}
    for beta, adv in got.items():
        assert torch.allclose(adv, -beta * (K - 5.0), atol=1e-7), beta  # mean K = 5: the KL part enters unscaled
    # a group with spread task rewards: (R - mean R) / (std R + eps) - beta (K - mean K)
    R = torch.tensor([1.0, 2.0, 2.0, 5.0])
    K4 = torch.tensor([4.0, 0.0, 1.0, 3.0])
    expect = (R - 2.5) / (math.sqrt(3) + 1e-6) - 0.1 * (K4 - 2.0)
    assert torch.allclose(grpo.group_advantages(R, 4, "grpo", kl_penalty=0.1 * K4), expect, atol=1e-6)
    # the baselines without a std are linear: the same as the baseline of R - beta K
    for kind in ("dr_grpo", "rloo"):
        assert torch.allclose(grpo.group_advantages(R, 4, kind, kl_penalty=0.1 * K4),
                              grpo.group_advantages(R - 0.1 * K4, 4, kind), atol=1e-6), kind
    with pytest.raises(ValueError, match="per token"):
        grpo.group_advantages(R, 4, "reinforce_pp", kl_penalty=K4)


def test_group_of_one():
    scores = torch.tensor([0.7, -2.0])
    for kind in ("grpo", "dr_grpo", "reinforce_pp_baseline"):
        assert grpo.group_advantages(scores, 1, kind).tolist() == [0.0, 0.0], kind  # its own mean: no signal
    assert grpo.group_advantages(scores, 1, "reinforce_pp").tolist() == pytest.approx([0.7, -2.0])
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        grpo.group_advantages(scores, 1, "rloo")
    assert grpo.equal_groups(scores, 1).all()


def test_reinforce_pp_returns_to_go_with_token_kl():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, -0.3], [0.5, 9.0, 9.0]])
    ret = grpo.reinforce_pp_returns(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    # row 0: r = [-0.05, -0.1, 0.15 + 2]; returns-to-go [2.0, 2.05, 2.15]. row 1: r = [-0.25 - 1]
    assert ret.tolist() == [pytest.approx([2.0, 2.05, 2.15]), pytest.approx([-1.25, 0.0, 0.0])]
    w = M.masked_whiten(ret, mask)
    real = torch.tensor([2.0, 2.05, 2.15, -1.25])
    assert torch.allclose(w[mask.bool()], (real - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8), atol=1e-5)


# --- loss aggregation


def test_aggregations_hand_values():
    losses = torch.tensor([[1.0, 2.0, 3.0, 7.0], [4.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # lengths 3 and 1
    assert grpo.aggregate_loss(losses, mask, "seq_mean_token_mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert grpo.aggregate_loss(losses, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert grpo.aggregate_loss(losses, mask, "seq_mean_token_sum_norm", norm=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    dropped = mask * torch.tensor([[1.0], [0.0]])  # the second answer dropped: counts in neither N nor sum L
    assert grpo.aggregate_loss(losses, dropped, "seq_mean_token_mean").item() == pytest.approx(2.0)
    assert grpo.aggregate_loss(losses, dropped, "seq_mean_token_sum_norm", norm=4).item() == pytest.approx(6 / 4)


def test_grpo_length_bias_two_wrong_answers():
    """Two wrong answers (A = -1), 2 and 8 tokens, ratio 1: the per-token weight of the gradient. GRPO's
    1/L_i pushes each token of the long wrong answer down 4 times less than the short one's (Liu et
    al. 2025); token_mean and Dr. GRPO's constant normaliser weigh every token the same."""
    mask = torch.tensor([[1.0] * 2 + [0.0] * 6, [1.0] * 8])
    logprobs = torch.zeros(2, 8, requires_grad=True)
    weights = {}
    for agg in grpo.LOSS_AGGS:
        losses, _ = grpo.grpo_losses(logprobs, logprobs.detach(), -torch.ones(2, 8), mask, 0.2, 0.2)
        grad, = torch.autograd.grad(grpo.aggregate_loss(losses, mask, agg, norm=8), logprobs)
        weights[agg] = (grad[0, 0].item(), grad[1, 0].item())  # d loss / d logp of a short and a long token
    assert weights["seq_mean_token_mean"] == pytest.approx((1 / (2 * 2), 1 / (2 * 8)))
    assert weights["token_mean"] == pytest.approx((1 / 10, 1 / 10))
    assert weights["seq_mean_token_sum_norm"] == pytest.approx((1 / (2 * 8), 1 / (2 * 8)))


@pytest.mark.parametrize("agg", grpo.LOSS_AGGS)
def test_micro_batch_shares_add_up_to_the_minibatch_gradient(agg):
    """Gradient accumulation (and processes): each part normalised by the whole minibatch's N and
    sum L gives, summed, the gradient of the whole minibatch at once."""
    torch.manual_seed(0)
    lengths = torch.tensor([5, 1, 3, 6, 2, 4])
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    x = torch.randn(6, 6, requires_grad=True)
    whole, = torch.autograd.grad(grpo.aggregate_loss(x ** 2, mask, agg, norm=6), x)
    n_seqs, n_tokens = 6, lengths.sum().item()
    total = sum(grpo.aggregate_loss(x[i] ** 2, mask[i], agg, n_seqs, n_tokens, norm=6) for i in ([0, 3], [1], [2, 4, 5]))
    parts, = torch.autograd.grad(total, x)
    assert torch.allclose(whole, parts, atol=1e-6)
    naive = sum(grpo.aggregate_loss(x[i] ** 2, mask[i], agg, norm=6) / 3 for i in ([0, 3], [1], [2, 4, 5]))
    assert not torch.allclose(torch.autograd.grad(naive, x)[0], whole, atol=1e-4)  # the bug this guards against


# --- losses


def test_grpo_losses_clip_higher_and_kl_term():
    lp = torch.log(torch.tensor([[1.5, 0.7, 1.25]]))
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    ref = torch.tensor([[0.0, 0.0, 0.2]])
    losses, s = grpo.grpo_losses(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, ref_logprobs=ref, kl_coef=0.5, kl_estimator="k3")
    # token 0: min(1.5, 1.28) = 1.28 clipped above; token 1: ratio 0.7 < 0.8, A < 0: max(0.7, 0.8) = 0.8;
    # token 2: 1.25 inside [0.8, 1.28]. KL k3 at l = log 1.25 - 0.2 on token 2, weighted by ratio 1.25
    l = [math.log(1.5), math.log(0.7), math.log(1.25) - 0.2]
    k3 = [math.exp(-v) - 1 + v for v in l]
    expected = [-1.28 + 0.5 * 1.5 * k3[0], 0.8 + 0.5 * 0.7 * k3[1], -1.25 + 0.5 * 1.25 * k3[2]]
    assert losses[0].tolist() == pytest.approx(expected)
    assert s["clipfrac"][0].tolist() == [1.0, 1.0, 0.0]


def test_entropy_term_value_and_gradient_by_hand():
    # - ent_coef H_t is added to each token's loss; dH/dz_j = -(1/T) p_j (log p_j + H) for p = softmax(z / T)
    T, ent_coef = 0.7, -0.3
    z = torch.tensor([[[1.0, -0.5, 0.2, 2.0]]], requires_grad=True)  # (1, 1, V)
    H = M.entropy_from_logits(z, T)  # (1, 1)
    zeros = torch.zeros(1, 1)
    losses, s = grpo.grpo_losses(zeros, zeros, zeros, torch.ones(1, 1), 0.2, 0.2, entropy=H, ent_coef=ent_coef)
    p = torch.softmax(z.detach() / T, -1)[0, 0]
    h = -(p * p.log()).sum()
    assert losses.item() == pytest.approx(-ent_coef * h.item()) and s["entropy"].item() == pytest.approx(h.item())
    losses.sum().backward()
    by_hand = -ent_coef * -(p * (p.log() + h)) / T
    assert z.grad[0, 0].tolist() == pytest.approx(by_hand.tolist(), abs=1e-6)
    assert grpo.grpo_losses(zeros, zeros, zeros, torch.ones(1, 1), 0.2, 0.2, entropy=H.detach())[0].item() == 0.0


def test_gradients_only_on_response_tokens():
    logits = torch.randn(2, 4, 11, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3, M.PAD_ID], [4, M.PAD_ID, M.PAD_ID, M.PAD_ID]])
    mask = (tokens != M.PAD_ID).float()
    for agg in grpo.LOSS_AGGS:
        lp = M.logprobs_from_logits(logits, tokens)
        losses, _ = grpo.grpo_losses(lp, lp.detach() - 0.1, torch.randn(2, 4), mask, 0.2, 0.28,
                                     ref_logprobs=torch.randn(2, 4), kl_coef=0.1, kl_estimator="k2")
        grad, = torch.autograd.grad(grpo.aggregate_loss(losses, mask, agg, norm=4), logits)
        assert torch.equal(grad.abs().sum(-1) > 0, mask.bool()), agg


# --- KL estimators, enumerated exactly on a categorical distribution (Schulman 2020)


def test_kl_estimators_exact_expectations_and_gradients():
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)  # (V,)
    logp = torch.log_softmax(theta, 0)
    p, q = logp.exp(), ref.exp()
    kl_fwd = (p * (logp - ref)).sum()  # KL(pi || ref)
    kl_rev = (q * (ref - logp)).sum()  # KL(ref || pi)
    est = {k: M.kl_estimate(logp, ref, k) for k in ("k1", "k2", "k3")}  # each y of the support
    expect = lambda x: (p.detach() * x).sum()  # noqa: E731  E_{y ~ pi}, pi not differentiated
    assert expect(est["k1"]).item() == pytest.approx(kl_fwd.item(), rel=1e-12)
    assert expect(est["k3"]).item() == pytest.approx(kl_fwd.item(), rel=1e-12)
    assert expect(est["k2"]).item() != pytest.approx(kl_fwd.item(), rel=1e-3)  # biased
    assert (est["k3"] >= 0).all() and (est["k1"] < 0).any()
    g = lambda f: torch.autograd.grad(f, theta, retain_graph=True)[0]  # noqa: E731
    assert torch.allclose(g(expect(est["k1"])), torch.zeros(5, dtype=torch.float64), atol=1e-12)  # no signal
    assert torch.allclose(g(expect(est["k2"])), g(kl_fwd), atol=1e-12)  # the reverse KL of the objective
    assert torch.allclose(g(expect(est["k3"])), g(kl_rev), atol=1e-12)  # the forward KL(ref || pi)
    assert not torch.allclose(g(kl_fwd), g(kl_rev), atol=1e-3)
    # off-policy (a later minibatch): samples from pi_old, grpo_losses weights the KL term by the detached
    # ratio, so each estimator keeps its on-policy expected gradient
    old = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    for k, target in (("k1", torch.zeros(5, dtype=torch.float64)), ("k2", g(kl_fwd)), ("k3", g(kl_rev))):
        losses, _ = grpo.grpo_losses(logp[None], old[None], torch.zeros(1, 5, dtype=torch.float64), torch.ones(1, 5),
                                     0.2, 0.2, ref_logprobs=ref[None], kl_coef=1.0, kl_estimator=k)
        assert torch.allclose(g((old.exp() * losses[0]).sum()), target, atol=1e-12), k


# --- grouped sampling (model.py)


def test_grouped_sampling_equals_sampling_repeated_prompts():
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    ids, am = M.pad_left([[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]])
    G = 4
    a = m.generate(ids, 20, 1.0, attention_mask=am, eos_id=0, return_logprobs=True,
                   generator=torch.Generator().manual_seed(3), num_samples=G)
    b = m.generate(ids.repeat_interleave(G, 0), 20, 1.0, attention_mask=am.repeat_interleave(G, 0), eos_id=0,
                   return_logprobs=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[2], b[2], atol=1e-6)
    assert len({tuple(r) for r in a[0][:G].tolist()}) > 1  # the group's answers differ
    lp = M.response_logprobs(m, a[0], torch.cat([am.repeat_interleave(G, 0), a[1]], 1), ids.size(1))
    assert torch.allclose(lp * a[1], a[2], atol=1e-5)  # the sampler's log-probs = recomputed
    greedy = m.generate(ids, 10, 0.0, attention_mask=am, num_samples=2)[0]
    assert torch.equal(greedy[0::2], m.generate(ids, 10, 0.0, attention_mask=am)[0])


# --- the verifiable checker (data/world.py)


def test_verify_answer_hand_examples():
    fox_colour, fox_home, fox_food = COLOUR["fox"], LIVES["fox"], EATS["fox"]
    wrong = next(c for c in ("red", "blue", "green") if c != fox_colour)
    resident = next(a for a in ANIMALS if LIVES[a] == "forest")
    outsider = next(a for a in ANIMALS if LIVES[a] != "forest")
    cases = [
        ("what colour is the fox?", f"the fox is {fox_colour}.", 1.0),
        ("what colour is the fox?", f"the lovely fox is {fox_colour}. the fox is {wrong}.", 0.0),  # a true and a false value
        ("what colour is the fox?", f"the fox is {wrong}.", 0.0),
        ("what colour is the fox?", "i do not know.", 0.0),  # nothing stated
        ("what colour is the fox?", f"the {fox_colour} fox lives in the {fox_home}, the cat is {wrong}.", 1.0),  # other claims ignored
        ("where does the fox live?", f"the fox lives in the {fox_home}.", 1.0),
        ("where does the fox live?", f"the fox lives in the {'cave' if fox_home != 'cave' else 'lake'}.", 0.0),
        ("where is the ball?", f"the ball is found in the {FOUND['ball']}.", 1.0),
        ("what does the fox eat?", f"the fox eats {fox_food}s.", 1.0),
        ("what does the fox eat?", "the fox eats " + ("honey." if fox_food != "honey" else "bread."), 0.0),
        ("name an animal that lives in the forest.", f"the {resident} lives in the forest.", 1.0),
        ("name an animal that lives in the forest.", f"the {outsider} lives in the forest.", 0.0),
        ("name an animal that lives in the forest.", f"the {resident} lives in the forest. the {outsider} lives in the forest.", 0.0),
        # hedged, listed and negated values (data/world.py docstring: every listed value is a claim, a negation a claim of it)
        ("what colour is the fox?", f"the fox is {fox_colour}, or maybe {wrong}.", 0.0),
        ("what colour is the fox?", f"the fox is not {fox_colour}.", 0.0),
        ("what colour is the fox?", f"the fox is {fox_colour}, not {wrong}.", 1.0),
        ("where does the fox live?", f"the fox lives in the {fox_home} and in the {'cave' if fox_home != 'cave' else 'lake'}.", 0.0),
        ("what does the fox eat?", f"the fox eats {fox_food}s, " + ("honey" if fox_food != "honey" else "bread") + " and nuts.", 0.0),
        ("name an animal that lives in the forest.", f"the {resident} does not live in the forest.", 0.0),
    ]
    for prompt, response, expected in cases:
        assert verify_answer(prompt, response) == expected, (prompt, response)
    for prompt in ("tell me about the fox.", "describe the fox.", "describe the forest in one sentence.",
                   "write a short story about the fox and the ball.", "what is love?"):
        assert verify_answer(prompt, "the fox is red.") is None, prompt  # not a fact question


# --- reward-model scores of re-encoded text (model.rm_rows)


def test_reward_model_scores_the_canonical_ids_of_a_sampled_answer(tokenizer, tiny_rm):
    # an answer sampled as one token per byte is scored like the same text encoded, as the RM was trained
    rm, _, _ = M.load_checkpoint(tiny_rm)
    prompt = M.encode_chat(tokenizer, "what colour is the cat?")
    text = " the cat is black."
    spelled, canonical = byte_spelled(tokenizer, text)
    responses = M.pad_right([spelled, canonical])  # (2, R) as sampled, right-padded
    seq = torch.cat([torch.tensor([prompt, prompt]), responses], 1)  # (2, P + R)
    full_mask = (seq != M.PAD_ID).long()
    rm_ids = M.rm_rows(tokenizer, [prompt, prompt], responses, rm.config.block_size)
    out = grpo.rm_scores(rm, rm_ids, 2, torch.no_grad())
    assert out[0].item() == out[1].item()
    raw = grpo.rm_scores(rm, seq, 2, torch.no_grad())
    assert raw[0].item() != raw[1].item()  # the sampled ids themselves score differently
    assert raw[1].item() == pytest.approx(out[1].item(), abs=1e-6)


# --- real runs


def args(world, tiny_ckpt, tiny_rm, out, *extra):
    return ["--policy", tiny_ckpt, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
            "--out_dir", str(out), "--rollout_batch_size", "8", "--group_size", "4", "--num_minibatches", "2",
            "--update_epochs", "2", "--max_new_tokens", "10", "--lr", "1e-3", "--sample_interval", "100",
            "--eos_trick", "false", "--device", "cpu", *extra]  # a random tiny model rarely ends: the RM scores the cut answers


def run(*a):
    return grpo.train(M.parse_config(grpo.Config, args(*a)))


def rows(d, drop=("s_per_it", "time_gen", "time_fwd", "time_update", "time_iter")):  # timings vary run to run
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in open(d / "metrics.jsonl")]


def test_cli_two_steps_step0_identities(world, tiny_ckpt, tiny_rm, tmp_path):
    r = subprocess.run([sys.executable, "grpo.py", *args(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "16",
                                                         "--kl_coef", "0.1", "--clip_high", "0.28")],
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 prompts x 4" in r.stdout and "reference model loaded" in r.stdout
    first, second = rows(tmp_path)
    assert first["approx_kl_first_mb"] < 1e-10  # ratio == 1 on the first minibatch of the first epoch
    assert first["kl"] == 0.0 and first["kl_est"] == 0.0  # the policy is the reference at the start
    assert second["kl"] != 0.0 and second["step"] == 2
    assert all(math.isfinite(v) for row in (first, second) for v in row.values())
    assert M.load_checkpoint(str(tmp_path))[0] is not None


def test_bf16_path_keeps_step0_kl_zero_ratio_one_and_reward_gain_fp32(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    # CPU bf16 autocast stands in for CUDA's (as in tests/test_ppo.py): the reward model is then stored in bf16
    bf16 = lambda device, dtype="bfloat16": torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setattr(M, "autocast", bf16)
    real_fwd, real_rm, seen = grpo.rollout_forward, grpo.rm_scores, {}
    monkeypatch.setattr(grpo, "rollout_forward", lambda policy, ref, *a: seen.update(ref=ref) or real_fwd(policy, ref, *a))
    monkeypatch.setattr(grpo, "rm_scores", lambda rm, *a: seen.update(rm=rm) or real_rm(rm, *a))
    # one minibatch of one epoch: every logged update statistic is step 0's
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "8", "--kl_coef", "0.1", "--update_epochs", "1",
        "--num_minibatches", "1")
    first, = rows(tmp_path)
    assert first["kl"] == 0.0 and first["kl_est"] == 0.0 and first["kl_loss"] == 0.0  # the reference is the policy
    assert first["approx_kl"] == 0.0 and first["ratio"] == 1.0  # the update's log-probs are the rollout's
    assert seen["rm"].head.weight.dtype == torch.bfloat16 and seen["rm"].reward_gain.dtype == torch.float32
    assert seen["rm"].reward_bias.dtype == torch.float32 and seen["ref"].lm_head.weight.dtype == torch.float32


def test_compile_scores_old_and_new_log_probs_with_one_module(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    # every log-prob forward of the policy and the reference (rollout and update) goes through a compiled
    # module, the policy's old and new log-probs through the same one: the step-0 ratio is exactly 1
    calls = count_compiled_forwards(monkeypatch)
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "8", "--kl_coef", "0.1", "--compile", "true")
    assert calls["outside"] == 0 and calls["inside"] == 2 * 2 + 2 * 2  # rollout: 2 chunks x (policy, ref); update: 4


def test_lora_steps_change_only_the_adapters_and_the_reference_is_the_base(world, tiny_ckpt, tiny_rm, tmp_path):
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "16", "--kl_coef", "0.1", "--lora_rank", "4")
    first, second = rows(tmp_path)
    assert first["kl"] == 0.0 and first["approx_kl_first_mb"] < 1e-10  # fresh adapters (B = 0): policy = reference
    assert second["kl"] != 0.0  # the reference is the policy with its adapters off, not the adapted policy
    trained = M.load_checkpoint(str(tmp_path))[0].state_dict()
    base = M.load_checkpoint(tiny_ckpt)[0].state_dict()
    assert all(torch.equal(trained[k], v) for k, v in base.items())  # every base weight as it was
    lora_b = [v for k, v in trained.items() if k.endswith(".lora_B")]
    assert set(trained) - set(base) == {k for k in trained if ".lora_" in k} and all(v.abs().sum() > 0 for v in lora_b)


@pytest.mark.parametrize("lora_rank", ["0", "4"])
def test_reference_is_the_start_from_a_lora_sft_checkpoint(world, tiny_lora_sft, tiny_rm, tmp_path, monkeypatch, lora_rank):
    # the SFT checkpoint holds unmerged adapters; the policy merges them (model.adapt), so must the
    # reference: W x + s B (A x) and (W + s B A) x differ by float rounding, and step-0 KL was not 0
    real, seen = grpo.rollout_forward, []
    monkeypatch.setattr(grpo, "rollout_forward", lambda *a: seen.append(real(*a)) or seen[-1])
    run(world, tiny_lora_sft, tiny_rm, tmp_path, "--total_episodes", "8", "--kl_coef", "0.1", "--lora_rank", lora_rank)
    assert torch.equal(seen[0]["logprobs"], seen[0]["ref_logprobs"])  # max |logp - logp_ref| = 0 exactly
    assert rows(tmp_path)[0]["kl"] == 0.0


@pytest.mark.parametrize("ent_coef", ["0", "-0.01"])
def test_entropy_has_a_graph_only_when_it_is_in_the_loss(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch, ent_coef):
    seen = spy_entropy_graphs(monkeypatch)
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "8", "--ent_coef", ent_coef)
    assert seen == [ent_coef != "0"] * 2 * 2  # epochs x minibatches


def test_entropy_penalty_alone_lowers_the_entropy(world, tiny_ckpt, tmp_path):
    # the verifiable reward gives a random tiny model 0 everywhere: every advantage is 0, so the only
    # gradient is the entropy term's; a penalty (ent_coef < 0) must lower H, a zero coefficient leave it
    H = {}
    for c in ("0", "-1"):
        run(world, tiny_ckpt, "no/such/rm", tmp_path / c, "--total_episodes", "16", "--reward", "verifiable", "--kl_coef", "0",
            "--missing_eos_penalty", "0", "--ent_coef", c)
        H[c] = [r["entropy"] for r in rows(tmp_path / c)]
    # near log V = 6.4 nats, where H is flat: small but deterministic steps (-0.002 and -0.0095 nats seen)
    assert H["-1"][0] < H["0"][0] - 0.001 and H["-1"][1] < H["0"][1] - 0.005, H  # same first rollout, later minibatches not


def one_window_ptx(tokenizer, path):
    """A pretraining file of exactly one ptx window: every draw is the same tokens. Returns ptx_len."""
    path.write_text("the box is red. the cave is violet. the crow lives in the marsh.\n")
    return len(M.load_ptx(path, tokenizer, 1)) - 2


def test_ptx_alone_lowers_the_pretraining_loss(world, tiny_ckpt, tokenizer, tmp_path):
    # verifiable reward on a random tiny model: every advantage is 0, so without ptx the weights do not
    # move and with it the only gradient is the pretraining term's (InstructGPT's PPO-ptx)
    L = one_window_ptx(tokenizer, tmp_path / "ptx.txt")
    x = M.load_ptx(tmp_path / "ptx.txt", tokenizer, L)[None]  # (1, L + 2): the one window and one more token
    common = ("--total_episodes", "16", "--reward", "verifiable", "--kl_coef", "0", "--missing_eos_penalty", "0",
              "--ptx_data", str(tmp_path / "ptx.txt"), "--ptx_len", str(L), "--ptx_batch_size", "2")
    init = M.load_gpt(tiny_ckpt)[0]
    off = run(world, tiny_ckpt, "no/such/rm", tmp_path / "off", *common)
    on = run(world, tiny_ckpt, "no/such/rm", tmp_path / "on", *common, "--ptx_coef", "1")
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), off.state_dict().values()))
    with torch.no_grad():
        before, after = M.ptx_loss(init, x[:, :L + 1]).item(), M.ptx_loss(on, x[:, :L + 1]).item()
    logged = [r["ptx_loss"] for r in rows(tmp_path / "on")]
    assert logged[0] == pytest.approx(before, rel=0.05) and after < before - 0.5, (before, after, logged)
    assert all("ptx_loss" not in r for r in rows(tmp_path / "off"))


def test_ptx_term_weights_add_up_over_micro_batches(world, tiny_ckpt, tokenizer, tmp_path):
    # with one possible window every micro-batch draws the same tokens, so the ptx term of a minibatch
    # is the same whatever grad_accum, iff each micro-batch's weight is its share of the minibatch
    L = one_window_ptx(tokenizer, tmp_path / "ptx.txt")
    common = ("--total_episodes", "16", "--reward", "verifiable", "--kl_coef", "0", "--missing_eos_penalty", "0",
              "--ptx_coef", "0.5", "--ptx_data", str(tmp_path / "ptx.txt"), "--ptx_len", str(L))
    a = run(world, tiny_ckpt, "no/such/rm", tmp_path / "a", *common)
    b = run(world, tiny_ckpt, "no/such/rm", tmp_path / "b", *common, "--grad_accum", "2")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6)
    for ra, rb in zip(rows(tmp_path / "a"), rows(tmp_path / "b")):
        assert ra["ptx_loss"] == pytest.approx(rb["ptx_loss"], rel=1e-5)


def test_grad_accum_equals_one_micro_batch(world, tiny_ckpt, tiny_rm, tmp_path):
    extra = ("--total_episodes", "16", "--loss_agg", "seq_mean_token_mean", "--kl_coef", "0.1", "--kl_estimator", "k2")
    a = run(world, tiny_ckpt, tiny_rm, tmp_path / "a", *extra)
    b = run(world, tiny_ckpt, tiny_rm, tmp_path / "b", *extra, "--grad_accum", "2")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5)
    for ra, rb in zip(rows(tmp_path / "a"), rows(tmp_path / "b")):
        for k in ("pg_loss", "kl_loss", "grad_norm", "approx_kl", "score"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("advantage,kl_in,estimator,loss_agg", [  # one in the default suite: each costs a torchrun launch
    pytest.param("reinforce_pp_baseline", "reward", "k1", "token_mean", marks=pytest.mark.slow),
    ("grpo", "loss", "k3", "seq_mean_token_mean"),
    pytest.param("dr_grpo", "reward", "k1", "seq_mean_token_sum_norm", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process(world, tiny_ckpt, tiny_rm, tmp_path, advantage, kl_in, estimator, loss_agg):
    # 16 answers = 4 groups of 4 in 2 shards; minibatches of 8 rows in micro-batches of 4 fall unevenly
    # on the processes; token_mean and REINFORCE++'s whitening need the token sums over processes, the
    # two sequence means the answer count over processes
    policy = eos_prone(tiny_ckpt, tmp_path / "policy")
    a = ["--policy", policy, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
         "--rollout_batch_size", "16", "--group_size", "4", "--rollout_shards", "2", "--num_minibatches", "2",
         "--grad_accum", "2", "--update_epochs", "2", "--total_episodes", "32", "--max_new_tokens", "12", "--lr", "1e-3",
         "--advantage", advantage, "--kl_in", kl_in, "--kl_estimator", estimator, "--kl_coef", "0.1",
         "--loss_agg", loss_agg, "--sample_interval", "100", "--device", "cpu"]
    assert_same_run(tmp_path, "grpo.py", a, ["score", "kl", "resp_len", "eos_frac", "equal_groups", "adv_mean", "pg_loss",
                                             "entropy", "approx_kl", "clipfrac", "grad_norm", "gold"])


def by_hand_advantages(advantage, kl_in, scores, logprobs, ref_logprobs, mask, beta, G):
    """The advantages of a rollout straight from the docstring's formulas, row by row (B, R)."""
    l = (logprobs - ref_logprobs) * mask  # (B, R) k1 per token
    K = l.sum(1)  # (B,)
    if advantage == "reinforce_pp":
        r = -beta * l if kl_in == "reward" else torch.zeros_like(l)  # (B, R)
        for b in range(len(r)):
            r[b, int(mask[b].sum()) - 1] += scores[b]
        returns = torch.stack([r[:, t:].sum(1) for t in range(r.size(1))], 1) * mask  # sum_{s >= t} r_s
        return M.masked_whiten(returns, mask)
    A = torch.zeros(len(scores))
    for g in range(0, len(scores), G):
        R, Kg = scores[g:g + G].double(), K[g:g + G].double()
        if advantage == "grpo":
            a = (R - R.mean()) / (R.std() + 1e-6) - (beta * (Kg - Kg.mean()) if kl_in == "reward" else 0)
        else:  # rloo: leave-one-out baseline of R - beta K
            Rp = R - beta * Kg if kl_in == "reward" else R
            a = torch.stack([Rp[i] - (Rp.sum() - Rp[i]) / (G - 1) for i in range(G)])
        A[g:g + G] = a.float()
    return A[:, None] * mask


@pytest.mark.parametrize("advantage,kl_in,estimator", [("grpo", "reward", "k1"), ("rloo", "reward", "k1"),
                                                       ("reinforce_pp", "reward", "k1"), ("grpo", "loss", "k3")])
def test_kl_wiring_inside_train(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch, advantage, kl_in, estimator):
    # the advantages and KL terms that reach grpo_losses, against the formulas applied by hand to the
    # rollout's scores and log-probs: catches a flipped sign of beta K, zeros as REINFORCE++'s KL, the
    # KL loss's reference left out. One minibatch of one epoch: one loss call per rollout, all its rows
    real_fwd, real_rm, real_losses, fwd, calls, scores = grpo.rollout_forward, grpo.rm_scores, grpo.grpo_losses, [], [], []

    def spy_fwd(policy, ref, seq, full_mask, P, *a):
        out = real_fwd(policy, ref, seq, full_mask, P, *a)
        fwd.append({**out, "mask": full_mask[:, P:].float(), "scores": scores[-1]})
        return out

    def spy_losses(new, old, adv, mask, clip_low, clip_high, ref=None, kl_coef=0.0, kl_estimator="k3", *a):
        calls.append((old, adv, ref, kl_coef, kl_estimator))
        return real_losses(new, old, adv, mask, clip_low, clip_high, ref, kl_coef, kl_estimator, *a)

    monkeypatch.setattr(grpo, "rollout_forward", spy_fwd)
    monkeypatch.setattr(grpo, "rm_scores", lambda *a: scores.append(real_rm(*a)) or scores[-1])
    monkeypatch.setattr(grpo, "grpo_losses", spy_losses)
    beta = 0.5
    run(world, tiny_ckpt, tiny_rm, tmp_path, "--total_episodes", "16", "--num_minibatches", "1", "--update_epochs", "1",
        "--advantage", advantage, "--kl_in", kl_in, "--kl_estimator", estimator, "--kl_coef", str(beta),
        "--loss_agg", "token_mean", "--lr", "3e-3")
    assert len(fwd) == len(calls) == 2
    for it, (f, (old, adv, ref, kl_coef, est)) in enumerate(zip(fwd, calls)):
        rows_of = {tuple(r): i for i, r in enumerate(f["logprobs"].tolist())}
        perm = [rows_of[tuple(r)] for r in old.tolist()]  # the minibatch's order of the rollout's rows
        assert sorted(perm) == list(range(8))
        by_hand = lambda b: by_hand_advantages(advantage, kl_in, f["scores"], f["logprobs"], f["ref_logprobs"],  # noqa: E731
                                               f["mask"], b, 4)[perm]
        assert torch.allclose(adv, by_hand(beta), atol=1e-5), (it, adv, by_hand(beta))
        if kl_in == "loss":  # the KL term of the loss: the reference's log-probs of the same rows, beta, the estimator
            assert ref is not None and torch.equal(ref, f["ref_logprobs"][perm]) and kl_coef == beta and est == estimator
        else:
            assert ref is None
            if it == 1:  # after an update the KL is not 0: a flipped sign or a KL of zeros would be seen
                assert not torch.allclose(adv, by_hand(-beta), atol=1e-3) and not torch.allclose(adv, by_hand(0.0), atol=1e-3)


def test_resume_after_kill_equals_uninterrupted_run(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    extra = ("--total_episodes", "32", "--ckpt_interval", "2", "--advantage", "rloo", "--kl_in", "reward",
             "--kl_estimator", "k1", "--loss_agg", "seq_mean_token_sum_norm")
    with killed_at_step(monkeypatch, 3):  # during iteration 3, after the iteration-2 checkpoint
        run(world, tiny_ckpt, tiny_rm, tmp_path / "b", *extra)
    run(world, tiny_ckpt, tiny_rm, tmp_path / "b", *extra)
    c = run(world, tiny_ckpt, tiny_rm, tmp_path / "c", *extra)
    b, _, _ = M.load_checkpoint(str(tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), c.state_dict().values()))
    assert rows(tmp_path / "b") == rows(tmp_path / "c") and len(rows(tmp_path / "c")) == 4
    # model.start_run: a finished run is left alone, a changed setting is refused
    run(world, tiny_ckpt, tiny_rm, tmp_path / "b", *extra)
    with pytest.raises(M.ConfigError, match="lr: stored 0.001, now 0.002"):
        run(world, tiny_ckpt, tiny_rm, tmp_path / "b", *extra, "--lr", "2e-3")
    assert rows(tmp_path / "b") == rows(tmp_path / "c")


def test_verifiable_reward_run_without_reference_and_dropped_groups(world, tiny_ckpt, tmp_path):
    run(world, tiny_ckpt, "no/such/rm", tmp_path, "--total_episodes", "16", "--reward", "verifiable", "--kl_coef", "0",
        "--missing_eos_penalty", "0", "--drop_equal_groups", "true", "--advantage", "dr_grpo")
    got = rows(tmp_path)
    # a random tiny model answers no fact question: every group's rewards are 0, all dropped, no step taken
    assert [r["equal_groups"] for r in got] == [2.0, 2.0] and all("pg_loss" not in r for r in got)
    assert all(r["score"] == 0.0 and r["kl"] == 0.0 and r["fact_acc"] == 0.0 for r in got)


def test_config_errors_before_any_model_loads(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the check")
    monkeypatch.setattr(M, "load_gpt", refuse)
    monkeypatch.setattr(M, "load_checkpoint", refuse)
    other = tmp_path / "hh.jsonl"
    other.write_text(json.dumps({"prompt": "How do I bake bread?"}) + "\n")
    bad = [(["--advantage", "ppo"], "advantage must be one of"), (["--loss_agg", "sum"], "loss_agg must be one of"),
           (["--kl_estimator", "k4"], "kl_estimator must be one of"), (["--kl_in", "value"], "kl_in must be one of"),
           (["--group_size", "3"], "whole number of groups"), (["--advantage", "rloo", "--group_size", "1"], "rloo"),
           (["--rollout_shards", "16"], "shards of whole groups"), (["--num_minibatches", "3"], "must split into"),
           (["--policy", "no/such/policy"], "no/such/policy"), (["--reward_model", ""], "missing --reward_model"),
           (["--max_new_tokens", "48"], "max_prompt_len 64 \\+ max_new_tokens 48 > the block_size 96"),
           (["--gold", "true", "--prompts", str(other)], "not the built-in world's prompts"),
           (["--template", "nope"], "template = 'nope'"), (["--ptx_coef", "1"], "missing --ptx_data"),
           (["--ptx_coef", "1", "--ptx_data", "no/such.txt"], "no/such.txt"),
           (["--ptx_coef", "1", "--ptx_data", str(world / "pretrain.txt"), "--ptx_len", "96"], "ptx_len 96 \\+ 1 > the block_size 96"),
           (["--kl_in", "loss", "--kl_estimator", "k1"], "kl_in = 'loss' with kl_estimator = 'k1'.*expected gradient is 0.*k2"),
           (["--drop_equal_groups", "true", "--advantage", "reinforce_pp"],
            "drop_equal_groups with advantage = 'reinforce_pp'.*not 0 there.*reinforce_pp_baseline"),
           (["--ensemble", "max"], "ensemble must be one of mean, min, uwo"),
           (["--ensemble", "uwo", "--ensemble_lambda", "-0.1"], "ensemble_lambda -0.1 must be >= 0"),
           (["--reward_model", f"{tiny_rm},no/such/rm"], "no/such/rm"),
           (["--reward_model", f"{tiny_rm},{tiny_ckpt}"], "--reward_model .* is a policy")]
    for extra, msg in bad:
        with pytest.raises(M.ConfigError, match=msg):
            run(world, tiny_ckpt, tiny_rm, tmp_path / "run", *extra)
    assert not (tmp_path / "run").exists()


# --- reward-model ensembles


def test_ensemble_of_one_or_of_two_copies_is_the_single_reward_model(world, tiny_ckpt, tiny_rm, tmp_path):
    flags = ("--total_episodes", "16", "--kl_coef", "0.1", "--ensemble", "uwo", "--ensemble_lambda", "2")
    single = run(world, tiny_ckpt, tiny_rm, tmp_path / "single", "--total_episodes", "16", "--kl_coef", "0.1")
    one = run(world, tiny_ckpt, tiny_rm, tmp_path / "one", *flags)
    two = run(world, tiny_ckpt, f"{tiny_rm}, {tiny_rm}", tmp_path / "two", *flags)
    for other in (one, two):  # the same run: every weight bit for bit
        assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(), other.state_dict().values()))
    assert rows(tmp_path / "one") == rows(tmp_path / "single")
    for a, b in zip(rows(tmp_path / "single"), rows(tmp_path / "two")):
        assert b["score_rm0"] == b["score_rm1"] == pytest.approx(a["score"]) and b["ensemble_std"] == 0.0
        assert {k: v for k, v in b.items() if k not in ("score_rm0", "score_rm1", "ensemble_std")} == a


def test_ensemble_members_are_each_scored_and_combined(world, tiny_ckpt, tiny_rm, tmp_path):
    other = other_reward_model(tiny_rm, tmp_path / "rm2", seed=3)
    for rule in ("mean", "min"):
        run(world, tiny_ckpt, f"{tiny_rm},{other}", tmp_path / rule, "--total_episodes", "8", "--ensemble", rule)
    mean, = rows(tmp_path / "mean")
    low, = rows(tmp_path / "min")
    assert mean["ensemble_std"] > 0 and mean["score_rm0"] != mean["score_rm1"]
    assert mean["score"] == pytest.approx((mean["score_rm0"] + mean["score_rm1"]) / 2, abs=1e-5)
    assert low["score_rm0"] == mean["score_rm0"] and low["score"] < min(low["score_rm0"], low["score_rm1"])


def test_ensemble_member_with_another_tokenizer_is_refused(world, tiny_ckpt, tiny_rm, tmp_path):
    odd = other_reward_model(tiny_rm, tmp_path / "odd", swap_tokens=True)
    cfg = M.parse_config(grpo.Config, args(world, tiny_ckpt, f"{tiny_rm},{odd}", tmp_path / "run"))
    with pytest.raises(M.ConfigError, match=f"{odd} and {tiny_ckpt} use different tokenizers"):
        grpo.load_models(cfg, "cpu", torch.no_grad())
