"""
grpo.py: the critic-free policy gradients sampled in groups (GRPO, Dr. GRPO, RLOO, REINFORCE++, with GSPO,
CISPO and DAPO's objectives), beside ppo.py, and a lab for the mismatch between the sampler and the trainer.

Objective: the same as PPO's (maximise E[R(x, y)] - beta KL(pi || pi_ref)), but with no value model:
each prompt is answered G times (a group) and the group is the baseline.
  1. rollout     P prompts x G answers (group_size) with the KV cache; each prompt's prefill runs once
                 and its cache is copied to its G samples. Temperature T, no top-k/top-p, at most
                 max_new_tokens, each row stopping at EOS
  2. score       R_i: reward = "rm": the reward-model score of the re-encoded answer (normalised by its
                 gain/bias), an answer without EOS scoring missing_eos_penalty instead (Stiennon et al.
                 2020, N+ "EOS trick"); several reward models (reward_model "a,b,c": an ensemble, e.g.
                 reward.py run with --seed 1, 2, 3) score each answer with their own normalisation, combined by
                 ensemble (model.combine_ensemble; Coste et al. 2023): mean, min (worst case), or uwo =
                 mean - ensemble_lambda * Var (population variance over members); logged score_rm<j>, ensemble_std;
                 reward = "verifiable": 1 if the answer states the true value of what a fact question
                 asks and no false one, else 0 (data/world.py verify_answer; RL from verifiable rewards),
                 or with verifier = "arith" 1 if it states a + b and no other result (data/arith.py);
                 training prompts are filtered to the checker's questions (counted).
                 With overlong_buffer > 0, DAPO's soft overlong penalty is added (Yu et al. 2025, Eq. 13):
                 0 up to max_new_tokens - overlong_buffer tokens, then linearly down to -overlong_penalty.
                 With dynamic_sampling (DAPO, Yu et al. 2025, Sec. 3.2), steps 1-2 repeat on fresh prompts
                 (at most max_sample_rounds rounds, each shard on its own) until each shard holds its
                 groups of scores that are not all equal; equal groups fill what is still missing (logged dyn_filled)
  3. forward     old log-probs log pi_old(y_t), reference log-probs log pi_ref(y_t) (both of logits / T;
                 no reference model at all when kl_coef = 0); with LoRA (lora_rank > 0) pi_ref is the
                 policy with its adapters switched off
  4. KL          k_t = kl_estimator(log pi_old(y_t) - log pi_ref(y_t)) (Schulman 2020):
                 k1 = l, k2 = l^2 / 2, k3 = exp(-l) - 1 + l.  kl_in = "reward": a penalty on the reward,
                 kl_in = "loss": beta * k_t(pi_theta) added to the per-token loss (the KL section of
                 the docstring of model.kl_estimate says what gradient each estimator gives there)
  5. advantages  one of (R_i the score of answer i, mean_g / std_g over its group of G):
                 grpo         A_i = (R_i - mean_g R) / (std_g R + eps)          (Shao et al. 2024, Eq. 3)
                 dr_grpo      A_i = R_i - mean_g R                                (Liu et al. 2025, Dr. GRPO)
                 rloo         A_i = R_i - 1/(G-1) sum_{j!=i} R_j                  (Ahmadian et al. 2024, Eq. 9)
                 reinforce_pp r_t = -beta k_t + R_i at the last token, A_t = sum_{s>=t} r_s,
                              whitened over the whole rollout's tokens            (Hu 2025, REINFORCE++)
                 reinforce_pp_baseline  the same with R_i - mean_g R in place of R_i  (Hu 2025)
                 grpo / dr_grpo / rloo put A_i on every token of answer i. With kl_in = "reward"
                 (K_i = sum_t k_t): dr_grpo and rloo take their baseline of R_i - beta K_i (RLOO's
                 sequence-level penalty); grpo divides by the std of the task reward only, and the
                 KL part enters centred but unscaled:
                              A_i = (R_i - mean_g R) / (std_g R + eps) - beta (K_i - mean_g K)
                 (dividing R_i - beta K_i by its own std, as before, gave a group of equal task
                 rewards the same advantages at every beta: the std scaled with beta). The beta
                 rows of docs/grpo_results.md with GRPO's advantages and k1 in the reward (the KL
                 table's first row, the verifiable "KL anchor" runs) were measured with that old
                 rule and mean it until re-run. REINFORCE++'s KL is per token as in PPO. A group
                 whose task rewards are all equal has A = 0 exactly (grpo, dr_grpo, rloo; group
                 statistics in float64 and equal groups set to 0, so fp32 rounding of the mean never
                 becomes an advantage), plus the KL part with kl_in = "reward": such groups are
                 counted; drop_equal_groups also takes them out of the loss (DAPO's dynamic
                 sampling without the re-sampling, Yu et al. 2025)
  6. update      update_epochs passes over the rollout in shuffled minibatches of whole rows (each split
                 into grad_accum micro-batches), PPO's clipped surrogate with separate clip ranges
                 (DAPO's clip-higher, Yu et al. 2025, Eq. 10), r_t = pi_theta / pi_old:
                 l_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
                       + [kl_in = loss] beta * r_t.detach() * k_t
                 or with policy_loss = "gspo" the sequence ratio s_i = exp(1/L_i sum_t log r_t) in place
                 of r_t (Zheng et al. 2025, GSPO, Eq. 5-7; whole answers clipped), or "cispo"
                 -sg[clip(r_t, 1 - clip_low, 1 + clip_high)] A_t log pi_theta(y_t) (MiniMax 2025, CISPO,
                 Eq. 4-5; no token's gradient clipped away), both in grpo_losses' docstring;
                 aggregated over the minibatch by loss_agg (L_i the length of answer i, N answers):
                 seq_mean_token_mean      1/N sum_i 1/L_i sum_t l_t          (GRPO, Shao et al. 2024, Eq. 3)
                 token_mean               1/sum_i L_i sum_i sum_t l_t         (DAPO, Yu et al. 2025, Eq. 8)
                 seq_mean_token_sum_norm  1/N sum_i 1/max_new_tokens sum_t l_t (Dr. GRPO, Liu et al. 2025)
                 The first favours short correct answers and long wrong ones (a per-answer 1/L_i);
                 the other two weigh every token the same. N and sum_i L_i are the whole minibatch's
                 (over micro-batches and processes), so grad_accum and torchrun never change the loss.
                 With ent_coef != 0, l_t also gets - ent_coef H_t (H_t the policy's entropy at t):
                 PPO's entropy bonus (Schulman et al. 2017, Eq. 9), or with ent_coef < 0 a penalty
                 (token-level entropy minimisation, Agarwal et al. 2025). With ptx_coef > 0 each minibatch
                 loss also gets ptx_coef times the mean next-token negative log-likelihood of random
                 windows of pretraining text (ptx_data): InstructGPT's PPO-ptx (Ouyang et al. 2022, Eq. 2),
                 which keeps what pretraining taught while RL moves the policy.
The sampler-trainer mismatch lab: the rollout of step 1 drawn from mu, a chosen dose away from the
trainer's pi_old: sampler_dtype (the sampler in bf16 autocast, on CPU too), sampler_top_p (its
nucleus against the trainer's full softmax), staleness k (the policy's weights of k iterations back:
asynchronous RL; kept in the checkpoint, so resume stays exact). log mu(y_t) is the sampler's own
full forward in its own precision and nucleus, so with no dose w_t = pi_old(y_t) / mu(y_t) is exactly 1.
Logged: mis_ratio_mean, mis_out_0.1 (share of tokens outside [0.9, 1.1]), mis_ratio_max, _min,
mis_kept. Corrections (is_correction; mismatch_correction's docstring): none, tis (each token's loss
times min(w_t, is_cap): truncated IS, Yao et al. 2025), token_mask (tokens with w_t outside
[is_low, is_high] left out of the loss: IcePop), seq_mask (answers whose geometric-mean w leaves
the band left out). docs/grpo_results.md, sections 4-5, has what they measured.

Log-prob, KL and loss arithmetic is fp32 even under bf16 autocast (docs/implementation_details.md,
item 16); dropout is off in every model (item 2); Adam eps 1e-5 (item 15). With
ent_coef = 0 the entropy H is logged only, computed without gradients, so no (B, R, V) fp32 graph is
kept for it.

Models, as in ppo.py without the value model: the policy, the frozen reference (the policy's start,
in the policy's precision: item 19) and, with reward = "rm", the frozen reward model (or each member of
an ensemble, all in bf16 under bf16 autocast), which scores the re-encoded text of each answer (item 20).

Departures: the KL loss term is weighted by the detached importance ratio pi_theta / pi_old, so that
on later minibatches (ratio != 1) its expected gradient is still the estimator's on-policy one
(DeepSeekMath adds k3 unweighted; at ratio 1 the two are the same). GRPO's std is the unbiased
sample std (as in TRL, OpenRLHF and verl), eps 1e-6. As in ppo.py, old log-probs are recomputed by a
full forward after sampling, and the gold reward of the built-in task (and its fact accuracy) is logged
only on the world's own prompts (gold = auto), never trained on.

Several GPUs: torchrun --nproc_per_node N grpo.py --config ... (data parallel, no DDP wrapper), as
ppo.py (item 21: several processes take the step one process takes): each process owns whole groups,
so a group's baseline is local; REINFORCE++'s whitening and every logged mean are over the whole
rollout (tests/test_grpo.py). With --fsdp true the policy, the reference and the reward models are
sharded (FSDP2, model.fsdp_wrap; item 23): the rollout gathers the policy whole, and every process
runs every micro-batch (an empty share at weight 0), since the shards' all-gathers are collective.

Run:
  CPU, built-in task:  python grpo.py --config configs/grpo_world.toml
  Dr. GRPO:  python grpo.py --config configs/grpo_world.toml --advantage dr_grpo --loss_agg seq_mean_token_sum_norm --out_dir out/dr_grpo
  RLOO:      python grpo.py --config configs/grpo_world.toml --advantage rloo --kl_in reward --kl_estimator k1 --out_dir out/rloo
  verifiable rewards:  python grpo.py --config configs/grpo_world_verifiable.toml
  RM ensemble (UWO):   python grpo.py --config configs/grpo_world.toml --reward_model out/reward_seed1,out/reward_seed2,out/reward_seed3 \
                           --ensemble uwo --ensemble_lambda 0.5 --out_dir out/grpo_uwo
  GSPO, CISPO, DAPO, the mismatch lab: sweep.sh's gspo, cispo, dapo, stale4, bf16, topp0.9 runs (their flags there)
  one GPU:   python grpo.py --config configs/grpo_world.toml --device cuda
"""

