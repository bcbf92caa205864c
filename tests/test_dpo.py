"""Tests of dpo.py: the DPO / cDPO / IPO losses against hand-computed values, gradients reaching the
policy only, the step-0 identities, the concatenated forward against per-row and per-token
references, the CLI (pairs and rankings, metrics, checkpoint, over-fitting), and exact resume.
Run: python -m pytest -q tests/test_dpo.py"""

import json
import math
from contextlib import nullcontext

import pytest
import torch

import dpo
import model as M
from helpers import killed_at_step, same_distribution_model

sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731

PAIRS = [("describe the cat.", "the cat is black.", "the cat is a very black cat that sleeps in the town."),
         ("where does the owl live?", "the owl lives in the forest.", "no.")]


def test_dpo_loss_hand_computed():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])  # policy log-probs
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])  # reference log-probs
    beta = 0.5  # h = [1, -2]
    losses, r_c, r_r = dpo.dpo_loss(pc, pr, rc, rr, beta)
    assert losses.tolist() == pytest.approx([-math.log(sig(0.5)), -math.log(sig(-1.0))], abs=1e-6)
    assert r_c.tolist() == pytest.approx([0.25, -0.5]) and r_r.tolist() == pytest.approx([-0.25, 0.5])
    e = 0.1
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=e)
    expected = [-(1 - e) * math.log(sig(b)) - e * math.log(sig(-b)) for b in (0.5, -1.0)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    assert losses.tolist() == pytest.approx([(1 - 1) ** 2, (-2 - 1) ** 2], abs=1e-6)  # (h - 1/(2 beta))^2
    with pytest.raises(ValueError, match="loss_type"):
        dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type="simpo")  # simpo and kto have their own functions
    # the DPO gradient (Rafailov et al. 2023, Sec. 4): dL/dlog pi(y_w) = -beta sigmoid(-beta h) = -dL/dlog pi(y_l)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, r_c, r_r = dpo.dpo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-beta * sig(-0.5), -beta * sig(1.0)], abs=1e-6)
    assert torch.allclose(pr.grad, -pc.grad) and not r_c.requires_grad and not r_r.requires_grad


def test_gradient_reaches_the_policy_only_and_step0_identities(tokenizer, tiny_ckpt):
    policy, _, _ = M.load_checkpoint(tiny_ckpt)
    ref, _, _ = M.load_checkpoint(tiny_ckpt)  # a separate model with the same weights: pi = pi_ref
    ex, _ = dpo.encode_pairs(PAIRS, tokenizer, 64, 8)
    ref_logps = dpo.reference_logprobs(ref, ex, [[0, 1]], "cpu", nullcontext())  # (2, 2)
    assert not ref_logps.requires_grad and torch.isfinite(ref_logps).all()
    ids, mask = dpo.collate(ex)
    chosen, rejected = dpo.concatenated_logps(policy, ids, mask)
    losses, r_c, r_r = dpo.dpo_loss(chosen, rejected, ref_logps[:, 0], ref_logps[:, 1], beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-6)  # h = 0 at step 0
    assert r_c.abs().max() < 1e-6 and r_r.abs().max() < 1e-6
    losses.mean().backward()
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is not None for p in policy.parameters()) and policy.lm_head.weight.grad.abs().sum() > 0


