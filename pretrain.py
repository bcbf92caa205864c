"""
pretrain.py: next-token pretraining on plain text. The built-in task needs a base model that
knows the world's language before it can be taught to follow instructions.

Objective: minimise -sum_t log p(x_t | x_<t) over random windows of block_size tokens drawn from
the tokenized corpus (a memory-mapped uint16/uint32 file, nanoGPT style), documents separated by
<|endoftext|>. AdamW, linear warmup then cosine decay, gradient clipping, periodic held-out loss.

Data: a .txt file (documents separated by a blank line, see doc_sep) or a .jsonl of {"text": ...}.
The token files are cached in out_dir and rebuilt when the corpus or tokenizer changes.

Several GPUs: torchrun --nproc_per_node N pretrain.py ... (PyTorch DDP; batch_size stays the global
batch, each process takes its rows of it; rank 0 writes checkpoints and logs). --fsdp true shards the
model and its AdamW state instead (FSDP2, model.fsdp_wrap; docs/implementation_details.md item 23).

Resume: a checkpoint (weights, optimizer, RNG, step) is written to out_dir/ckpt every
ckpt_interval steps; running the same command again continues from it. Same seed on CPU gives
the same weights as an uninterrupted run.

Run:
  CPU, built-in task:  python pretrain.py --config configs/pretrain_world.toml
  one GPU, GPT-2 on your corpus:  python pretrain.py --init gpt2 --data my.txt --device cuda --compile true
"""

import dataclasses
import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import model as M

# --- config


@dataclass
class Config:
    data: str = ""  # (required) .txt (documents split by doc_sep) or .jsonl with "text"
    doc_sep: str = "\n\n"  # document separator in .txt files; "" = the whole file is one document
    tokenizer: str = ""  # (required when init = scratch) ranks file, GPT-2 dir or 'gpt2'; ignored when init is a model
    init: str = "scratch"  # 'scratch', a GPT-2 dir/name ('gpt2', ...), or one of our checkpoints
    out_dir: str = "out/pretrain"  # checkpoint (ckpt/), config.json, metrics.jsonl, the tokenized corpus
    overwrite: bool = False  # delete an existing run in out_dir and start afresh
    resume_changed: bool = False  # resume a run in out_dir although result-affecting settings changed (recorded in metrics.jsonl)
    wandb_project: str = ""  # mirror metrics.jsonl to this Weights & Biases project (optional: pip install wandb)
    wandb_mode: str = "offline"  # offline (no network; wandb sync later) | online
    # model (used when init = scratch)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # width of the residual stream
    block_size: int = 128  # max positions (the context length)
    dropout: float = 0.0  # dropout probability (0 for every RLHF model, item 2)
    bias: bool = True  # biases in Linear and LayerNorm (GPT-2 has them)
    # optimisation
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000  # optimizer steps
    lr: float = 3e-3  # peak learning rate
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay of the weight matrices
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm
    # bookkeeping
    val_frac: float = 0.02  # last fraction of documents held out
    eval_interval: int = 250  # steps between val metrics
    eval_iters: int = 20  # val batches per eval
    log_interval: int = 50  # steps between console/metrics.jsonl lines
    ckpt_interval: int = 500  # steps between checkpoints (always one at the end)
    seed: int = 0  # seeds init and the batch windows
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs in fp32
    compile: bool = False  # torch.compile the forward
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2) instead of DDP


# settings that cannot change the trained weights or the logged numbers: may differ on resume
SAFE_KEYS = {"log_interval", "eval_interval", "ckpt_interval", "device"}


# --- data


def read_documents(path, doc_sep):
    if path.endswith(".jsonl"):
        return [row["text"] for row in M.read_jsonl(path, ("text",))]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise M.DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    docs = [d for d in (text.split(doc_sep) if doc_sep else [text]) if d.strip()]
    if not docs:
        raise M.DataError(f"{path}: no text")
    return docs


