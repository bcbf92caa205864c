"""The IMDb controlled-sentiment chain runs offline with the committed configs: prepare_imdb on a small
archive in the upstream format -> sft -> sentiment reward (objective classify) -> reward-ranked SFT
samples (eval.py --dump_rankings) -> dpo, and ppo without the EOS trick. A tiny random model
stands in for GPT-2 (--init/--policy), on CPU in fp32 without compile.
Run: python -m pytest -q tests/test_imdb.py"""

import json

import pytest
import torch

import dpo
import eval as evaluate
import model as M
import ppo
import reward
import sft
from data import prepare_imdb
from test_prepare import IMDB, write_imdb

CPU = ["--device", "cpu", "--dtype", "float32"]


def test_imdb_chain_runs_with_the_committed_configs(tiny_ckpt, tmp_path):
    write_imdb(tmp_path / "imdb.tar.gz", IMDB)
    d, out = tmp_path / "imdb", tmp_path / "out"
    prepare_imdb.main(["--src", str(tmp_path / "imdb.tar.gz"), "--out_dir", str(d)])
    sft.train(M.parse_config(sft.Config, [
        "--config", "configs/sft_imdb_gpt2.toml", *CPU, "--compile", "false", "--init", tiny_ckpt, "--max_len", "64",
        "--data", str(d / "imdb_sft_train.jsonl"), "--val_data", str(d / "imdb_sft_test.jsonl"), "--out_dir", str(out / "sft"),
        "--batch_size", "3", "--grad_accum", "1", "--n_samples", "1", "--max_new_tokens", "4"]))
    rm = reward.train(M.parse_config(reward.Config, [
        "--config", "configs/reward_imdb_gpt2.toml", *CPU, "--compile", "false", "--init", str(out / "sft"),
        "--data", str(d / "imdb_sentiment_train.jsonl"), "--val_data", str(d / "imdb_sentiment_test.jsonl"),
        "--out_dir", str(out / "reward"), "--batch_size", "3", "--grad_accum", "1"]))
    assert json.load(open(out / "reward" / "config.json"))["objective"] == "classify" and rm.reward_gain.item() != 1.0
    last = [json.loads(x) for x in open(out / "reward" / "metrics.jsonl")][-1]
    # val_acc is the classifier's accuracy: the sign of the raw score against the label, counted here by hand
    groups, _ = reward.read_labels(str(d / "imdb_sentiment_test.jsonl"))
    rows, _ = reward.encode_groups(groups, M.load_checkpoint(str(out / "reward"))[1], 72, 16, "none")  # the config's max_len and template
    right = 0.0
    with torch.no_grad():
        for g in rows:
            label = int(g[0] is not None)
            r = rm(torch.tensor([g[0] if label else g[1]]))[0, -1].item()  # the raw score at the EOS
            right += 1.0 if (r > 0) == bool(label) and r != 0 else 0.5 if r == 0 else 0.0
    assert last["val_acc"] == pytest.approx(right / len(rows))
    for split in ("train", "test"):
        s = evaluate.evaluate(M.parse_config(evaluate.Config, [
            "--ckpt", str(out / "sft"), "--reward_model", str(out / "reward"), "--gold", "false", "--best_of_n", "4",
            "--max_new_tokens", "8", "--prompts", str(d / f"imdb_prompts_{split}.jsonl"), "--device", "cpu",
            "--dump_rankings", str(d / f"imdb_prefs_{split}.jsonl"), "--out", str(out / f"prefs_{split}.json")]))
        n_prompts = len(M.read_jsonl(str(d / f"imdb_prompts_{split}.jsonl")))
        assert s["rankings_dumped"] == n_prompts - s["rankings_skipped"] == len(open(d / f"imdb_prefs_{split}.jsonl").readlines())
        assert s["rankings_dumped"] >= 1
    dpo.train(M.parse_config(dpo.Config, [
        "--config", "configs/dpo_imdb_gpt2.toml", *CPU, "--compile", "false", "--init", str(out / "sft"),
        "--data", str(d / "imdb_prefs_train.jsonl"), "--val_data", str(d / "imdb_prefs_test.jsonl"),
        "--out_dir", str(out / "dpo"), "--batch_size", "2", "--grad_accum", "1", "--warmup", "1", "--n_samples", "0"]))
    ppo.train(M.parse_config(ppo.Config, [
        "--config", "configs/ppo_imdb_gpt2.toml", *CPU, "--compile", "false", "--policy", str(out / "sft"),
        "--reward_model", str(out / "reward"), "--prompts", str(d / "imdb_prompts_train.jsonl"), "--out_dir", str(out / "ppo"),
        "--total_episodes", "8", "--rollout_batch_size", "4", "--max_new_tokens", "6"]))
    rows = [json.loads(x) for x in open(out / "ppo" / "metrics.jsonl")]
    assert len(rows) == 2 and rows[0]["approx_kl_first_mb"] < 1e-10
    assert all(r["score_used"] == r["score"] for r in rows)  # eos_trick false: cut answers keep their RM score
