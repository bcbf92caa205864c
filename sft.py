"""
sft.py: supervised fine-tuning on prompt/response pairs (step 1 of InstructGPT, Ouyang et al. 2022).

Objective: minimise -(1/N) sum over response tokens of log pi(y_t | x, y_<t), where each example is
the chat template "Human: {prompt}\\n\\nAssistant: {response}<|endoftext|>" and N counts the
response tokens of the whole optimizer step. The prompt tokens are context only; the final EOS
is a target (docs/implementation_details.md, item 5), so the model learns to stop. Prompt and response are
tokenized separately and concatenated (item 8). Rows are right-padded with PAD_ID, which is never
a target.

Data: JSONL of {"prompt", "response"}, or Alpaca's {"instruction", "input", "output"} (prompt =
instruction, plus a blank line and the input when there is one). Empty prompts or responses are
errors naming the file and line.
Too long (prompt + response > max_len): model.truncate_example's rule, the prompt is cut from the
left, keeping its last tokens; if the response alone leaves fewer than min_prompt prompt tokens,
the response is cut on the right too (so that example loses its EOS). Both counts are printed and
saved in data_stats.json.

Resume: the batch order is a function of (seed, step), so running the same command again
continues from out_dir/ckpt exactly.

Several GPUs: torchrun --nproc_per_node N sft.py ... (PyTorch DDP; batch_size stays global, each
process takes its share of every micro-batch, the loss is normalised by the whole step's tokens).
With --fsdp true the model and its AdamW state are sharded instead (FSDP2, model.fsdp_wrap): the same
step, 1/N of the weights per process; eval and samples then run on every process.

Run:
  CPU, built-in task:  python sft.py --config configs/sft_world.toml
  one GPU, GPT-2 on Alpaca:  python sft.py --config configs/sft_alpaca_gpt2.toml
"""

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M

# --- config


@dataclass
class Config:
    data: str = ""  # (required) JSONL of {"prompt", "response"} or Alpaca rows
    val_data: str = ""  # (required) held-out pairs for the eval loss and samples
    init: str = ""  # (required) a checkpoint of ours, or a GPT-2 dir/name
    out_dir: str = "out/sft"  # checkpoint (ckpt/), config.json, metrics.jsonl, data_stats.json
    template: str = "auto"  # chat template, a key of model.CHAT_TEMPLATES ("hh": Human/Assistant; "none": raw continuation); auto = init's, else hh
    overwrite: bool = False  # delete an existing run in out_dir and start afresh
    resume_changed: bool = False  # resume a run in out_dir although result-affecting settings changed (recorded in metrics.jsonl)
    wandb_project: str = ""  # mirror metrics.jsonl to this Weights & Biases project (optional: pip install wandb)
    wandb_mode: str = "offline"  # offline (no network; wandb sync later) | online
    max_len: int = 128  # prompt + response tokens per row
    min_prompt: int = 16  # prompt tokens always kept when truncating
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 2.0  # passes over the training data
    lr: float = 1e-3  # peak learning rate
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay of the weight matrices
    grad_clip: float = 1.0  # max global gradient norm
    dropout: float = 0.0  # dropout probability (0 for every RLHF model, item 2)
    eval_interval: int = 200  # steps between val metrics
    log_interval: int = 25  # steps between console/metrics.jsonl lines
    ckpt_interval: int = 200  # steps between checkpoints (always one at the end)
    n_samples: int = 4  # held-out prompts sampled and printed at each eval
    sample_temperature: float = 1.0  # temperature of the printed samples
    max_new_tokens: int = 64  # length cap of sampled answers
    seed: int = 0  # seeds init, batch order and sampling
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs in fp32; loss math is fp32 anyway
    compile: bool = False  # torch.compile the forward
    lora_rank: int = 0  # LoRA adapters of this rank, all else frozen (model.add_lora); 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA output scale alpha / rank
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # which Linears of each block get adapters
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2) instead of DDP


# settings that cannot change the trained weights or the logged numbers: may differ on resume
SAFE_KEYS = {"log_interval", "eval_interval", "ckpt_interval", "n_samples", "device"}


# --- data