import collections
import copy
import dataclasses
import importlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M

VERIFIERS = {"facts": "data.world", "arith": "data.arith"}  # reward = "verifiable": the module whose verify_answer scores
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
POLICY_LOSSES = ("ppo_clip", "gspo", "cispo")
CORRECTIONS = ("none", "tis", "token_mask", "seq_mask")

# --- config


@dataclass
class Config:
    policy: str = ""  # (required) SFT checkpoint: the policy's start and the frozen reference
    reward: str = "rm"  # "rm": reward_model's score; "verifiable": the verifier's 0/1 checker
    verifier: str = "facts"  # reward = "verifiable": facts (data/world.py's fact questions) or arith (data/arith.py's sums)
    reward_model: str = ""  # (required when reward = "rm") reward-model checkpoint (reward.py); several, comma-separated: an ensemble
    ensemble: str = "mean"  # how an ensemble's members combine per answer: mean | min | uwo (mean - ensemble_lambda * variance)
    ensemble_lambda: float = 0.5  # uwo's lambda (Coste et al. 2023), on normalised scores; a starting value, not tuned here
    prompts: str = ""  # (required) JSONL of {"prompt": ...} rows
    out_dir: str = "out/grpo"  # checkpoint (ckpt/), config.json, metrics.jsonl
    template: str = "auto"  # chat template (model.CHAT_TEMPLATES); auto = the policy checkpoint's, else hh
    overwrite: bool = False  # delete an existing run in out_dir and start afresh
    resume_changed: bool = False  # resume a run in out_dir although result-affecting settings changed (recorded in metrics.jsonl)
    wandb_project: str = ""  # mirror metrics.jsonl to this Weights & Biases project (optional: pip install wandb)
    wandb_mode: str = "offline"  # offline (no network; wandb sync later) | online
    # rollout
    total_episodes: int = 8192  # sampled answers over the whole run
    rollout_batch_size: int = 64  # answers per iteration (global: over all processes) = prompts x group_size
    group_size: int = 8  # G answers per prompt; the group is the baseline
    rollout_shards: int = 0  # 0 = one per process; sampling of shard k depends on (seed, iteration, k) only
    max_prompt_len: int = 64  # prompts are cut to their last max_prompt_len tokens (counted)
    max_new_tokens: int = 48  # response length cap; also Dr. GRPO's constant normaliser
    temperature: float = 1.0  # sampling temperature, also divides every log-prob's logits (item 1)
    eos_trick: bool = True  # answers that never emit EOS score missing_eos_penalty (item 9)
    missing_eos_penalty: float = -1.0  # score of an answer that never emits EOS (item 9); 0 keeps verifiable rewards 0/1
    # advantage, KL, loss
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline
    adv_eps: float = 1e-6  # GRPO's eps in (R - mean) / (std + eps)
    kl_coef: float = 0.04  # beta (DeepSeekMath: 0.04); 0 = no KL term and no reference model loaded
    kl_estimator: str = "k3"  # k1 | k2 | k3 (Schulman 2020)
    kl_in: str = "loss"  # "loss" (GRPO; k2 or k3: k1's expected gradient there is 0) or "reward" (RLOO, REINFORCE++)
    loss_agg: str = "seq_mean_token_mean"  # seq_mean_token_mean (GRPO) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr. GRPO)
    drop_equal_groups: bool = False  # take groups whose rewards are all equal out of the loss (always counted); not with reinforce_pp
    dynamic_sampling: bool = False  # DAPO: sample more groups until each shard of the rollout holds only groups of unequal rewards
    max_sample_rounds: int = 4  # dynamic_sampling: at most this many rounds per iteration; equal groups fill what is left (counted)
    policy_loss: str = "ppo_clip"  # ppo_clip (clipped token ratio) | gspo (clipped sequence ratio) | cispo (clipped IS weight on every token)
    overlong_buffer: int = 0  # DAPO's soft overlong penalty: 0 up to max_new_tokens - this, then down to -overlong_penalty; 0 = off
    overlong_penalty: float = 1.0  # DAPO's overlong penalty at max_new_tokens
    ent_coef: float = 0.0  # - ent_coef H_t in each token's loss: > 0 a bonus, < 0 a penalty; 0: H logged without a graph
    # the sampler-trainer mismatch lab: the rollout drawn from mu, a dose away from the trainer's pi_old
    sampler_dtype: str = "same"  # same (the trainer's) | bfloat16 (autocast, on CPU too) | float32
    sampler_top_p: float = 1.0  # < 1: the sampler's nucleus; the trainer keeps the full softmax
    staleness: int = 0  # k: every rollout sampled by the policy of k iterations back (asynchronous RL)
    is_correction: str = "none"  # none | tis (token weight min(pi_old / mu, is_cap)) | token_mask | seq_mask (ratio outside [is_low, is_high])
    is_cap: float = 2.0  # tis: the cap C (>= 1)
    is_low: float = 0.5  # token_mask, seq_mask: the smallest ratio kept (<= 1)
    is_high: float = 2.0  # token_mask, seq_mask: the largest ratio kept (>= 1)
    # PPO-ptx (InstructGPT Eq. 2); 0 = off
    ptx_coef: float = 0.0  # weight of the pretraining negative log-likelihood in each minibatch loss
    ptx_data: str = ""  # plain text, documents separated by a blank line (required when ptx_coef > 0)
    ptx_batch_size: int = 8  # pretraining windows per micro-batch
    ptx_len: int = 64  # tokens per pretraining window
    # update
    update_epochs: int = 4  # passes over each rollout
    num_minibatches: int = 4  # minibatches per pass (optimizer steps per epoch)
    grad_accum: int = 1  # micro-batches per minibatch
    lr: float = 1e-4  # AdamW learning rate of the policy
    anneal_lr: bool = True  # linear decay to 0 over the run (N+)
    clip_low: float = 0.2  # ratio >= 1 - clip_low
    clip_high: float = 0.2  # ratio <= 1 + clip_high (DAPO's clip-higher: 0.28)
    max_grad_norm: float = 1.0  # max global gradient norm
    # bookkeeping
    gold: str = "auto"  # log the built-in world's gold reward and fact accuracy (never trained on): auto = when the prompts are the world's; true; false
    log_interval: int = 1  # iterations
    sample_interval: int = 10  # print a few answers every this many iterations (item 18)
    n_show: int = 3  # answers printed every sample_interval
    ckpt_interval: int = 20  # iterations between checkpoints (always one at the end)
    eval_snapshot_interval: int = 0  # write the policy alone (weights, tokenizer, config) to out_dir/snapshots/it<N> every this many iterations and at the end, for eval.py --curve; 0 = off
    seed: int = 0  # seeds init, prompt order, sampling and minibatches
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "bfloat16"  # autocast on CUDA; the reward model also stored in it there (item 17), the reference not
    compile: bool = False  # torch.compile the forward
    lora_rank: int = 0  # LoRA adapters of this rank, all else frozen (model.add_lora); 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA output scale alpha / rank
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # which Linears of each block get adapters
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    fsdp: bool = False  # under torchrun: shard the policy, reference, reward models and AdamW state (FSDP2); gradients summed as without it


