"""Runs a researcher can trust: --help, no accidental runs, a resume that refuses changed settings,
no world defaults on other data, chat templates, checks before loading, and a metrics.jsonl that
survives a real SIGKILL at any moment (model.py section 8, data/world.py's marker, each stage's preamble).
Run: python -m pytest -q tests/test_runs.py"""

import dataclasses
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
from helpers import killed_at_step
import dpo
import eval as evaluate
import grpo
import ppo
import reward
import sft
from data.world import WORLD_MARKER, gold_on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SCRIPTS = ["pretrain", "sft", "reward", "ppo", "grpo", "dpo", "eval", "plot", "bench", "data.world", "data.bpe", "data.preferences",
           "data.rm_probe", "data.prepare_hh", "data.prepare_tldr", "data.prepare_imdb", "data.prepare_alpaca"]


# --- 1. --help, one argument style, no accidental runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_every_key_with_type_default_and_comment(name, capsys):
    mod = importlib.import_module(name)
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            M.parse_config(mod.Config, [flag])
        assert e.value.code == 0
        out = capsys.readouterr().out
        docs = dict(M.field_docs(mod.Config))
        for f in dataclasses.fields(mod.Config):
            assert f"--{f.name} " in out
            assert docs[f.name] in out  # the comment beside the field (empty only where there is none)
    assert "usage: python" in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_key_has_a_description_and_the_summary_is_whole(name, capsys):
    mod = importlib.import_module(name)
    assert [k for k, comment in M.field_docs(mod.Config) if k and not comment] == []
    summary = " ".join(mod.__doc__.strip().split("\n\n")[0].split())  # the docstring's first paragraph
    assert summary.endswith(".") and len(summary) < 250, summary
    with pytest.raises(SystemExit):
        M.parse_config(mod.Config, ["--help"])
    assert capsys.readouterr().out.splitlines()[1] == summary  # printed whole, not cut at the first line


def test_help_from_the_command_line():
    r = subprocess.run([sys.executable, "ppo.py", "-h"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--kl_coef float = 0.05" in r.stdout and "beta; the start value when adaptive_kl" in r.stdout
    assert "--policy str = ''" in r.stdout and "(required)" in r.stdout
    assert "# rollout" in r.stdout  # section titles of the Config


def test_field_docs_reads_comments_not_strings():
    @dataclasses.dataclass
    class C:
        a: str = "x # not a comment"  # the real one
        # a section
        b: int = 1
    assert M.field_docs(C) == [("a", "the real one"), (None, "a section"), ("b", "")]


def test_no_arguments_is_an_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for mod, keys in ((ppo, "--policy"), (grpo, "--policy"), (sft, "--data"), (reward, "--data"), (dpo, "--data")):
        with pytest.raises(M.ConfigError, match=f"missing {keys}"):
            mod.train(M.parse_config(mod.Config, []))
    with pytest.raises(M.ConfigError, match="missing --ckpt"):
        evaluate.evaluate(M.parse_config(evaluate.Config, []))
    assert os.listdir(tmp_path) == []  # no out/ directory


# --- 2. a resume that refuses changed settings


def sft_args(world, ckpt, out, *extra):
    return ["--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"), "--init", ckpt,
            "--out_dir", str(out), "--max_len", "64", "--batch_size", "16", "--epochs", "0.1", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "0", "--device", "cpu", *extra]


def test_finished_run_refuses_changes_and_writes_nothing(world, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "sft"
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out)))
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "config.json", out / "metrics.jsonl")}
    capsys.readouterr()
    # the same command again: finished, nothing written
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out)))
    assert "is finished" in capsys.readouterr().out
    # a key that cannot change results may differ
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--log_interval", "5")))
    # another data file, or another lr: an error naming the keys and both values
    other = tmp_path / "other.jsonl"
    other.write_text((world / "sft_val.jsonl").read_text())
    with pytest.raises(M.ConfigError, match=r"data: stored '.*sft_train.jsonl', now '.*other.jsonl'[\s\S]*lr: stored 0.001, now 0.5"):
        sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--data", str(other), "--lr", "0.5")))
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == files
    # a deliberate change: resumes, and metrics.jsonl records it
    n = len(M.read_metrics(str(out / "metrics.jsonl")))
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--epochs", "0.2", "--resume_changed", "true")))
    rows = M.read_metrics(str(out / "metrics.jsonl"))
    assert rows[n] == {"step": rows[n - 1]["step"], "config_changed": {"epochs": [0.1, 0.2]}}
    assert len(rows) > n + 1 and json.load(open(out / "config.json"))["epochs"] == 0.2
    # --overwrite: a fresh start, the old rows gone
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--overwrite", "true")))
    assert [r["step"] for r in M.read_metrics(str(out / "metrics.jsonl"))] == list(range(1, n + 1))


