"""Tests of the over-optimisation curves: ppo.py's and grpo.py's evaluation snapshots (they leave a run
bit for bit as it was, and a resumed run neither loses nor duplicates one).
Run: python -m pytest -q tests/test_curves.py"""

import json
import os

import pytest
import torch

import grpo
import model as M
import ppo
from helpers import killed_at_step

STAGES = {"ppo": (ppo, ["--grad_accum", "2", "--max_new_tokens", "12", "--value_lr", "1e-3"]),
          "grpo": (grpo, ["--group_size", "4", "--eos_trick", "false", "--max_new_tokens", "10"])}
TIMINGS = ("s_per_it", "time_gen", "time_fwd", "time_update", "time_iter")


def run(stage, world, tiny_ckpt, tiny_rm, out, *extra):
    mod, own = STAGES[stage]
    return mod.train(M.parse_config(mod.Config, [
        "--policy", tiny_ckpt, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
        "--out_dir", str(out), "--rollout_batch_size", "8", "--num_minibatches", "2", "--update_epochs", "2",
        "--lr", "1e-3", "--sample_interval", "100", "--total_episodes", "32", "--device", "cpu", *own, *extra]))


def rows(d):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in open(d / "metrics.jsonl")]


def weights(path):
    return list(M.load_checkpoint(str(path))[0].state_dict().values())


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- snapshots along a run


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_snapshots_leave_the_run_bit_for_bit_unchanged(stage, world, tiny_ckpt, tiny_rm, tmp_path):
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "off", "--total_episodes", "24")  # the default: 0, no snapshots
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "on", "--total_episodes", "24", "--eval_snapshot_interval", "2")
    assert not os.path.exists(tmp_path / "off" / "snapshots")
    assert same(weights(tmp_path / "off"), weights(tmp_path / "on")) and rows(tmp_path / "off") == rows(tmp_path / "on")
    snaps = M.list_snapshots(str(tmp_path / "on"))
    assert [it for it, _ in snaps] == [2, 3]  # every 2 iterations and at the end (3 iterations of 8)
    assert same(weights(snaps[-1][1]), weights(tmp_path / "on"))  # the last one is the final policy
    assert not same(weights(snaps[0][1]), weights(snaps[1][1]))
    info = M.checkpoint_info(snaps[0][1])
    assert info["role"] == "policy" and info["meta"] == {"iteration": 2} and info["train"]["eval_snapshot_interval"] == 2
    assert sorted(os.listdir(snaps[0][1])) == ["config.json", "model.pt", "tokenizer.tiktoken"]  # no optimizer state
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "on", "--total_episodes", "8", "--overwrite", "true")
    assert not os.path.exists(tmp_path / "on" / "snapshots")  # starting afresh dropped them


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_resumed_run_neither_loses_nor_duplicates_snapshots(stage, world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    with killed_at_step(monkeypatch, 3):  # after iteration 3's snapshot, before its checkpoint (every 2)
        run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "b", "--eval_snapshot_interval", "1", "--ckpt_interval", "2")
    assert [it for it, _ in M.list_snapshots(str(tmp_path / "b"))] == [1, 2, 3]
    (tmp_path / "b" / "snapshots" / "it4.tmp").mkdir()  # a half-written one of a kill mid-save
    # resumed from iteration 2 with snapshots every 2 (the interval may change on resume): iteration 3's, from the
    # iterations the kill lost, is dropped, as the resumed run does not write it again; 1 and 2 stay
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "b", "--eval_snapshot_interval", "2", "--ckpt_interval", "2")
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "c", "--eval_snapshot_interval", "1")
    b, c = dict(M.list_snapshots(str(tmp_path / "b"))), dict(M.list_snapshots(str(tmp_path / "c")))
    assert sorted(b) == [1, 2, 4] and sorted(c) == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "b" / "snapshots")) == ["it1", "it2", "it4"]  # nothing else left
    assert all(same(weights(b[it]), weights(c[it])) for it in b)  # each one the uninterrupted run's, bit for bit
    # a run killed before its first checkpoint starts afresh: its snapshots go with it
    with killed_at_step(monkeypatch, 3):
        run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "d", "--eval_snapshot_interval", "1", "--ckpt_interval", "8")
    run(stage, world, tiny_ckpt, tiny_rm, tmp_path / "d", "--eval_snapshot_interval", "2", "--ckpt_interval", "8")
    assert [it for it, _ in M.list_snapshots(str(tmp_path / "d"))] == [2, 4]


def test_negative_snapshot_interval_is_refused():
    for mod in (ppo, grpo):
        with pytest.raises(M.ConfigError, match="eval_snapshot_interval -1 must be >= 0"):
            mod.check_config(M.parse_config(mod.Config, ["--eval_snapshot_interval", "-1"]), 1)
