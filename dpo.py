"""
dpo.py: Direct Preference Optimization: the policy learns from preference pairs directly, with no
reward model and no sampling (Rafailov et al. 2023), plus its IPO and conservative variants.

Objective. For a prompt x with a preferred answer y_w and a dispreferred one y_l, the policy pi
(initialised from SFT) and the frozen reference pi_ref (the same SFT weights):
  h = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)]
where log pi(y|x) is summed over the response tokens, its EOS included; prompt and padding tokens
count nothing.
  DPO (Rafailov et al. 2023, Eq. 7):   loss = -log sigmoid(beta h)
  conservative DPO, label smoothing e (Mitchell 2023, a note on DPO with noisy preferences; the
  DPO reference code's cDPO):        loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
  IPO (Azar et al. 2023, Eq. 17):      loss = (h - 1 / (2 beta))^2
averaged over the pairs of an optimizer step. The implicit reward of an answer is
  r(x, y) = beta (log pi(y|x) - log pi_ref(y|x))            (Rafailov et al. 2023, Sec. 5)
logged for chosen and rejected with their margin and the accuracy (chosen > rejected).

Expected behaviour (docs/implementation_details.md, DPO): at step 0 pi = pi_ref, so h = 0, the loss is log 2
and both rewards are 0. Only the margin is optimised: the chosen log-prob usually falls too
(the rejected one falls faster); that is not a bug. A training loss near 0 with huge margins
means over-fitting; watch the val_ metrics and val_logratio.

Steps of train():
  0. reference  log pi_ref of every training pair the run will use and every validation pair,
                ONCE, under no_grad in eval mode, in the micro-batches of the first epoch (so h = 0
                exactly at step 0); kept as one (N, 2) tensor per split; the reference model is dropped
  1. batch      the pairs of the step from a permutation of (seed, epoch): resume is exact
  2. forward    chosen and rejected rows stacked into ONE right-padded batch (2B, T), one
                forward, per-row summed response log-probs, split back into (B,) and (B,)
  3. loss       dpo_loss, mean over the step's pairs, accumulated over micro-batches
  4. update     clip the gradient norm, AdamW step (lr: warmup, then linear decay)
  5. log, eval, checkpoint

Data: pairs {"prompt", "chosen", "rejected"}, HH-RLHF transcripts {"chosen", "rejected"}, or
InstructGPT rankings {"prompt", "responses": [best, ..., worst]} (model.read_preferences). A
ranking of K answers is expanded into its K(K-1)/2 pairs, each an independent example, as DPO
treats pairs (InstructGPT instead keeps a ranking's pairs together in one batch element, see
reward.py; a Plackett-Luce DPO over whole rankings is Rafailov et al. 2023, App. A.3, not done
here). Too long rows follow model.truncate_example (prompt cut on the left, keeping min_prompt
tokens, then the response on the right), applied once per pair by model.truncate_group: the prompt
is cut once, sized by the longer answer, so chosen and rejected are read in the same context (as
the DPO reference code does). Truncations (rows) are counted, printed and saved in
out_dir/data_stats.json.

Departures from the paper's recipe (App. B: RMSprop, lr 1e-6, linear warmup over 150 steps, then
constant): AdamW (model.configure_optimizer), and the lr decays linearly to min_lr_frac * lr after
warmup (min_lr_frac 1.0 gives the constant rate). IPO comes in two forms. Summed
log-probs (the default) are Azar et al.'s Eq. 17 as written, with log pi(y|x) the sequence
log-likelihood, and what the DPO reference code's IPO loss uses. ipo_average = true averages them
over each answer's tokens (EOS included) before h is formed, as TRL does for IPO, following the IPO
authors; h is then per token, so the target 1/(2 beta) and a good beta differ from the summed form.

Run:
  CPU, built-in task:  python dpo.py --config configs/dpo_world.toml
  IPO:                 python dpo.py --config configs/dpo_world.toml --loss_type ipo --out_dir out/ipo
  one GPU, GPT-2 on HH-RLHF:  python dpo.py --config configs/dpo_hh_gpt2.toml
  (the paper's settings there: beta 0.1, lr 1e-6, warmup 150, 64 pairs a step as
   --batch_size 8 --grad_accum 8, --device cuda --dtype bfloat16 --compile true)
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
    data: str = ""  # (required) pairs, HH transcripts, or rankings (expanded to all their pairs)
    val_data: str = ""  # (required) held-out pairs for the val_ metrics
    init: str = ""  # (required) the SFT checkpoint (or a GPT-2 dir/name): the policy's init AND the frozen reference
    out_dir: str = "out/dpo"  # checkpoint (ckpt/), config.json, metrics.jsonl, data_stats.json
    template: str = "auto"  # chat template (model.CHAT_TEMPLATES); auto = the init checkpoint's, else hh
    overwrite: bool = False  # delete an existing run in out_dir and start afresh
    resume_changed: bool = False  # resume a run in out_dir although result-affecting settings changed (recorded in metrics.jsonl)
    wandb_project: str = ""  # mirror metrics.jsonl to this Weights & Biases project (optional: pip install wandb)
    wandb_mode: str = "offline"  # offline (no network; wandb sync later) | online
    loss_type: str = "dpo"  # "dpo" (Rafailov et al. Eq. 7, with label_smoothing: cDPO) or "ipo" (Azar et al. Eq. 17)
    beta: float = 0.1  # strength of the implicit KL constraint to pi_ref (paper: 0.1; 0.5 for TL;DR)
    label_smoothing: float = 0.0  # cDPO: assumed probability that a label is flipped (dpo only)
    ipo_average: bool = False  # ipo only: log-probs averaged over response tokens (TRL's form), not summed (Eq. 17 as written)
    max_len: int = 128  # prompt + response tokens per row
    min_prompt: int = 16  # prompt tokens always kept when truncating
    batch_size: int = 32  # pairs per micro-batch (each pair is 2 rows of the forward)
    grad_accum: int = 1  # micro-batches per optimizer step (paper: 64 pairs a step)
    epochs: float = 1.0  # passes over the training pairs
    lr: float = 1e-4  # for the ~1M-parameter built-in model; the paper's 1e-6 is for GPT-2 size and up
    min_lr_frac: float = 0.0  # lr decays linearly to min_lr_frac * lr (1.0 = constant, the DPO code's)
    warmup: int = 10  # warmup steps (paper: 150)
    weight_decay: float = 0.0  # AdamW decay of the weight matrices
    grad_clip: float = 1.0  # max global gradient norm
    eval_interval: int = 100  # steps between val metrics (and samples)
    log_interval: int = 10  # steps between console/metrics.jsonl lines
    ckpt_interval: int = 100  # steps between checkpoints (always one at the end)
    n_samples: int = 4  # held-out prompts sampled and printed at each eval (0 = none)
    max_new_tokens: int = 64  # length cap of those samples
    seed: int = 0  # batch order and sampling
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs in fp32; loss math is fp32 anyway
    compile: bool = False  # torch.compile the policy's forward
    lora_rank: int = 0  # LoRA adapters of this rank, all else frozen (model.add_lora); 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA output scale alpha / rank
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # which Linears of each block get adapters
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute


# settings that cannot change the trained weights or the logged numbers: may differ on resume
SAFE_KEYS = {"log_interval", "eval_interval", "ckpt_interval", "n_samples", "device"}


# --- data


def expand_pairs(groups):
    """(prompt, [best, ..., worst]) groups -> (prompt, chosen, rejected) for every i < j."""
    return [(prompt, answers[i], answers[j]) for prompt, answers in groups
            for i in range(len(answers)) for j in range(i + 1, len(answers))]


def encode_pairs(pairs, tokenizer, max_len, min_prompt, template="hh"):
    """Each pair -> ((chosen ids, n_prompt), (rejected ids, n_prompt)), ids = prompt + answer + EOS.
    Prompt and answer are tokenized separately (model.encode_chat, docs/implementation_details.md item 8)."""
    out, stats = [], {"pairs": len(pairs), "prompt_truncated": 0, "response_truncated": 0}  # truncations count rows
    for prompt, chosen, rejected in pairs:
        p = M.encode_chat(tokenizer, prompt, template=template)
        answers = [M.encode_chat(tokenizer, prompt, a, template)[1] for a in (chosen, rejected)]
        p, answers, cut_p, cut_r = M.truncate_group(p, answers, max_len, min_prompt)  # one prompt cut for both
        stats["prompt_truncated"] += 2 * cut_p
        stats["response_truncated"] += sum(cut_r)
        out.append(tuple((p + r, len(p)) for r in answers))
    return out, stats


def collate(examples):
    """B pairs -> ONE right-padded batch: ids (2B, T), rows [0, B) chosen, [B, 2B) rejected, and
    mask (2B, T), 1 on response tokens and the EOS only (not the prompt, not the padding)."""
    return M.pad_responses([e[0] for e in examples] + [e[1] for e in examples])  # (2B, T), (2B, T)


def batch_indices(step, n, per_step, seed):
    """Pair indices of optimizer step `step`: a fresh permutation every epoch, from (seed, epoch)."""
    steps_per_epoch = math.ceil(n / per_step)
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[k * per_step:(k + 1) * per_step].tolist()


# --- the loss


def concatenated_logps(model, ids, mask, average=False):
    """Summed response log-probs of chosen and rejected from one forward of the (2B, T) batch, or
    with average, their mean over each answer's tokens (EOS included). Returns (chosen (B,),
    rejected (B,)), fp32."""
    logprobs = M.response_logprobs(model, ids)  # (2B, T-1): log p(ids[:, t] | ids[:, :t]) for t >= 1
    logps = (logprobs * mask[:, 1:]).sum(-1)  # (2B,): the mask shifted like the targets ids[:, 1:]
    if average:
        logps = logps / mask[:, 1:].sum(-1)  # (2B,) every answer has at least its EOS
    B = ids.size(0) // 2
    return logps[:B], logps[B:]


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, label_smoothing=0.0, loss_type="dpo"):
    """Per-pair DPO / cDPO / IPO loss and the implicit rewards.

    policy_chosen_logps   (B,) log pi(y_w|x), summed over the response tokens and EOS
    policy_rejected_logps (B,) log pi(y_l|x)
    ref_chosen_logps      (B,) log pi_ref(y_w|x), a constant (no gradient reaches pi_ref)
    ref_rejected_logps    (B,) log pi_ref(y_l|x)
    beta                  float, the KL-constraint strength
    label_smoothing       float e in [0, 0.5): cDPO's probability of a flipped label (dpo only)
    loss_type             "dpo": -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)  (Rafailov et al. 2023, Eq. 7; e = 0)
                          "ipo": (h - 1/(2 beta))^2                                   (Azar et al. 2023, Eq. 17)
    with h = [log pi(y_w) - log pi(y_l)] - [log pi_ref(y_w) - log pi_ref(y_l)].
    Returns losses (B,), chosen_rewards (B,), rejected_rewards (B,); the rewards are the implicit
    beta (log pi(y) - log pi_ref(y)) (Rafailov et al. 2023, Sec. 5), detached.
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    if loss_type == "dpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: expected 'dpo' or 'ipo'")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