def test_a_run_that_never_trained_restarts_with_new_settings(world, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "sft"
    out.mkdir()  # what a run that failed a data check after start_run leaves: its config and data stats
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out)))))
    (out / "data_stats.json").write_text("{}")
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--lr", "0.002")))
    assert re.search(r"never trained \(no checkpoint, no metrics\): starting afresh with the new .*lr 0\.002", capsys.readouterr().out)
    assert json.load(open(out / "ckpt" / "config.json"))["train"]["lr"] == 0.002
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")  # trained, killed before a checkpoint
    shutil.rmtree(out / "ckpt")
    with pytest.raises(M.ConfigError, match="holds a run with other settings"):
        sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--lr", "0.003")))


class FakeWandb:
    """What start_wandb and log_metrics call of the wandb package: init(...) -> run; run.log(row, step)."""
    def __init__(self):
        self.inits, self.rows = [], []

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, row, step=None):
        self.rows.append((step, row))


def test_wandb_mirrors_metrics_and_resumes_the_same_run(world, tiny_ckpt, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(M, "_wandb_run", None)
    out = tmp_path / "sft"
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--wandb_project", "p")))
    rows = M.read_metrics(str(out / "metrics.jsonl"))
    assert fake.rows == [(r["step"], r) for r in rows] and len(rows) > 1
    (kw,) = fake.inits
    assert kw["project"] == "p" and kw["mode"] == "offline" and kw["dir"] == str(out) and kw["config"]["lr"] == 0.001
    # the project is no result-affecting setting, and a later command continues the same W&B run
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--epochs", "0.2", "--resume_changed", "true",
                                                  "--wandb_project", "p")))
    assert fake.inits[1]["id"] == kw["id"] == (out / "wandb_id").read_text().strip()
    assert "wandb_project" not in M.read_metrics(str(out / "metrics.jsonl"))[len(rows)]["config_changed"]
    # --overwrite: a new W&B run
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, out, "--overwrite", "true", "--wandb_project", "p")))
    assert fake.inits[2]["id"] != kw["id"]


def test_wandb_missing_or_bad_mode_is_an_error_before_anything_runs(world, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(M.ConfigError, match="needs the wandb package"):
        sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, tmp_path / "a", "--wandb_project", "p")))
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    with pytest.raises(M.ConfigError, match="wandb_mode must be"):
        sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, tmp_path / "b", "--wandb_project", "p",
                                                      "--wandb_mode", "cloud")))


def test_out_dir_that_is_not_a_run_is_refused(world, tiny_ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(M.ConfigError, match="holds no run of ours"):
        sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, tmp_path)))
    assert os.listdir(tmp_path) == ["notes.txt"]


def ppo_args(world, tiny_ckpt, tiny_rm, out, *extra):
    return ["--policy", tiny_ckpt, "--reward_model", tiny_rm, "--prompts", str(world / "prompts_train.jsonl"),
            "--out_dir", str(out), "--rollout_batch_size", "8", "--num_minibatches", "2", "--update_epochs", "1",
            "--max_new_tokens", "8", "--total_episodes", "24", "--ckpt_interval", "1", "--sample_interval", "100",
            "--device", "cpu", *extra]


