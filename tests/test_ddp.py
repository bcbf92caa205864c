"""DDP with torchrun: 2 CPU processes (gloo) on the same global batch give the same losses and
the same weights as one process (up to the order of float sums). PPO: 2 processes, each sampling
its own shard, equal one process sampling the 2 shards in turn (--rollout_shards 2).
GRPO's dynamic sampling: 2 processes pick the rows one process with 2 shards picks. Every torchrun
run here is marked slow, to keep the default suite within its 3 minutes (each launch costs seconds
of imports; the default suite keeps GRPO's in tests/test_grpo.py and SFT's under FSDP in
tests/test_fsdp.py): run `python -m pytest -m slow tests/test_ddp.py` after touching a stage's
data-parallel code.
Run: python -m pytest -q tests/test_ddp.py"""

import json

import pytest
import torch

import model as M
import ppo
from helpers import PPO_KEYS, assert_same_run, eos_prone, ppo_args, preference_args


@pytest.mark.slow
def test_pretrain_ddp_equals_one_process(world, tmp_path):
    args = ["--data", str(world / "pretrain.txt"), "--tokenizer", str(world / "tokenizer.tiktoken"), "--n_layer", "1",
            "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4", "--grad_accum", "2",
            "--max_steps", "3", "--log_interval", "1", "--eval_interval", "3", "--eval_iters", "1", "--device", "cpu"]
    assert_same_run(tmp_path, "pretrain.py", args, ["loss", "grad_norm"])


@pytest.mark.slow
def test_sft_ddp_equals_one_process(world, tiny_ckpt, tmp_path):
    args = ["--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"), "--init", tiny_ckpt,
            "--max_len", "48", "--batch_size", "5", "--grad_accum", "2", "--epochs", "0.06", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "1", "--max_new_tokens", "4", "--device", "cpu"]
    assert_same_run(tmp_path, "sft.py", args, ["loss", "grad_norm"])


@pytest.mark.slow
def test_dpo_ddp_equals_one_process(tmp_path, tiny_ckpt):
    args = [*preference_args(tmp_path / "p.jsonl", 3, tiny_ckpt, 1), "--n_samples", "0"]
    assert_same_run(tmp_path, "dpo.py", args, ["loss", "rewards/margin", "rewards/accuracy", "grad_norm"])


@pytest.mark.slow
def test_reward_ddp_equals_one_process(tmp_path, tiny_ckpt):
    args = preference_args(tmp_path / "r.jsonl", 4, tiny_ckpt, 2)
    assert_same_run(tmp_path, "reward.py", args, ["loss", "acc", "grad_norm"])


@pytest.mark.slow
def test_ppo_ddp_equals_one_process(world, tiny_ckpt, tiny_rm, tmp_path):
    # 12 answers in 2 shards of 6, minibatches of 6, micro-batches of 3: every micro-batch's rows
    # fall unevenly on the 2 processes (sometimes all on one, which the other skips)
    policy = eos_prone(tiny_ckpt, tmp_path / "policy")
    assert_same_run(tmp_path, "ppo.py", ppo_args(world, policy, tiny_rm), PPO_KEYS)
    rows = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert all(r["eos_frac"] > 0 for r in rows) and any(r["eos_frac"] < 1 for r in rows)  # some answers hit the cap


def whiten_worker(rank, init, x, mask, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    rows = slice(3 * rank, 3 * rank + 3)  # this process's rows of the batch
    torch.save({"whiten": M.masked_whiten(x[rows], mask[rows], world=2),
                "whiten_no_shift": M.masked_whiten(x[rows], mask[rows], shift_mean=False, world=2),
                "ev": ppo.explained_variance(x[rows] * 0.5, x[rows], mask[rows], world=2)}, out / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_distributed_whiten_equals_whiten_of_all_rows(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    mask = (torch.arange(5)[None] < torch.tensor([5, 1, 3, 0, 2, 4])[:, None]).float()  # uneven lengths, an empty row
    torch.multiprocessing.spawn(whiten_worker, (f"file://{tmp_path / 'init'}", x, mask, tmp_path), nprocs=2)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for key, expected in (("whiten", M.masked_whiten(x, mask)), ("whiten_no_shift", M.masked_whiten(x, mask, shift_mean=False))):
        assert torch.allclose(torch.cat([p[key] for p in parts]), expected, atol=1e-5), key
    ev = ppo.explained_variance(x * 0.5, x, mask)
    assert parts[0]["ev"] == pytest.approx(ev, rel=1e-5) and parts[1]["ev"] == pytest.approx(ev, rel=1e-5)


@pytest.mark.slow
def test_grpo_dynamic_sampling_ddp_equals_one_process(world, tiny_ckpt, tmp_path):
    # DAPO's dynamic sampling is per shard: 2 processes pick the same rows as one process sampling
    # its 2 shards in turn. The checker never says right, so the score is 0 for an answer that ends
    # and -1 for one cut at the cap (the EOS penalty): pairs of answers are equal or not by chance,
    # and the shards take different numbers of rounds
    policy = eos_prone(tiny_ckpt, tmp_path / "policy")
    args = ["--policy", policy, "--reward", "verifiable", "--prompts", str(world / "prompts_train.jsonl"),
            "--kl_coef", "0", "--missing_eos_penalty", "-1", "--advantage", "dr_grpo", "--group_size", "2",
            "--rollout_batch_size", "8", "--rollout_shards", "2", "--num_minibatches", "2", "--update_epochs", "1",
            "--total_episodes", "24", "--max_new_tokens", "6", "--lr", "1e-3", "--log_interval", "1",
            "--dynamic_sampling", "true", "--max_sample_rounds", "3", "--sample_interval", "100", "--device", "cpu"]
    assert_same_run(tmp_path, "grpo.py", args, ["score", "dyn_rounds", "dyn_filled", "equal_groups", "resp_len",
                                                "pg_loss", "approx_kl", "grad_norm"])
    rows = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert any(r["dyn_rounds"] > 1 for r in rows)  # the re-sampling happened
    assert len({r["dyn_rounds"] for r in rows}) > 1 or any(r["dyn_rounds"] % 1 for r in rows)  # shards differed