# settings that cannot change the trained weights or the logged numbers: may differ on resume
SAFE_KEYS = {"log_interval", "sample_interval", "n_show", "ckpt_interval", "eval_snapshot_interval", "device"}


# --- the algorithm, as pure functions


def group_advantages(scores, group_size, advantage, eps=1e-6, kl_penalty=None):
    """Sequence-level advantages (B,) from scores (B,) in groups of G consecutive rows.

    grpo      (R_i - mean_g R) / (std_g R + eps), std unbiased; a group of 1 gets 0   (Shao et al. 2024, Eq. 3)
    dr_grpo, reinforce_pp_baseline   R_i - mean_g R                (Liu et al. 2025; Hu 2025)
    rloo      R_i - 1/(G-1) sum_{j != i} R_j = G/(G-1) (R_i - mean_g R)  (Ahmadian et al. 2024), G >= 2
    reinforce_pp   R_i: no group baseline (the batch whitening of reinforce_pp_returns centres it)
    kl_penalty (B,): beta K_i = beta sum_t k_t of each answer (kl_in = "reward"; grpo, dr_grpo, rloo).
    dr_grpo and rloo take the baseline of R_i - beta K_i (RLOO's sequence-level penalty, Ahmadian et
    al. 2024). grpo divides by the std of the task reward only, the KL part entering centred but
    unscaled: A_i = (R_i - mean_g R) / (std_g R + eps) - beta (K_i - mean_g K). Dividing R - beta K by
    its own std would make beta meaningless in a group of equal task rewards (the std scales with beta).
    The group statistics are float64 and a group whose scores are all equal gets exactly 0 (grpo,
    dr_grpo, rloo, reinforce_pp_baseline): in fp32 the mean of G equal scores can be 1-2 ulp off, and
    grpo's (R_i - mean) / (std + eps) then turns that rounding error into |A| of order 1, one sign for
    the whole group. Returned in the dtype of scores."""
    R = scores.view(-1, group_size).double()  # (B / G, G)
    centred = group_centred(R)  # (B / G, G)
    if kl_penalty is not None and advantage not in ("grpo", "dr_grpo", "rloo"):
        raise ValueError(f"advantage {advantage!r} takes its KL per token (reinforce_pp_returns), not as kl_penalty")
    kl_centred = 0.0 if kl_penalty is None else group_centred(kl_penalty.view(-1, group_size).double())  # (B / G, G)
    if advantage == "grpo":
        std = R.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(R)
        out = centred / (std + eps) - kl_centred
    elif advantage in ("dr_grpo", "reinforce_pp_baseline"):
        out = centred - kl_centred
    elif advantage == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs group_size >= 2: the baseline is the mean of the other answers")
        out = (centred - kl_centred) * group_size / (group_size - 1)  # = R_i - 1/(G-1) sum_{j != i} R_j
    elif advantage == "reinforce_pp":
        out = R
    else:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, not {advantage!r}")
    return out.reshape(-1).to(scores.dtype)  # (B,)


def group_centred(x):
    """x - mean_g x for x (B / G, G) float64, exactly 0 in a group whose values are all equal."""
    equal = (x == x[:, :1]).all(1, keepdim=True)  # (B / G, 1)
    return torch.where(equal, 0.0, x - x.mean(1, keepdim=True))  # (B / G, G)


def equal_groups(scores, group_size):
    """(B,) bool: the row's group has all rewards equal (so grpo, dr_grpo and rloo give it A = 0)."""
    R = scores.view(-1, group_size)  # (B / G, G)
    return (R == R[:, :1]).all(1).repeat_interleave(group_size)  # (B,)


def reinforce_pp_returns(seq_rewards, kl, mask, kl_coef):
    """REINFORCE++ (Hu 2025): token rewards r_t = -beta k_t, plus the sequence reward at the last real
    token; the return-to-go A_t = sum_{s >= t} r_s (gamma 1), before the batch whitening.

    seq_rewards (B,), kl and mask (B, R). Returns (B, R), 0 on padding."""
    rewards = -kl_coef * kl * mask  # (B, R)
    rewards[torch.arange(len(seq_rewards)), M.last_index(mask)] += seq_rewards
    return rewards.flip(1).cumsum(1).flip(1) * mask  # (B, R)


def aggregate_loss(losses, mask, loss_agg, n_seqs=None, n_tokens=None, norm=None):
    """Aggregate per-token losses (B, R) over mask into this batch's share of the minibatch loss.

    n_seqs, n_tokens: the number of answers and of real tokens in the whole minibatch (over
    micro-batches and processes; default: this batch's own), so the shares of a minibatch's parts
    add up to the loss of the whole minibatch, whatever grad_accum and the process count.
    seq_mean_token_mean      1/N sum_i (1/L_i) sum_t l_it      (GRPO, Shao et al. 2024, Eq. 3)
    token_mean               1/sum_i L_i sum_i sum_t l_it      (DAPO, Yu et al. 2025, Eq. 8)
    seq_mean_token_sum_norm  1/N sum_i (1/norm) sum_t l_it     (Dr. GRPO, Liu et al. 2025; norm = max_new_tokens)
    Rows with an empty mask (dropped answers) count in neither N nor sum L."""
    lengths = mask.sum(1)  # (B,)
    n_seqs = (lengths > 0).sum() if n_seqs is None else n_seqs
    n_tokens = lengths.sum() if n_tokens is None else n_tokens
    per_seq = (losses * mask).sum(1)  # (B,)
    if loss_agg == "seq_mean_token_mean":
        return (per_seq / lengths.clamp(min=1)).sum() / max(n_seqs, 1)
    if loss_agg == "token_mean":
        return per_seq.sum() / max(n_tokens, 1)
    if loss_agg == "seq_mean_token_sum_norm":
        return (per_seq / norm).sum() / max(n_seqs, 1)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, not {loss_agg!r}")