def test_ppo_resume_with_a_deliberate_kl_change_uses_it(world, tiny_ckpt, tiny_rm, tmp_path):
    out = tmp_path / "ppo"
    ppo.train(M.parse_config(ppo.Config, ppo_args(world, tiny_ckpt, tiny_rm, out, "--total_episodes", "8")))
    with pytest.raises(M.ConfigError, match="kl_coef: stored 0.05, now 0.3"):
        ppo.train(M.parse_config(ppo.Config, ppo_args(world, tiny_ckpt, tiny_rm, out, "--kl_coef", "0.3")))
    ppo.train(M.parse_config(ppo.Config, ppo_args(world, tiny_ckpt, tiny_rm, out, "--kl_coef", "0.3", "--resume_changed", "true")))
    rows = M.read_metrics(str(out / "metrics.jsonl"))
    assert [r.get("kl_coef") for r in rows] == [0.05, None, 0.3, 0.3]  # the command line's beta, not the saved one
    assert rows[1]["config_changed"] == {"kl_coef": [0.05, 0.3], "total_episodes": [8, 24]}
    for k in ("lr", "score_std", "return_std", "approx_kl_first_mb"):
        assert k in rows[0]


# --- 3. no world defaults on other data


def test_gold_reward_only_on_the_worlds_prompts(world, tmp_path):
    ours = str(world / "prompts_val.jsonl")
    assert gold_on("auto", ours) and gold_on("true", ours) and not gold_on("false", ours)
    other = tmp_path / "prompts_val.jsonl"
    other.write_text(json.dumps({"prompt": "How do I bake bread?"}) + "\n")
    assert not gold_on("auto", str(other))
    with pytest.raises(M.ConfigError, match="not the built-in world's prompts"):
        gold_on("true", str(other))
    edited = tmp_path / "w"
    edited.mkdir()
    (edited / WORLD_MARKER).write_text((world / WORLD_MARKER).read_text())
    (edited / "prompts_val.jsonl").write_text(open(ours).read() + json.dumps({"prompt": "hi"}) + "\n")
    assert not gold_on("auto", str(edited / "prompts_val.jsonl"))  # a changed file is no longer the world's


def test_eval_on_other_prompts_reports_no_gold(tiny_ckpt, tmp_path):
    p = tmp_path / "hh.jsonl"
    p.write_text(json.dumps({"prompt": "How do I bake bread?"}) + "\n")
    s = evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(p), "--max_new_tokens", "8",
                                                           "--out", str(tmp_path / "e.json"), "--device", "cpu"]))
    assert "gold" not in s and "helpful" not in s


def test_stage_configs_have_no_world_paths():
    for mod in (sft, reward, ppo, grpo, dpo, evaluate, importlib.import_module("pretrain")):
        for f in dataclasses.fields(mod.Config):
            assert "world" not in str(f.default), (mod.__name__, f.name)


# --- 4. chat templates


def test_templates(tokenizer, tmp_path, tiny_ckpt):
    assert M.chat_prompt("q") == "Human: q\n\nAssistant:"
    assert M.chat_prompt("POST: x\n\nTL;DR:", "none") == "POST: x\n\nTL;DR:"
    p, r = M.encode_chat(tokenizer, "the fox", "is red", template="none")
    assert p == tokenizer.encode("the fox") and r == tokenizer.encode(" is red") + [tokenizer.eot_id]
    assert M.resolve_template("auto", tiny_ckpt) == "hh"  # a checkpoint that names none reads as hh
    assert M.resolve_template("none", tiny_ckpt) == "none"
    model, tok, _ = M.load_checkpoint(tiny_ckpt)
    M.save_checkpoint(str(tmp_path / "c"), model, tok, {"template": "none"})
    assert M.resolve_template("auto", str(tmp_path / "c"), "") == "none"
    with pytest.raises(M.ConfigError, match="was trained with 'none'"):
        M.resolve_template("hh", str(tmp_path / "c"))
    with pytest.raises(M.ConfigError, match="different templates"):
        M.save_checkpoint(str(tmp_path / "d"), model, tok, {"template": "hh"})
        M.resolve_template("auto", str(tmp_path / "c"), str(tmp_path / "d"))