def test_concatenated_forward_equals_separate_and_per_token(tokenizer, tiny_ckpt):
    m, _, _ = M.load_checkpoint(tiny_ckpt)
    ex, stats = dpo.encode_pairs(PAIRS, tokenizer, 64, 8)
    assert stats == {"pairs": 2, "prompt_truncated": 0, "response_truncated": 0}
    ids, mask = dpo.collate(ex)  # (4, T): chosen rows, then rejected rows, padded to the longest
    assert ids.size(0) == 4 and (ids == M.PAD_ID).any()
    with torch.no_grad():
        chosen, rejected = dpo.concatenated_logps(m, ids, mask)
        for k, (prompt, *answers) in enumerate(PAIRS):
            for j, got in enumerate((chosen[k], rejected[k])):
                seq, n_prompt = ex[k][j]
                row = k + j * len(PAIRS)  # rows [0, B) chosen, [B, 2B) rejected
                assert seq[:n_prompt] == M.encode_chat(tokenizer, prompt) and seq[-1] == tokenizer.eot_id
                assert tokenizer.decode(ids[row][mask[row].bool()].tolist()) == " " + answers[j]  # response only
                assert mask[row].sum() == len(seq) - n_prompt  # response tokens + EOS, no prompt, no padding
                alone = M.response_logprobs(m, torch.tensor([seq]))[0, n_prompt - 1:].sum()  # one row, no padding
                slow = sum(torch.log_softmax(m(torch.tensor([seq[:t]]))[0, -1], -1)[seq[t]].item()
                           for t in range(n_prompt, len(seq)))  # response tokens and EOS only
                assert got.item() == pytest.approx(alone.item(), abs=1e-4)
                assert got.item() == pytest.approx(slow, abs=1e-4)


def test_rankings_expand_to_all_pairs():
    groups = [("q", ["a", "b", "c"]), ("p", ["x", "y"])]
    assert dpo.expand_pairs(groups) == [("q", "a", "b"), ("q", "a", "c"), ("q", "b", "c"), ("p", "x", "y")]


def write_prefs(path):
    rows = [{"prompt": "what colour is the fox?", "chosen": "the fox is red.", "rejected": "the fox is stupid."},
            {"prompt": "where does the owl live?", "chosen": "the owl lives in the forest.", "rejected": "i do not know."},
            {"prompt": "describe the cat.", "responses": ["the cat is black and kind.", "the cat is black.", "cat cat cat"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(prefs, tiny_ckpt, out, *extra):
    cfg = M.parse_config(dpo.Config, ["--data", prefs, "--val_data", prefs, "--init", tiny_ckpt, "--out_dir", str(out),
                                      "--max_len", "64", "--log_interval", "1", "--n_samples", "1",
                                      "--max_new_tokens", "8", *extra])
    return dpo.train(cfg)


def test_cli_trains_logs_checkpoints_and_overfits(tiny_ckpt, tmp_path):
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    policy = run(prefs, tiny_ckpt, tmp_path / "dpo", "--batch_size", "5", "--epochs", "20", "--lr", "3e-3",
                 "--warmup", "2", "--eval_interval", "10", "--ckpt_interval", "10")
    stats = json.load(open(tmp_path / "dpo" / "data_stats.json"))
    assert stats["train"]["rows"] == 3 and stats["train"]["pairs"] == 5  # 2 pairs + a ranking of 3
    rows = [json.loads(x) for x in open(tmp_path / "dpo" / "metrics.jsonl")]
    keys = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
            "logps/chosen", "logps/rejected", "lr", "grad_norm"}
    assert [r["step"] for r in rows] == list(range(1, 21)) and all(keys <= set(r) for r in rows)
    assert {"val_" + k for k in keys - {"step", "lr", "grad_norm"}} | {"val_logratio"} <= set(rows[-1])
    first, last = rows[0], rows[-1]
    # step 0 (the loss of the first step is computed before its update): pi = pi_ref
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margin"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/accuracy"] == 0.5  # every pair ties
    assert last["loss"] < 0.5 * math.log(2) and last["val_loss"] < 0.5 * math.log(2) and last["rewards/margin"] > 0.5
    assert last["rewards/accuracy"] == 1.0 and last["val_rewards/accuracy"] == 1.0
    loaded, _, info = M.load_checkpoint(str(tmp_path / "dpo"))
    assert info["kind"] == "gpt" and info["train"]["loss_type"] == "dpo"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), policy.state_dict().values()))


