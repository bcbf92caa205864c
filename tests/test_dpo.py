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
from helpers import killed_at_step

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
        dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type="kto")
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
        run(prefs, tiny_ckpt, tmp_path / "x", "--loss_type", "kto")


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
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    model = lambda seq, mask=None, logits_start=0: logits.expand(seq.size(0), seq.size(1) - logits_start, 3)  # noqa: E731
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
