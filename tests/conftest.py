"""Shared fixtures: a tiny generated world, a BPE trained on it, a tiny random checkpoint, the same
with non-zero LoRA adapters, and a reward model (session-scoped, built once). Shared helpers that
are not fixtures live in helpers.py (pytest's conftest is not for importing)."""

import pytest
import torch

import model as M
from data.bpe import train_bpe
from data.world import generate

torch.set_num_threads(1)  # tiny models: one thread is faster, and tests running beside a job don't thrash


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small world (corpus, SFT pairs, prompts) with its tokenizer.tiktoken."""
    d = tmp_path_factory.mktemp("world")
    generate(d, seed=0, corpus_mb=0.1, n_sft=400)
    text = (d / "pretrain.txt").read_text() + (d / "sft_train.jsonl").read_text()
    M.write_ranks(train_bpe(text, 600), d / "tokenizer.tiktoken")
    return d


@pytest.fixture(scope="session")
def tokenizer(world):
    return M.load_tokenizer(str(world / "tokenizer.tiktoken"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer):
    """A random tiny GPT saved as one of our checkpoints (stands in for a pretrained model)."""
    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    torch.manual_seed(0)
    config = M.GPTConfig(vocab_size=tokenizer.n_vocab, block_size=96, n_layer=2, n_head=2, n_embd=32)
    M.save_checkpoint(str(d), M.GPT(config), tokenizer, {})
    return str(d)


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory, tiny_ckpt):
    """The tiny GPT as a reward model (fresh head), saved as a checkpoint."""
    torch.manual_seed(1)  # the head's init draws from the global RNG: the same head whichever tests ran first
    rm, tok, _ = M.load_checkpoint(tiny_ckpt, kind="scalar")
    d = str(tmp_path_factory.mktemp("rm") / "ckpt")
    M.save_checkpoint(d, rm, tok, {})
    return d


@pytest.fixture(scope="session")
def tiny_lora_sft(tmp_path_factory, tiny_ckpt):
    """The tiny GPT with trained-looking LoRA adapters (B != 0), saved unmerged: an SFT checkpoint
    made with lora_rank > 0, which a full fine-tuning RL stage merges."""
    model, tokenizer, _ = M.load_checkpoint(tiny_ckpt)
    model = M.add_lora(model, 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    d = str(tmp_path_factory.mktemp("lora_sft") / "ckpt")
    M.save_checkpoint(d, model, tokenizer, {})
    return d