def test_template_travels_from_sft_to_the_next_stage(world, tiny_ckpt, tmp_path):
    sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, tmp_path / "sft", "--template", "none")))
    assert json.load(open(tmp_path / "sft" / "ckpt" / "config.json"))["train"]["template"] == "none"
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "the fox", "chosen": "is red.", "rejected": "is rude."}) + "\n")
    cfg = M.parse_config(dpo.Config, ["--data", str(prefs), "--val_data", str(prefs), "--init", str(tmp_path / "sft"),
                                      "--out_dir", str(tmp_path / "dpo"), "--max_len", "32", "--n_samples", "0", "--device", "cpu"])
    dpo.train(cfg)
    assert json.load(open(tmp_path / "dpo" / "config.json"))["template"] == "none"
    tok = M.load_tokenizer(str(world / "tokenizer.tiktoken"))
    _, ids, _ = M.load_prompts(str(prefs), tok, 64, "none")
    assert ids == [tok.encode("the fox")]


# --- 5. checks before loading


def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the check")
    monkeypatch.setattr(M, "load_gpt", refuse)
    monkeypatch.setattr(M, "load_checkpoint", refuse)


def test_checks_before_any_model_loads(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    no_loading(monkeypatch)
    with pytest.raises(M.ConfigError, match="max_prompt_len 64 \\+ max_new_tokens 48 > the block_size 96"):
        ppo.train(M.parse_config(ppo.Config, ppo_args(world, tiny_ckpt, tiny_rm, tmp_path / "p", "--max_new_tokens", "48")))
    with pytest.raises(M.ConfigError, match="ptx_len 96 \\+ 1 > the block_size 96"):
        ppo.train(M.parse_config(ppo.Config, ppo_args(world, tiny_ckpt, tiny_rm, tmp_path / "p", "--ptx_coef", "0.1",
                                                      "--ptx_data", str(world / "pretrain.txt"), "--ptx_len", "96")))
    p = str(world / "prompts_val.jsonl")
    with pytest.raises(M.ConfigError, match="max_new_tokens 96 leaves no room"):
        evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", p]))
    with pytest.raises(M.ConfigError, match="the directory .*missing does not exist"):
        evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", p, "--max_new_tokens", "8",
                                                           "--dump", str(tmp_path / "missing" / "d.jsonl")]))
    with pytest.raises(M.ConfigError, match="is a directory; expected a file"):
        sft.train(M.parse_config(sft.Config, sft_args(world, tiny_ckpt, tmp_path / "s", "--data", str(world))))
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_swapped_checkpoints_are_refused_naming_what_each_key_takes(world, tiny_ckpt, tiny_rm, tmp_path, monkeypatch):
    no_loading(monkeypatch)
    prompts, prefs = str(world / "prompts_train.jsonl"), str(world / "sft_val.jsonl")
    with pytest.raises(M.ConfigError, match=r"--policy .* is a reward model \(reward.py\), but --policy takes a policy .*"
                                            r"\(--policy and --reward_model swapped\?\)"):
        ppo.train(M.parse_config(ppo.Config, ppo_args(world, tiny_rm, tiny_ckpt, tmp_path / "p")))
    with pytest.raises(M.ConfigError, match=r"--reward_model .* is a policy .*, but --reward_model takes a reward model"):
        ppo.train(M.parse_config(ppo.Config, ppo_args(world, tiny_ckpt, tiny_ckpt, tmp_path / "p")))
    with pytest.raises(M.ConfigError, match="--policy .* is a reward model"):
        grpo.train(M.parse_config(grpo.Config, ["--policy", tiny_rm, "--reward_model", tiny_rm, "--prompts", prompts,
                                                "--out_dir", str(tmp_path / "g"), "--max_new_tokens", "8"]))
    base = ["--prompts", prompts, "--max_new_tokens", "8"]
    for key, ckpt in (("reward_model", tiny_ckpt), ("ref", tiny_rm), ("baseline", tiny_rm)):
        with pytest.raises(M.ConfigError, match=f"--{key} .* takes a {'reward model' if key == 'reward_model' else 'policy'}"):
            evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, f"--{key}", ckpt, *base]))
    with pytest.raises(M.ConfigError, match="--ckpt .* is a reward model"):
        evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_rm, *base]))
    for mod in (sft, reward, dpo):  # reward.py --init takes the policy whose trunk the reward model starts from
        with pytest.raises(M.ConfigError, match="--init .* is a reward model .* --init takes a policy"):
            mod.train(M.parse_config(mod.Config, ["--data", prefs, "--val_data", prefs, "--init", tiny_rm,
                                                  "--out_dir", str(tmp_path / "x"), "--max_len", "64"]))
    pretrain = importlib.import_module("pretrain")
    with pytest.raises(M.ConfigError, match="--init .* is a reward model"):
        pretrain.train(M.parse_config(pretrain.Config, ["--data", str(world / "pretrain.txt"), "--init", tiny_rm,
                                                        "--out_dir", str(tmp_path / "pt"), "--block_size", "32"]))
    assert not [p for p in ("p", "g", "x", "pt") if (tmp_path / p).exists()]


