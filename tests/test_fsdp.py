"""FSDP2 with torchrun (--fsdp true): 2 CPU processes (gloo), each holding half of every model and of
its AdamW state, give the losses, gradient norms and final weights of one unsharded process on the
same global batch, within the DDP tests' tolerances (tests/test_ddp.py); sampling gathers the
weights (model.gathered); checkpoints are whole and resume exactly; --fsdp true without torchrun
or with what it cannot run is a ConfigError naming the key. Each torchrun launch costs seconds: the
in-process 2-process checks and the config errors are in the default suite, every stage's torchrun
run behind slow (`python -m pytest -m slow tests/test_fsdp.py` after touching a stage's FSDP path).
Run: python -m pytest -q tests/test_fsdp.py"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dpo
import grpo
import model as M
import ppo
import sft
from helpers import PPO_KEYS, ROOT, assert_same_run, eos_prone, ppo_args, preference_args


def sft_args(world, tiny_ckpt):
    return ["--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"), "--init", tiny_ckpt,
            "--max_len", "48", "--batch_size", "5", "--grad_accum", "2", "--epochs", "0.06", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "1", "--max_new_tokens", "4", "--device", "cpu"]


def test_fsdp_without_torchrun_or_with_what_it_cannot_run_is_a_config_error(world, tiny_ckpt, tiny_rm, monkeypatch, tmp_path):
    for module, args in ((sft, sft_args(world, tiny_ckpt)), (grpo, grpo_args(world, tiny_ckpt, tiny_rm))):
        with pytest.raises(M.ConfigError, match=r"--fsdp true shards the models over torchrun's processes"):
            module.train(M.parse_config(module.Config, [*args, "--fsdp", "true", "--out_dir", str(tmp_path / "x")]))
    monkeypatch.setenv("RANK", "0")  # as under torchrun, before the process group is joined
    monkeypatch.setenv("WORLD_SIZE", "2")
    for module, args, key in ((grpo, [*grpo_args(world, tiny_ckpt, tiny_rm), "--staleness", "1"], "staleness"),
                              (grpo, [*grpo_args(world, tiny_ckpt, tiny_rm), "--dynamic_sampling", "true"], "dynamic_sampling"),
                              (ppo, ["--policy", tiny_ckpt, "--reward_model", tiny_rm, "--compile", "true"], "compile"),
                              (dpo, ["--loss_type", "kto"], "loss_type")):
        with pytest.raises(M.ConfigError, match=rf"--fsdp true with --{key} "):
            module.train(M.parse_config(module.Config, [*args, "--fsdp", "true", "--out_dir", str(tmp_path / "x")]))


@pytest.mark.slow
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


@pytest.mark.slow
def test_grpo_fsdp_equals_one_process(world, tiny_ckpt, tiny_rm, tmp_path):
    policy = eos_prone(tiny_ckpt, tmp_path / "policy")
    # with evaluation snapshots: every process joins their gather, rank 0 writes the same ones as one process
    args = [*grpo_args(world, policy, tiny_rm), "--eval_snapshot_interval", "1"]
    _, two = assert_same_run(tmp_path, "grpo.py", args, GRPO_KEYS, ["--fsdp", "true"])
    snaps = [M.list_snapshots(str(tmp_path / run)) for run in ("one", "two")]
    assert [i for i, _ in snaps[0]] == [i for i, _ in snaps[1]] and len(snaps[0]) > 1
    for (_, a), (_, b) in zip(*snaps):
        for x, y in zip(M.load_checkpoint(a)[0].state_dict().values(), M.load_checkpoint(b)[0].state_dict().values()):
            assert torch.allclose(x, y, atol=1e-4)
    # each process holds about half of the policy, the reference and the reward model, and of AdamW's two moments
    whole = 2 * model_bytes(policy) + model_bytes(tiny_rm)
    assert 0.45 < two[-1]["param_mb"] * 2**20 / whole < 0.55, (two[-1]["param_mb"], whole / 2**20)
    assert 0.45 < two[-1]["optim_mb"] * 2**20 / (2 * model_bytes(policy)) < 0.55, two[-1]["optim_mb"]


@pytest.mark.slow
def test_ppo_fsdp_equals_one_process(world, tiny_ckpt, tiny_rm, tmp_path):
    # the policy, its value model, the reference and the reward model all sharded; the one optimizer over two models
    policy = eos_prone(tiny_ckpt, tmp_path / "policy")
    args = ppo_args(world, policy, tiny_rm)
    _, two = assert_same_run(tmp_path, "ppo.py", args, PPO_KEYS, ["--fsdp", "true"])
    # each process holds about half of policy, value model, reference and reward model, and of AdamW over two models
    value = model_bytes(tiny_rm)  # the value model: a ScalarModel of the same shape
    whole = 2 * model_bytes(policy) + value + model_bytes(tiny_rm)
    assert 0.45 < two[-1]["param_mb"] * 2**20 / whole < 0.55, (two[-1]["param_mb"], whole / 2**20)
    assert 0.45 < two[-1]["optim_mb"] * 2**20 / (2 * (model_bytes(policy) + value)) < 0.55, two[-1]["optim_mb"]


@pytest.mark.slow
def test_dpo_fsdp_equals_one_process(tmp_path, tiny_ckpt):
    # the reference log-probs from the model each process loaded whole, then the same model sharded as the policy
    args = [*preference_args(tmp_path / "p.jsonl", 3, tiny_ckpt, 1), "--n_samples", "1", "--max_new_tokens", "4"]
    assert_same_run(tmp_path, "dpo.py", args, ["loss", "rewards/margin", "rewards/accuracy", "grad_norm", "val_loss"],
                    ["--fsdp", "true"])


@pytest.mark.slow
def test_reward_fsdp_equals_one_process(tmp_path, tiny_ckpt):
    # a ScalarModel sharded: its blocks are its trunk's; the normalisation fitted at the end on every process
    args = preference_args(tmp_path / "r.jsonl", 4, tiny_ckpt, 2)
    assert_same_run(tmp_path, "reward.py", args, ["loss", "acc", "grad_norm", "val_loss", "val_acc"], ["--fsdp", "true"])


@pytest.mark.slow
def test_pretrain_fsdp_equals_one_process(world, tmp_path):
    args = ["--data", str(world / "pretrain.txt"), "--tokenizer", str(world / "tokenizer.tiktoken"), "--n_layer", "1",
            "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "4", "--grad_accum", "2",
            "--max_steps", "3", "--log_interval", "1", "--eval_interval", "3", "--eval_iters", "1", "--device", "cpu"]
    assert_same_run(tmp_path, "pretrain.py", args, ["loss", "grad_norm", "val_loss"], ["--fsdp", "true"])


# --- in-process: 2 gloo processes spawned, no torchrun


def tiny_models():
    """(name, model) pairs: a GPT-2, a ScalarModel, a Qwen2-family GPT with LoRA adapters (B != 0), seeded."""
    config = M.GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    gpt, scalar = M.GPT(config), M.scalar_from_gpt(M.GPT(config))
    qwen = M.family_config("qwen2", vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_inner=48)
    lora = M.add_lora(M.GPT(qwen), 4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith(".lora_B"):
                p.normal_(0, 0.05)
    return [("gpt", gpt), ("scalar", scalar), ("lora", lora)]


def model_loss(model, x):
    return model(x).sum() if isinstance(model, M.ScalarModel) else model(x, targets=x)


def shard_worker(rank, init, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for name, model in tiny_models():
        M.fsdp_wrap(model, 2, "cpu", sum_grads=True)
        opt = M.configure_optimizer(model, 1e-2)
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))  # this process's rows
        model_loss(model, x).backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        norm = M.clip_grad_checked(model.parameters(), 1e9, "test")
        opt.step()
        held = M.held_bytes([model], opt)
        r = {"grads": grads, "norm": norm, "held": held, "weights": M.full_state_dict(model)}
        if name == "gpt":  # sampling on gathered weights: each process stops after its own number of tokens
            prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(9))
            with M.gathered(model):
                r["sample"] = model.generate(prompt, 4 + 5 * rank, temperature=0.0)[0]
            model_loss(model, x).backward()  # and training goes on after the gather
        if name != "scalar":  # every process calls it, rank 0 writes the whole directory (LoRA: merged)
            model.save_pretrained(str(out / f"hf_{name}"))
        try:  # an optimizer state stored without FSDP (keyed by position) is refused, naming the key
            plain = M.configure_optimizer(M.GPT(M.GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=8)), 1e-3)
            M.load_optimizer_state(opt, plain.state_dict(), "ckpt", model)
        except M.ConfigError as e:
            r["refused"] = str(e)
        results[name] = r
    torch.save(results, out / f"{rank}.pt")
    torch.distributed.destroy_process_group()


def test_fsdp_shards_gradients_sum_samples_gather_and_export_is_whole(tmp_path):
    torch.multiprocessing.spawn(shard_worker, (f"file://{tmp_path / 'init'}", tmp_path), nprocs=2)
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    for name, model in tiny_models():  # one process, both processes' rows: the summed gradient, the same step
        opt = M.configure_optimizer(model, 1e-2)
        before = sum(p.numel() * p.element_size() for p in model.parameters())
        for rank in range(2):
            model_loss(model, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))).backward()
        norm = M.clip_grad_checked(model.parameters(), 1e9, "test")
        for n, p in model.named_parameters():
            if p.grad is not None:
                assert torch.allclose(parts[0][name]["grads"][n], p.grad, atol=1e-5), (name, n)
        assert parts[0][name]["norm"] == pytest.approx(norm, rel=1e-5) and parts[1][name]["norm"] == pytest.approx(norm, rel=1e-5)
        opt.step()
        one = M.held_bytes([model], opt)
        for rank in range(2):  # about half of the parameters and of AdamW's state on each process
            params, state = parts[rank][name]["held"]
            assert 0.45 < params / before < 0.55 and 0.45 < state / one[1] < 0.55, (name, rank, params, before, state, one)
        assert parts[1][name]["weights"] is None  # gathered to rank 0 only
        for k, v in model.state_dict().items():
            assert torch.allclose(parts[0][name]["weights"][k], v, atol=1e-6), (name, k)
        if name == "gpt":
            prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(9))
            for rank in range(2):
                assert torch.equal(parts[rank]["gpt"]["sample"], model.generate(prompt, 4 + 5 * rank, temperature=0.0)[0])
        if name != "scalar":  # the whole Hugging Face directory, LoRA merged into the base
            exported = M.GPT.from_pretrained(str(tmp_path / f"hf_{name}")).state_dict()
            for k, v in (M.merge_lora(model) if name == "lora" else model).state_dict().items():
                assert torch.allclose(exported[k], v, atol=1e-6), (name, k)
        assert "written with --fsdp false; resume it with --fsdp false" in parts[0][name]["refused"]


# --- checkpoints: whole, resumed exactly, on any process count


def torchrun(nproc, script, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def kill_torchrun(pid):
    """SIGKILL a torchrun and its workers: torchrun starts each worker in a session of its own, so a
    kill of torchrun's process group leaves them running to the end of the run."""
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        os.kill(int(child), signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


def metrics(d, drop=("ex_s",)):
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in open(d / "metrics.jsonl")]


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_equals_uninterrupted_and_resumes_on_another_process_count(world, tiny_ckpt, tmp_path):
    args = ["--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"), "--init", tiny_ckpt,
            "--max_len", "64", "--batch_size", "8", "--epochs", "1", "--ckpt_interval", "3", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "0", "--device", "cpu", "--fsdp", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(torchrun(2, "sft.py", [*args, "--out_dir", str(tmp_path / "a")]), cwd=ROOT, env=env, check=True, capture_output=True)
    for name, nproc in (("b", 2), ("c", 1)):  # killed on 2 processes, resumed on 2, and on 1
        d = tmp_path / name
        p = subprocess.Popen(torchrun(2, "sft.py", [*args, "--out_dir", str(d)]), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (d / "ckpt" / "state.pt").exists() and time.time() < deadline:  # the first checkpoint
            time.sleep(0.05)
        time.sleep(0.3)
        kill_torchrun(p.pid)  # both processes, at whatever they are doing
        p.wait()
        time.sleep(0.2)  # the killed workers' files closed
        state = M.load_train_state(str(d / "ckpt"))
        assert state is not None and not state["finished"], "the kill came after the run had finished"
        assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # the full optimizer state, keyed by name
        r = subprocess.run(torchrun(nproc, "sft.py", [*args, "--out_dir", str(d)]), cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = (M.load_checkpoint(str(tmp_path / n))[0].state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise on the same process count
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert all(torch.allclose(a[k], c[k], atol=1e-4) for k in a)  # another process count: the same run up to float sums
    for x, y in zip(metrics(tmp_path / "a"), metrics(tmp_path / "c")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), (x, y)


@pytest.mark.slow
def test_grpo_lora_fsdp_equals_one_process(world, tiny_ckpt, tiny_rm, tmp_path):
    # LoRA under FSDP: the frozen base sharded with its adapters, the reference the policy with its adapters
    # off (the same sharded module), AdamW over the adapters only; activation checkpointing re-gathers in backward
    policy = eos_prone(tiny_ckpt, tmp_path / "policy")
    args = [*grpo_args(world, policy, tiny_rm), "--lora_rank", "4", "--lr", "1e-2", "--activation_checkpointing", "true"]
    _, two = assert_same_run(tmp_path, "grpo.py", args, GRPO_KEYS, ["--fsdp", "true"])
    assert two[-1]["kl"] > 0  # the adapters moved the policy off its reference
