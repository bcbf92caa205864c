"""Tests of pretrain.py: token files, batches, the real CLI, exact resume after a kill.
Run: python -m pytest -q tests/test_pretrain.py"""

import json
import os

import numpy as np
import pytest
import torch

import model as M
from helpers import killed_at_step
import pretrain

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--log_interval", "1", "--eval_interval", "2", "--warmup", "2"]


def cfg_for(world, out_dir, *extra):
    return M.parse_config(pretrain.Config, ["--data", str(world / "pretrain.txt"), "--tokenizer", str(world / "tokenizer.tiktoken"),
                                            "--out_dir", str(out_dir), *TINY, *extra])


def test_token_files_end_every_document_with_eos(world, tokenizer, tmp_path):
    cfg = cfg_for(world, tmp_path)
    os.makedirs(tmp_path, exist_ok=True)
    meta = pretrain.build_token_files(cfg, tokenizer)
    train = np.fromfile(tmp_path / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(tmp_path / "val.bin", dtype=meta["dtype"])
    docs = pretrain.read_documents(cfg.data, cfg.doc_sep)
    assert (train == tokenizer.eot_id).sum() + (val == tokenizer.eot_id).sum() == len(docs)
    assert train[-1] == tokenizer.eot_id
    first = tokenizer.encode(docs[0])
    assert train[:len(first) + 1].tolist() == first + [tokenizer.eot_id]


def test_get_batch_targets_are_inputs_shifted():
    data = np.arange(100, dtype=np.uint16)
    x, y = pretrain.get_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == (4, 8) and torch.equal(y, x + 1)


def test_cli_trains_and_loss_falls(world, tmp_path):
    cfg = cfg_for(world, tmp_path, "--max_steps", "30", "--lr", "1e-2", "--ckpt_interval", "30")
    pretrain.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert json.load(open(tmp_path / "config.json"))["max_steps"] == 30
    m, tok, info = M.load_checkpoint(str(tmp_path))
    assert info["train"]["n_embd"] == 32 and tok.n_vocab == m.config.vocab_size


def test_resume_after_kill_equals_uninterrupted_run(world, tmp_path, monkeypatch):
    pretrain.train(cfg_for(world, tmp_path / "a", "--max_steps", "6", "--ckpt_interval", "2"))
    with killed_at_step(monkeypatch, 5):
        pretrain.train(cfg_for(world, tmp_path / "b", "--max_steps", "6", "--ckpt_interval", "2"))
    pretrain.train(cfg_for(world, tmp_path / "b", "--max_steps", "6", "--ckpt_interval", "2"))
    a, _, _ = M.load_checkpoint(str(tmp_path / "a"))
    b, _, _ = M.load_checkpoint(str(tmp_path / "b"))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tok_s"} for r in rows]  # noqa: E731
    ra = strip(json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl"))
    rb = strip(json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl"))
    assert ra == rb


def test_failed_data_check_leaves_nothing_that_blocks_the_corrected_command(world, tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(f"the fox {i} lives in the forest and eats the apple." for i in range(10)))
    small = lambda *a: M.parse_config(pretrain.Config, ["--data", str(corpus), "--tokenizer", str(world / "tokenizer.tiktoken"),  # noqa: E731
                                                        "--out_dir", str(tmp_path / "run"), *TINY, "--max_steps", "2", *a])
    with pytest.raises(M.DataError, match=r"the val split has \d+ tokens, fewer than block_size \+ 1 = 33 \(10 documents, "
                                          r"1 held out by val_frac 0.02\): raise --val_frac"):
        pretrain.train(small())
    assert os.listdir(tmp_path / "run") == ["config.json"]  # the check ran before any token file was written
    pretrain.train(small("--val_frac", "0.3"))  # the corrected command runs: that run never trained
    assert "never trained" in capsys.readouterr().out
    assert [r["step"] for r in M.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))][-1] == 2
