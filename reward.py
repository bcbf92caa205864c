"""
reward.py: a reward model from human preferences (step 2 of InstructGPT, Ouyang et al. 2022).

Objective (InstructGPT Eq. 1; Stiennon et al. 2020 Eq. 1; Bradley-Terry):
  loss(theta) = -1 / C(K,2) * E_(x, y_w, y_l) [ log sigmoid(r(x, y_w) - r(x, y_l)) ]
A K-answer ranking contributes all C(K,2) of its pairs, kept together in one batch element: each
answer goes through the model once and the pair differences are taken from its K scores
(InstructGPT section 3.5: per-pair batches over-fit and cost C(K,2) forwards instead of K).
Each ranking weighs the same whatever its K (the 1/C(K,2)); a preference pair is a ranking of 2.
Options: a margin m, -log sigmoid(r_w - r_l - m) (Llama 2 uses it for graded preferences), and
label smoothing e, -(1-e) log sigmoid(d) - e log sigmoid(-d) (robust to flipped labels).

objective = "classify": labelled answers instead of comparisons, {"prompt", "response", "label"}
with label 1 (e.g. a positive IMDb review) or 0. A labelled answer is a pair against a constant
score 0: -log sigmoid(r) for label 1, -log sigmoid(-r) for label 0, the logistic loss of a
classifier whose logit is r. So r is the log-odds of "positive" (before the normalisation
below), the sentiment reward of Ziegler et al. 2019 (section 4.1) and of the DPO paper's
controlled-sentiment task (Rafailov et al. 2023, section 6.1); accuracy is then the
classifier's accuracy.

Details (docs/implementation_details.md): r is the scalar head read at the last real token, the EOS that ends
every answer (items 5, 6); initialised from the SFT model, head N(0, 1/sqrt(n_embd + 1)), bias 0;
one epoch, learning rate annealed linearly to 0 (item 11: it over-fits fast); dropout off (item 2).
After training the score is normalised so the policy's own samples (the answers of the training
data, which the SFT policy wrote) score mean 0 and std 1: gain and bias are stored in the
checkpoint and applied by ScalarModel.score (item 10; lm-human-preferences, InstructGPT).

Data: rankings {"prompt", "responses": [best, ..., worst]}, pairs {"prompt", "chosen", "rejected"},
or HH-RLHF transcripts {"chosen", "rejected"} (model.read_preferences); with objective "classify",
{"prompt", "response", "label"} rows (read_labels).

An ensemble for ppo.py and grpo.py (a comma-separated reward_model; Coste et al. 2023): k runs of this
script that differ only in --seed, written to out/reward_seed<s>. The seed draws the head's initial
weights and the order of the batches; the trunk starts from the same SFT checkpoint and every member
sees the same data. That is Eisenstein et al. 2023's fine-tune ensemble ("Helping or Herding?"), the
less diverse kind: members that share a pretrained trunk tend to make the same errors, so their spread
understates the uncertainty (their pretrain ensembles, members pretrained from different seeds, disagree
more). Each member fits its own normalisation (mean 0, std 1 on the SFT answers), so every member's
score is on the same scale before they are combined.

Several GPUs: torchrun --nproc_per_node N reward.py ... (PyTorch DDP; batch_size stays global,
each process takes its share of the rankings of every micro-batch).

Run:
  CPU, built-in task:  python reward.py --config configs/reward_world.toml
  an ensemble of 3:    for s in 1 2 3; do python reward.py --config configs/reward_world.toml --seed $s --out_dir out/reward_seed$s; done
  one GPU, GPT-2 on HH-RLHF:  python reward.py --config configs/reward_hh_gpt2.toml
  one GPU, IMDb sentiment classifier:  python reward.py --config configs/reward_imdb_gpt2.toml
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
    objective: str = "preference"  # "preference": rankings, pairs or HH transcripts; "classify": labelled answers
    data: str = ""  # (required) rankings, pairs or HH transcripts (or labelled answers)
    val_data: str = ""  # (required) held-out rows of the same kind, for the val_ metrics
    init: str = ""  # (required) the SFT checkpoint (or a GPT-2 dir/name)
    out_dir: str = "out/reward"  # checkpoint (ckpt/), config.json, metrics.jsonl, data_stats.json
    template: str = "auto"  # chat template (model.CHAT_TEMPLATES); auto = the init checkpoint's, else hh
    overwrite: bool = False  # delete an existing run in out_dir and start afresh
    resume_changed: bool = False  # resume a run in out_dir although result-affecting settings changed (recorded in metrics.jsonl)
    wandb_project: str = ""  # mirror metrics.jsonl to this Weights & Biases project (optional: pip install wandb)
    wandb_mode: str = "offline"  # offline (no network; wandb sync later) | online
    max_len: int = 128  # prompt + response tokens per row
    min_prompt: int = 16  # prompt tokens always kept when truncating
    batch_size: int = 8  # rankings (or pairs) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the training data
    lr: float = 1e-3  # peak learning rate
    warmup: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay of the weight matrices
    grad_clip: float = 1.0  # max global gradient norm
    margin: float = 0.0  # Bradley-Terry margin m in -log sigmoid(r_w - r_l - m)
    label_smoothing: float = 0.0  # assumed probability that a label is flipped (conservative loss)
    normalize: bool = True  # fit gain/bias so the training answers score mean 0, std 1
    eval_interval: int = 50  # steps between val metrics
    log_interval: int = 10  # steps between console/metrics.jsonl lines
    ckpt_interval: int = 50  # steps between checkpoints (always one at the end)
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
SAFE_KEYS = {"log_interval", "eval_interval", "ckpt_interval", "device"}


# --- data


def read_labels(path):
    """Labelled answers {"prompt", "response", "label": 1 or 0} as groups (prompt, [best, worst])
    in which None stands for the constant score 0: (prompt, [response, None]) for label 1,
    (prompt, [None, response]) for label 0. A bad label or an empty text is an error naming the line."""
    groups, stats = [], {"rows": 0, "positive": 0}
    for n, row in enumerate(M.read_jsonl(path, ("prompt", "response", "label")), 1):
        prompt, response, label = row["prompt"], row["response"], row["label"]
        if not all(isinstance(t, str) and t.strip() for t in (prompt, response)):
            raise M.DataError(f"{path}:{n}: empty or non-string prompt or response")
        if label not in (0, 1):
            raise M.DataError(f"{path}:{n}: label must be 1 (positive) or 0 (negative), got {label!r}")
        stats["rows"] += 1
        stats["positive"] += int(label)
        response = response.strip()
        groups.append((prompt, [response, None] if label == 1 else [None, response]))
    return groups, stats


def encode_groups(groups, tokenizer, max_len, min_prompt, template="hh"):
    """Each (prompt, [answers best..worst]) -> list of token rows prompt + answer + EOS (None, the
    constant 0 of a labelled answer, stays None). Too long rows follow model.truncate_group: the
    prompt is cut once per group, sized by its longest answer, so the K answers of a ranking are
    compared in the same context; truncations count rows."""
    out, stats = [], {"groups": len(groups), "prompt_truncated": 0, "response_truncated": 0}
    for prompt, answers in groups:
        p = M.encode_chat(tokenizer, prompt, template=template)
        real = [M.encode_chat(tokenizer, prompt, a, template)[1] for a in answers if a is not None]
        p, real, cut_p, cut_r = M.truncate_group(p, real, max_len, min_prompt)  # one prompt cut for the whole group
        stats["prompt_truncated"] += cut_p * len(real)
        stats["response_truncated"] += sum(cut_r)
        real = iter(real)
        out.append([None if a is None else p + next(real) for a in answers])
    return out, stats


def collate(groups):
    """Flatten groups of rows into one right-padded batch.

    Returns ids (N, T), and for every pair (i better than j within a group) the indices w (P,),
    l (P,) into the N rows and a weight (P,) = 1 / (C(K,2) * n_groups), so that the weighted sum
    over pairs is the mean over groups of the mean over each group's pairs. A None answer (the
    constant 0 of a labelled answer) gets index -1, where pair_scores puts that 0.
    """
    rows, w, l, weight = [], [], [], []
    for rows_g in groups:
        index = []
        for r in rows_g:
            index.append(-1 if r is None else len(rows))
            rows.extend([] if r is None else [r])
        k = len(rows_g)
        for i in range(k):
            for j in range(i + 1, k):
                w.append(index[i])
                l.append(index[j])
                weight.append(1.0 / (k * (k - 1) / 2 * len(groups)))
    return M.pad_right(rows), torch.tensor(w), torch.tensor(l), torch.tensor(weight)


def batch_indices(step, n, per_step, seed):
    """Group indices of optimizer step `step`: a fresh permutation every epoch, from (seed, epoch)."""
    steps_per_epoch = math.ceil(n / per_step)
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[k * per_step:(k + 1) * per_step].tolist()


# --- the loss


def reward_loss(r_chosen, r_rejected, weight, margin=0.0, label_smoothing=0.0):
    """Bradley-Terry loss of pairs (InstructGPT Eq. 1) with optional margin and label smoothing.

    r_chosen, r_rejected (P,) scores of the preferred and the other answer; weight (P,) sums to
    the number of groups' share of this step. Returns the weighted loss (scalar).
    """
    d = r_chosen - r_rejected - margin  # (P,)
    losses = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    return (losses * weight).sum()


def scores_of(model, ids):
    """Raw reward at the last real token of each right-padded row: (N,)."""
    values = model(ids)  # (N, T): right padding needs no attention mask (causal)
    return values.gather(1, M.last_index(ids != M.PAD_ID)[:, None]).squeeze(1)


def pair_scores(model, ids, w, l):
    """fp32 scores of the better and the worse side of every pair, (P,) each; index -1 is the
    constant 0 that a labelled answer is compared with."""
    s = F.pad(scores_of(model, ids).float(), (0, 1))  # (N + 1,)
    return s[w], s[l]


@torch.no_grad()
def evaluate(model, groups, cfg, device, ctx):
    """Pairwise accuracy (ties count half), mean margin r_w - r_l and loss over all pairs."""
    model.eval()
    correct, margin, loss, n = 0.0, 0.0, 0.0, 0
    for i in range(0, len(groups), cfg.batch_size):
        ids, w, l, weight = collate(groups[i:i + cfg.batch_size])
        with ctx:
            sw, sl = pair_scores(model, ids.to(device), w.to(device), l.to(device))
        d = (sw - sl).cpu()
        correct += (d > 0).sum().item() + 0.5 * (d == 0).sum().item()
        margin += d.sum().item()
        loss += -F.logsigmoid(d).sum().item()
        n += len(d)
    model.train()
    return {"val_acc": correct / n, "val_margin": margin / n, "val_loss": loss / n}


@torch.no_grad()
def fit_normalisation(model, groups, cfg, device, ctx):
    """gain, bias such that gain * r + bias has mean 0, std 1 over every answer in groups."""
    model.eval()
    scores = []
    for i in range(0, len(groups), cfg.batch_size):
        ids, _, _, _ = collate(groups[i:i + cfg.batch_size])
        with ctx:
            scores.append(scores_of(model, ids.to(device)).float().cpu())
    s = torch.cat(scores)
    gain = 1.0 / s.std().clamp(min=1e-6)
    return gain.item(), (-s.mean() * gain).item()


# --- training


def train(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    M.require(cfg, "data", "val_data", "init")
    M.check_paths(data=cfg.data, val_data=cfg.val_data, init=cfg.init)
    M.check_roles(init=(cfg.init, "policy"))  # the reward model starts from a policy's trunk, with a fresh head
    if cfg.objective not in ("preference", "classify"):
        raise M.ConfigError(f"objective must be 'preference' or 'classify', not {cfg.objective!r}")
    M.check_fsdp(cfg)
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
        model, tokenizer, _ = M.load_checkpoint(ckpt, device, kind="scalar")
    else:
        policy, tokenizer = M.load_gpt(cfg.init, device)
        model = M.scalar_from_gpt(policy)  # fresh head: N(0, 1/sqrt(n_embd + 1)), bias 0
        del policy
    model = M.adapt(model, cfg, resumed=state is not None)
    read = read_labels if cfg.objective == "classify" else M.read_preferences
    raw_train, train_read = read(cfg.data)
    raw_val, val_read = read(cfg.val_data)
    train_g, train_stats = encode_groups(raw_train, tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
    val_g, val_stats = encode_groups(raw_val, tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
    if master:
        M.print_config(cfg)
    per_step = cfg.batch_size * cfg.grad_accum
    max_steps = math.ceil(cfg.epochs * math.ceil(len(train_g) / per_step))
    n_pairs = sum(len(g) * (len(g) - 1) // 2 for g in train_g)
    print(f"train {train_read} {train_stats} ({n_pairs} pairs) | val {val_read} {val_stats} | {max_steps} steps")
    if master:
        M.check_warmup(cfg.warmup, max_steps, cfg.lr)
    if master:
        with open(os.path.join(cfg.out_dir, "data_stats.json"), "w") as f:
            json.dump({"train": {**train_read, **train_stats, "pairs": n_pairs}, "val": {**val_read, **val_stats}}, f)

    ddp_model = M.fsdp_wrap(model, world, device) if cfg.fsdp else M.ddp_wrap(model, world, device)  # FSDP: in place
    opt = M.configure_optimizer(model, cfg.lr, cfg.weight_decay, device=device)  # after the wrap: FSDP shards its state
    step = 0
    if state is not None:
        step = M.resume_state(opt, state, ckpt, model)
    ctx = M.autocast(device, cfg.dtype)
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    model.train()
    t0, start = time.time(), step
    bar = tqdm(total=max_steps, initial=step, desc="reward", dynamic_ncols=True, disable=not master)
    while step < max_steps:
        # 1. the rankings of this step; learning rate: warmup, then linear decay to 0 (item 11)
        idx = batch_indices(step, len(train_g), per_step, cfg.seed)
        lr = M.lr_at(step, max_steps, cfg.lr, cfg.warmup, min_lr_frac=0.0, schedule="linear")
        for group in opt.param_groups:
            group["lr"] = lr
        # 2. one forward per answer, the loss over all pairs of each ranking
        total, acc, n_pairs = 0.0, 0.0, 0
        micro = [idx[j::cfg.grad_accum] for j in range(cfg.grad_accum) if idx[j::cfg.grad_accum]]  # the last step can be short
        for j, rows in enumerate(micro):
            mine = rows[rank::world]  # this rank's share; an empty share still joins the all-reduce
            ids, w, l, weight = collate([train_g[i] for i in mine or rows[:1]])
            sync = world == 1 or j == len(micro) - 1 or cfg.fsdp  # FSDP reduce-scatters every micro-batch
            with ctx, (nullcontext() if sync else ddp_model.no_sync()):
                sw, sl = pair_scores(fwd, ids.to(device), w.to(device), l.to(device))  # (P,) each
                # each group weighs 1/len(idx) of the step; DDP (and FSDP) average over ranks, so * world
                weight = weight.to(device) * (len(mine) / len(idx)) * world
                loss = reward_loss(sw, sl, weight, cfg.margin, cfg.label_smoothing)
                loss.backward()
            if mine:
                total += loss.item() / world
                acc += (sw > sl).float().sum().item()
                n_pairs += len(w)
        total = M.ddp_sum(total, world, device)
        acc, n_pairs = M.ddp_sum(acc, world, device), M.ddp_sum(n_pairs, world, device)
        if not math.isfinite(total):
            raise FloatingPointError(f"step {step}: loss is {total}; last good checkpoint is in {ckpt}")
        # 3. clip, step
        grad_norm = M.clip_grad_checked(model.parameters(), cfg.grad_clip, f"step {step} (last good checkpoint: {ckpt})")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # 4. log, eval, checkpoint
        last = step == max_steps
        # (FSDP: every process runs the eval and the checkpoint's gather; rank 0 writes)
        if (master or cfg.fsdp) and (step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or last):
            metrics = {"step": step, "loss": total, "acc": acc / n_pairs, "lr": lr, "grad_norm": grad_norm,
                       "groups_s": round(per_step * (step - start) / (time.time() - t0), 1)}
            if step % cfg.eval_interval == 0 or last:
                metrics.update(evaluate(model, val_g, cfg, device, ctx))
            if master:
                M.log_metrics(cfg.out_dir, metrics)
        if last and cfg.normalize:
            # 5. normalise: the policy's own answers score mean 0, std 1 (item 10)
            gain, bias = fit_normalisation(model, train_g, cfg, device, ctx)
            model.reward_gain.fill_(gain)
            model.reward_bias.fill_(bias)
            print(f"reward normalisation: gain {gain:.4f} bias {bias:.4f}")
        if (master or cfg.fsdp) and (step % cfg.ckpt_interval == 0 or last):
            M.save_checkpoint(ckpt, model, tokenizer, dataclasses.asdict(cfg), role="reward_model", fitted=last and cfg.normalize,
                              state={"step": step, "optimizer": M.optimizer_state(opt, model), "rng": M.rng_state(),
                                     "finished": last})
    bar.close()
    M.ddp_cleanup(world)
    return model


if __name__ == "__main__":
    M.main(train, Config)
