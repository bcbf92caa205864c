"""
dpo.py: preference optimisation without RL: DPO (Rafailov et al. 2023) and its IPO and conservative
variants, the reference-free SimPO, KTO on unpaired answers, and online DPO on the policy's own samples.

Objective. For a prompt x with a preferred answer y_w and a dispreferred one y_l, the policy pi
(initialised from SFT) and the frozen reference pi_ref (the same SFT weights):
  h = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)]
where log pi(y|x) is summed over the response tokens, its EOS included; prompt and padding tokens
count nothing.
  DPO (Rafailov et al. 2023, Eq. 7):   loss = -log sigmoid(beta h)
  conservative DPO, label smoothing e (Mitchell 2023, a note on DPO with noisy preferences; the
  DPO reference code's cDPO):        loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
  IPO (Azar et al. 2023, Eq. 17):      loss = (h - 1 / (2 beta))^2
  SimPO (Meng et al. 2024, Eq. 6), reference-free and length-normalised, with a target margin gamma:
                                       loss = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
        |y| the answer's tokens, EOS included. No reference model: step 0 below is skipped.
  KTO (Ethayarajh et al. 2024, Eq. 8), on unpaired answers, each desirable (D) or undesirable (U):
        r = log pi(y|x) - log pi_ref(y|x)
        z0 = max(0, mean over the step's mismatched pairs (x, y') of log pi(y'|x) - log pi_ref(y'|x)), detached
        v = lambda_D sigmoid(beta (r - z0)) for D,  lambda_U sigmoid(beta (z0 - r)) for U
                                       loss = lambda_y - v
averaged over the pairs (KTO: answers) of an optimizer step. The implicit reward of an answer is
  r(x, y) = beta (log pi(y|x) - log pi_ref(y|x))            (Rafailov et al. 2023, Sec. 5)
(SimPO: beta/|y| log pi(y|x), its Eq. 4), logged for chosen and rejected (KTO: desirable and
undesirable, TRL's names) with their margin and the accuracy (chosen > rejected; not for KTO,
whose answers are unpaired: it logs z0 as kl).

Expected behaviour (docs/implementation_details.md, DPO): at step 0 pi = pi_ref, so h = 0, the loss is log 2
and both rewards are 0 (KTO: r = 0 and z0 = 0, each loss lambda_y / 2; SimPO has no such identity).
Only the margin is optimised: the chosen log-prob usually falls too (the rejected one falls
faster); that is not a bug. A training loss near 0 with huge margins
means over-fitting; watch the val_ metrics and val_logratio.

Steps of train():
  0. reference  log pi_ref of every training pair the run will use and every validation pair,
                ONCE, under no_grad in eval mode, in the micro-batches of the first epoch (so h = 0
                exactly at step 0); kept as one (N, 2) tensor per split; the reference model is dropped.
                KTO: of each answer and of its mismatched row, each kind in its own forward. SimPO: none
  1. batch      the pairs of the step from a permutation of (seed, epoch): resume is exact
  2. forward    chosen and rejected rows stacked into ONE right-padded batch (2B, T), one
                forward, per-row summed response log-probs, split back into (B,) and (B,).
                KTO: first z0 of the whole step, from the mismatched rows under no_grad (so grad_accum
                cannot change it), then the answers alone
  3. loss       dpo_loss / simpo_loss / kto_loss, mean over the step's pairs, accumulated over micro-batches
  4. update     clip the gradient norm, AdamW step (lr: warmup, then linear decay)
  5. log, eval, checkpoint

Online (online = true; Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback";
Xiong et al. 2024, iterative DPO; TRL's OnlineDPOTrainer), train_online(), each step:
  1. prompts    online_prompts_per_step prompts from a permutation of (seed, pass)
  2. sample     online_samples answers to each from the CURRENT policy (KV cache, temperature T, at most
                max_new_tokens), from a generator seeded by (seed, step): resume is exact
  3. rank       the reward model scores the re-encoded answers (model.rm_rows); an answer without EOS
                scores missing_eos_penalty (the EOS trick, item 9; eos_trick false: the raw score). Each
                prompt's best answer is chosen and its worst rejected (best_worst_pairs); a prompt whose
                answers all score the same (two penalised answers, say) gives no pair: skipped, counted
                as ties. A step with no pair at all takes no optimizer step
  4. reference  log pi_ref of THESE pairs, fresh each step (no precomputation can know them), by the
                frozen SFT start kept loaded, in the very micro-batches of step 5: h = 0 at step 0
  5. loss       dpo_loss (dpo, cDPO or ipo) on micro-batches of batch_size pairs, a mean over the step's pairs
  6. update, 7. log (RM score of chosen and rejected, ties, EOS fraction, the gold reward of the samples
                on the built-in world's prompts), eval on val_data pairs when given, checkpoint

Data: pairs {"prompt", "chosen", "rejected"}, HH-RLHF transcripts {"chosen", "rejected"}, or
InstructGPT rankings {"prompt", "responses": [best, ..., worst]} (model.read_preferences). A
ranking of K answers is expanded into its K(K-1)/2 pairs, each an independent example, as DPO
treats pairs (InstructGPT instead keeps a ranking's pairs together in one batch element, see
reward.py; a Plackett-Luce DPO over whole rankings is Rafailov et al. 2023, App. A.3, not done
here). Too long rows follow model.truncate_example (prompt cut on the left, keeping min_prompt
tokens, then the response on the right), applied once per pair by model.truncate_group: the prompt
is cut once, sized by the longer answer, so chosen and rejected are read in the same context (as
the DPO reference code does). Truncations (rows) are counted, printed and saved in
out_dir/data_stats.json. KTO reads unpaired rows {"prompt", "completion", "label": true | false}
(TRL's format; read_unpaired), or any of the paired forms above, each pair split into a desirable
(chosen) and an undesirable (rejected) row; each row is truncated on its own.

Departures from the paper's recipe (App. B: RMSprop, lr 1e-6, linear warmup over 150 steps, then
constant): AdamW (model.configure_optimizer), and the lr decays linearly to min_lr_frac * lr after
warmup (min_lr_frac 1.0 gives the constant rate). SimPO's gamma is TRL's simpo_gamma (the SimPO
code's gamma_beta_ratio times beta); no SFT term (the CPO-style loss TRL can add). KTO's z0 pairs
each prompt with a fixed other row's answer (a cyclic shift in a random order fixed by the seed),
where TRL shifts the answers within each batch, and is a mean over the whole optimizer step, not
the micro-batch; a paired file is split into one desirable and one undesirable row per pair. KTO
and online DPO run in one process (not under torchrun). Under torchrun the offline losses run with
DDP, or with --fsdp true sharded (FSDP2, model.fsdp_wrap; item 23): the reference log-probs are
computed before the wrap, by the model every process has just loaded whole, which then becomes the
sharded policy; eval and samples run on every process. IPO comes in two forms. Summed
log-probs (the default) are Azar et al.'s Eq. 17 as written, with log pi(y|x) the sequence
log-likelihood, and what the DPO reference code's IPO loss uses. ipo_average = true averages them
over each answer's tokens (EOS included) before h is formed, as TRL does for IPO, following the IPO
authors; h is then per token, so the target 1/(2 beta) and a good beta differ from the summed form.

Run:
  CPU, built-in task:  python dpo.py --config configs/dpo_world.toml
  IPO:                 python dpo.py --config configs/dpo_world.toml --loss_type ipo --out_dir out/ipo
  SimPO:               python dpo.py --config configs/dpo_world_simpo.toml
  KTO:                 python dpo.py --config configs/dpo_world_kto.toml
  online DPO:          python dpo.py --config configs/dpo_world_online.toml
  (docs/dpo_variants.md: the formulas, where they depart from the papers and TRL, and measured results)
  one GPU, GPT-2 on HH-RLHF:  python dpo.py --config configs/dpo_hh_gpt2.toml
  (the paper's settings there: beta 0.1, lr 1e-6, warmup 150, 64 pairs a step as
   --batch_size 8 --grad_accum 8, --device cuda --dtype bfloat16 --compile true)
"""