def grpo_losses(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ref_logprobs=None,
                kl_coef=0.0, kl_estimator="k3", entropy=None, ent_coef=0.0, policy_loss="ppo_clip"):
    """Per-token losses (B, R): the policy-gradient term of policy_loss, plus, when ref_logprobs is
    given (kl_in = "loss"), beta times the KL estimator of the current policy, weighted by the detached
    token ratio pi_theta / pi_old (so that its expected gradient is the on-policy one on every
    minibatch), minus ent_coef times the entropy H_t of the current policy at each position
    (Schulman et al. 2017, Eq. 9). All inputs (B, R). The policy-gradient terms, r_t = pi_theta / pi_old:
      ppo_clip  max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high))
                (Schulman et al. 2017, Eq. 7; clip-higher: Yu et al. 2025, Eq. 10)
      gspo      the same with the sequence ratio s_i = exp(1/L_i sum_t log r_t) in place of r_t, so a
                whole answer is clipped or not (Zheng et al. 2025, GSPO, Eq. 5-7), written as GSPO-token
                (Eq. 13-14): token t carries sg[s_i] pi_theta(y_t) / sg[pi_theta(y_t)], whose value is s_i
                and whose gradient is s_i grad log pi_theta(y_t); averaged over the answer's tokens
                (loss_agg seq_mean_token_mean) that is grad s_i, GSPO's own gradient
      cispo     -sg[clip(r_t, 1 - clip_low, 1 + clip_high)] A log pi_theta(y_t): REINFORCE on every token,
                weighted by the clipped, stop-gradient ratio, so no token's gradient is ever clipped away
                (MiniMax 2025, CISPO, Eq. 4-5). Written as -A sg[w_t] pi_theta / sg[pi_theta] (the same
                gradient), so its value is -A w_t, on PPO's scale
    Returns the per-token losses (aggregate them with aggregate_loss) and a dict of per-token stats."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # (B, R) the token ratio
    unit = torch.exp(logprobs - logprobs.detach())  # (B, R) value 1, gradient grad log pi_theta
    if policy_loss == "cispo":
        weight = torch.clamp(ratio, 1 - clip_low, 1 + clip_high).detach()  # (B, R)
        pg = -advantages * weight * unit
        clipped = weight != ratio
    else:
        if policy_loss == "gspo":
            seq_log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
            r = torch.exp(seq_log_ratio).detach() * unit  # (B, R) value s_i
        elif policy_loss == "ppo_clip":
            r = ratio
        else:
            raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, not {policy_loss!r}")
        pg1 = -advantages * r
        pg2 = -advantages * torch.clamp(r, 1 - clip_low, 1 + clip_high)
        pg = torch.max(pg1, pg2)  # (B, R)
        clipped = pg2 > pg1
    kl = M.kl_estimate(logprobs, ref_logprobs, kl_estimator) if ref_logprobs is not None else torch.zeros_like(pg)
    losses = pg + kl_coef * ratio.detach() * kl  # (B, R)
    if ent_coef != 0:
        losses = losses - ent_coef * entropy
    with torch.no_grad():
        stats = {"approx_kl": 0.5 * log_ratio ** 2, "clipfrac": clipped.float(), "ratio": ratio, "pg_loss": pg,
                 "kl_loss": kl}
        if entropy is not None:
            stats["entropy"] = entropy.detach()
    return losses, stats


def overlong_penalty(lengths, max_len, buffer, penalty=1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), added to the task reward: 0 for an
    answer of at most max_len - buffer tokens, then falling linearly to -penalty at max_len (EOS
    counted; the sampler never goes past max_len, where the paper's -1 applies). lengths (B,) -> (B,)."""
    return -penalty * ((lengths.float() - (max_len - buffer)).clamp(min=0) / buffer).clamp(max=1)


def pick_groups(equal_rounds, n):
    """Dynamic sampling's choice (DAPO, Yu et al. 2025, Sec. 3.2): from the groups of several sampling
    rounds, equal_rounds[r] (groups,) bool (all of the group's scores equal), the first n groups
    of unequal scores in sampling order, then, if there are fewer, the first equal groups to fill
    the rollout. Returns [(round, group)] of length n and how many equal groups filled it."""
    pairs = [(r, g) for r, eq in enumerate(equal_rounds) for g in range(len(eq))]
    unequal = [p for p in pairs if not equal_rounds[p[0]][p[1]]]
    fill = [p for p in pairs if equal_rounds[p[0]][p[1]]][:max(n - len(unequal), 0)]
    return (unequal[:n] + fill), len(fill)


def mismatch_correction(trainer_logprobs, sampler_logprobs, mask, correction, cap=2.0, low=0.5, high=2.0):
    """The correction of a rollout sampled by mu and trained as if from pi_old. w_t = pi_old(y_t) / mu(y_t),
    exactly 1 where the two log-probs agree and on padding. Inputs (B, R); returns (weights, keep, w),
    each (B, R): the per-token loss is multiplied by weights and counted only where keep is 1.
      none        weights 1, keep = mask: the mismatch ignored
      tis         weights min(w_t, cap): truncated importance sampling (Yao et al. 2025; Ionides 2008)
      token_mask  keep the tokens with low <= w_t <= high (IcePop, Ling Team 2025: masked, not reweighted)
      seq_mask    keep the answers whose geometric-mean ratio exp(1/L sum_t log w_t) lies in [low, high]
                  (sequence-level masked IS; the length-normalised form, so its bounds read as token ones)"""
    log_w = (trainer_logprobs - sampler_logprobs) * mask  # (B, R)
    w = torch.exp(log_w)
    ones = torch.ones_like(w)
    if correction == "none":
        return ones, mask, w
    if correction == "tis":
        return w.clamp(max=cap), mask, w
    if correction == "token_mask":
        return ones, mask * ((w >= low) & (w <= high)).float(), w
    if correction == "seq_mask":
        g = torch.exp(log_w.sum(1) / mask.sum(1).clamp(min=1))  # (B,)
        return ones, mask * ((g >= low) & (g <= high)).float()[:, None], w
    raise ValueError(f"is_correction must be one of {CORRECTIONS}, not {correction!r}")


def mismatch_stats(w, mask, keep, world, device):
    """The logged sampler-trainer ratio w = pi_old / mu over the rollout's tokens (all processes): its
    mean, the share outside [0.9, 1.1], its max and min, and the share of tokens the correction keeps."""
    on = mask > 0
    sums = M.ddp_sum(torch.stack([(w * mask).sum(), (((w < 0.9) | (w > 1.1)) & on).sum().float(), keep.sum(), mask.sum()]),
                     world, device).tolist()
    ext = torch.stack([w[on].max(), -w[on].min()]) if on.any() else torch.full((2,), -math.inf)
    if world > 1:
        ext = ext.to(device)
        torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX)
    n = max(sums[3], 1.0)
    return {"mis_ratio_mean": sums[0] / n, "mis_out_0.1": sums[1] / n, "mis_ratio_max": ext[0].item(),
            "mis_ratio_min": -ext[1].item(), "mis_kept": sums[2] / n}


def merge_rounds(parts):
    """Rows of several sampling rounds as one rollout: parts [(seq (b_r, P_r + R_r), full_mask, P_r)],
    each left-padded to the widest prompt and right-padded to the longest answer (positions come from
    the mask, item 7, so the padding changes no log-prob). Returns (seq, full_mask, P)."""
    P = max(p for _, _, p in parts)
    T = P + max(s.size(1) - p for s, _, p in parts)
    seq = torch.cat([F.pad(s, (P - p, T - P - (s.size(1) - p)), value=M.PAD_ID) for s, _, p in parts])  # (b, P + R)
    full_mask = torch.cat([F.pad(m, (P - p, T - P - (m.size(1) - p))) for _, m, p in parts])  # (b, P + R)
    return seq, full_mask, P


# --- data