def read_pairs(path):
    """(prompt, response) pairs; Alpaca rows are converted; empty fields are errors."""
    rows = M.read_jsonl(path)
    pairs = []
    for n, row in enumerate(rows, 1):
        if "instruction" in row and "output" in row:
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            response = row["output"]
        elif "prompt" in row and "response" in row:
            prompt, response = row["prompt"], row["response"]
        else:
            raise M.DataError(f"{path}: row {n}: expected keys prompt+response or instruction+input+output, got {sorted(row)}")
        if not isinstance(prompt, str) or not isinstance(response, str) or not prompt.strip() or not response.strip():
            raise M.DataError(f"{path}: row {n}: empty or non-string prompt/response")
        pairs.append((prompt, response.strip()))
    return pairs


def tokenize_pairs(pairs, tokenizer, max_len, min_prompt, template="hh"):
    """Each pair -> (ids, n_prompt): ids = prompt ids + response ids + EOS, truncated by the rule above."""
    out, stats = [], {"examples": len(pairs), "prompt_truncated": 0, "response_truncated": 0}
    for prompt, response in pairs:
        p, r, cut_p, cut_r = M.truncate_example(*M.encode_chat(tokenizer, prompt, response, template), max_len, min_prompt)
        stats["prompt_truncated"] += cut_p
        stats["response_truncated"] += cut_r
        out.append((p + r, len(p)))
    return out, stats


def collate(examples):
    """Right-padded ids (B, T) and the loss mask (B, T): 1 on response tokens and the EOS."""
    return M.pad_responses(examples)


def batch_indices(step, n, per_step, seed):
    """Example indices of optimizer step `step`: a fresh permutation every epoch, from (seed, epoch)."""
    steps_per_epoch = math.ceil(n / per_step)
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[k * per_step:(k + 1) * per_step].tolist()


# --- the loss


def sft_loss_terms(model, ids, mask):
    """Summed negative log-likelihood of the masked tokens and their count. ids, mask (B, T).

    Position t predicts ids[:, t + 1]: the targets are ids shifted left, weighted by the mask of
    the token they predict (the last position predicts nothing). fp32, without the (B, T, V)
    logits (model.linear_cross_entropy)."""
    targets = F.pad(ids[:, 1:], (0, 1), value=M.PAD_ID)  # (B, T)
    m = F.pad(mask[:, 1:].float(), (0, 1))  # (B, T)
    return model(ids, targets=targets, weights=m), m.sum()


@torch.no_grad()
def eval_loss(model, examples, batch_size, device, ctx):
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        ids, mask = collate(examples[i:i + batch_size])
        with ctx:
            nll, n = sft_loss_terms(model, ids.to(device), mask.to(device))
        total, count = total + nll.item(), count + n.item()
    model.train()
    return total / count


@torch.no_grad()
def print_samples(model, tokenizer, prompts, cfg, device, show=True):
    """A few held-out answers, the first sign of over-optimisation (docs/implementation_details.md, item 18).
    show=False: sampled (an FSDP process joining the gather), not printed."""
    if not prompts:
        return
    model.eval()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    answers = M.sample_answers(model, tokenizer, prompts, cfg.max_new_tokens, cfg.sample_temperature, len(prompts), g, cfg.template)
    for p, (resp, ended) in zip(prompts if show else [], answers):
        tqdm.write(f"  > {p}\n    {tokenizer.decode(resp)!r}{'' if ended else ' [no EOS]'}")
    model.train()


# --- training


