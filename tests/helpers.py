"""Shared test helpers (plain functions, imported as `from helpers import ...`): a stage's CLI launched
under torchrun and compared with one process, the tiny GPT made to end its answers early, a way to
kill a training loop at a given step, a stand-in for torch.compile that counts forwards run outside a
compiled module, a spy on the RL stages' entropy gradient, a stand-in model of one next-token
distribution, and an answer spelled one byte a token (a
non-canonical encoding of its text). The fixtures are in conftest.py."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, args, out, nproc):
    """Run a stage's CLI (under torchrun with nproc > 1; one thread a process); its metrics.jsonl rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, script, *args, "--out_dir", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in open(out / "metrics.jsonl")]


def assert_same_run(tmp_path, script, args, loss_keys, two_args=()):
    """One process, then 2 under torchrun (with two_args added, e.g. --fsdp true), on the same global
    batch: the same logged loss_keys (rel 1e-4, abs 1e-5) and the same final weights (atol 1e-4)."""
    one = launch(script, args, tmp_path / "one", 1)
    two = launch(script, [*args, *two_args], tmp_path / "two", 2)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for k in [k for k in loss_keys if k in a or k in b]:  # a key logged on some rows only (val_loss): on the same rows
            assert a.get(k) == pytest.approx(b.get(k), rel=1e-4, abs=1e-5), (k, a, b)
    m1, _, _ = M.load_checkpoint(str(tmp_path / "one"))
    m2, _, _ = M.load_checkpoint(str(tmp_path / "two"))
    for (k, x), y in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-4), k
    return one, two


def eos_prone(tiny_ckpt, path):
    """The tiny GPT with EOS's logit raised by about 4.5 (ln_f bias along EOS's row): answers end
    after about 5 tokens, at varied lengths, so the shards stop at different widths."""
    model, tokenizer, _ = M.load_checkpoint(tiny_ckpt)
    u = torch.nn.functional.normalize(torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0)), dim=0)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eot_id] = u  # tied: also EOS's embedding, only read after an answer ends
        model.transformer.ln_f.bias.copy_(4.5 * u)
    M.save_checkpoint(str(path), model, tokenizer, {})
    return str(path)



@contextlib.contextmanager
def killed_at_step(monkeypatch, n):
    """Inside: the training loop dies at the start of step n (after the checkpoints before it),
    through model.lr_at, which every stage calls once a step."""
    real = M.lr_at

    def dying(step, *a, **k):
        if step == n:
            raise KeyboardInterrupt
        return real(step, *a, **k)

    monkeypatch.setattr(M, "lr_at", dying)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(M, "lr_at", real)


def count_compiled_forwards(monkeypatch):
    """torch.compile replaced by a wrapper module; every GPT forward is counted as run inside a
    compiled module or outside one. Returns the live counts {"inside": n, "outside": n}."""
    depth, calls = {"n": 0}, {"outside": 0, "inside": 0}

    class Compiled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

        def forward(self, *a, **k):
            depth["n"] += 1
            try:
                return self._orig_mod(*a, **k)
            finally:
                depth["n"] -= 1

    real_forward = M.GPT.forward

    def counted(self, *a, **k):
        calls["inside" if depth["n"] else "outside"] += 1
        return real_forward(self, *a, **k)

    monkeypatch.setattr(torch, "compile", lambda m, **k: Compiled(m))
    monkeypatch.setattr(M.GPT, "forward", counted)
    return calls


def spy_entropy_graphs(monkeypatch):
    """model.LinearLogprobs.backward wrapped (the fused log-probs and entropy): the returned list gets,
    per backward, whether a gradient of the entropy reached it (a loss used the entropy)."""
    real, seen = M.LinearLogprobs.backward, []

    def spy(ctx, g_logp, g_ent):
        seen.append(g_ent is not None)
        return real(ctx, g_logp, g_ent)

    monkeypatch.setattr(M.LinearLogprobs, "backward", staticmethod(spy))
    return seen


def same_distribution_model(probs):
    """A stand-in for a GPT whose next-token distribution is `probs` at every position: hidden state 1,
    LM head the log-probs, through model.linear_logprobs as GPT.forward(logprobs=True) computes them."""
    head = torch.log(torch.tensor(probs))[:, None]  # (V, C = 1)

    def model(seq, mask=None, logits_start=0, targets=None, logprobs=False, temperature=1.0):
        return M.linear_logprobs(torch.ones(seq.size(0), targets.size(1), 1), head, targets, temperature)

    return model


def byte_spelled(tokenizer, text):
    """(spelled, canonical): the ids of text one byte a token, as a sampler may emit them, and the
    tokenizer's own encoding, each followed by EOS."""
    spelled = [tokenizer.ranks[bytes([b])] for b in text.encode()] + [tokenizer.eot_id]
    return spelled, tokenizer.encode(text) + [tokenizer.eot_id]


def other_reward_model(path, out, seed=0, swap_tokens=False):
    """A second reward model beside the one at path, saved at out (returned): the same trunk with a head
    re-drawn from seed (another member of an ensemble), or with swap_tokens the same weights under a
    tokenizer whose two last merges trade ids (a member that reads other ids: refused)."""
    rm, tokenizer, _ = M.load_checkpoint(path)
    if swap_tokens:
        (a, ra), (b, rb) = sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])[-2:]
        tokenizer = M.Tokenizer({**tokenizer.ranks, a: rb, b: ra}, name=tokenizer.name)
    else:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=g))
    M.save_checkpoint(str(out), rm, tokenizer, {})
    return str(out)


PREFERENCE_ROWS = [{"prompt": "what colour is the fox?", "responses": ["the fox is red.", "the fox is blue.", "fox fox"]},
                   {"prompt": "where does the owl live?", "chosen": "the owl lives in the forest.", "rejected": "i do not know."}]


def preference_args(path, copies, init, epochs):
    """The DDP and FSDP tests' dpo.py and reward.py run: a ranking and a pair, `copies` times, written to
    path and used as train and validation data, batches of 3 in 2 micro-batches, at lr 1e-3."""
    path.write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE_ROWS * copies))
    return ["--data", str(path), "--val_data", str(path), "--init", init, "--max_len", "64", "--batch_size", "3",
            "--grad_accum", "2", "--epochs", str(epochs), "--lr", "1e-3", "--log_interval", "1", "--eval_interval", "100",
            "--device", "cpu"]


PPO_KEYS = ["score", "kl", "kl_coef", "resp_len", "eos_frac", "explained_var", "adv_mean", "adv_std", "return_mean",
            "value_mean", "pg_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "vf_clipfrac", "grad_norm", "gold"]


def ppo_args(world, policy, rm):
    """The DDP and FSDP tests' ppo.py run: 12 answers in 2 shards of 6, minibatches of 6, micro-batches of 3,
    so every micro-batch's rows fall unevenly on 2 processes (sometimes all on one); adaptive KL, whitening."""
    return ["--policy", policy, "--reward_model", rm, "--prompts", str(world / "prompts_train.jsonl"),
            "--rollout_batch_size", "12", "--rollout_shards", "2", "--num_minibatches", "2", "--grad_accum", "2",
            "--update_epochs", "2", "--total_episodes", "36", "--max_new_tokens", "12", "--lr", "1e-3", "--value_lr", "1e-3",
            "--adaptive_kl", "true", "--whiten_rewards", "true", "--sample_interval", "100", "--device", "cpu"]