def pair_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, prefix=""):
    """Means over pairs of the numbers the DPO paper and TRL report. Accuracy counts ties as half
    (at step 0 every pair ties: accuracy 0.5, chance)."""
    margin = chosen_rewards - rejected_rewards  # (B,)
    acc = (margin > 0).float() + 0.5 * (margin == 0).float()  # (B,)
    values = (losses, chosen_rewards, rejected_rewards, acc, margin, chosen_logps, rejected_logps)
    return {prefix + k: v.float().mean().item() for k, v in zip(PAIR_KEYS, values)}


PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected")


@torch.no_grad()
def reference_logprobs(ref, examples, batches, device, ctx, average=False):
    """log pi_ref of the chosen and rejected answer of every pair in `batches` (lists of indices
    into examples), in eval mode: (N, 2). A pair in no batch is NaN, so using it would fail loudly."""
    ref.eval()
    out = torch.full((len(examples), 2), float("nan"))  # (N, 2): [:, 0] chosen, [:, 1] rejected
    for b in tqdm(batches, desc="reference log-probs", dynamic_ncols=True, leave=False):
        ids, mask = collate([examples[i] for i in b])
        with ctx:
            chosen, rejected = concatenated_logps(ref, ids.to(device), mask.to(device), average)
        out[b] = torch.stack([chosen, rejected], 1).float().cpu()  # (B, 2)
    return out


