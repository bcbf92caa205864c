"""FSDP2 with torchrun (--fsdp true): 2 CPU processes (gloo), each holding half of every model and of
its AdamW state, give the losses, gradient norms and final weights of one unsharded process on the
same global batch, within the DDP tests' tolerances (tests/test_ddp.py); sampling gathers the
weights (model.gathered); checkpoints are whole and resume exactly; --fsdp true without torchrun
or with what it cannot run is a ConfigError naming the key. Each torchrun launch costs seconds: the
SFT run and the in-process checks are in the default suite, the other stages behind slow
(`python -m pytest -m slow tests/test_fsdp.py` after touching a stage's FSDP path).
Run: python -m pytest -q tests/test_fsdp.py"""

import json

import pytest
import torch

import model as M
import sft
from helpers import assert_same_run, eos_prone


def sft_args(world, tiny_ckpt):
    return ["--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"), "--init", tiny_ckpt,
            "--max_len", "48", "--batch_size", "5", "--grad_accum", "2", "--epochs", "0.06", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "1", "--max_new_tokens", "4", "--device", "cpu"]


def test_sft_fsdp_equals_one_process(world, tiny_ckpt, tmp_path):
    assert_same_run(tmp_path, "sft.py", sft_args(world, tiny_ckpt), ["loss", "grad_norm", "val_loss"], ["--fsdp", "true"])


def grpo_args(world, policy, tiny_rm):
    # 16 answers = 4 groups of 4 in 2 shards; minibatches of 8 rows in micro-batches of 4 fall unevenly on the
    # processes (a process with none of a micro-batch's rows runs it at weight 0); the reference is sharded too
    return ["--policy", policy, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
            "--rollout_batch_size", "16", "--group_size", "4", "--rollout_shards", "2", "--num_minibatches", "2",
            "--grad_accum", "2", "--update_epochs", "2", "--total_episodes", "32", "--max_new_tokens", "12", "--lr", "1e-3",
            "--kl_coef", "0.1", "--kl_in", "loss", "--kl_estimator", "k3", "--sample_interval", "100", "--device", "cpu"]


GRPO_KEYS = ["score", "kl", "resp_len", "eos_frac", "equal_groups", "adv_mean", "pg_loss", "kl_loss", "entropy",
             "approx_kl", "clipfrac", "grad_norm", "gold"]


def model_bytes(path):
    return sum(p.numel() * p.element_size() for p in M.load_checkpoint(path)[0].parameters())


def test_grpo_fsdp_equals_one_process(world, tiny_ckpt, tiny_rm, tmp_path):
    policy = eos_prone(tiny_ckpt, tmp_path / "policy")
    _, two = assert_same_run(tmp_path, "grpo.py", grpo_args(world, policy, tiny_rm), GRPO_KEYS, ["--fsdp", "true"])
    # each process holds about half of the policy, the reference and the reward model, and of AdamW's two moments
    whole = 2 * model_bytes(policy) + model_bytes(tiny_rm)
    assert 0.45 < two[-1]["param_mb"] * 2**20 / whole < 0.55, (two[-1]["param_mb"], whole / 2**20)
    assert 0.45 < two[-1]["optim_mb"] * 2**20 / (2 * model_bytes(policy)) < 0.55, two[-1]["optim_mb"]


PPO_KEYS = ["score", "kl", "kl_coef", "resp_len", "eos_frac", "explained_var", "adv_mean", "adv_std", "return_mean",
            "value_mean", "pg_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "vf_clipfrac", "grad_norm", "gold"]


@pytest.mark.slow
def test_ppo_fsdp_equals_one_process(world, tiny_ckpt, tiny_rm, tmp_path):
    # the policy, its value model, the reference and the reward model all sharded; the one optimizer over two models
    policy = eos_prone(tiny_ckpt, tmp_path / "policy")
    args = ["--policy", policy, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
            "--rollout_batch_size", "12", "--rollout_shards", "2", "--num_minibatches", "2", "--grad_accum", "2",
            "--update_epochs", "2", "--total_episodes", "36", "--max_new_tokens", "12", "--lr", "1e-3", "--value_lr", "1e-3",
            "--adaptive_kl", "true", "--whiten_rewards", "true", "--sample_interval", "100", "--device", "cpu"]
    assert_same_run(tmp_path, "ppo.py", args, PPO_KEYS, ["--fsdp", "true"])


@pytest.mark.slow
def test_dpo_fsdp_equals_one_process(tmp_path, tiny_ckpt):
    # the reference log-probs from the model each process loaded whole, then the same model sharded as the policy
    rows = [{"prompt": "what colour is the fox?", "responses": ["the fox is red.", "the fox is blue.", "fox fox"]},
            {"prompt": "where does the owl live?", "chosen": "the owl lives in the forest.", "rejected": "i do not know."}] * 3
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", str(tmp_path / "p.jsonl"), "--val_data", str(tmp_path / "p.jsonl"), "--init", tiny_ckpt,
            "--max_len", "64", "--batch_size", "3", "--grad_accum", "2", "--epochs", "1", "--lr", "1e-3", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "1", "--max_new_tokens", "4", "--device", "cpu"]
    assert_same_run(tmp_path, "dpo.py", args, ["loss", "rewards/margin", "rewards/accuracy", "grad_norm", "val_loss"],
                    ["--fsdp", "true"])


@pytest.mark.slow
def test_reward_fsdp_equals_one_process(tmp_path, tiny_ckpt):
    # a ScalarModel sharded: its blocks are its trunk's; the normalisation fitted at the end on every process
    rows = [{"prompt": "what colour is the fox?", "responses": ["the fox is red.", "the fox is blue.", "fox fox"]},
            {"prompt": "where does the owl live?", "chosen": "the owl lives in the forest.", "rejected": "i do not know."}] * 4
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", str(tmp_path / "r.jsonl"), "--val_data", str(tmp_path / "r.jsonl"), "--init", tiny_ckpt,
            "--max_len", "64", "--batch_size", "3", "--grad_accum", "2", "--epochs", "2", "--lr", "1e-3",
            "--log_interval", "1", "--eval_interval", "100", "--device", "cpu"]
    assert_same_run(tmp_path, "reward.py", args, ["loss", "acc", "grad_norm", "val_loss", "val_acc"], ["--fsdp", "true"])


@pytest.mark.slow
def test_pretrain_fsdp_equals_one_process(world, tmp_path):
    args = ["--data", str(world / "pretrain.txt"), "--tokenizer", str(world / "tokenizer.tiktoken"), "--n_layer", "1",
            "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4", "--grad_accum", "2",
            "--max_steps", "3", "--log_interval", "1", "--eval_interval", "3", "--eval_iters", "1", "--device", "cpu"]
    assert_same_run(tmp_path, "pretrain.py", args, ["loss", "grad_norm", "val_loss"], ["--fsdp", "true"])