def load_prompts(path, tokenizer, max_len, template="hh", verify=None):
    """Templated prompt ids, cut to their last max_len tokens (counted); with a checker verify, its
    questions only (verify(prompt, "") is None for the others: no checkable answer), with the number left out."""
    rows = [r["prompt"] for r in M.read_jsonl(path, ("prompt",))]
    for n, p in enumerate(rows, 1):
        if not isinstance(p, str) or not p.strip():
            raise M.DataError(f"{path}: row {n}: empty prompt")
    n_other = 0
    if verify is not None:
        kept = [p for p in rows if verify(p, "") is not None]
        n_other, rows = len(rows) - len(kept), kept
        if not rows:
            raise M.ConfigError(f"{path}: reward = 'verifiable' needs the verifier's questions; none found")
    ids = [M.encode_chat(tokenizer, p, template=template) for p in rows]
    cut = sum(len(x) > max_len for x in ids)
    return rows, [x[-max_len:] for x in ids], cut, n_other


# --- checks, before anything loads


def check_config(cfg, world):
    """Every option error before any model loads; returns the derived sizes."""
    for key, value, allowed in (("reward", cfg.reward, ("rm", "verifiable")), ("advantage", cfg.advantage, ADVANTAGES),
                                ("kl_estimator", cfg.kl_estimator, ("k1", "k2", "k3")), ("kl_in", cfg.kl_in, ("reward", "loss")),
                                ("loss_agg", cfg.loss_agg, LOSS_AGGS), ("verifier", cfg.verifier, VERIFIERS),
                                ("policy_loss", cfg.policy_loss, POLICY_LOSSES), ("is_correction", cfg.is_correction, CORRECTIONS),
                                ("sampler_dtype", cfg.sampler_dtype, ("same", "bfloat16", "float32"))):
        if value not in allowed:
            raise M.ConfigError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
    if cfg.kl_in == "loss" and cfg.kl_estimator == "k1" and cfg.kl_coef > 0:
        raise M.ConfigError("kl_in = 'loss' with kl_estimator = 'k1' pulls nothing toward the reference: as a loss term "
                            "k1 = log pi - log pi_ref has gradient grad log pi, whose expected gradient is 0 under pi "
                            "(Schulman 2020). Use kl_estimator k2 (its expected gradient is that of KL(pi || pi_ref)) "
                            "or k3 in the loss, or k1 with kl_in = 'reward'")
    if cfg.drop_equal_groups and cfg.advantage == "reinforce_pp":
        raise M.ConfigError("drop_equal_groups with advantage = 'reinforce_pp': an equal group's advantages are not 0 "
                            "there (no group baseline: the batch whitening gives its answers the sign of R_i against the "
                            "batch mean), so dropping it throws away signal. Use advantage reinforce_pp_baseline (the group "
                            "mean subtracted first), grpo, dr_grpo or rloo, or drop_equal_groups false")
    if cfg.dynamic_sampling and cfg.advantage == "reinforce_pp":
        raise M.ConfigError("dynamic_sampling with advantage = 'reinforce_pp': it re-samples equal groups away, and "
                            "their advantages are not 0 there (no group baseline). Use reinforce_pp_baseline, grpo, "
                            "dr_grpo or rloo")
    if cfg.dynamic_sampling and cfg.max_sample_rounds < 1:
        raise M.ConfigError(f"max_sample_rounds {cfg.max_sample_rounds} must be >= 1")
    if cfg.policy_loss == "gspo" and cfg.loss_agg != "seq_mean_token_mean":
        raise M.ConfigError(f"policy_loss = 'gspo' with loss_agg {cfg.loss_agg!r}: GSPO's objective is a mean over "
                            "answers of the sequence-ratio term (Zheng et al. 2025, Eq. 5), which its token form gives "
                            "only averaged over each answer's tokens: use loss_agg seq_mean_token_mean")
    if not 0 <= cfg.overlong_buffer <= cfg.max_new_tokens or cfg.overlong_penalty < 0:
        raise M.ConfigError(f"overlong_buffer {cfg.overlong_buffer} must be in [0, max_new_tokens {cfg.max_new_tokens}] "
                            f"and overlong_penalty {cfg.overlong_penalty} >= 0")
    if not 0 < cfg.sampler_top_p <= 1 or cfg.staleness < 0:
        raise M.ConfigError(f"sampler_top_p {cfg.sampler_top_p} must be in (0, 1] and staleness {cfg.staleness} >= 0")
    if cfg.is_cap < 1 or not 0 <= cfg.is_low <= 1 <= cfg.is_high:
        raise M.ConfigError(f"is_cap {cfg.is_cap} must be >= 1 and is_low {cfg.is_low} <= 1 <= is_high {cfg.is_high}, "
                            "so that a rollout without mismatch (every ratio 1) is left as it is")
    B, G = cfg.rollout_batch_size, cfg.group_size
    if G < 1 or B % G:
        raise M.ConfigError(f"rollout_batch_size {B} must be a whole number of groups of group_size {G}")
    if cfg.advantage == "rloo" and G < 2:
        raise M.ConfigError("advantage 'rloo' needs group_size >= 2 (its baseline is the other answers' mean)")
    if cfg.kl_coef < 0 or cfg.clip_low < 0 or cfg.clip_high < 0:
        raise M.ConfigError(f"kl_coef {cfg.kl_coef}, clip_low {cfg.clip_low}, clip_high {cfg.clip_high} must be >= 0")
    if cfg.eval_snapshot_interval < 0:
        raise M.ConfigError(f"eval_snapshot_interval {cfg.eval_snapshot_interval} must be >= 0 (0 = no snapshots)")
    M.check_ensemble(cfg)
    M.check_fsdp(cfg, staleness=cfg.staleness and "the stale sampler is a copy of the policy, not built from shards: "
                 "--staleness 0", dynamic_sampling=cfg.dynamic_sampling and "the rounds sampled differ from process to process, and sharded "
                 "models cannot run them in step: --dynamic_sampling false")
    minibatch, micro, shards = M.check_rollout_sizes(cfg, world, G)
    return B, G, minibatch, micro, shards


def check_inputs(cfg):
    """Every input before anything loads: the paths exist and hold what each key takes (a policy, a
    reward model unless the reward is verifiable), the chat template resolves, prompt and answer fit
    the block size. Returns whether the built-in world's gold reward is logged."""
    rm_paths = M.reward_model_paths(cfg.reward_model) if cfg.reward == "rm" else []  # the verifiable reward needs none
    M.require(cfg, "policy", "prompts", *["reward_model"] * (cfg.reward == "rm"), *["ptx_data"] * (cfg.ptx_coef > 0))
    M.check_paths(policy=cfg.policy, prompts=cfg.prompts, ptx_data=cfg.ptx_data if cfg.ptx_coef > 0 else "")
    for path in rm_paths or [""]:  # every member of an ensemble
        M.check_paths(reward_model=path)
        M.check_roles(policy=(cfg.policy, "policy"), reward_model=(path, "reward_model"))
    cfg.template = M.resolve_template(cfg.template, cfg.policy, *rm_paths)
    M.check_rl_lengths(cfg)
    from data.world import gold_on  # the built-in task's marker: its gold reward only on its own prompts
    return gold_on(cfg.gold, cfg.prompts)


def load_verifier(cfg, gold):
    """The checker's verify_answer(prompt, answer) -> 1.0, 0.0 or None (not its question): the reward when
    reward = "verifiable", the world's fact checker as a metric when the gold reward is on, else None."""
    if cfg.reward == "verifiable" or gold:
        return importlib.import_module(VERIFIERS[cfg.verifier if cfg.reward == "verifiable" else "facts"]).verify_answer
    return None


# --- training