@torch.no_grad()
def evaluate(model, examples, ref_logps, cfg, device, ctx):
    """The training metrics on held-out pairs (val_ prefix), plus val_logratio."""
    model.eval()
    cols = [[] for _ in range(5)]
    for i in range(0, len(examples), cfg.batch_size):
        ids, mask = collate(examples[i:i + cfg.batch_size])
        with ctx:
            chosen, rejected = concatenated_logps(model, ids.to(device), mask.to(device), cfg.ipo_average)
        mb_ref = ref_logps[i:i + cfg.batch_size].to(device)  # (B, 2)
        out = dpo_loss(chosen, rejected, mb_ref[:, 0], mb_ref[:, 1], cfg.beta, cfg.label_smoothing, cfg.loss_type)
        for c, v in zip(cols, (*out, chosen, rejected)):
            c.append(v.float().cpu())
    model.train()
    losses, r_c, r_r, lp_c, lp_r = (torch.cat(c) for c in cols)
    metrics = pair_metrics(losses, r_c, r_r, lp_c, lp_r, prefix="val_")
    # mean of log pi(y) - log pi_ref(y) over the val chosen AND rejected answers. Not KL(pi || pi_ref):
    # these answers are the data's, not samples from pi, so it can even be negative (both log-probs
    # usually fall). eval.py measures the on-policy KL from the policy's own samples.
    metrics["val_logratio"] = ((torch.cat([r_c, r_r]) / cfg.beta).mean()).item()
    return metrics