def test_reference_is_the_start_from_a_lora_sft_checkpoint(tiny_lora_sft, tmp_path, monkeypatch):
    # the reference log-probs come from the SFT checkpoint's model, the policy merges its adapters:
    # both must be the merged model, so h = 0 exactly at step 0. Under CPU bf16 autocast (CUDA's
    # stand-in, as in tests/test_ppo.py): in fp32 the summed log-probs of these short answers round
    # the difference away, in bf16 it is of order 1e-3
    monkeypatch.setattr(M, "autocast", lambda device, dtype="bfloat16": torch.autocast("cpu", dtype=torch.bfloat16))
    real, seen = dpo.dpo_loss, []
    monkeypatch.setattr(dpo, "dpo_loss", lambda pc, pr, rc, rr, *a: seen.append((pc - rc, pr - rr)) or real(pc, pr, rc, rr, *a))
    run(write_prefs(tmp_path / "prefs.jsonl"), tiny_lora_sft, tmp_path / "dpo", "--batch_size", "5", "--epochs", "1")
    assert all(torch.equal(d, torch.zeros_like(d)) for d in seen[0])


def test_config_errors(tiny_ckpt, tmp_path):
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    with pytest.raises(M.ConfigError, match="label_smoothing"):
        run(prefs, tiny_ckpt, tmp_path / "x", "--loss_type", "ipo", "--label_smoothing", "0.1")
    with pytest.raises(M.ConfigError, match="loss_type"):
        run(prefs, tiny_ckpt, tmp_path / "x", "--loss_type", "orpo")


def test_nan_loss_stops_with_the_step(tiny_ckpt, tmp_path, monkeypatch):
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    real = dpo.dpo_loss
    monkeypatch.setattr(dpo, "dpo_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), *real(*a, **k)[1:]))
    with pytest.raises(FloatingPointError, match=r"step 0: loss is nan; last good checkpoint is in .*ckpt"):
        run(prefs, tiny_ckpt, tmp_path / "nan", "--batch_size", "5")


def test_cli_resumes_exactly(tiny_ckpt, tmp_path, monkeypatch):
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    args = ("--batch_size", "1", "--grad_accum", "2", "--epochs", "2", "--loss_type", "ipo", "--lr", "1e-3",
            "--warmup", "1", "--eval_interval", "4", "--ckpt_interval", "2")  # 6 steps
    run(prefs, tiny_ckpt, tmp_path / "a", *args)
    with killed_at_step(monkeypatch, 3):
        run(prefs, tiny_ckpt, tmp_path / "b", *args)
    run(prefs, tiny_ckpt, tmp_path / "b", *args)
    a, _, _ = M.load_checkpoint(str(tmp_path / "a"))
    b, _, _ = M.load_checkpoint(str(tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "pairs_s"} for x in open(d / "metrics.jsonl")]  # noqa: E731
    assert rows(tmp_path / "a") == rows(tmp_path / "b") and [r["step"] for r in rows(tmp_path / "a")] == list(range(1, 7))
    assert "val_loss" in rows(tmp_path / "a")[3] and "val_loss" in rows(tmp_path / "a")[-1]
    again = run(prefs, tiny_ckpt, tmp_path / "a", *args)  # a finished run is not trained again
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), again.state_dict().values()))


def test_chosen_and_rejected_share_one_truncated_prompt(tokenizer):
    prompt = "describe the cat and the dog and the owl and the forest and the town where they all live."
    pair = (prompt, "no.", "the cat is a very black cat that sleeps in the town with the dog.")
    p = M.encode_chat(tokenizer, prompt)
    long_ = M.encode_chat(tokenizer, prompt, pair[2])[1]
    max_len = len(p) + len(long_) - 5  # the longer answer forces a 5-token prompt cut; the short one alone would not
    (c, n_c), (r, n_r) = dpo.encode_pairs([pair], tokenizer, max_len, 4)[0][0]
    assert n_c == n_r == len(p) - 5 and c[:n_c] == r[:n_r] == p[5:]
    assert dpo.encode_pairs([pair], tokenizer, max_len, 4)[1] == {"pairs": 1, "prompt_truncated": 2, "response_truncated": 0}