@torch.no_grad()
def rollout_forward(policy, ref, seq, full_mask, P, cfg, micro, ctx, sampler=None, sampler_ctx=None):
    """Old, reference and sampler log-probs of a rollout, in chunks of `micro` rows (item 17: memory).
    policy is the module the update calls (compiled or not), so the step-0 ratio is exactly 1;
    ref None with kl_coef > 0: the reference is the policy with its LoRA adapters off;
    sampler (the mismatch lab; None: mu is pi_old): log mu(y_t) from the sampler's own full forward,
    with its weights, under sampler_ctx (its precision), of its nucleus (sampler_top_p) at temperature T."""
    outs = {"logprobs": [], "ref_logprobs": [], "sampler_logprobs": []}
    for i in range(0, seq.size(0), micro):
        s, m = seq[i:i + micro], full_mask[i:i + micro]
        with ctx:
            outs["logprobs"].append(M.response_logprobs(policy, s, m, P, cfg.temperature))
            if cfg.kl_coef > 0:
                with M.adapters_off(policy) if ref is None else nullcontext():
                    outs["ref_logprobs"].append(M.response_logprobs(policy if ref is None else ref, s, m, P, cfg.temperature))
        if sampler is not None and cfg.sampler_top_p < 1:  # the nucleus needs the whole (b, R, V) distribution
            with sampler_ctx:
                logits = M.response_logits(sampler, s, m, P)  # (b, R, V)
            logits = M.top_p_filter(logits.float() / cfg.temperature, cfg.sampler_top_p)
            outs["sampler_logprobs"].append(M.logprobs_from_logits(logits, s[:, P:]))
        elif sampler is not None:  # the trainer's own path: no dose, the same numbers
            with sampler_ctx:
                outs["sampler_logprobs"].append(M.response_logprobs(sampler, s, m, P, cfg.temperature))
    return {k: torch.cat(v) if v else None for k, v in outs.items()}


@torch.no_grad()
def rm_scores(rm, rm_ids, micro, ctx):
    """Reward-model scores (b,) of its rows rm_ids (b, T') (model.rm_rows: the re-encoded answers), in
    chunks of `micro` rows."""
    outs = []
    for i in range(0, rm_ids.size(0), micro):
        r = rm_ids[i:i + micro]
        with ctx:
            outs.append(rm.score(r, r != M.PAD_ID).float())
    return torch.cat(outs)


def sampler_context(cfg, device, ctx):
    """The sampler's precision in the mismatch lab: the trainer's (ctx), bf16 autocast (on CPU too), or fp32."""
    if cfg.sampler_dtype == "same":
        return ctx
    if cfg.sampler_dtype == "float32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def pick_rollout(shard_rounds, n, G):
    """Dynamic sampling: this process's rollout from the sampling rounds of each of its shards
    (shard_rounds[k][r]: dicts of per-row tensors and lists, rows in groups of G), n groups per shard
    by pick_groups, in shard order; seq and full_mask merged by merge_rounds. Returns the rollout and
    how many equal groups filled it."""
    rows, filled = [], 0
    for rounds in shard_rounds:
        chosen, f = pick_groups([r["equal"].view(-1, G)[:, 0] for r in rounds], n)
        rows += [(rounds[r], range(g * G, (g + 1) * G)) for r, g in chosen]
        filled += f
    out = {k: [x for rd, rs in rows for x in (rd[k][i] for i in rs)] for k in ("my_idx", "texts")}
    out.update({k: torch.cat([rd[k][rs.start:rs.stop] for rd, rs in rows])
                for k in ("raw_scores", "member_scores", "scores", "ended", "equal")})
    out["seq"], out["full_mask"], out["P"] = merge_rounds([(rd["seq"][rs.start:rs.stop], rd["full_mask"][rs.start:rs.stop], rd["P"])
                                                           for rd, rs in rows])
    return out, filled


def load_models(cfg, device, ctx):
    """The policy, its frozen reference (kl_coef > 0) and the frozen reward models (reward = "rm": one,
    or each member of an ensemble), all with dropout off (item 2). The reference is the policy's start
    (item 19): a copy of it (an SFT checkpoint's LoRA adapters merged in both, so step-0 KL is exactly
    0), or with LoRA None: the policy itself with its adapters off. Under bf16 autocast every reward
    model is stored in bf16, its gain and bias fp32 (item 17); the reference stays in the policy's
    precision path. Returns (policy, tokenizer, ref, rms), rms the list of reward models ([] if none)."""
    policy, tokenizer = M.load_gpt(cfg.policy, device)
    policy = M.adapt(policy, cfg)
    ref = copy.deepcopy(policy) if cfg.kl_coef > 0 and not cfg.lora_rank else None
    rms = []
    for path in M.reward_model_paths(cfg.reward_model) if cfg.reward == "rm" else []:
        rm, rm_tok, _ = M.load_checkpoint(path, device, kind="scalar")
        if rm_tok.ranks != tokenizer.ranks:  # every member reads the policy's answers re-encoded by the policy's tokenizer
            raise M.ConfigError(f"{path} and {cfg.policy} use different tokenizers")
        rms.append(rm)
    for frozen in (m for m in (ref, *rms) if m is not None):
        frozen.eval().requires_grad_(False)
    if isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16:
        for rm in rms:
            rm.backbone.to(torch.bfloat16)
            rm.head.to(torch.bfloat16)
    policy.eval()  # eval() = no dropout; gradients still flow
    return policy, tokenizer, ref, rms


