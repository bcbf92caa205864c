"""Exact resume: a real SIGKILL at a random moment, then the same command again, ends with the same
weights and the same logged metrics as an uninterrupted run (CPU, same seed). And reward.py's
resume, like the sft/pretrain/ppo/dpo tests in their own files.
Run: python -m pytest -q tests/test_resume.py"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
from helpers import killed_at_step
import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def same_weights(a, b):
    ma, _, _ = M.load_checkpoint(str(a))
    mb, _, _ = M.load_checkpoint(str(b))
    return all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


def metrics(d, drop=("ex_s", "groups_s", "pairs_s", "tok_s", "s_per_it")):
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in open(d / "metrics.jsonl")]


@pytest.mark.slow  # a real kill mid-run and two runs; test_runs.py's kills of every stage stay in the default suite
def test_sigkill_mid_run_then_resume_equals_uninterrupted(world, tiny_ckpt, tmp_path):
    args = [sys.executable, "sft.py", "--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"),
            "--init", tiny_ckpt, "--max_len", "64", "--batch_size", "8", "--epochs", "2", "--ckpt_interval", "3",
            "--log_interval", "1", "--eval_interval", "100", "--n_samples", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out_dir", str(tmp_path / "a")], cwd=ROOT, env=env, check=True, capture_output=True)
    b = tmp_path / "b"
    p = subprocess.Popen(args + ["--out_dir", str(b)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (b / "ckpt" / "state.pt").exists() and time.time() < deadline:  # wait for the first checkpoint
        time.sleep(0.05)
    time.sleep(0.3)  # then kill at whatever it is doing: a step, a log line, or a checkpoint write
    p.send_signal(signal.SIGKILL)
    p.wait()
    state = M.load_train_state(str(b / "ckpt"))
    assert state is not None and state["step"] < 100, "the kill came after the run had finished"
    subprocess.run(args + ["--out_dir", str(b)], cwd=ROOT, env=env, check=True, capture_output=True)
    assert same_weights(tmp_path / "a", b)
    assert metrics(tmp_path / "a") == metrics(b)


def test_reward_resume_after_kill_equals_uninterrupted_run(tiny_ckpt, tmp_path, monkeypatch):
    rows = [{"prompt": "what colour is the fox?", "responses": ["the fox is red.", "the fox is blue.", "fox fox"]},
            {"prompt": "where does the owl live?", "chosen": "the owl lives in the forest.", "rejected": "i do not know."}] * 4
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out):
        cfg = M.parse_config(reward.Config, ["--data", str(tmp_path / "r.jsonl"), "--val_data", str(tmp_path / "r.jsonl"),
                                             "--init", tiny_ckpt, "--out_dir", str(out), "--max_len", "64", "--epochs", "3",
                                             "--batch_size", "2", "--grad_accum", "2", "--ckpt_interval", "2",
                                             "--log_interval", "1", "--eval_interval", "3"])
        return reward.train(cfg)

    run(tmp_path / "a")
    with killed_at_step(monkeypatch, 3):
        run(tmp_path / "b")
    run(tmp_path / "b")
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert M.load_checkpoint(str(tmp_path / "b"))[0].reward_gain.item() != 1.0  # normalised at the end, once


class RunsCode:
    """An object whose unpickling calls a function: what a crafted state.pt would hold."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_crafted_state_pickle_is_refused(tiny_ckpt, tokenizer, tmp_path):
    d = str(tmp_path / "ckpt")
    m, _, _ = M.load_checkpoint(tiny_ckpt)
    M.save_checkpoint(d, m, tokenizer, {}, state={"step": 1, "rng": M.rng_state(), "payload": RunsCode()})
    with pytest.raises(ValueError, match=r"state\.pt: refused to load.*could run code.*GLOBAL .*system"):
        M.load_train_state(d)
    # what the stages save (tensors, numbers, optimizer and RNG states) loads
    opt = torch.optim.AdamW(m.parameters())
    m(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    M.save_checkpoint(d, m, tokenizer, {}, state={"step": 1, "kl_coef": 0.1, "optimizer": opt.state_dict(), "rng": M.rng_state()})
    state = M.load_train_state(d)
    assert state["step"] == 1 and torch.equal(state["rng"]["torch"], torch.get_rng_state())