def test_checkpoints_written_before_roles_still_load(tiny_ckpt, tiny_rm, tmp_path, capsys):
    old = {}
    for name, src in (("policy", tiny_ckpt), ("rm", tiny_rm)):  # config.json as it was: no role, no normalisation
        shutil.copytree(src, tmp_path / name)
        info = json.load(open(tmp_path / name / "config.json"))
        for k in ("role", "normalisation", "step"):
            info.pop(k, None)
        (tmp_path / name / "config.json").write_text(json.dumps(info))
        old[name] = str(tmp_path / name)
    assert M.checkpoint_role(old["policy"]) == "policy" and M.checkpoint_role(old["rm"]) == "reward_model"
    M.check_roles(policy=(old["policy"], "policy"), reward_model=(old["rm"], "reward_model"))
    assert "records no role (an older checkpoint): read as a reward model" in capsys.readouterr().out
    with pytest.raises(M.ConfigError, match="is a reward model"):
        M.check_roles(policy=(old["rm"], "policy"))


def test_gpu_config_on_a_cpu_machine_names_the_cpu_flags_before_loading(world, tiny_ckpt, tmp_path, monkeypatch):
    no_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build of torch
    args = ["--config", os.path.join(ROOT, "configs", "sft_hh_qwen25_lora.toml"), "--data", str(world / "sft_train.jsonl"),
            "--val_data", str(world / "sft_val.jsonl"), "--init", tiny_ckpt, "--out_dir", str(tmp_path / "s"), "--max_len", "64"]
    with pytest.raises(M.ConfigError, match=r"--device cuda: this torch \(.*\) is built without CUDA\. To run this config "
                                            r"on CPU: --device cpu --dtype float32 --compile false$"):
        sft.train(M.parse_config(sft.Config, args))
    M.check_device(M.parse_config(sft.Config, args + "--device cpu --dtype float32 --compile false".split()))  # those flags pass
    with pytest.raises(M.ConfigError, match=r"--device 'gpu': expected auto \(cuda, then mps, then cpu\), cpu, cuda, cuda:N or mps"):
        sft.train(M.parse_config(sft.Config, args + ["--device", "gpu"]))
    with pytest.raises(M.ConfigError, match="--device cuda: .* To run this config on CPU: --device cpu$"):
        evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(world / "prompts_val.jsonl"),
                                                           "--device", "cuda"]))
    with pytest.raises(M.ConfigError, match="--dtype 'fp16': expected one of float32, bfloat16, float16"):
        M.check_device(M.parse_config(sft.Config, ["--device", "cpu", "--dtype", "fp16"]))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(M.shutil, "which", lambda name: None)  # no C++ compiler for torch.compile's CPU backend
    with pytest.raises(M.ConfigError, match="--compile true on CPU needs a C\\+\\+ compiler .*: --compile false"):
        M.check_device(M.parse_config(sft.Config, ["--device", "cpu", "--compile", "true"]))
    assert not (tmp_path / "s").exists()