@torch.no_grad()
def print_samples(model, tokenizer, prompts, cfg, device):
    """A few held-out answers, the first sign of over-optimisation (docs/implementation_details.md, item 18)."""
    if not prompts:
        return
    model.eval()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    answers = M.sample_answers(model, tokenizer, prompts, cfg.max_new_tokens, 1.0, len(prompts), g, cfg.template)
    for p, (resp, ended) in zip(prompts, answers):
        tqdm.write(f"  > {p}\n    {tokenizer.decode(resp)!r}{'' if ended else ' [no EOS]'}")
    model.train()


# --- training


def train(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    if cfg.loss_type not in ("dpo", "ipo"):
        raise M.ConfigError(f"loss_type {cfg.loss_type!r}: expected 'dpo' or 'ipo'")
    if cfg.loss_type == "ipo" and cfg.label_smoothing:
        raise M.ConfigError("label_smoothing is cDPO's; it does not apply to loss_type 'ipo'")
    if cfg.ipo_average and cfg.loss_type != "ipo":
        raise M.ConfigError("ipo_average is IPO's per-token form; it does not apply to loss_type 'dpo'")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise M.ConfigError(f"label_smoothing {cfg.label_smoothing}: expected 0 <= e < 0.5 (a flip probability)")
    M.require(cfg, "data", "val_data", "init")
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
    ref, tokenizer = M.load_gpt(cfg.init, device)  # pi_ref, dropout 0 (docs/implementation_details.md item 2)
    if ref.config.lora_rank:  # an SFT checkpoint's adapters merged now, as model.adapt merges the policy's: h = 0 at step 0
        ref = M.merge_lora(ref)
    train_groups, train_read = M.read_preferences(cfg.data)
    val_groups, val_read = M.read_preferences(cfg.val_data)
    train_ex, train_stats = encode_pairs(expand_pairs(train_groups), tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
    val_ex, val_stats = encode_pairs(expand_pairs(val_groups), tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
    if master:
        with open(os.path.join(cfg.out_dir, "data_stats.json"), "w") as f:
            json.dump({"train": {**train_read, **train_stats}, "val": {**val_read, **val_stats}}, f)
        M.print_config(cfg)
    per_step = cfg.batch_size * cfg.grad_accum
    max_steps = math.ceil(cfg.epochs * math.ceil(len(train_ex) / per_step))
    print(f"train {train_read} {train_stats} | val {val_read} {val_stats} | {per_step} pairs/step | {max_steps} steps")
    if master:
        M.check_warmup(cfg.warmup, max_steps, cfg.lr)
    step = state["step"] if state is not None else 0
    if step >= max_steps:  # a checkpoint older than the "finished" flag
        print(f"{ckpt} is at step {step} of {max_steps}: already done")
        return M.load_checkpoint(ckpt, device)[0]
    ctx = M.autocast(device, cfg.dtype)

    # 0. reference log-probs, once for the whole run, in the very micro-batches of the first epoch
    # (so step 0 gives h = 0 exactly; with epochs < 1 only the pairs the run will use) and of the
    # evaluation. Then the reference model's job is done: the policy starts from the same weights
    # (pi = pi_ref at step 0) or, on resume, from the checkpoint.
    t0 = time.time()
    steps_per_epoch = math.ceil(len(train_ex) / per_step)
    batches = [idx[j::cfg.grad_accum] for s in range(min(max_steps, steps_per_epoch))
               for idx in [batch_indices(s, len(train_ex), per_step, cfg.seed)] for j in range(cfg.grad_accum)
               if idx[j::cfg.grad_accum]]  # an epoch's last step can leave a micro-batch empty
    ref_train = reference_logprobs(ref, train_ex, batches, device, ctx, cfg.ipo_average)  # (N_train, 2)
    val_batches = [list(range(i, min(i + cfg.batch_size, len(val_ex)))) for i in range(0, len(val_ex), cfg.batch_size)]
    ref_val = reference_logprobs(ref, val_ex, val_batches, device, ctx, cfg.ipo_average)  # (N_val, 2)
    print(f"reference log-probs of {sum(map(len, batches))} + {len(val_ex)} pairs in {time.time() - t0:.1f}s")
    model = ref if state is None else M.load_checkpoint(ckpt, device)[0]
    model = M.adapt(model, cfg, resumed=state is not None)  # with LoRA, pi_ref is the base under the adapters
    del ref
    val_prompts = list(dict.fromkeys(p for p, _ in val_groups))[:cfg.n_samples]

    opt = M.configure_optimizer(model, cfg.lr, cfg.weight_decay, device=device)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        M.set_rng_state(state["rng"])
    ddp_model = M.ddp_wrap(model, world, device)
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    model.train()
    t0, start = time.time(), step
    bar = tqdm(total=max_steps, initial=step, desc="dpo", dynamic_ncols=True, disable=not master)
    while step < max_steps:
        # 1. the pairs of this step; learning rate: warmup, then linear decay
        idx = batch_indices(step, len(train_ex), per_step, cfg.seed)
        lr = M.lr_at(step, max_steps, cfg.lr, cfg.warmup, cfg.min_lr_frac, schedule="linear")
        for group in opt.param_groups:
            group["lr"] = lr
        cols = [[] for _ in range(5)]
        micro = [idx[j::cfg.grad_accum] for j in range(cfg.grad_accum) if idx[j::cfg.grad_accum]]  # the last step can be short
        for j, rows in enumerate(micro):
            mine = rows[rank::world]  # this rank's share; an empty share still joins the all-reduce
            mb_idx = mine or rows[:1]
            ids, mask = collate([train_ex[i] for i in mb_idx])
            # 2. chosen and rejected in one forward, split back
            sync = world == 1 or j == len(micro) - 1
            with ctx, (nullcontext() if sync else ddp_model.no_sync()):
                chosen, rejected = concatenated_logps(fwd, ids.to(device), mask.to(device), cfg.ipo_average)  # (B,), (B,)
                mb_ref = ref_train[mb_idx].to(device)  # (B, 2), constants
                # 3. the loss, a mean over all pairs of the step (DDP averages over ranks: * world)
                losses, r_c, r_r = dpo_loss(chosen, rejected, mb_ref[:, 0], mb_ref[:, 1],
                                            cfg.beta, cfg.label_smoothing, cfg.loss_type)  # (B,) each
                (losses.sum() * (1.0 if mine else 0.0) / len(idx) * world).backward()
            if mine:
                for c, v in zip(cols, (losses, r_c, r_r, chosen, rejected)):
                    c.append(v.detach().float().cpu())
        n_mine = sum(len(c) for c in cols[0])
        local = pair_metrics(*(torch.cat(c) for c in cols)) if n_mine else dict.fromkeys(PAIR_KEYS, 0.0)
        sums = M.ddp_sum(torch.tensor([local[k] * n_mine for k in PAIR_KEYS]), world, device)  # over all ranks' pairs
        metrics = {k: (v / len(idx)).item() for k, v in zip(PAIR_KEYS, sums)}
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: loss is {metrics['loss']}; last good checkpoint is in {ckpt}")
        # 4. clip, step
        grad_norm = M.clip_grad_checked(model.parameters(), cfg.grad_clip, f"step {step} (last good checkpoint: {ckpt})")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # 5. log, eval with samples, checkpoint
        last = step == max_steps
        if master and (step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or last):
            metrics = {"step": step, **metrics, "lr": lr, "grad_norm": grad_norm,
                       "pairs_s": round(per_step * (step - start) / (time.time() - t0), 1)}
            if step % cfg.eval_interval == 0 or last:
                metrics.update(evaluate(model, val_ex, ref_val, cfg, device, ctx))
                if val_prompts:
                    print_samples(model, tokenizer, val_prompts, cfg, device)
            M.log_metrics(cfg.out_dir, metrics)
        if master and (step % cfg.ckpt_interval == 0 or last):
            M.save_checkpoint(ckpt, model, tokenizer, dataclasses.asdict(cfg), role="policy",
                              state={"step": step, "optimizer": opt.state_dict(), "rng": M.rng_state(), "finished": last})
    bar.close()
    M.ddp_cleanup(world)
    return model


if __name__ == "__main__":
    M.main(train, Config)