def test_ipo_average_uses_per_token_log_probs():
    # a stand-in model whose next-token distribution is log-probs [log 0.5, log 0.25, log 0.25] everywhere
    model = same_distribution_model([0.5, 0.25, 0.25])
    # chosen: prompt [0], answer [0, 1, 2] (3 tokens); rejected: prompt [0], answer [1] (1 token)
    ids, mask = dpo.collate([(([0, 0, 1, 2], 1), ([0, 1], 1))])
    chosen, rejected = dpo.concatenated_logps(model, ids, mask)
    assert chosen.item() == pytest.approx(math.log(0.5) + 2 * math.log(0.25)) and rejected.item() == pytest.approx(math.log(0.25))
    chosen, rejected = dpo.concatenated_logps(model, ids, mask, average=True)
    assert chosen.item() == pytest.approx((math.log(0.5) + 2 * math.log(0.25)) / 3) and rejected.item() == pytest.approx(math.log(0.25))
    # IPO on the averages against a reference at -1 (chosen) and -2 (rejected): h = (c + 1) - (r + 2), beta 0.5
    losses, _, _ = dpo.dpo_loss(chosen, rejected, torch.tensor([-1.0]), torch.tensor([-2.0]), 0.5, loss_type="ipo")
    h = (chosen.item() + 1) - (rejected.item() + 2)
    assert losses.item() == pytest.approx((h - 1.0) ** 2)


def test_cli_ipo_average_step0(tiny_ckpt, tmp_path):
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    run(prefs, tiny_ckpt, tmp_path / "ipo", "--loss_type", "ipo", "--ipo_average", "true", "--batch_size", "5",
        "--epochs", "1", "--n_samples", "0")
    first = json.loads(open(tmp_path / "ipo" / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx((0 - 1 / (2 * 0.1)) ** 2, abs=1e-4)  # h = 0: policy and reference averaged alike
    # the logged log-probs are per token: a mean over answers of about log(1/V) for a random tiny model
    assert -2 * math.log(601) < first["logps/chosen"] < 0
    with pytest.raises(M.ConfigError, match="ipo_average"):
        run(prefs, tiny_ckpt, tmp_path / "x", "--ipo_average", "true")


# --- SimPO, KTO, online DPO


def test_simpo_loss_hand_computed():
    # per-token average log-probs of chosen and rejected; beta 2, gamma 0.5 (Meng et al. 2024, Eq. 6)
    pc, pr = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-1.5, -1.0], requires_grad=True)
    losses, r_c, r_r = dpo.simpo_loss(pc, pr, beta=2.0, gamma=0.5)
    # z = 2 (-1 + 1.5) - 0.5 = 0.5 and 2 (-2 + 1) - 0.5 = -2.5
    assert losses.tolist() == pytest.approx([-math.log(sig(0.5)), -math.log(sig(-2.5))], abs=1e-6)
    assert r_c.tolist() == pytest.approx([-2.0, -4.0]) and r_r.tolist() == pytest.approx([-3.0, -2.0])  # beta * average
    losses.sum().backward()  # dL/d avg_w = -beta sigmoid(-z) = -dL/d avg_l
    assert pc.grad.tolist() == pytest.approx([-2 * sig(-0.5), -2 * sig(2.5)], abs=1e-6)
    assert torch.allclose(pr.grad, -pc.grad) and not r_c.requires_grad