def build_token_files(cfg, tokenizer):
    """Tokenize the corpus once into out_dir/{train,val}.bin; EOS after every document."""
    key = hashlib.sha1(f"{cfg.data}|{os.path.getmtime(cfg.data)}|{cfg.doc_sep}|{cfg.val_frac}|{tokenizer.n_vocab}".encode()).hexdigest()
    meta_path = os.path.join(cfg.out_dir, "tokens.json")
    if os.path.exists(meta_path) and json.load(open(meta_path)).get("key") == key:
        return json.load(open(meta_path))
    docs = read_documents(cfg.data, cfg.doc_sep)
    n_val = max(1, int(len(docs) * cfg.val_frac)) if len(docs) > 1 else 0
    dtype = np.uint16 if tokenizer.n_vocab <= 65536 else np.uint32
    meta = {"key": key, "dtype": np.dtype(dtype).name, "docs": len(docs)}
    splits = {}
    for split, part in (("train", docs[:len(docs) - n_val]), ("val", docs[len(docs) - n_val:] or docs[-1:])):
        ids = []
        for toks in tokenizer.encode_batch(part):
            ids.extend(toks)
            ids.append(tokenizer.eot_id)
        splits[split] = np.array(ids, dtype=dtype)
    for split, ids in splits.items():  # both checked before either file is written
        if len(ids) <= cfg.block_size:
            fix = "raise --val_frac" if split == "val" else "lower --val_frac"
            raise M.DataError(f"{cfg.data}: the {split} split has {len(ids)} tokens, fewer than block_size + 1 = "
                              f"{cfg.block_size + 1} ({len(docs)} documents, {n_val} held out by val_frac {cfg.val_frac}): "
                              f"{fix}, lower --block_size, or give a larger corpus")
    for split, ids in splits.items():
        ids.tofile(os.path.join(cfg.out_dir, f"{split}.bin.tmp"))
        os.replace(os.path.join(cfg.out_dir, f"{split}.bin.tmp"), os.path.join(cfg.out_dir, f"{split}.bin"))
        meta[split] = len(ids)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return meta