def test_model_type_we_cannot_load_names_itself(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "n_embd": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type 'llama' cannot be loaded"):
        M.load_hf_gpt2(str(tmp_path))


def test_offline_gpt2_is_a_clear_error_and_leaves_no_run_dir(world, tmp_path):
    env = {**ENV, "PLAINRLHF_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "sft.py", *sft_args(world, "gpt2", tmp_path / "run"), "--max_len", "64"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "not in " + str(tmp_path / "cache" / "gpt2") in r.stderr and "Hugging Face cache" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # the failed run left no directory


def test_hf_cache_is_used(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in ("config.json", "vocab.json", "merges.txt", "model.safetensors"):
        (snap / f).write_text("")
    monkeypatch.setenv("PLAINRLHF_CACHE", str(tmp_path / "ours"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert M.hf_gpt2_dir("gpt2") == str(snap)


def test_dump_counts_answers_left_out(tiny_ckpt, tmp_path, world):
    s = evaluate.evaluate(M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(world / "prompts_val.jsonl"),
                                                           "--n_prompts", "6", "--max_new_tokens", "4", "--device", "cpu",
                                                           "--dump", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "e.json")]))
    assert s["dumped"] + s["dump_skipped_no_eos"] == 6 and s["dump_skipped_no_eos"] > 0


# --- 8. metrics.jsonl survives any kill


def test_partial_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    M.truncate_metrics(str(tmp_path), 5)
    assert "dropped a partial last line" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON line"):
        M.read_metrics(str(tmp_path / "metrics.jsonl"))


def test_sigkill_during_truncation_keeps_old_or_new_file(tmp_path):
    rows = [{"step": i, "x": "y" * 200} for i in range(1, 60001)]  # ~13 MB: the rewrite takes a while
    path = tmp_path / "metrics.jsonl"
    M.write_metrics(str(path), rows)
    old = path.read_text()
    code = f"import model; model.truncate_metrics({str(tmp_path)!r}, 30000)"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV)
    size = path.stat().st_size
    # the window: the new file is being written (or, rewritten in place, the old one is shrinking)
    while not (tmp_path / "metrics.jsonl.tmp").exists() and path.stat().st_size == size and p.poll() is None:
        time.sleep(0.001)
    p.send_signal(signal.SIGKILL)
    p.wait()
    text = path.read_text()
    assert text == old or text == "".join(json.dumps(r) + "\n" for r in rows[:30000])


def test_sigkill_during_appends_leaves_readable_rows(tmp_path):
    """Kill a process appending large rows; whatever is cut, the next resume reads every whole row."""
    code = (f"import model\nfor i in range(1, 10**6):\n"
            f"    model.log_metrics({str(tmp_path)!r}, {{'step': i, 'x': 'y' * 4_000_000}})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL)
    path = tmp_path / "metrics.jsonl"
    while (not path.exists() or path.stat().st_size < 20_000_000) and p.poll() is None:
        time.sleep(0.001)
    p.send_signal(signal.SIGKILL)
    p.wait()
    M.truncate_metrics(str(tmp_path), 10**9)
    rows = M.read_metrics(str(path))
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 4
    assert path.read_text().endswith("\n")


def stage_cli(stage, world, tiny_ckpt, tiny_rm, tmp_path, out):
    """A real command line per stage, long enough to be killed between its first metrics row and its
    only checkpoint (ckpt_interval past the end)."""
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"where does the owl live? {i}", "chosen": "the owl lives in the forest.",
                                         "rejected": "i do not know."}) + "\n" for i in range(40)))
    args = {
        "pretrain": ["--data", str(world / "pretrain.txt"), "--tokenizer", str(world / "tokenizer.tiktoken"), "--n_layer", "1",
                     "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--max_steps", "30",
                     "--eval_iters", "1", "--out_dir", str(out)],
        "sft": sft_args(world, tiny_ckpt, out, "--epochs", "1", "--batch_size", "16"),
        "reward": ["--data", str(prefs), "--val_data", str(prefs), "--init", tiny_ckpt, "--max_len", "32", "--batch_size", "2",
                   "--epochs", "1", "--out_dir", str(out)],
        "dpo": ["--data", str(prefs), "--val_data", str(prefs), "--init", tiny_ckpt, "--max_len", "32", "--batch_size", "2",
                "--epochs", "1", "--n_samples", "0", "--out_dir", str(out)],
        "ppo": ppo_args(world, tiny_ckpt, tiny_rm, out, "--total_episodes", "64"),
    }[stage]
    quiet = ["--eval_interval", "100000"] if stage != "ppo" else []
    return [sys.executable, f"{stage}.py", *args, "--device", "cpu", "--log_interval", "1", "--ckpt_interval", "100000", *quiet]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo", "ppo"])