def train(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    B, G, minibatch, micro, shards = check_config(cfg, M.process_count())  # option errors before path errors
    gold = check_inputs(cfg)
    rank, world, device = M.ddp_setup(cfg.device)
    master = rank == 0  # only rank 0 writes files and logs
    lo, share, shard_size, my_shards = M.process_rows(B, shards, world, rank)  # rows lo .. lo + share - 1: whole groups
    iterations = cfg.total_episodes // B
    run = M.start_run(cfg, SAFE_KEYS, master)
    if run.finished:
        return M.load_checkpoint(run.ckpt, device)[0]
    torch.manual_seed(cfg.seed)
    ctx = M.autocast(device, cfg.dtype)
    policy, tokenizer, ref, rms = load_models(cfg, device, ctx)
    use_ref = cfg.kl_coef > 0  # a KL term: the reference's log-probs are computed
    verify_answer = load_verifier(cfg, gold)
    prompts, prompt_ids, n_cut, n_other = load_prompts(cfg.prompts, tokenizer, cfg.max_prompt_len, cfg.template,
                                                       verify_answer if cfg.reward == "verifiable" else None)
    ptx = M.load_ptx(cfg.ptx_data, tokenizer, cfg.ptx_len) if cfg.ptx_coef > 0 else None
    if gold:
        from data.world import gold_reward  # the task's oracle: a metric only

    it = 0
    ckpt, state = run.ckpt, run.state
    if state is not None:  # every process resumes from the same checkpoint
        policy.load_state_dict(M.load_checkpoint(ckpt)[0].state_dict())
    if cfg.fsdp:  # every model sharded, the frozen ones too (item 23)
        for m in (policy, ref, *rms):
            if m is not None:
                M.fsdp_wrap(m, world, device, sum_grads=True)
    opt = M.configure_optimizer(policy, cfg.lr, 0.0, (0.9, 0.999), eps=1e-5, device=device)  # FSDP: over the shards
    base_lrs = [group["lr"] for group in opt.param_groups]
    if state is not None:
        it = M.resume_state(opt, state, ckpt, policy)
    # the mismatch lab: the sampler's precision, nucleus and weights (a copy of the policy k iterations back)
    lab = cfg.sampler_dtype != "same" or cfg.sampler_top_p < 1 or cfg.staleness > 0 or cfg.is_correction != "none"
    sampler_ctx, top_p = sampler_context(cfg, device, ctx), cfg.sampler_top_p if cfg.sampler_top_p < 1 else None
    stale = copy.deepcopy(policy).requires_grad_(False) if cfg.staleness else None
    versions = collections.deque(state.get("versions", []) if state else [], maxlen=cfg.staleness + 1)  # the last k + 1 starts
    if master:
        M.print_config(cfg)
        ref_note = "loaded" if ref is not None else "the policy, adapters off" if use_ref else "not loaded (kl_coef 0)"
        print(f"batch hierarchy: rollout {B} answers = {B // G} prompts x {G} ({shards} shards of {shard_size}, "
              f"{world} processes) -> {cfg.num_minibatches} minibatches of {minibatch} -> {cfg.grad_accum} micro-batches "
              f"of {micro}; {cfg.update_epochs} epochs = {cfg.update_epochs * cfg.num_minibatches} optimizer steps per "
              f"rollout; {iterations} rollouts | {len(prompts)} prompts ({n_cut} cut to {cfg.max_prompt_len} tokens"
              + (f"; {n_other} that are not the {cfg.verifier} checker's questions left out)" if cfg.reward == "verifiable" else ")")
              + f" | reference model {ref_note}")
    fwd_policy = torch.compile(policy) if cfg.compile else policy  # old AND new log-probs go through it
    fwd_ref = torch.compile(ref) if cfg.compile and ref is not None else ref  # the same path as the policy's: step-0 KL is 0
    gen, ptx_gen = torch.Generator(device=device), torch.Generator(device=device)
    stat_keys = ["approx_kl", "clipfrac", "ratio", "pg_loss", "kl_loss", "entropy", "loss"] + ["ptx_loss"] * (ptx is not None)

    def sample_round(idx, stream, shards_here):
        """Steps 1-2 for the prompts idx: the rows of the rollout's shards shards_here, sampled from the
        generator stream `stream` and scored (the score used, shaped, and whether each row's group is equal)."""
        seq, full_mask, P = M.sample_rollout(policy if stale is None else stale, prompt_ids, idx, shards_here, shard_size, G,
                                             cfg, it, tokenizer.eot_id, gen, sampler_ctx, device, top_p, stream)  # (b, P + R)
        responses = seq[:, P:]  # (b, R)
        my_idx = [idx[r // G] for k in shards_here for r in range(k * shard_size, (k + 1) * shard_size)]  # each row's prompt
        texts = [tokenizer.decode(r) for r in responses.tolist()]
        if rms:  # each reward model scores the re-encoded text (item 20), cut to its own block size
            rm_ids = {n: M.rm_rows(tokenizer, [prompt_ids[i] for i in my_idx], responses, n).to(device)
                      for n in {rm.config.block_size for rm in rms}}  # (b, T') per block size
            member_scores = torch.stack([rm_scores(rm, rm_ids[rm.config.block_size], micro, ctx) for rm in rms])  # (k, b)
            raw_scores = M.combine_ensemble(member_scores, cfg.ensemble, cfg.ensemble_lambda)  # (b,) k = 1: the member's
        else:
            raw_scores = torch.tensor([verify_answer(prompts[i], t) for i, t in zip(my_idx, texts)], device=device)
            member_scores = raw_scores.new_zeros(0, len(raw_scores))  # (0, b): no reward model
        scores, ended = M.penalise_missing_eos(raw_scores, responses, tokenizer.eot_id, cfg.missing_eos_penalty)
        if not cfg.eos_trick:
            scores = raw_scores
        if cfg.overlong_buffer:
            lengths = full_mask[:, P:].sum(1)  # (b,) EOS counted
            scores = scores + overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        return {"seq": seq, "full_mask": full_mask, "P": P, "my_idx": my_idx, "texts": texts, "raw_scores": raw_scores,
                "member_scores": member_scores.T, "scores": scores, "ended": ended,  # member_scores (b, k)
                "equal": equal_groups(scores, G)}  # equal: before any KL enters

    def dynamic_rounds(idx, k):
        """DAPO's dynamic sampling for shard k: its rows of the rollout, then round r's fresh prompts (one
        draw of B / G from (seed, iteration, "dynamic", r), the shard's slice of it), until the shard holds
        shard_size rows in unequal groups or max_sample_rounds rounds are sampled. Per shard, not per
        process, so that any process count picks the same rows (item 14)."""
        rounds = [sample_round(idx, "sample", [k])]
        while len(rounds) < cfg.max_sample_rounds and sum(int((~r["equal"]).sum()) for r in rounds) < shard_size:
            draw = torch.Generator().manual_seed(M.rng_seed(cfg.seed, it, "dynamic", len(rounds)))
            rounds.append(sample_round(torch.randint(len(prompts), (B // G,), generator=draw).tolist(),
                                       f"sample/round{len(rounds)}", [k]))
        return rounds

    t0, start = time.time(), it
    bar = tqdm(total=iterations, initial=it, desc=cfg.advantage, dynamic_ncols=True, disable=not master)
    while it < iterations:
        frac = M.lr_at(it, iterations, 1.0, min_lr_frac=0.0, schedule="linear") if cfg.anneal_lr else 1.0  # linear to 0
        for group, base_lr in zip(opt.param_groups, base_lrs):
            group["lr"] = base_lr * frac

        t_start = M.clock(device)  # phase times: time_gen (1-2), time_fwd (3), time_update (6), time_iter
        # 1. rollout: G answers to each of B / G prompts (one shared prefill per prompt), this process's shards only,
        #    by the sampler: the policy, or in the mismatch lab its weights of `staleness` iterations back
        if stale is not None:
            versions.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
            stale.load_state_dict(versions[0])  # the policy at the start of iteration max(it - staleness, 0)
        idx = M.prompt_batch(it, len(prompts), B // G, cfg.seed)  # the same B / G prompts on every process
        # 2. (in sample_round) score: the reward model or the checker, the EOS penalty (item 9), DAPO's overlong
        #    penalty. Dynamic sampling: fresh prompts, round after round, until each shard's groups are unequal
        if cfg.dynamic_sampling:
            rounds = [dynamic_rounds(idx, k) for k in my_shards]  # [shard][round]
            roll, filled = pick_rollout(rounds, shard_size // G, G)
            n_rounds = sum(map(len, rounds))
        else:
            roll, filled = sample_round(idx, "sample", my_shards), 0
        seq, full_mask, P, my_idx, texts = (roll[k] for k in ("seq", "full_mask", "P", "my_idx", "texts"))
        raw_scores, scores, ended, equal = (roll[k] for k in ("raw_scores", "scores", "ended", "equal"))  # (b,) each
        member_scores = roll["member_scores"].T  # (k, b) each reward model's score (k = 0: verifiable)
        my_prompts = [prompts[i] for i in my_idx]
        responses = seq[:, P:]  # (b, R)
        mask = full_mask[:, P:].float()  # (b, R) 1 on response tokens up to and including EOS

        # 3. forward: old and reference log-probs; in the mismatch lab the sampler's own, log mu
        t_gen = M.clock(device)
        out = rollout_forward(fwd_policy, fwd_ref, seq, full_mask, P, cfg, micro, ctx,
                              (fwd_policy if stale is None else stale) if lab else None, sampler_ctx)
        t_fwd = M.clock(device)
        old_logprobs, ref_logprobs = out["logprobs"], out["ref_logprobs"]
        if lab:  # w = pi_old / mu and the correction's token weights and kept tokens
            is_weights, is_keep, w = mismatch_correction(old_logprobs, out["sampler_logprobs"], mask, cfg.is_correction,
                                                         cfg.is_cap, cfg.is_low, cfg.is_high)

        # 4. KL of the sampled tokens to the reference (0 without one); in the reward or later in the loss
        beta = cfg.kl_coef
        kl = M.kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask if use_ref else torch.zeros_like(mask)
        kl1 = (old_logprobs - ref_logprobs) * mask if use_ref else torch.zeros_like(mask)  # k1: the logged KL
        kl_reward = cfg.kl_in == "reward" and use_ref

        # 5. advantages: the group baseline (grpo, dr_grpo, rloo), or REINFORCE++'s whitened returns-to-go
        if cfg.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
            seq_adv = group_advantages(scores, G, cfg.advantage, cfg.adv_eps)  # (b,) R_i or R_i - mean_g R
            returns = reinforce_pp_returns(seq_adv, kl if kl_reward else torch.zeros_like(kl), mask, beta)  # (b, R)
            advantages = M.masked_whiten(returns, mask, world=world)
        else:
            kl_penalty = beta * kl.sum(1) if kl_reward else None  # (b,) RLOO's sequence-level penalty beta K_i
            advantages = group_advantages(scores, G, cfg.advantage, cfg.adv_eps, kl_penalty)[:, None] * mask  # (b, R)
        loss_mask = mask * (~equal).float()[:, None] if cfg.drop_equal_groups else mask  # (b, R)
        if lab:
            loss_mask = loss_mask * is_keep  # the correction's masked tokens count in no denominator
        seq_sums = torch.stack([raw_scores.float(), scores.float(), kl1.sum(1), kl.sum(1), mask.sum(1), ended.float(),
                                equal.float(), (advantages * mask).sum(1) / mask.sum(1).clamp(min=1)]).sum(1)  # (8,)
        score, score_used, seq_kl, seq_kl_est, resp_len, eos_frac, equal_frac, adv_mean = (M.ddp_sum(seq_sums, world, device) / B).tolist()

        # 6. update: update_epochs over shuffled minibatches, grad_accum micro-batches each. The order is
        #    the same on every process; each runs the rows it owns and the gradients are summed
        order = torch.Generator().manual_seed(M.rng_seed(cfg.seed, it, "order"))
        ptx_gen.manual_seed(M.rng_seed(cfg.seed, it, "ptx", rank))
        stats, t_update = [], M.clock(device)
        for epoch in range(cfg.update_epochs):
            perm = torch.randperm(B, generator=order).tolist()  # global row indices
            for mb in range(cfg.num_minibatches):
                mb_idx = perm[mb * minibatch:(mb + 1) * minibatch]
                mine = [g - lo for g in mb_idx if lo <= g < lo + share]
                # the whole minibatch's answers and tokens: the denominators of aggregate_loss
                lens = loss_mask[mine].sum(1)
                mb_seqs, mb_tokens = M.ddp_sum(torch.stack([(lens > 0).sum().float(), lens.sum()]), world, device).tolist()
                if mb_tokens == 0:  # every answer of it dropped (drop_equal_groups): no step, on every process
                    continue
                mb_stats = torch.zeros(len(stat_keys), device=device)
                for a in range(cfg.grad_accum):
                    i = [g - lo for g in mb_idx[a * micro:(a + 1) * micro] if lo <= g < lo + share]
                    if not i and not cfg.fsdp:  # none of this micro-batch's rows is ours
                        continue
                    mine_w = 1.0 if i else 0.0  # FSDP: an empty share still runs (its first row, weight 0): all-gathers are collective
                    i = torch.tensor(i or [0], device=device)
                    mb_seq, mb_full, mb_mask = seq[i], full_mask[i], loss_mask[i]
                    with ctx:  # fused LM head: no (b, R, V) logits (model.linear_logprobs)
                        new_logprobs, entropy = M.response_logprobs(fwd_policy, mb_seq, mb_full, P, cfg.temperature,
                                                                    entropy=True)  # (b, R) fp32 each
                    if cfg.ent_coef == 0:
                        entropy = entropy.detach()  # logged only: no gradient work for it
                    kl_loss_ref = ref_logprobs[i] if use_ref and cfg.kl_in == "loss" else None
                    losses, s = grpo_losses(new_logprobs, old_logprobs[i], advantages[i], mb_mask, cfg.clip_low, cfg.clip_high,
                                            kl_loss_ref, beta, cfg.kl_estimator, entropy, cfg.ent_coef, cfg.policy_loss)
                    if lab:
                        losses = losses * is_weights[i]  # tis: the truncated weight pi_old / mu on every token's loss
                    loss = aggregate_loss(losses, mb_mask, cfg.loss_agg, mb_seqs, mb_tokens, cfg.max_new_tokens)
                    s["loss"] = losses.detach()
                    row = [(s[k] * mb_mask).sum().float() / mb_tokens for k in stat_keys if k != "ptx_loss"]
                    if ptx is not None:  # PPO-ptx on random windows (per process), weighted by these rows' share of the minibatch
                        x = M.ptx_windows(ptx, cfg.ptx_len, cfg.ptx_batch_size, ptx_gen).to(device)  # (b, L + 1)
                        with ctx:
                            ptx_nll = M.ptx_loss(fwd_policy, x)
                        loss = loss + cfg.ptx_coef * ptx_nll * len(i) / minibatch
                        row.append(ptx_nll.detach() * len(i) / minibatch)
                    (loss * mine_w).backward()
                    mb_stats += torch.stack(row) * mine_w
                mb_stats = dict(zip(stat_keys, M.ddp_sum(mb_stats, world, device).tolist()))  # token-weighted means
                where = f"iteration {it} epoch {epoch} minibatch {mb} (last good checkpoint: {ckpt})"
                mb_stats["grad_norm"] = M.optimizer_step(opt, (policy,), mb_stats, cfg.max_grad_norm, world, where)
                stats.append(mb_stats)
        t_update = M.clock(device) - t_update
        it += 1
        bar.update(1)

        # then metrics (every process joins the sums), samples, checkpoint (rank 0)
        if it % cfg.log_interval == 0 or it == iterations:
            metrics = {"step": it, "episodes": it * B, "score": score, "score_used": score_used, "kl": seq_kl,
                       "kl_est": seq_kl_est, "kl_coef": beta, "resp_len": resp_len, "eos_frac": eos_frac,
                       "equal_groups": equal_frac * B / G, "adv_mean": adv_mean, "lr": cfg.lr * frac}
            if stats:
                metrics.update({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})
                metrics["approx_kl_first_mb"] = stats[0]["approx_kl"]  # first minibatch of the first epoch: 0 (item 3)
            if cfg.dynamic_sampling:  # rounds sampled (mean over shards), equal groups that filled the rollout
                metrics.update(zip(("dyn_rounds", "dyn_filled"), M.ddp_sum(torch.tensor([n_rounds / shards, filled]),
                                                                           world, device).tolist()))
            if lab:
                metrics.update(mismatch_stats(w, mask, is_keep, world, device))
            if len(rms) > 1:  # each member's mean score and their spread (std across members, mean over answers)
                metrics.update(M.ensemble_metrics(member_scores, world, device, B))
            if gold:
                metrics.update(M.gold_metrics(gold_reward, my_prompts, texts, ended, world, device, B, verify_answer))
            metrics["s_per_it"] = round((time.time() - t0) / (it - start), 2)
            metrics.update(time_gen=t_gen - t_start, time_fwd=t_fwd - t_gen, time_update=t_update,
                           time_iter=M.clock(device) - t_start)  # this iteration's; the rest: steps 3-5, gold
            if cfg.fsdp:  # what this process holds of every model and of AdamW: about 1/world of it all
                held = M.held_bytes([m for m in (policy, ref, *rms) if m is not None], opt)
                metrics.update(param_mb=held[0] / 2**20, optim_mb=held[1] / 2**20)
            if master:
                M.log_metrics(cfg.out_dir, metrics)
        if master and (it % cfg.sample_interval == 0 or it == iterations):  # reward hacking shows in the text first
            for r in range(0, min(cfg.n_show * G, len(texts)), G):  # the first answer of the first groups
                tqdm.write(f"  > {my_prompts[r]}\n    {texts[r]!r} score {scores[r].item():+.2f}")
        if (master or cfg.fsdp) and cfg.eval_snapshot_interval and (it % cfg.eval_snapshot_interval == 0 or it == iterations):
            # before the checkpoint: a kill between the two redoes this iteration, snapshot included (FSDP: all gather)
            M.save_snapshot(cfg.out_dir, it, policy, tokenizer, dataclasses.asdict(cfg))
        if (master or cfg.fsdp) and (it % cfg.ckpt_interval == 0 or it == iterations):  # FSDP: all gather, rank 0 writes
            M.save_checkpoint(ckpt, policy, tokenizer, dataclasses.asdict(cfg),
                              state={"iteration": it, "optimizer": M.optimizer_state(opt, policy), "rng": M.rng_state(),
                                     "finished": it == iterations, **({"versions": list(versions)} if stale is not None else {})})
    bar.close()
    M.ddp_cleanup(world)
    return policy


if __name__ == "__main__":
    M.main(train, Config)