def get_batch(data, batch_size, block_size, gen):
    """Random windows: x (B, T) and targets y (B, T) = x shifted by one."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    return x, y


def lm_loss(model, x, y):
    """Mean next-token cross entropy of targets y (B, T), fp32, without the (B, T, V) logits
    (model.linear_cross_entropy)."""
    return model(x, targets=y) / y.numel()


@torch.no_grad()
def eval_loss(model, data, cfg, device, ctx):
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same windows at every eval
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, gen)
        with ctx:
            losses.append(lm_loss(model, x.to(device), y.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def init_model(cfg, device, state=None):
    """(model, tokenizer, start state or None): resume from out_dir when state is given, else init from cfg.init."""
    if state is not None:
        model, tokenizer, _ = M.load_checkpoint(os.path.join(cfg.out_dir, "ckpt"), device, dropout=cfg.dropout)
        return model, tokenizer, state
    if cfg.init == "scratch":
        tokenizer = M.load_tokenizer(cfg.tokenizer)
        config = M.GPTConfig(vocab_size=tokenizer.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
        return M.GPT(config).to(device), tokenizer, None
    model, tokenizer = M.load_gpt(cfg.init, device, cfg.dropout)
    return model, tokenizer, None


# --- training


def train(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    M.require(cfg, "data", *["tokenizer"] * (cfg.init == "scratch"))
    M.check_paths(data=cfg.data, tokenizer=cfg.tokenizer if cfg.init == "scratch" else "", init="" if cfg.init == "scratch" else cfg.init)
    M.check_roles(init=("" if cfg.init == "scratch" else cfg.init, "policy"))
    if cfg.init != "scratch" and cfg.block_size > M.block_size_of(cfg.init):
        raise M.ConfigError(f"block_size {cfg.block_size} > the block_size {M.block_size_of(cfg.init)} of {cfg.init}")
    M.check_fsdp(cfg)
    rank, world, device = M.ddp_setup(cfg.device)
    master = rank == 0  # only rank 0 writes files and logs
    if cfg.batch_size % world:
        raise M.ConfigError(f"batch_size {cfg.batch_size} must split evenly over {world} processes")
    run = M.start_run(cfg, SAFE_KEYS, master)
    if run.finished:
        return M.load_checkpoint(run.ckpt, device)[0]
    if master:
        M.check_warmup(cfg.warmup, cfg.max_steps, cfg.lr)
    torch.manual_seed(cfg.seed)
    model, tokenizer, state = init_model(cfg, device, run.state)
    if world > 1 and not master:
        torch.distributed.barrier()  # rank 0 tokenizes; the others then read its cached files
    meta = build_token_files(cfg, tokenizer)
    if world > 1 and master:
        torch.distributed.barrier()
    train_data = np.memmap(os.path.join(cfg.out_dir, "train.bin"), dtype=meta["dtype"], mode="r")
    val_data = np.memmap(os.path.join(cfg.out_dir, "val.bin"), dtype=meta["dtype"], mode="r")
    if master:
        M.print_config(cfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    print(f"rank {rank}/{world} | {model.num_params() / 1e6:.2f}M parameters | vocab {tokenizer.n_vocab} | train {meta['train']:,} tokens "
          f"| val {meta['val']:,} | {tokens_per_step:,} tokens/step | {cfg.max_steps * tokens_per_step / meta['train']:.1f} epochs")

    ddp_model = M.fsdp_wrap(model, world, device) if cfg.fsdp else M.ddp_wrap(model, world, device)  # FSDP: in place
    opt = M.configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device=device)  # FSDP: over the shards
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if state is not None:
        step = M.resume_state(opt, state, os.path.join(cfg.out_dir, "ckpt"), model)
        gen.set_state(state["data_rng"])
    ctx = M.autocast(device, cfg.dtype)
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    model.train()

    def checkpoint():
        M.save_checkpoint(os.path.join(cfg.out_dir, "ckpt"), model, tokenizer, dataclasses.asdict(cfg), role="policy",
                          state={"step": step, "optimizer": M.optimizer_state(opt, model), "data_rng": gen.get_state(), "rng": M.rng_state(),
                                 "finished": step == cfg.max_steps})

    t0 = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", dynamic_ncols=True, disable=not master)
    while step < cfg.max_steps:
        # 1. learning rate for this step
        lr = M.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        # 2. forward/backward over grad_accum micro-batches; under DDP each rank takes its rows of
        # the same global micro-batch and gradients are averaged when the last one is done
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, gen)  # (B, T): every rank draws the same
            x, y = x[rank::world], y[rank::world]  # (B / world, T)
            sync = world == 1 or micro == cfg.grad_accum - 1 or cfg.fsdp  # FSDP reduce-scatters every micro-batch
            with ctx, (nullcontext() if sync else ddp_model.no_sync()):
                loss = lm_loss(fwd, x.to(device), y.to(device)) / cfg.grad_accum
                loss.backward()
            total += loss.item()
        total = M.ddp_sum(total, world, device) / world
        if not np.isfinite(total):
            raise FloatingPointError(f"step {step}: loss is {total}; last good checkpoint is in {cfg.out_dir}/ckpt")
        # 3. clip and step
        grad_norm = M.clip_grad_checked(model.parameters(), cfg.grad_clip, f"step {step} (last good checkpoint: {cfg.out_dir}/ckpt)")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # 4. log, eval, checkpoint
        # (FSDP: every process runs the eval and the checkpoint's gather; rank 0 writes)
        if (master or cfg.fsdp) and (step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or step == cfg.max_steps):
            metrics = {"step": step, "loss": total, "lr": lr, "grad_norm": grad_norm,
                       "tok_s": int(tokens_per_step * (step - (state or {}).get("step", 0)) / (time.time() - t0))}
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                metrics["val_loss"] = eval_loss(model, val_data, cfg, device, ctx)
            if master:
                M.log_metrics(cfg.out_dir, metrics)
        if (master or cfg.fsdp) and (step % cfg.ckpt_interval == 0 or step == cfg.max_steps):
            checkpoint()
    bar.close()
    M.ddp_cleanup(world)
    return model


if __name__ == "__main__":
    M.main(train, Config)
