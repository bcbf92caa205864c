"""DDP with torchrun: 2 CPU processes (gloo) on the same global batch give the same losses and
the same weights as one process (up to the order of float sums)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, args, out, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, script, *args, "--out_dir", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in open(out / "metrics.jsonl")]


def assert_same_run(tmp_path, script, args, loss_keys):
    one = launch(script, args, tmp_path / "one", 1)
    two = launch(script, args, tmp_path / "two", 2)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for k in loss_keys:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a, b)
    m1, _, _ = M.load_checkpoint(str(tmp_path / "one"))
    m2, _, _ = M.load_checkpoint(str(tmp_path / "two"))
    for (k, x), y in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-4), k


def test_pretrain_ddp_equals_one_process(world, tmp_path):
    args = ["--data", str(world / "pretrain.txt"), "--tokenizer", str(world / "tokenizer.tiktoken"), "--n_layer", "1",
            "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4", "--grad_accum", "2",
            "--max_steps", "3", "--log_interval", "1", "--eval_interval", "3", "--eval_iters", "1", "--device", "cpu"]
    assert_same_run(tmp_path, "pretrain.py", args, ["loss", "grad_norm"])


def test_sft_ddp_equals_one_process(world, tiny_ckpt, tmp_path):
    args = ["--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"), "--init", tiny_ckpt,
            "--max_len", "48", "--batch_size", "5", "--grad_accum", "2", "--epochs", "0.06", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "1", "--max_new_tokens", "4", "--device", "cpu"]
    assert_same_run(tmp_path, "sft.py", args, ["loss", "grad_norm"])


def test_dpo_ddp_equals_one_process(tmp_path, tiny_ckpt):
    rows = [{"prompt": "what colour is the fox?", "responses": ["the fox is red.", "the fox is blue.", "fox fox"]},
            {"prompt": "where does the owl live?", "chosen": "the owl lives in the forest.", "rejected": "i do not know."}] * 3
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", str(tmp_path / "p.jsonl"), "--val_data", str(tmp_path / "p.jsonl"), "--init", tiny_ckpt,
            "--max_len", "64", "--batch_size", "3", "--grad_accum", "2", "--epochs", "1", "--lr", "1e-3", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "0", "--device", "cpu"]
    assert_same_run(tmp_path, "dpo.py", args, ["loss", "rewards/margin", "rewards/accuracy", "grad_norm"])


def test_reward_ddp_equals_one_process(tmp_path, tiny_ckpt):
    rows = [{"prompt": "what colour is the fox?", "responses": ["the fox is red.", "the fox is blue.", "fox fox"]},
            {"prompt": "where does the owl live?", "chosen": "the owl lives in the forest.", "rejected": "i do not know."}] * 4
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", str(tmp_path / "r.jsonl"), "--val_data", str(tmp_path / "r.jsonl"), "--init", tiny_ckpt,
            "--max_len", "64", "--batch_size", "3", "--grad_accum", "2", "--epochs", "2", "--lr", "1e-3",
            "--log_interval", "1", "--eval_interval", "100", "--device", "cpu"]
    assert_same_run(tmp_path, "reward.py", args, ["loss", "acc", "grad_norm"])