def test_sigkill_before_first_checkpoint_then_rerun_logs_each_step_once(stage, world, tiny_ckpt, tiny_rm, tmp_path):
    out = tmp_path / "run"
    cmd = stage_cli(stage, world, tiny_ckpt, tiny_rm, tmp_path, out)
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or metrics.read_text().count("\n") < 2) and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert M.load_train_state(str(out / "ckpt")) is None, "the kill came after the first checkpoint"
    assert len(M.read_metrics(str(metrics))) >= 2
    mod = importlib.import_module(stage)  # the same command again, in this process (saves a start-up)
    mod.train(M.parse_config(mod.Config, cmd[2:]))
    steps = [row["step"] for row in M.read_metrics(str(metrics))]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 2  # every step once: the killed run's rows are gone


# --- 7. self-contained: the code and README cite the project's own docs


def test_no_citations_of_documents_readers_cannot_see():
    files = [os.path.join(d, f) for d in (ROOT, os.path.join(ROOT, "data"), os.path.join(ROOT, "tests"))
             for f in os.listdir(d) if f.endswith((".py", ".md", ".sh", ".toml"))]
    files += [os.path.join(ROOT, "configs", f) for f in os.listdir(os.path.join(ROOT, "configs"))]
    bad = ["RLHF_" + "DETAILS", "the issue" + "'s target"]  # split so this file does not match itself
    assert [(f, b) for f in files for b in bad if b in open(f, encoding="utf-8").read()] == []
    assert os.path.exists(os.path.join(ROOT, "docs", "implementation_details.md"))


# --- 9. a Ctrl-C and a bad data file end in one line, not a traceback


def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_resume(world, tiny_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sft"
    args = sft_args(world, tiny_ckpt, out, "--epochs", "1", "--ckpt_interval", "2")
    real = M.lr_at
    monkeypatch.setattr(M, "lr_at", lambda step, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if step == 1 else real(step, *a, **k))
    with pytest.raises(SystemExit) as e:
        M.main(sft.train, sft.Config, args)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().endswith(f"before the first checkpoint: {out} holds nothing to resume from; "
                                                    f"rerunning the same command starts afresh")
    monkeypatch.setattr(M, "lr_at", lambda step, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else real(step, *a, **k))
    with pytest.raises(SystemExit):
        M.main(sft.train, sft.Config, args)
    assert capsys.readouterr().err.strip().endswith(f"interrupted (Ctrl-C): the last checkpoint is {out}/ckpt (step 2); "
                                                    f"rerun the same command to resume from it")
    monkeypatch.setattr(M, "lr_at", real)
    with killed_at_step(monkeypatch, 4):  # called as a library, train() still lets the KeyboardInterrupt through
        sft.train(M.parse_config(sft.Config, args))


def test_real_ctrl_c_prints_one_line_and_no_traceback(world, tiny_ckpt, tmp_path):
    out = tmp_path / "sft"
    cmd = [sys.executable, "sft.py", *sft_args(world, tiny_ckpt, out, "--epochs", "20", "--ckpt_interval", "1")]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "ckpt" / "config.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert re.search(rf"interrupted \(Ctrl-C\): the last checkpoint is {out}/ckpt \(step \d+\); rerun the same command", err)


def test_bad_data_file_is_one_line_from_the_command_line(world, tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "hi", "response": "unterminated}')  # json: "... starting at"
    r = subprocess.run([sys.executable, "sft.py", *sft_args(world, tiny_ckpt, tmp_path / "sft", "--data", str(bad))],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: {bad}:2: malformed JSON: Unterminated string starting at: column 30"