import copy
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
    loss_type: str = "dpo"  # dpo (Rafailov et al. Eq. 7; with label_smoothing: cDPO) | ipo (Azar et al. Eq. 17) | simpo (Meng et al. Eq. 6) | kto (Ethayarajh et al. Eq. 8)
    beta: float = 0.1  # strength of the implicit KL constraint to pi_ref (paper: 0.1; 0.5 for TL;DR); SimPO's reward scale (its paper: 2.0 to 2.5)
    label_smoothing: float = 0.0  # cDPO: assumed probability that a label is flipped (dpo only)
    ipo_average: bool = False  # ipo only: log-probs averaged over response tokens (TRL's form), not summed (Eq. 17 as written)
    simpo_gamma: float = 0.5  # simpo only: gamma, the target reward margin of Eq. 6, in reward units (TRL's simpo_gamma; the SimPO code's gamma_beta_ratio is gamma / beta)
    desirable_weight: float = 1.0  # kto only: lambda_D (the paper: keep lambda_D n_D / (lambda_U n_U) in [1, 4/3])
    undesirable_weight: float = 1.0  # kto only: lambda_U
    # online DPO (online = true): fresh pairs from the current policy's samples, ranked by a reward model
    online: bool = False  # sample, rank by reward_model, update, repeat (Guo et al. 2024; Xiong et al. 2024); data and epochs unused
    reward_model: str = ""  # (required when online) reward-model checkpoint (reward.py) that ranks the samples
    prompts: str = ""  # (required when online) JSONL of {"prompt": ...} rows to sample answers to
    online_steps: int = 100  # optimizer steps, one fresh sample of pairs each
    online_prompts_per_step: int = 32  # prompts sampled per step: at most one pair each
    online_samples: int = 2  # answers per prompt; the reward model's best is chosen, its worst rejected (TRL: 2)
    temperature: float = 1.0  # online sampling temperature; the policy's and reference's log-probs are of logits / T (item 1)
    eos_trick: bool = True  # online: an answer without EOS scores missing_eos_penalty, not the reward model's score (item 9)
    missing_eos_penalty: float = -1.0  # online: that score (the reward model is normalised to mean 0, std 1 on SFT samples)
    gold: str = "auto"  # online: log the built-in world's gold reward of the samples (never trained on): auto | true | false
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
    max_new_tokens: int = 64  # length cap of those samples, and of the online answers (prompts cut to max_len - max_new_tokens)
    seed: int = 0  # batch order and sampling (online: the answers of step s are drawn from (seed, s))
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs in fp32; loss math is fp32 anyway
    compile: bool = False  # torch.compile the policy's forward
    lora_rank: int = 0  # LoRA adapters of this rank, all else frozen (model.add_lora); 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA output scale alpha / rank
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # which Linears of each block get adapters
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    fsdp: bool = False  # under torchrun: shard weights, gradients and AdamW state over the processes (FSDP2) instead of DDP


# settings that cannot change the trained weights or the logged numbers: may differ on resume
SAFE_KEYS = {"log_interval", "eval_interval", "ckpt_interval", "n_samples", "device"}
LOSS_TYPES = ("dpo", "ipo", "simpo", "kto")
ONLINE_KEYS = ("reward_model", "prompts", "online_steps", "online_prompts_per_step", "online_samples", "temperature",
               "eos_trick", "missing_eos_penalty", "gold")  # used only when online = true


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


