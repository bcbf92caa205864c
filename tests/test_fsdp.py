"""FSDP2 with torchrun (--fsdp true): 2 CPU processes (gloo), each holding half of every model and of
its AdamW state, give the losses, gradient norms and final weights of one unsharded process on the
same global batch, within the DDP tests' tolerances (tests/test_ddp.py); sampling gathers the
weights (model.gathered); checkpoints are whole and resume exactly; --fsdp true without torchrun
or with what it cannot run is a ConfigError naming the key. Each torchrun launch costs seconds: the
SFT run and the in-process checks are in the default suite, the other stages behind slow
(`python -m pytest -m slow tests/test_fsdp.py` after touching a stage's FSDP path).
Run: python -m pytest -q tests/test_fsdp.py"""

import pytest
import torch

import model as M
import sft
from helpers import assert_same_run


def sft_args(world, tiny_ckpt):
    return ["--data", str(world / "sft_train.jsonl"), "--val_data", str(world / "sft_val.jsonl"), "--init", tiny_ckpt,
            "--max_len", "48", "--batch_size", "5", "--grad_accum", "2", "--epochs", "0.06", "--log_interval", "1",
            "--eval_interval", "100", "--n_samples", "1", "--max_new_tokens", "4", "--device", "cpu"]


def test_sft_fsdp_equals_one_process(world, tiny_ckpt, tmp_path):
    assert_same_run(tmp_path, "sft.py", sft_args(world, tiny_ckpt), ["loss", "grad_norm", "val_loss"], ["--fsdp", "true"])