def test_cli_simpo_is_reference_free_length_normalised_and_trains(tiny_ckpt, tmp_path, monkeypatch):
    prefs = write_prefs(tmp_path / "prefs.jsonl")
    m, tok, _ = M.load_checkpoint(tiny_ckpt)
    pairs = dpo.expand_pairs(M.read_preferences(prefs)[0])
    ex, _ = dpo.encode_pairs(pairs, tok, 64, 16)

    def avg_logp(seq, n_prompt):  # mean log-prob of the answer's tokens and EOS, one row at a time
        with torch.no_grad():
            lp = M.response_logprobs(m, torch.tensor([seq]))[0, n_prompt - 1:]
        return lp.mean().item()
    beta, gamma = 2.0, 0.5
    expected = sum(-math.log(sig(beta * avg_logp(*c) - beta * avg_logp(*r) - gamma)) for c, r in ex) / len(ex)
    monkeypatch.setattr(dpo, "reference_logprobs", lambda *a, **k: pytest.fail("simpo ran a reference pass"))
    run(prefs, tiny_ckpt, tmp_path / "simpo", "--loss_type", "simpo", "--beta", str(beta), "--simpo_gamma", str(gamma),
        "--batch_size", "5", "--epochs", "20", "--lr", "3e-3", "--warmup", "2", "--eval_interval", "20", "--n_samples", "0")
    rows = [json.loads(x) for x in open(tmp_path / "simpo" / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(expected, abs=1e-5)  # step 0: Eq. 6 on the SFT model's average log-probs
    assert -math.log(601) * 2 < first["logps/chosen"] < 0  # per-token averages, not sums
    assert last["loss"] < 0.5 * first["loss"] and last["rewards/margin"] > gamma and last["val_rewards/accuracy"] == 1.0
    assert "val_logratio" not in last  # no reference, no log-ratio


def test_kto_loss_hand_computed():
    pol, ref = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True), torch.tensor([-1.5, -1.5, -2.0])  # r = [0.5, -0.5, -1]
    desirable = torch.tensor([True, False, True])
    losses, rewards = dpo.kto_loss(pol, ref, desirable, torch.tensor(0.2), beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    # desirable: 1 - sigmoid(0.5 (r - 0.2)); undesirable: 2 - 2 sigmoid(0.5 (0.2 - r))   (Ethayarajh et al. 2024, Eq. 8)
    expected = [1 - sig(0.5 * 0.3), 2 - 2 * sig(0.5 * 0.7), 1 - sig(0.5 * -1.2)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.25, -0.25, -0.5]) and not rewards.requires_grad
    losses.sum().backward()  # d/dr [lambda - lambda sigmoid(+-beta (r - z0))] = -+lambda beta s (1 - s)
    s = [sig(0.15), sig(0.35), sig(-0.6)]
    assert pol.grad.tolist() == pytest.approx([-0.5 * s[0] * (1 - s[0]), 2 * 0.5 * s[1] * (1 - s[1]), -0.5 * s[2] * (1 - s[2])], abs=1e-6)
    # z0: the mean log-ratio of the mismatched pairs, clamped at 0, detached
    p_kl = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert dpo.kto_kl(p_kl, torch.tensor([-1.5, -2.1])).item() == pytest.approx(0.3)  # (0.5 + 0.1) / 2
    assert dpo.kto_kl(p_kl, torch.tensor([-1.5, -1.0])).item() == 0.0  # (0.5 - 1) / 2 < 0 -> 0
    assert not dpo.kto_kl(p_kl, torch.tensor([-1.5, -2.1])).requires_grad
    # at pi = pi_ref every loss is lambda_y / 2
    losses, _ = dpo.kto_loss(ref, ref, desirable, torch.tensor(0.0), 0.1, 1.0, 2.0)
    assert losses.tolist() == pytest.approx([0.5, 1.0, 0.5])


UNPAIRED = [{"prompt": "what colour is the fox?", "completion": "the fox is red.", "label": True},
            {"prompt": "what colour is the fox?", "completion": "the fox is stupid.", "label": False},
            {"prompt": "where does the owl live?", "completion": "the owl lives in the forest.", "label": True},
            {"prompt": "describe the cat.", "completion": "cat cat cat", "label": False},
            {"prompt": "describe the cat.", "completion": "the cat is black and kind.", "label": True}]


def write_unpaired(path, rows=UNPAIRED, blank_line=False):
    lines = [json.dumps(r) + "\n" for r in rows]
    if blank_line:
        lines.insert(1, "\n")
    path.write_text("".join(lines))
    return str(path)


def test_read_unpaired_rows_pairs_and_errors(tmp_path, tokenizer):
    rows, stats = dpo.read_unpaired(write_unpaired(tmp_path / "u.jsonl"))
    assert rows[1] == ("what colour is the fox?", "the fox is stupid.", False)
    assert stats == {"rows": 5, "pairs_split": 0, "desirable": 3, "undesirable": 2}
    # a paired file: each pair split into its chosen (desirable) and its rejected (undesirable) answer
    rows, stats = dpo.read_unpaired(write_prefs(tmp_path / "p.jsonl"))
    assert rows[:2] == [("what colour is the fox?", "the fox is red.", True), ("what colour is the fox?", "the fox is stupid.", False)]
    assert stats["pairs_split"] == 5 and stats["desirable"] == stats["undesirable"] == 5 and len(rows) == 10
    bad = [dict(UNPAIRED[0]), dict(UNPAIRED[1], label=1)]  # a number is not a label; line 3 (a blank line 2)
    with pytest.raises(M.DataError, match=r"u2.jsonl:3: label must be a JSON boolean"):
        dpo.read_unpaired(write_unpaired(tmp_path / "u2.jsonl", bad, blank_line=True))
    bad = [dict(UNPAIRED[0]), {"prompt": "p", "completion": "c"}]
    with pytest.raises(M.DataError, match=r"u3.jsonl:2: missing key\(s\) \['label'\]"):
        dpo.read_unpaired(write_unpaired(tmp_path / "u3.jsonl", bad))
    with pytest.raises(M.DataError, match=r"u4.jsonl:1: label must be"):
        dpo.read_unpaired(write_unpaired(tmp_path / "u4.jsonl", [dict(UNPAIRED[0], label="true")]))
    # each answer's mismatched row: its own prompt, another row's completion
    rows, _ = dpo.read_unpaired(write_unpaired(tmp_path / "u.jsonl"))
    ex, labels, stats = dpo.encode_unpaired(rows, tokenizer, 64, 16)
    assert labels.tolist() == [True, False, True, False, True] and stats["prompt_truncated"] == 0
    answers = {tuple(M.encode_chat(tokenizer, p, c)[1]) for p, c, _ in rows}
    for (p, c, _), ((seq, n), (kl_seq, kl_n)) in zip(rows, ex):
        assert seq[:n] == kl_seq[:kl_n] == M.encode_chat(tokenizer, p) and seq[n:] == M.encode_chat(tokenizer, p, c)[1]
        assert kl_seq[kl_n:] != seq[n:] and tuple(kl_seq[kl_n:]) in answers
    with pytest.raises(M.DataError, match="at least 2"):
        dpo.encode_unpaired(rows[:1], tokenizer, 64, 16)


def test_cli_kto_step0_z0_and_trains(tiny_ckpt, tmp_path, monkeypatch):
    data = write_unpaired(tmp_path / "u.jsonl")
    m, tok, _ = M.load_checkpoint(tiny_ckpt)
    ex, _, _ = dpo.encode_unpaired(dpo.read_unpaired(data)[0], tok, 64, 16)
    with torch.no_grad():  # log pi_0 of every mismatched row, computed here one row at a time
        kl_rows = torch.tensor([M.response_logprobs(m, torch.tensor([s]))[0, n - 1:].sum().item() for _, (s, n) in ex])
    real, seen = dpo.kto_kl, []
    monkeypatch.setattr(dpo, "kto_kl", lambda p, r: seen.append((p.clone(), r.clone())) or real(p, r))
    run(data, tiny_ckpt, tmp_path / "kto", "--loss_type", "kto", "--undesirable_weight", "1.5", "--batch_size", "5",
        "--epochs", "20", "--lr", "3e-3", "--warmup", "2", "--eval_interval", "20", "--n_samples", "0")
    rows = [json.loads(x) for x in open(tmp_path / "kto" / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    # step 0: r = 0 and z0 = 0, so v = lambda_y sigmoid(0) and the loss is the mean of lambda_y / 2: (3 * 1 + 2 * 1.5) / 10
    assert first["loss"] == pytest.approx(0.6, abs=1e-6) and first["kl"] == 0.0
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    # z0 of step 0 came from the mismatched rows, under the policy and the reference alike (both pi_0 there)
    order = dpo.batch_indices(0, 5, 5, 0)
    assert torch.allclose(seen[0][0], kl_rows[order], atol=1e-4) and torch.allclose(seen[0][1], kl_rows[order], atol=1e-4)
    assert last["loss"] < 0.65 * first["loss"] and last["rewards/chosen"] > 0 > last["rewards/rejected"]
    assert last["val_rewards/margin"] > 0 and last["kl"] >= 0 and "val_kl" in last
    with pytest.raises(M.ConfigError, match="undesirable_weight is kto's"):
        run(data, tiny_ckpt, tmp_path / "x", "--undesirable_weight", "2")


def test_best_worst_pairs_hand_computed():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.3, 2.0, -1.0])  # 3 prompts x 2 answers; the second ties
    chosen, rejected, tie = dpo.best_worst_pairs(scores, 2)
    assert chosen.tolist() == [1, 2, 4] and rejected.tolist() == [0, 2, 5] and tie.tolist() == [False, True, False]
    chosen, rejected, tie = dpo.best_worst_pairs(torch.tensor([1.0, 3.0, 2.0, 0.0, 0.0, 0.0]), 3)  # best vs worst of 3
    assert chosen.tolist() == [1, 3] and rejected.tolist() == [0, 3] and tie.tolist() == [False, True]


def write_prompts(path):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _, _ in PAIRS + [("what colour is the fox?",) * 3,
                                                                                       ("name an animal.",) * 3]))
    return str(path)