def read_unpaired(path):
    """KTO's data: (prompt, completion, desirable) rows, and counts.

    Rows {"prompt", "completion", "label": true | false} (TRL's unpaired format), or a file of
    preferences in any form model.read_preferences reads, each pair split into its chosen answer
    (desirable) and its rejected one (undesirable), a ranking first expanded to all its pairs (so a
    middle answer of a ranking is desirable in some rows and undesirable in others). A file is one
    kind or the other: a row with "completion" or "label" makes it unpaired, and then every row
    needs prompt, completion and a JSON boolean label. An empty completion is an answer (EOS alone)."""
    rows = M.read_jsonl(path)
    lines = [n for n, raw in enumerate(open(path, "rb"), 1) if raw.decode("utf-8").strip()]  # the line of each row
    if not any("completion" in r or "label" in r for r in rows):
        groups, read = M.read_preferences(path)
        pairs = expand_pairs(groups)
        out = [x for p, c, r in pairs for x in ((p, c, True), (p, r, False))]
        return out, {**read, "pairs_split": len(pairs), "desirable": len(pairs), "undesirable": len(pairs)}
    out = []
    for n, row in zip(lines, rows):
        missing = [k for k in ("prompt", "completion", "label") if k not in row]
        if missing:
            raise M.DataError(f"{path}:{n}: missing key(s) {missing}; an unpaired row has prompt, completion, label")
        if not (isinstance(row["prompt"], str) and row["prompt"].strip()):
            raise M.DataError(f"{path}:{n}: empty or non-string prompt")
        if not isinstance(row["completion"], str):
            raise M.DataError(f"{path}:{n}: non-string completion")
        if not isinstance(row["label"], bool):  # 1, "true", "good": a guess at their meaning would be a silent bug
            raise M.DataError(f"{path}:{n}: label must be a JSON boolean (true = desirable), got {row['label']!r:.40}")
        out.append((row["prompt"], row["completion"].strip(), row["label"]))
    n_d = sum(d for _, _, d in out)
    return out, {"rows": len(rows), "pairs_split": 0, "desirable": n_d, "undesirable": len(out) - n_d}


def encode_unpaired(rows, tokenizer, max_len, min_prompt, template="hh", seed=0):
    """KTO rows -> examples ((answer ids, n_prompt), (mismatched ids, n_prompt)) and labels (N,) bool.
    The mismatched row is the same prompt with another row's completion: row perm[k] takes the
    completion of row perm[k + 1] (a cyclic shift in a fixed random order), the pairs KTO's z0 is
    estimated from (Ethayarajh et al. 2024, Sec. 4.2; TRL shifts the completions within its batch).
    Each row is truncated on its own by model.truncate_example; both kinds are counted."""
    if len(rows) < 2:
        raise M.DataError(f"KTO needs at least 2 rows (z0 pairs a prompt with another row's answer), got {len(rows)}")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    other = {perm[k]: perm[(k + 1) % len(rows)] for k in range(len(rows))}
    prompts = [M.encode_chat(tokenizer, p, template=template) for p, _, _ in rows]
    answers = [M.encode_chat(tokenizer, p, c, template)[1] for p, c, _ in rows]
    out, stats = [], {"answers": len(rows), "prompt_truncated": 0, "response_truncated": 0, "kl_rows_truncated": 0}
    for i in range(len(rows)):
        p, r, cut_p, cut_r = M.truncate_example(prompts[i], answers[i], max_len, min_prompt)
        q, s, cut_q, cut_s = M.truncate_example(prompts[i], answers[other[i]], max_len, min_prompt)
        stats["prompt_truncated"] += cut_p
        stats["response_truncated"] += cut_r
        stats["kl_rows_truncated"] += cut_q or cut_s
        out.append(((p + r, len(p)), (q + s, len(q))))
    return out, torch.tensor([d for _, _, d in rows]), stats


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


def concatenated_logps(model, ids, mask, average=False, temperature=1.0):
    """Summed response log-probs of chosen and rejected from one forward of the (2B, T) batch, or
    with average, their mean over each answer's tokens (EOS included). Returns (chosen (B,),
    rejected (B,)), fp32. temperature divides the logits (online DPO's sampling temperature, item 1)."""
    logprobs = M.response_logprobs(model, ids, None, 1, temperature)  # (2B, T-1): log p(ids[:, t] | ids[:, :t]) for t >= 1
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


def rows_logps(model, rows, device, average=False):
    """Summed (or, with average, per-token mean) response log-probs (B,) of rows (ids, n_prompt), one
    right-padded forward: KTO's answers and its mismatched rows, each kind in a forward of its own."""
    ids, mask = M.pad_responses(rows)  # (B, T), (B, T)
    ids, mask = ids.to(device), mask.to(device)
    logps = (M.response_logprobs(model, ids) * mask[:, 1:]).sum(-1)  # (B,)
    return logps / mask[:, 1:].sum(-1) if average else logps


def simpo_loss(policy_chosen_logps, policy_rejected_logps, beta, gamma):
    """Per-pair SimPO loss and its rewards (Meng et al. 2024, "SimPO: Simple Preference Optimization
    with a Reference-Free Reward", Eq. 6):
        loss = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)

    policy_chosen_logps   (B,) (1/|y_w|) log pi(y_w|x): the MEAN over the answer's tokens, EOS included
    policy_rejected_logps (B,) (1/|y_l|) log pi(y_l|x)
    beta                  float, the reward scale (the paper's 2.0 to 2.5, not DPO's 0.1)
    gamma                 float, the target reward margin (TRL's simpo_gamma)
    No reference model. Returns losses (B,), chosen_rewards (B,), rejected_rewards (B,); the rewards
    are the length-normalised beta/|y| log pi(y|x) of Eq. 4, detached.
    """
    chosen_rewards = beta * policy_chosen_logps  # (B,)
    rejected_rewards = beta * policy_rejected_logps  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)  # (B,)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def kto_kl(policy_kl_logps, ref_kl_logps):
    """KTO's reference point z0 (Ethayarajh et al. 2024, Sec. 4.2, as TRL computes it): the batch
    mean of log pi(y'|x) - log pi_ref(y'|x) over mismatched pairs (x, y') (another row's answer to
    x), clamped at 0 and detached: z0 is a baseline, no gradient flows through it. (B,), (B,) -> ()."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps, ref_logps, desirable, kl, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-answer KTO loss and implicit rewards (Ethayarajh et al. 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization", Eq. 8):
        r = log pi(y|x) - log pi_ref(y|x)
        v = lambda_D sigmoid(beta (r - z0))   if y is desirable
            lambda_U sigmoid(beta (z0 - r))   if y is undesirable
        loss = lambda_y - v

    policy_logps (B,) log pi(y|x), summed over the response tokens and EOS
    ref_logps    (B,) log pi_ref(y|x), constants
    desirable    (B,) bool, the label of each answer
    kl           () z0, the detached reference point (kto_kl)
    beta, desirable_weight (lambda_D), undesirable_weight (lambda_U): floats
    Returns losses (B,) and rewards (B,), beta r, detached. At pi = pi_ref (r = 0, z0 = 0) every
    loss is lambda_y / 2.
    """
    r = policy_logps - ref_logps  # (B,)
    lam = torch.where(desirable, desirable_weight, undesirable_weight).to(r.dtype)  # (B,) lambda_y
    v = lam * torch.sigmoid(beta * torch.where(desirable, r - kl, kl - r))  # (B,)
    return lam - v, beta * r.detach()


