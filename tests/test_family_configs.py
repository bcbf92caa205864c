"""Smoke test of the Qwen2.5 (with and without LoRA) and Pythia configs: every stage's real CLI,
with its config file, runs one step on a tiny random model of the same family, exported in the
Hugging Face layout with a tokenizer.json (vocabulary rows padded past the tokenizer, as Qwen's
and Pythia's are), chained sft -> reward -> ppo and dpo as in the configs.
Run: python -m pytest -q tests/test_family_configs.py"""

import json
import os

import pytest
import torch

import dpo
import model as M
import ppo
import reward
import sft

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
CHAINS = {"qwen25": ("qwen2", "hh"), "qwen25_lora": ("qwen2", "hh"), "pythia1b": ("pythia", "tldr")}


def tiny_hf(family, ranks, d):
    """A tiny random model of the family + its tokenizer, written as a Hugging Face directory."""
    n = len(ranks)
    if family == "pythia":  # GPT-NeoX numbers <|endoftext|> 0 and <|padding|> 1, then the BPE
        tok = M.Tokenizer({t: r + 2 for t, r in ranks.items()}, "neox", special={M.EOT: 0, "<|padding|>": 1})
        kw = dict(n_head=2)
    else:
        tok = M.Tokenizer(ranks, "qwen", special={M.EOT: n, "<|im_start|>": n + 1, "<|im_end|>": n + 2})
        kw = dict(n_head=4, n_kv_head=2, n_inner=48)
    torch.manual_seed(0)
    config = M.family_config(family, vocab_size=tok.n_vocab + 5, block_size=128, n_layer=2, n_embd=32, **kw)
    M.GPT(config).save_pretrained(str(d), tokenizer=tok)
    return str(d)


@pytest.mark.parametrize("chain", CHAINS)
def test_family_configs_run_one_step_each(chain, world, tokenizer, tmp_path):
    family, task = CHAINS[chain]
    init = tiny_hf(family, tokenizer.ranks, tmp_path / "hf")
    model, tok = M.load_gpt(init)
    assert model.config.family == family and model.config.vocab_size == tok.n_vocab  # padded rows trimmed
    rows = [{"prompt": "what colour is the fox?", "chosen": "the fox is red.", "rejected": "the fox is stupid."},
            {"prompt": "where does the owl live?", "chosen": "the owl lives in the forest.", "rejected": "no."}] * 2
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {s: str(tmp_path / s) for s in ("sft", "reward", "ppo", "dpo")}
    cpu = ["--device", "cpu", "--compile", "false"]

    def run(stage, module, *args):
        cfg = M.parse_config(module.Config, ["--config", os.path.join(CONFIGS, f"{stage}_{task}_{chain}.toml"), *args, *cpu])
        return cfg, module.train(cfg)

    cfg, policy = run("sft", sft, "--init", init, "--data", str(world / "sft_train.jsonl"), "--val_data",
                      str(world / "sft_val.jsonl"), "--out_dir", out["sft"], "--max_len", "64", "--batch_size", "4",
                      "--grad_accum", "1", "--epochs", "0.01", "--warmup", "0", "--n_samples", "1", "--max_new_tokens", "4")
    assert policy.config.lora_rank == cfg.lora_rank and policy.config.family == family
    lora = cfg.lora_rank > 0
    _, rm = run("reward", reward, "--init", out["sft"], "--data", str(prefs), "--val_data", str(prefs),
                "--out_dir", out["reward"], "--max_len", "64", "--batch_size", "4", "--grad_accum", "1", "--warmup", "0")
    assert rm.config.lora_rank == cfg.lora_rank
    run("ppo", ppo, "--policy", out["sft"], "--reward_model", out["reward"], "--prompts", str(world / "prompts_train.jsonl"),
        "--out_dir", out["ppo"], "--total_episodes", "4", "--rollout_batch_size", "4", "--rollout_shards", "0",
        "--num_minibatches", "1", "--grad_accum", "1", "--update_epochs", "1", "--max_prompt_len", "32",
        "--max_new_tokens", "6", "--ckpt_interval", "1")
    last = [json.loads(x) for x in open(os.path.join(out["ppo"], "metrics.jsonl"))][-1]
    assert last["step"] == 1 and last["episodes"] == 4 and abs(last["kl"]) < 1e-4  # policy = reference at the rollout
    _, pol = run("dpo", dpo, "--init", out["sft"], "--data", str(prefs), "--val_data", str(prefs), "--out_dir", out["dpo"],
                 "--max_len", "64", "--batch_size", "4", "--grad_accum", "1", "--warmup", "0", "--n_samples", "1",
                 "--max_new_tokens", "4")
    first = [json.loads(x) for x in open(os.path.join(out["dpo"], "metrics.jsonl"))][0]
    assert abs(first["loss"] - 0.6931) < 1e-3  # pi = pi_ref at step 0, with LoRA too (adapters start at B = 0)
    if lora:  # the trained policies keep their adapters; exporting merges them
        assert pol.config.lora_rank > 0
        pol.save_pretrained(str(tmp_path / "export"), tokenizer=tok)
        back = M.GPT.from_pretrained(str(tmp_path / "export")).eval()
        x = torch.randint(0, tok.n_vocab, (2, 10))
        assert torch.allclose(back(x), pol.eval()(x), atol=1e-5)