def run_online(prompts, tiny_ckpt, tiny_rm, out, *extra):
    cfg = M.parse_config(dpo.Config, ["--online", "true", "--prompts", prompts, "--reward_model", tiny_rm, "--init", tiny_ckpt,
                                      "--out_dir", str(out), "--max_len", "48", "--max_new_tokens", "8", "--log_interval", "1",
                                      "--n_samples", "0", "--online_prompts_per_step", "4", "--batch_size", "3",
                                      "--lr", "3e-3", "--warmup", "1", *extra])
    return dpo.train(cfg)


def test_cli_online_dpo_step0_fresh_reference_and_exact_resume(tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    args = ("--online_steps", "6", "--eos_trick", "false", "--ckpt_interval", "2", "--eval_interval", "3")
    policy = run_online(prompts, tiny_ckpt, tiny_rm, tmp_path / "a", *args)
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "s_per_step"} for x in open(d / "metrics.jsonl")]  # noqa: E731
    a = rows(tmp_path / "a")
    first = a[0]
    # step 0: pi = pi_ref on the fresh pairs (reference computed on the same rows): h = 0, loss log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margin"] == pytest.approx(0, abs=1e-6)
    assert first["pairs"] + first["ties"] == 4 and first["pairs"] > 0 and first["score/chosen"] > first["score/rejected"]
    # the reference stays the SFT start: later pairs have h != 0 (a reference copied from the policy each step gives log 2 forever)
    assert all(abs(r["loss"] - math.log(2)) > 1e-4 for r in a[2:]) and [r["step"] for r in a] == list(range(1, 7))
    assert "gold" not in first  # these prompts are not the built-in world's
    start, _, _ = M.load_checkpoint(tiny_ckpt)
    assert not all(torch.equal(x, y) for x, y in zip(start.state_dict().values(), policy.state_dict().values()))
    # resume: killed at step 3, restarted; the samples of step s are drawn from (seed, s)
    with killed_at_step(monkeypatch, 3):
        run_online(prompts, tiny_ckpt, tiny_rm, tmp_path / "b", *args)
    again = run_online(prompts, tiny_ckpt, tiny_rm, tmp_path / "b", *args)
    assert rows(tmp_path / "b") == a
    assert all(torch.equal(x, y) for x, y in zip(policy.state_dict().values(), again.state_dict().values()))
    # it trains: one step raises the DPO margin h of the pairs it was taken on (h = 0 before it)
    real, batches = dpo.collate, []
    monkeypatch.setattr(dpo, "collate", lambda ex: batches.append(real(ex)) or batches[-1])
    one = run_online(prompts, tiny_ckpt, tiny_rm, tmp_path / "c", "--online_steps", "1", "--eos_trick", "false")
    with torch.no_grad():
        h = [(c - r) - (rc - rr) for ids, mask in batches
             for (c, r), (rc, rr) in [(dpo.concatenated_logps(one, ids, mask), dpo.concatenated_logps(start, ids, mask))]]
    assert len(batches) == 2 and torch.cat(h).mean() > 0.05  # 4 pairs in micro-batches of 3 and 1
    # the step's loss is the mean over its pairs: its gradient norm, recomputed here from the start
    pol, n = M.load_checkpoint(tiny_ckpt)[0], sum(ids.size(0) // 2 for ids, _ in batches)
    for ids, mask in batches:
        c, r = dpo.concatenated_logps(pol, ids, mask)
        (dpo.dpo_loss(c, r, c.detach(), r.detach(), 0.1)[0].sum() / n).backward()
    norm = torch.cat([p.grad.flatten() for p in pol.parameters()]).norm().item()
    assert json.loads(open(tmp_path / "c" / "metrics.jsonl").readline())["grad_norm"] == pytest.approx(norm, rel=1e-4)
    # and the chosen row of each pair is the one the reward model scores higher
    rm, tok, _ = M.load_checkpoint(tiny_rm, kind="scalar")
    for ids, mask in batches:
        rows = [(ids[i][:mask[i].argmax()].tolist(), ids[i][mask[i].bool()][None]) for i in range(ids.size(0))]
        with torch.no_grad():
            s = torch.cat([rm.score(M.rm_rows(tok, [p], r, rm.config.block_size)) for p, r in rows])  # (2B,)
        B = ids.size(0) // 2
        assert (s[:B] > s[B:]).all()


def test_online_ties_are_skipped_and_counted(tiny_ckpt, tiny_rm, tmp_path):
    # the tiny random model almost never says EOS within 2 tokens: with the EOS trick every answer
    # scores missing_eos_penalty, every prompt ties, no pair, no update
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    policy = run_online(prompts, tiny_ckpt, tiny_rm, tmp_path / "t", "--online_steps", "2", "--max_new_tokens", "2")
    rows = [json.loads(x) for x in open(tmp_path / "t" / "metrics.jsonl")]
    assert [(r["pairs"], r["ties"], r["eos_frac"]) for r in rows] == [(0, 4, 0.0)] * 2 and "loss" not in rows[0]
    start, _, _ = M.load_checkpoint(tiny_ckpt)
    assert all(torch.equal(x, y) for x, y in zip(start.state_dict().values(), policy.state_dict().values()))


def test_option_errors_of_the_new_objectives(tiny_ckpt, tiny_rm, tmp_path):
    prefs, prompts = write_prefs(tmp_path / "prefs.jsonl"), write_prompts(tmp_path / "prompts.jsonl")
    for extra, match in ((("--simpo_gamma", "1.0"), "simpo_gamma is simpo's"),
                         (("--loss_type", "simpo", "--label_smoothing", "0.1"), "label_smoothing is cDPO's"),
                         (("--loss_type", "simpo", "--ipo_average", "true"), "SimPO always averages"),
                         (("--loss_type", "kto", "--desirable_weight", "0"), "must be > 0"),
                         (("--reward_model", tiny_rm), "reward_model is online DPO's")):
        with pytest.raises(M.ConfigError, match=match):
            run(prefs, tiny_ckpt, tmp_path / "x", *extra)
    for extra, match in ((("--loss_type", "simpo"), "offline only"), (("--data", prefs), "data is the offline run's"),
                         (("--online_samples", "1"), "online_samples 1"), (("--grad_accum", "2"), "grad_accum is the offline")):
        with pytest.raises(M.ConfigError, match=match):
            run_online(prompts, tiny_ckpt, tiny_rm, tmp_path / "y", *extra)