def train(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    M.require(cfg, "data", "val_data", "init")
    M.check_fsdp(cfg)
    M.check_paths(data=cfg.data, val_data=cfg.val_data, init=cfg.init)
    M.check_roles(init=(cfg.init, "policy"))
    cfg.template = M.resolve_template(cfg.template, cfg.init)
    if cfg.max_len > M.block_size_of(cfg.init):
        raise M.ConfigError(f"max_len {cfg.max_len} > the block_size {M.block_size_of(cfg.init)} of {cfg.init}")
    rank, world, device = M.ddp_setup(cfg.device)
    master = rank == 0  # only rank 0 writes files and logs
    run = M.start_run(cfg, SAFE_KEYS, master)
    if run.finished:
        return M.load_checkpoint(run.ckpt, device)[0]
    torch.manual_seed(cfg.seed)
    ckpt, state = run.ckpt, run.state
    if state is not None:
        model, tokenizer, _ = M.load_checkpoint(ckpt, device, dropout=cfg.dropout)
    else:
        model, tokenizer = M.load_gpt(cfg.init, device, cfg.dropout)
    model = M.adapt(model, cfg, resumed=state is not None)
    if cfg.max_len > model.config.block_size:
        raise M.ConfigError(f"max_len {cfg.max_len} > the model's block_size {model.config.block_size}")
    train_ex, stats = tokenize_pairs(read_pairs(cfg.data), tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
    val_pairs = read_pairs(cfg.val_data)
    val_ex, val_stats = tokenize_pairs(val_pairs, tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
    if master:
        with open(os.path.join(cfg.out_dir, "data_stats.json"), "w") as f:
            json.dump({"train": stats, "val": val_stats}, f)
        M.print_config(cfg)
    per_step = cfg.batch_size * cfg.grad_accum
    max_steps = math.ceil(cfg.epochs * math.ceil(len(train_ex) / per_step))
    print(f"train {stats} | val {val_stats} | {per_step} examples/step | {max_steps} steps")
    if master:
        M.check_warmup(cfg.warmup, max_steps, cfg.lr)

    ddp_model = M.fsdp_wrap(model, world, device) if cfg.fsdp else M.ddp_wrap(model, world, device)  # FSDP: in place
    opt = M.configure_optimizer(model, cfg.lr, cfg.weight_decay, device=device)  # after the wrap: FSDP shards its state
    step = 0
    if state is not None:
        step = M.resume_state(opt, state, ckpt, model)
    ctx = M.autocast(device, cfg.dtype)
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    model.train()
    t0, start = time.time(), step
    bar = tqdm(total=max_steps, initial=step, desc="sft", dynamic_ncols=True, disable=not master)
    while step < max_steps:
        # 1. the examples of this step, split into micro-batches, each split over the ranks
        idx = batch_indices(step, len(train_ex), per_step, cfg.seed)
        micro = [idx[j::cfg.grad_accum] for j in range(cfg.grad_accum) if idx[j::cfg.grad_accum]]
        n_tokens = sum(len(train_ex[i][0]) - train_ex[i][1] for i in idx)  # target tokens of the whole step, all ranks
        lr = M.lr_at(step, max_steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        # 2. token-mean loss over the whole step, accumulated over micro-batches
        total = 0.0
        for j, rows in enumerate(micro):
            mine = rows[rank::world]
            ids, mask = collate([train_ex[i] for i in mine or rows[:1]])  # an empty share still joins the all-reduce
            sync = world == 1 or j == len(micro) - 1 or cfg.fsdp  # FSDP reduce-scatters every micro-batch
            with ctx, (nullcontext() if sync else ddp_model.no_sync()):
                nll, _ = sft_loss_terms(fwd, ids.to(device), mask.to(device))
                nll = nll * (1.0 if mine else 0.0)
                (nll / n_tokens * world).backward()  # DDP (and FSDP) average over ranks: * world makes it the sum
            total += nll.item() / n_tokens
        total = M.ddp_sum(total, world, device)
        if not math.isfinite(total):
            raise FloatingPointError(f"step {step}: loss is {total}; last good checkpoint is in {ckpt}")
        # 3. clip, step
        grad_norm = M.clip_grad_checked(model.parameters(), cfg.grad_clip, f"step {step} (last good checkpoint: {ckpt})")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # 4. log, eval with samples, checkpoint
        last = step == max_steps
        # (FSDP: every process runs the eval, the samples and the checkpoint's gather; rank 0 writes)
        if (master or cfg.fsdp) and (step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or last):
            metrics = {"step": step, "loss": total, "lr": lr, "grad_norm": grad_norm,
                       "ex_s": round(per_step * (step - start) / (time.time() - t0), 1)}
            if step % cfg.eval_interval == 0 or last:
                metrics["val_loss"] = eval_loss(model, val_ex, cfg.batch_size, device, ctx)
                print_samples(model, tokenizer, [p for p, _ in val_pairs[:cfg.n_samples]], cfg, device, master)
            if master:
                M.log_metrics(cfg.out_dir, metrics)
        if (master or cfg.fsdp) and (step % cfg.ckpt_interval == 0 or last):
            M.save_checkpoint(ckpt, model, tokenizer, dataclasses.asdict(cfg), role="policy",
                              state={"step": step, "optimizer": M.optimizer_state(opt, model), "rng": M.rng_state(),
                                     "finished": last})
    bar.close()
    M.ddp_cleanup(world)
    return model


if __name__ == "__main__":
    M.main(train, Config)
