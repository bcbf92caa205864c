"""Tests of sft.py: the loss mask (response + EOS only), the loss against a hand computation,
gradients only through response positions, data formats and truncation, the CLI, resume.
Run: python -m pytest -q tests/test_sft.py"""

import json

import pytest
import torch
import torch.nn.functional as F

import model as M
from helpers import killed_at_step
import sft


def test_loss_mask_covers_response_and_eos_only(tokenizer):
    ex, _ = sft.tokenize_pairs([("what colour is the fox?", "the fox is red."), ("hi", "ok")], tokenizer, 64, 4)
    ids, mask = sft.collate(ex)
    for i, (prompt, response) in enumerate([("what colour is the fox?", "the fox is red."), ("hi", "ok")]):
        target = ids[i][mask[i].bool()].tolist()
        assert target[-1] == tokenizer.eot_id
        assert tokenizer.decode(target) == " " + response
        n_prompt = len(M.encode_chat(tokenizer, prompt))
        assert not mask[i, :n_prompt].any() and (ids[i, n_prompt:][~mask[i, n_prompt:].bool()] == M.PAD_ID).all()


def test_sft_loss_equals_hand_computed_cross_entropy(tokenizer, tiny_ckpt):
    m, _, _ = M.load_checkpoint(tiny_ckpt)
    ex, _ = sft.tokenize_pairs([("describe the cat.", "the cat is black."), ("tell me about the owl.", "the owl lives in the forest.")], tokenizer, 64, 4)
    ids, mask = sft.collate(ex)
    nll, n = sft.sft_loss_terms(m, ids, mask)
    logits = m(ids)  # (B, T, V)
    ref, count = 0.0, 0
    for b in range(ids.size(0)):
        for t in range(1, ids.size(1)):
            if mask[b, t]:
                ref += F.cross_entropy(logits[b, t - 1], ids[b, t]).item()
                count += 1
    assert n.item() == count and abs(nll.item() - ref) < 1e-3


def test_gradient_reaches_response_positions_only(tokenizer):
    ex, _ = sft.tokenize_pairs([("describe the cat.", "the cat is black.")], tokenizer, 64, 4)
    ids, mask = sft.collate(ex + [(ex[0][0][:-3], ex[0][1])])  # a shorter second row: padding
    logits = torch.randn(ids.size(0), ids.size(1) - 1, tokenizer.n_vocab, requires_grad=True)  # predicts ids[:, 1:]
    lp = M.logprobs_from_logits(logits, ids[:, 1:])
    (-(lp * mask[:, 1:]).sum()).backward()
    touched = logits.grad.abs().sum(-1) > 0  # (B, T-1)
    assert torch.equal(touched, mask[:, 1:].bool())


def test_alpaca_format_and_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"instruction": "add", "input": "1 and 2", "output": "3"}) + "\n"
                 + json.dumps({"instruction": "say hi", "input": "", "output": "hi"}) + "\n")
    assert sft.read_pairs(str(p)) == [("add\n\n1 and 2", "3"), ("say hi", "hi")]
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a", "response": " "}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl: row 2: empty"):
        sft.read_pairs(str(p))
    p.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: expected keys prompt\+response"):
        sft.read_pairs(str(p))


def test_truncation_rule_is_counted(tokenizer):
    long_prompt = "tell me about the fox. " * 20
    long_answer = "the fox is red. " * 30
    ex, stats = sft.tokenize_pairs([(long_prompt, "the fox is red."), ("hi", long_answer)], tokenizer, 48, 8)
    n_hi = len(M.encode_chat(tokenizer, "hi"))
    assert n_hi > 8  # so the second prompt is cut to min_prompt before its response is cut
    assert stats == {"examples": 2, "prompt_truncated": 2, "response_truncated": 1}
    (ids0, n0), (ids1, n1) = ex
    assert len(ids0) == 48 and ids0[-1] == tokenizer.eot_id  # the prompt lost its start, the answer is whole
    assert ids0[:n0] == M.encode_chat(tokenizer, long_prompt)[-n0:]
    assert n1 == 8 and len(ids1) == 48 and ids1[-1] != tokenizer.eot_id


def test_batch_indices_cover_each_example_once_per_epoch():
    seen = sum((sft.batch_indices(s, 10, 4, seed=0) for s in range(3)), [])
    assert sorted(seen) == list(range(10))
    assert sft.batch_indices(3, 10, 4, 0) != sft.batch_indices(0, 10, 4, 0)  # next epoch, new order


def run(world, tiny_ckpt, out, *extra):
    cfg = M.parse_config(sft.Config, ["--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"),
                                      "--init", tiny_ckpt, "--out_dir", str(out), "--max_len", "64", "--batch_size", "16",
                                      "--log_interval", "1", "--eval_interval", "100", "--n_samples", "2",
                                      "--max_new_tokens", "8", *extra])
    return sft.train(cfg)


def test_cli_runs_and_resumes_exactly(world, tiny_ckpt, tmp_path, monkeypatch):
    run(world, tiny_ckpt, tmp_path / "a", "--epochs", "0.25", "--ckpt_interval", "2")
    with killed_at_step(monkeypatch, 3):
        run(world, tiny_ckpt, tmp_path / "b", "--epochs", "0.25", "--ckpt_interval", "2")
    run(world, tiny_ckpt, tmp_path / "b", "--epochs", "0.25", "--ckpt_interval", "2")
    a, _, _ = M.load_checkpoint(str(tmp_path / "a"))
    b, _, _ = M.load_checkpoint(str(tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "ex_s"} for x in open(d / "metrics.jsonl")]  # noqa: E731
    assert rows(tmp_path / "a") == rows(tmp_path / "b") and rows(tmp_path / "a")[-1]["step"] == 7
    assert "val_loss" in rows(tmp_path / "a")[-1]


def test_warmup_longer_than_the_run_is_flagged(world, tiny_ckpt, tmp_path, capsys):
    run(world, tiny_ckpt, tmp_path / "a", "--epochs", "0.25", "--warmup", "20", "--n_samples", "0")  # 7 steps
    assert ("warning: warmup 20 steps >= the run's 7: the learning rate rises all run, to 0.00035 at the last step "
            "(peak lr 0.001), and never decays; lower --warmup") in capsys.readouterr().out
    run(world, tiny_ckpt, tmp_path / "b", "--epochs", "0.25", "--warmup", "2", "--n_samples", "0")
    assert "warning: warmup" not in capsys.readouterr().out