def pair_losses(cfg, chosen, rejected, mb_ref):
    """The loss_type's per-pair losses and rewards; simpo takes no reference (mb_ref None), else mb_ref (B, 2)."""
    if cfg.loss_type == "simpo":
        return simpo_loss(chosen, rejected, cfg.beta, cfg.simpo_gamma)
    return dpo_loss(chosen, rejected, mb_ref[:, 0], mb_ref[:, 1], cfg.beta, cfg.label_smoothing, cfg.loss_type)


def best_worst_pairs(scores, k):
    """Online DPO's pairs from scores (P * K,) of K consecutive answers per prompt: the row of each
    prompt's best answer (chosen) and of its worst (rejected), the first one where several tie, and
    tie (P,) bool, True where all K answers score the same: such a prompt gives no pair (it is
    skipped and counted). Returns chosen rows (P,), rejected rows (P,), tie (P,)."""
    s = scores.view(-1, k)  # (P, K)
    offset = torch.arange(s.size(0), device=s.device) * k  # (P,)
    tie = s.max(1).values == s.min(1).values  # (P,)
    return offset + s.argmax(1), offset + s.argmin(1), tie


def pair_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, prefix=""):
    """Means over pairs of the numbers the DPO paper and TRL report. Accuracy counts ties as half
    (at step 0 every pair ties: accuracy 0.5, chance)."""
    margin = chosen_rewards - rejected_rewards  # (B,)
    acc = (margin > 0).float() + 0.5 * (margin == 0).float()  # (B,)
    values = (losses, chosen_rewards, rejected_rewards, acc, margin, chosen_logps, rejected_logps)
    return {prefix + k: v.float().mean().item() for k, v in zip(PAIR_KEYS, values)}


PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected")


def kto_metrics(losses, rewards, logps, desirable, kl, prefix=""):
    """KTO's numbers, named as TRL names them: chosen = the desirable answers, rejected = the
    undesirable ones (unpaired, so no accuracy; the margin is the difference of the two means), kl = z0."""
    out = {prefix + "loss": losses.mean().item(), prefix + "kl": float(kl)}
    for name, sel in (("chosen", desirable), ("rejected", ~desirable)):
        if sel.any():  # a batch can hold one kind only
            out[f"{prefix}rewards/{name}"] = rewards[sel].mean().item()
            out[f"{prefix}logps/{name}"] = logps[sel].mean().item()
    if desirable.any() and (~desirable).any():
        out[prefix + "rewards/margin"] = out[prefix + "rewards/chosen"] - out[prefix + "rewards/rejected"]
    return out


@torch.no_grad()
def reference_logprobs(ref, examples, batches, device, ctx, average=False, joint=True):
    """log pi_ref of the chosen and rejected answer of every pair in `batches` (lists of indices
    into examples), in eval mode: (N, 2). A pair in no batch is NaN, so using it would fail loudly.
    joint: both rows of a pair in one forward, as training runs them; joint=False (KTO): [:, 0] the
    answers and [:, 1] their mismatched rows, each column in a forward of its own (rows_logps)."""
    ref.eval()
    out = torch.full((len(examples), 2), float("nan"))  # (N, 2): [:, 0] chosen, [:, 1] rejected
    for b in tqdm(batches, desc="reference log-probs", dynamic_ncols=True, leave=False):
        with ctx:
            if joint:
                ids, mask = collate([examples[i] for i in b])
                cols = concatenated_logps(ref, ids.to(device), mask.to(device), average)
            else:
                cols = [rows_logps(ref, [examples[i][j] for i in b], device) for j in (0, 1)]
        out[b] = torch.stack(cols, 1).float().cpu()  # (B, 2)
    return out


@torch.no_grad()
def evaluate(model, examples, ref_logps, cfg, device, ctx):
    """The training metrics on held-out pairs (val_ prefix), plus val_logratio."""
    model.eval()
    cols = [[] for _ in range(5)]
    for i in range(0, len(examples), cfg.batch_size):
        ids, mask = collate(examples[i:i + cfg.batch_size])
        with ctx:
            chosen, rejected = concatenated_logps(model, ids.to(device), mask.to(device), averaged(cfg))
        mb_ref = None if ref_logps is None else ref_logps[i:i + cfg.batch_size].to(device)  # (B, 2)
        out = pair_losses(cfg, chosen, rejected, mb_ref)
        for c, v in zip(cols, (*out, chosen, rejected)):
            c.append(v.float().cpu())
    model.train()
    losses, r_c, r_r, lp_c, lp_r = (torch.cat(c) for c in cols)
    metrics = pair_metrics(losses, r_c, r_r, lp_c, lp_r, prefix="val_")
    # mean of log pi(y) - log pi_ref(y) over the val chosen AND rejected answers. Not KL(pi || pi_ref):
    # these answers are the data's, not samples from pi, so it can even be negative (both log-probs
    # usually fall). eval.py measures the on-policy KL from the policy's own samples. SimPO has no
    # reference (its rewards are beta times average log-probs): no val_logratio.
    if ref_logps is not None:
        metrics["val_logratio"] = ((torch.cat([r_c, r_r]) / cfg.beta).mean()).item()
    return metrics


