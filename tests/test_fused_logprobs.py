"""Tests of model.linear_logprobs, the fused LM head, per-token log-probs and entropy of the RL stages
and DPO, against the logits path (logprobs_from_logits and entropy_from_logits on h W^T): values and
every gradient with chunks of one row, several rows and the whole batch, PAD targets, temperature,
an entropy no loss uses, a real GPT with left-padded prompts and right padding (every parameter's
gradient), CPU bf16 autocast, and that no stage's training step allocates a (rows, R, V) tensor.
Run: python -m pytest -q tests/test_fused_logprobs.py"""

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import grpo
import model as M
import ppo
from test_dpo import run as dpo_run, write_prefs
from test_grpo import args as grpo_args


def logits_path(h, W, targets, T):
    logits = h @ W.t()  # (N, V)
    return M.logprobs_from_logits(logits, targets, T), M.entropy_from_logits(logits, T)


def chunk_rows(monkeypatch, rows, V):
    monkeypatch.setattr(M, "CE_CHUNK_BYTES", 4 * V * rows)  # LinearLogprobs then takes `rows` rows at a time


@pytest.mark.parametrize("rows", [1, 3, 1000])
def test_values_and_gradients_equal_the_logits_path(monkeypatch, rows):
    g = torch.Generator().manual_seed(0)
    N, C, V, T = 11, 8, 37, 0.7
    h0, W0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)
    targets = torch.randint(V, (N,), generator=g)
    targets[[2, 9]] = M.PAD_ID  # padding: log-prob 0, no gradient through it
    up_lp, up_H = torch.randn(N, generator=g), torch.randn(N, generator=g)  # arbitrary upstream gradients
    chunk_rows(monkeypatch, rows, V)
    out = {}
    for name, fn in (("fused", M.linear_logprobs), ("logits", logits_path)):
        h, W = h0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
        lp, H = fn(h, W, targets, T)
        ((lp * up_lp).sum() + (H * up_H).sum()).backward()
        out[name] = (lp, H, h.grad, W.grad)
    for a, b in zip(out["fused"], out["logits"]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert out["fused"][0][[2, 9]].eq(0).all()


def test_an_unused_entropy_gets_no_gradient_work_and_changes_nothing(monkeypatch):
    g = torch.Generator().manual_seed(1)
    h0, W0, targets = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g), torch.randint(9, (6,), generator=g)
    seen, real = [], M.LinearLogprobs.backward
    monkeypatch.setattr(M.LinearLogprobs, "backward", staticmethod(lambda ctx, a, b: seen.append(b) or real(ctx, a, b)))
    h, W = h0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
    lp, _ = M.linear_logprobs(h, W, targets)
    lp.sum().backward()
    assert seen == [None]
    h2 = h0.clone().requires_grad_(True)
    M.logprobs_from_logits(h2 @ W0.t(), targets).sum().backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)


def test_gpt_response_logprobs_with_left_and_right_padding_and_every_parameter_gradient(tiny_ckpt, monkeypatch):
    model = M.load_checkpoint(tiny_ckpt)[0].eval()
    chunk_rows(monkeypatch, 2, model.config.vocab_size)
    P = 4
    seq = torch.tensor([[M.PAD_ID, M.PAD_ID, 5, 6, 7, 8, 9, M.PAD_ID], [3, 4, 5, 6, 9, 8, 7, 6], [M.PAD_ID, 2, 3, 4, 5, M.PAD_ID, M.PAD_ID, M.PAD_ID]])
    mask = (seq != M.PAD_ID).long()
    up = torch.randn(3, seq.size(1) - P, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name in ("fused", "logits"):
        model.zero_grad()
        if name == "fused":
            lp, H = M.response_logprobs(model, seq, mask, P, 0.9, entropy=True)
        else:
            logits = M.response_logits(model, seq, mask, P)  # (3, R, V)
            lp, H = M.logprobs_from_logits(logits, seq[:, P:], 0.9), M.entropy_from_logits(logits, 0.9)
        ((lp * up).sum() + (H * mask[:, P:] * up).sum()).backward()
        grads[name] = (lp.detach(), (H * mask[:, P:]).detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    (lp_f, H_f, g_f), (lp_l, H_l, g_l) = grads["fused"], grads["logits"]
    assert torch.allclose(lp_f, lp_l, atol=1e-5) and torch.allclose(H_f, H_l, atol=1e-5)
    assert lp_f[0, -1] == 0 and lp_f[2].tolist()[1:] == [0.0] * 3  # right padding
    for k in g_l:
        assert torch.allclose(g_f[k], g_l[k], atol=1e-5), k


def test_bf16_autocast_on_cpu_matches_the_logits_path_under_the_same_autocast(tiny_ckpt):
    model = M.load_checkpoint(tiny_ckpt)[0].eval()
    seq = torch.randint(3, 50, (4, 12), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, H = M.response_logprobs(model, seq, None, 5, 1.0, entropy=True)
        logits = M.response_logits(model, seq, None, 5)
    assert lp.dtype == H.dtype == torch.float32
    assert torch.allclose(lp, M.logprobs_from_logits(logits, seq[:, 5:]), atol=2e-2)
    assert torch.allclose(H, M.entropy_from_logits(logits, 1.0), atol=2e-2)


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor of rows x vocabulary, over every op run inside (the LM head's
    weight and its transpose, (V, C) and (C, V), are not rows of logits and are left out)."""

    def __init__(self, vocab, n_embd):
        super().__init__()
        self.vocab, self.n_embd, self.largest = vocab, n_embd, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.size(-1) == self.vocab and t.numel() != self.vocab * self.n_embd:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_stage_allocates_response_logits(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    # chunks of 2 rows: a fused step holds (2, V) at a time and sampling (8 rows, V), while a logits
    # path would hold at least (4 answers x 10 tokens, V)
    config = M.load_checkpoint(tiny_ckpt)[0].config
    V = config.vocab_size
    chunk_rows(monkeypatch, 2, V)
    runs = {
        "grpo": lambda out: grpo.train(M.parse_config(grpo.Config, grpo_args(world, tiny_ckpt, tiny_rm, out, "--total_episodes", "8",
                                                                              "--kl_coef", "0.1", "--ent_coef", "0.01"))),
        "ppo": lambda out: ppo.train(M.parse_config(ppo.Config, [
            "--policy", tiny_ckpt, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
            "--out_dir", str(out), "--total_episodes", "8", "--rollout_batch_size", "8", "--num_minibatches", "2",
            "--max_new_tokens", "10", "--device", "cpu", "--ent_coef", "0.01", "--eos_trick", "false"])),
        "dpo": lambda out: dpo_run(write_prefs(tmp_path / "prefs.jsonl"), tiny_ckpt, out, "--epochs", "1", "--n_samples", "0"),
    }
    for name, train in runs.items():
        with LargestVocabTensor(V, config.n_embd) as spy:
            train(tmp_path / name)
        assert 0 < spy.largest <= 8 * V, (name, spy.largest // V)