@torch.no_grad()
def evaluate_kto(model, examples, labels, ref_logps, cfg, device, ctx):
    """KTO's training metrics on held-out answers (val_ prefix), z0 from all their mismatched rows,
    plus val_logratio, the mean of log pi(y) - log pi_ref(y) over the held-out answers."""
    model.eval()
    batches = [list(range(i, min(i + cfg.batch_size, len(examples)))) for i in range(0, len(examples), cfg.batch_size)]
    with ctx:
        logps = torch.cat([rows_logps(model, [examples[i][0] for i in b], device).float().cpu() for b in batches])  # (N,)
        kl_logps = torch.cat([rows_logps(model, [examples[i][1] for i in b], device).float().cpu() for b in batches])  # (N,)
    model.train()
    kl = kto_kl(kl_logps, ref_logps[:, 1])
    losses, rewards = kto_loss(logps, ref_logps[:, 0], labels, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    metrics = kto_metrics(losses, rewards, logps, labels, kl, prefix="val_")
    metrics["val_logratio"] = (logps - ref_logps[:, 0]).mean().item()
    return metrics


def averaged(cfg):
    """Whether log-probs are per-token means: SimPO's length normalisation, IPO's per-token form."""
    return cfg.loss_type == "simpo" or cfg.ipo_average


@torch.no_grad()
def print_samples(model, tokenizer, prompts, cfg, device, show=True):
    """A few held-out answers, the first sign of over-optimisation (docs/implementation_details.md, item 18).
    show=False: sampled (an FSDP process joining the gather), not printed."""
    if not prompts:
        return
    model.eval()
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    answers = M.sample_answers(model, tokenizer, prompts, cfg.max_new_tokens, 1.0, len(prompts), g, cfg.template)
    for p, (resp, ended) in zip(prompts if show else [], answers):
        tqdm.write(f"  > {p}\n    {tokenizer.decode(resp)!r}{'' if ended else ' [no EOS]'}")
    model.train()


# --- training


def check_config(cfg):
    """Every option error before anything loads: a setting that does not apply to the loss_type
    (or to the offline / online mode) is an error, not a silent no-op."""
    if cfg.loss_type not in LOSS_TYPES:
        raise M.ConfigError(f"loss_type {cfg.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if cfg.label_smoothing and cfg.loss_type != "dpo":
        raise M.ConfigError(f"label_smoothing is cDPO's; it does not apply to loss_type {cfg.loss_type!r}")
    if cfg.ipo_average and cfg.loss_type != "ipo":
        raise M.ConfigError(f"ipo_average is IPO's per-token form; it does not apply to loss_type {cfg.loss_type!r}"
                            + (" (SimPO always averages)" if cfg.loss_type == "simpo" else ""))
    if not 0 <= cfg.label_smoothing < 0.5:
        raise M.ConfigError(f"label_smoothing {cfg.label_smoothing}: expected 0 <= e < 0.5 (a flip probability)")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    own = {"simpo_gamma": "simpo", "desirable_weight": "kto", "undesirable_weight": "kto"}
    for key, loss_type in own.items():
        if getattr(cfg, key) != defaults[key] and cfg.loss_type != loss_type:
            raise M.ConfigError(f"{key} is {loss_type}'s; it does not apply to loss_type {cfg.loss_type!r}")
    if cfg.loss_type == "kto" and not (cfg.desirable_weight > 0 and cfg.undesirable_weight > 0):
        raise M.ConfigError(f"desirable_weight {cfg.desirable_weight}, undesirable_weight {cfg.undesirable_weight}: must be > 0")
    if cfg.online:
        if cfg.loss_type not in ("dpo", "ipo"):
            raise M.ConfigError(f"online = true trains DPO or IPO on fresh pairs; loss_type {cfg.loss_type!r} is offline only here")
        for key in ("data", "epochs", "grad_accum"):
            if getattr(cfg, key) != defaults[key]:
                raise M.ConfigError(f"{key} is the offline run's; online = true samples its pairs each step "
                                    f"(online_steps, online_prompts_per_step, micro-batches of batch_size pairs)")
        if cfg.online_samples < 2 or cfg.online_prompts_per_step < 1 or cfg.online_steps < 1:
            raise M.ConfigError(f"online_samples {cfg.online_samples} (>= 2: a pair), online_prompts_per_step "
                                f"{cfg.online_prompts_per_step}, online_steps {cfg.online_steps} (>= 1)")
        if cfg.temperature <= 0:
            raise M.ConfigError(f"temperature {cfg.temperature}: online DPO samples, > 0")
    else:
        for key in ONLINE_KEYS:
            if getattr(cfg, key) != defaults[key]:
                raise M.ConfigError(f"{key} is online DPO's; it applies only with online = true")
    M.check_fsdp(cfg, online=cfg.online and "online DPO runs in one process: --fsdp false",
                 loss_type=cfg.loss_type == "kto" and "KTO runs in one process: --fsdp false")
    if (cfg.online or cfg.loss_type == "kto") and M.process_count() > 1:
        raise M.ConfigError("online DPO and KTO run in one process here (z0 and the sampled pairs are not shared "
                            "over processes); run without torchrun")


def train(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    check_config(cfg)
    if cfg.online:
        return train_online(cfg)
    M.require(cfg, "data", "val_data", "init")
    M.check_paths(data=cfg.data, val_data=cfg.val_data, init=cfg.init)
    M.check_roles(init=(cfg.init, "policy"))
    cfg.template = M.resolve_template(cfg.template, cfg.init)
    if cfg.max_len > M.block_size_of(cfg.init):
        raise M.ConfigError(f"max_len {cfg.max_len} > the block_size {M.block_size_of(cfg.init)} of {cfg.init}")
    kto, average = cfg.loss_type == "kto", averaged(cfg)
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
    if kto:  # unpaired answers (a paired file split into one desirable + one undesirable row per pair)
        train_rows, train_read = read_unpaired(cfg.data)
        val_rows, val_read = read_unpaired(cfg.val_data)
        train_ex, train_labels, train_stats = encode_unpaired(train_rows, tokenizer, cfg.max_len, cfg.min_prompt, cfg.template, cfg.seed)
        val_ex, val_labels, val_stats = encode_unpaired(val_rows, tokenizer, cfg.max_len, cfg.min_prompt, cfg.template, cfg.seed)
        val_prompts = list(dict.fromkeys(p for p, _, _ in val_rows))[:cfg.n_samples]
    else:
        train_groups, train_read = M.read_preferences(cfg.data)
        val_groups, val_read = M.read_preferences(cfg.val_data)
        train_ex, train_stats = encode_pairs(expand_pairs(train_groups), tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
        val_ex, val_stats = encode_pairs(expand_pairs(val_groups), tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
        val_prompts = list(dict.fromkeys(p for p, _ in val_groups))[:cfg.n_samples]
    if master:
        with open(os.path.join(cfg.out_dir, "data_stats.json"), "w") as f:
            json.dump({"train": {**train_read, **train_stats}, "val": {**val_read, **val_stats}}, f)
        M.print_config(cfg)
    per_step = cfg.batch_size * cfg.grad_accum  # pairs (KTO: answers) per optimizer step
    max_steps = math.ceil(cfg.epochs * math.ceil(len(train_ex) / per_step))
    unit = "answers" if kto else "pairs"
    print(f"train {train_read} {train_stats} | val {val_read} {val_stats} | {per_step} {unit}/step | {max_steps} steps")
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
    # (pi = pi_ref at step 0) or, on resume, from the checkpoint. KTO: of each answer and of its
    # mismatched row (for z0), each kind in its own forward, as training runs them. SimPO is
    # reference-free: no reference pass at all.
    t0 = time.time()
    steps_per_epoch = math.ceil(len(train_ex) / per_step)
    batches = [idx[j::cfg.grad_accum] for s in range(min(max_steps, steps_per_epoch))
               for idx in [batch_indices(s, len(train_ex), per_step, cfg.seed)] for j in range(cfg.grad_accum)
               if idx[j::cfg.grad_accum]]  # an epoch's last step can leave a micro-batch empty
    if cfg.loss_type == "simpo":
        ref_train = ref_val = None
        print("loss_type simpo is reference-free: no reference log-probs")
    else:
        ref_train = reference_logprobs(ref, train_ex, batches, device, ctx, average, joint=not kto)  # (N_train, 2)
        val_batches = [list(range(i, min(i + cfg.batch_size, len(val_ex)))) for i in range(0, len(val_ex), cfg.batch_size)]
        ref_val = reference_logprobs(ref, val_ex, val_batches, device, ctx, average, joint=not kto)  # (N_val, 2)
        print(f"reference log-probs of {sum(map(len, batches))} + {len(val_ex)} {unit} in {time.time() - t0:.1f}s")
    model = ref if state is None else M.load_checkpoint(ckpt, device)[0]
    model = M.adapt(model, cfg, resumed=state is not None)  # with LoRA, pi_ref is the base under the adapters
    del ref

    ddp_model = M.fsdp_wrap(model, world, device) if cfg.fsdp else M.ddp_wrap(model, world, device)  # FSDP: in place
    opt = M.configure_optimizer(model, cfg.lr, cfg.weight_decay, device=device)  # after the wrap: FSDP shards its state
    if state is not None:
        step = M.resume_state(opt, state, ckpt, model)
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    model.train()
    t0, start = time.time(), step
    bar = tqdm(total=max_steps, initial=step, desc=cfg.loss_type, dynamic_ncols=True, disable=not master)
    while step < max_steps:
        # 1. the pairs (KTO: answers) of this step; learning rate: warmup, then linear decay
        idx = batch_indices(step, len(train_ex), per_step, cfg.seed)
        lr = M.lr_at(step, max_steps, cfg.lr, cfg.warmup, cfg.min_lr_frac, schedule="linear")
        for group in opt.param_groups:
            group["lr"] = lr
        cols = [[] for _ in range(5)]
        micro = [idx[j::cfg.grad_accum] for j in range(cfg.grad_accum) if idx[j::cfg.grad_accum]]  # the last step can be short
        if kto:  # 2a. KTO's z0 over the whole step (any grad_accum gives the same), mismatched rows, no gradient
            with torch.no_grad(), ctx:
                kl_logps = torch.cat([rows_logps(fwd, [train_ex[i][1] for i in rows], device) for rows in micro])  # (n,)
            kl = kto_kl(kl_logps.float(), ref_train[[i for rows in micro for i in rows], 1].to(device))
        for j, rows in enumerate(micro):
            mine = rows[rank::world]  # this rank's share; an empty share still joins the all-reduce
            mb_idx = mine or rows[:1]
            # 2. chosen and rejected in one forward, split back (KTO: the answers alone)
            sync = world == 1 or j == len(micro) - 1 or cfg.fsdp  # FSDP reduce-scatters every micro-batch
            with ctx, (nullcontext() if sync else ddp_model.no_sync()):
                mb_ref = None if ref_train is None else ref_train[mb_idx].to(device)  # (B, 2), constants
                # 3. the loss, a mean over all pairs of the step (DDP and FSDP average over ranks: * world)
                if kto:
                    logps = rows_logps(fwd, [train_ex[i][0] for i in mb_idx], device)  # (B,)
                    mb_labels = train_labels[mb_idx].to(device)  # (B,)
                    losses, rewards = kto_loss(logps, mb_ref[:, 0], mb_labels, kl, cfg.beta,
                                               cfg.desirable_weight, cfg.undesirable_weight)  # (B,), (B,)
                    outs = (losses, rewards, logps, mb_labels)
                else:
                    ids, mask = collate([train_ex[i] for i in mb_idx])
                    chosen, rejected = concatenated_logps(fwd, ids.to(device), mask.to(device), average)  # (B,), (B,)
                    losses, r_c, r_r = pair_losses(cfg, chosen, rejected, mb_ref)  # (B,) each
                    outs = (losses, r_c, r_r, chosen, rejected)
                (losses.sum() * (1.0 if mine else 0.0) / len(idx) * world).backward()
            if mine:
                for c, v in zip(cols, outs):
                    c.append(v.detach().cpu())
        if kto:  # one process (check_config)
            losses, rewards, logps, labels = (torch.cat(c) for c in cols[:4])
            metrics = kto_metrics(losses.float(), rewards.float(), logps.float(), labels, kl)
        else:
            n_mine = sum(len(c) for c in cols[0])
            local = pair_metrics(*(torch.cat(c).float() for c in cols)) if n_mine else dict.fromkeys(PAIR_KEYS, 0.0)
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
        # (FSDP: every process runs the eval, the samples and the checkpoint's gather; rank 0 writes)
        if (master or cfg.fsdp) and (step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or last):
            metrics = {"step": step, **metrics, "lr": lr, "grad_norm": grad_norm,
                       f"{unit}_s": round(per_step * (step - start) / (time.time() - t0), 1)}
            if step % cfg.eval_interval == 0 or last:
                if kto:
                    metrics.update(evaluate_kto(model, val_ex, val_labels, ref_val, cfg, device, ctx))
                else:
                    metrics.update(evaluate(model, val_ex, ref_val, cfg, device, ctx))
                if val_prompts:
                    print_samples(model, tokenizer, val_prompts, cfg, device, master)
            if master:
                M.log_metrics(cfg.out_dir, metrics)
        if (master or cfg.fsdp) and (step % cfg.ckpt_interval == 0 or last):
            M.save_checkpoint(ckpt, model, tokenizer, dataclasses.asdict(cfg), role="policy",
                              state={"step": step, "optimizer": M.optimizer_state(opt, model), "rng": M.rng_state(),
                                     "finished": last})
    bar.close()
    M.ddp_cleanup(world)
    return model


def train_online(cfg):
    """Online DPO: the steps of the module docstring's online list. One process; the reference is
    the SFT start, kept loaded; the reward model ranks, it is never a loss."""
    M.require(cfg, "init", "reward_model", "prompts")
    M.check_paths(init=cfg.init, reward_model=cfg.reward_model, prompts=cfg.prompts, val_data=cfg.val_data)
    M.check_roles(init=(cfg.init, "policy"), reward_model=(cfg.reward_model, "reward_model"))
    cfg.template = M.resolve_template(cfg.template, cfg.init, cfg.reward_model)
    if cfg.max_len > M.block_size_of(cfg.init) or cfg.max_new_tokens >= cfg.max_len:
        raise M.ConfigError(f"max_len {cfg.max_len} must fit the block_size {M.block_size_of(cfg.init)} of {cfg.init} "
                            f"and exceed max_new_tokens {cfg.max_new_tokens} (a prompt gets max_len - max_new_tokens)")
    from data.world import gold_on, gold_reward, verify_answer  # the task's oracle: a metric only
    gold = gold_on(cfg.gold, cfg.prompts)
    _, _, device = M.ddp_setup(cfg.device)
    run = M.start_run(cfg, SAFE_KEYS)
    if run.finished:
        return M.load_checkpoint(run.ckpt, device)[0]
    torch.manual_seed(cfg.seed)
    ckpt, state = run.ckpt, run.state
    ctx = M.autocast(device, cfg.dtype)
    ref, tokenizer = M.load_gpt(cfg.init, device)  # pi_ref: the SFT start, fixed for the whole run
    if ref.config.lora_rank:
        ref = M.merge_lora(ref)
    rm, rm_tok, _ = M.load_checkpoint(cfg.reward_model, device, kind="scalar")
    if rm_tok.ranks != tokenizer.ranks:
        raise M.ConfigError(f"{cfg.reward_model} and {cfg.init} use different tokenizers")
    prompts, prompt_ids, n_cut = M.load_prompts(cfg.prompts, tokenizer, cfg.max_len - cfg.max_new_tokens, cfg.template)
    model = copy.deepcopy(ref) if state is None else M.load_checkpoint(ckpt, device)[0]
    model = M.adapt(model, cfg, resumed=state is not None)
    for frozen in (ref, rm):
        frozen.eval().requires_grad_(False)
    val_ex = ref_val = None
    if cfg.val_data:  # the offline val_ metrics on held-out pairs, for comparison with offline runs
        val_groups, _ = M.read_preferences(cfg.val_data)
        val_ex, _ = encode_pairs(expand_pairs(val_groups), tokenizer, cfg.max_len, cfg.min_prompt, cfg.template)
        val_batches = [list(range(i, min(i + cfg.batch_size, len(val_ex)))) for i in range(0, len(val_ex), cfg.batch_size)]
        ref_val = reference_logprobs(ref, val_ex, val_batches, device, ctx, cfg.ipo_average)  # (N_val, 2)
    M.print_config(cfg)
    K, n_prompts = cfg.online_samples, cfg.online_prompts_per_step
    print(f"online {cfg.loss_type}: {cfg.online_steps} steps x {n_prompts} prompts x {K} answers, best vs worst by "
          f"{cfg.reward_model} | {len(prompts)} prompts ({n_cut} cut to {cfg.max_len - cfg.max_new_tokens} tokens)")
    M.check_warmup(cfg.warmup, cfg.online_steps, cfg.lr)
    opt = M.configure_optimizer(model, cfg.lr, cfg.weight_decay, device=device)
    step = 0
    if state is not None:
        step = M.resume_state(opt, state, ckpt, model)
    fwd = torch.compile(model) if cfg.compile else model
    gen = torch.Generator(device=device)
    t0, start = time.time(), step
    bar = tqdm(total=cfg.online_steps, initial=step, desc=f"online {cfg.loss_type}", dynamic_ncols=True)
    while step < cfg.online_steps:
        # 1. the prompts of this step, from (seed, step); learning rate: warmup, then linear decay
        idx = M.prompt_batch(step, len(prompts), n_prompts, cfg.seed)
        lr = M.lr_at(step, cfg.online_steps, cfg.lr, cfg.warmup, cfg.min_lr_frac, schedule="linear")
        for group in opt.param_groups:
            group["lr"] = lr
        # 2. K answers to each from the CURRENT policy (one shared prefill per prompt), drawn from (seed, step)
        model.eval()
        seq, full_mask, P = M.sample_rollout(model, prompt_ids, idx, range(1), n_prompts * K, K, cfg, step,
                                             tokenizer.eot_id, gen, ctx, device)  # (n K, P + R)
        responses = seq[:, P:]  # (n K, R), PAD after an EOS
        lengths = full_mask[:, P:].sum(1).tolist()  # (n K,) tokens of each answer, its EOS included
        # 3. score the re-encoded answers; no EOS: missing_eos_penalty (item 9); each prompt's best vs worst
        rm_ids = M.rm_rows(tokenizer, [prompt_ids[i] for i in idx for _ in range(K)], responses, rm.config.block_size)
        with torch.no_grad(), ctx:
            raw = rm.score(rm_ids.to(device), (rm_ids != M.PAD_ID).to(device)).float()  # (n K,)
        scores, ended = M.penalise_missing_eos(raw, responses, tokenizer.eot_id, cfg.missing_eos_penalty)
        scores = scores if cfg.eos_trick else raw
        best, worst, tie = best_worst_pairs(scores, K)  # (n,) each
        keep = (~tie).nonzero().squeeze(1).tolist()  # prompts whose answers do not all tie
        rows = lambda r, i: (prompt_ids[i] + responses[r, :lengths[r]].tolist(), len(prompt_ids[i]))  # noqa: E731
        examples = [(rows(best[k].item(), idx[k]), rows(worst[k].item(), idx[k])) for k in keep]
        # 4-5. per micro-batch of batch_size pairs: the reference's log-probs of these fresh pairs (no
        # gradient; the same rows and padding as the policy's forward, so h = 0 exactly at step 0), then
        # the policy's, the loss as a mean over the step's pairs
        model.train()
        n, cols = len(examples), [[] for _ in range(5)]
        for i in range(0, n, cfg.batch_size):
            ids, mask = collate(examples[i:i + cfg.batch_size])  # (2B, T), (2B, T)
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad(), ctx:
                ref_c, ref_r = concatenated_logps(ref, ids, mask, cfg.ipo_average, cfg.temperature)  # (B,), (B,)
            with ctx:
                chosen, rejected = concatenated_logps(fwd, ids, mask, cfg.ipo_average, cfg.temperature)  # (B,), (B,)
                losses, r_c, r_r = dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta, cfg.label_smoothing, cfg.loss_type)
                (losses.sum() / n).backward()
            for c, v in zip(cols, (losses, r_c, r_r, chosen, rejected)):
                c.append(v.detach().float().cpu())
        metrics = pair_metrics(*(torch.cat(c) for c in cols)) if n else {}
        if n and not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"step {step}: loss is {metrics['loss']}; last good checkpoint is in {ckpt}")
        # 6. clip, step (a step whose prompts all tied has no pair: no update, the step still counts)
        grad_norm = 0.0
        if n:
            grad_norm = M.clip_grad_checked(model.parameters(), cfg.grad_clip, f"step {step} (last good checkpoint: {ckpt})")
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # 7. log (the ranking's scores, ties, the gold reward of the samples), eval with samples, checkpoint
        last = step == cfg.online_steps
        if step % cfg.log_interval == 0 or step % cfg.eval_interval == 0 or last:
            sel = torch.tensor(keep, dtype=torch.long)
            metrics = {"step": step, **metrics, "pairs": n, "ties": len(idx) - n, "score": scores.mean().item(),
                       "score/chosen": scores[best[sel]].mean().item() if n else float("nan"),
                       "score/rejected": scores[worst[sel]].mean().item() if n else float("nan"),
                       "eos_frac": ended.float().mean().item(), "resp_len": sum(lengths) / len(lengths),
                       "lr": lr, "grad_norm": grad_norm, "s_per_step": round((time.time() - t0) / (step - start), 2)}
            if gold:
                texts = [tokenizer.decode(responses[r, :lengths[r]].tolist()) for r in range(len(lengths))]
                metrics.update(M.gold_metrics(gold_reward, [prompts[i] for i in idx for _ in range(K)], texts, ended,
                                              1, device, len(texts), verify_answer))
            if val_ex is not None and (step % cfg.eval_interval == 0 or last):
                metrics.update(evaluate(model, val_ex, ref_val, cfg, device, ctx))
            if step % cfg.eval_interval == 0 or last:
                print_samples(model, tokenizer, prompts[:cfg.n_samples], cfg, device)
            M.log_metrics(cfg.out_dir, metrics)
        if step % cfg.ckpt_interval == 0 or last:
            M.save_checkpoint(ckpt, model, tokenizer, dataclasses.asdict(cfg), role="policy",
                              state={"step": step, "optimizer": opt.state_dict(), "rng": M.rng_state(), "finished": last})
    bar.close()
    return model


if __name__ == "__main__":
    M.main(train, Config)
