"""
ppo.py: PPO against a learned reward with a KL penalty to the SFT policy (step 3 of InstructGPT).

Objective (InstructGPT Eq. 2; Ziegler et al. 2019; Stiennon et al. 2020):
  maximise E_{x~D, y~pi}[ r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) ] + ptx_coef * E_{x~pretrain}[log pi(x)]
as a token-level RL problem: the state is prompt + response so far, the action the next token.
  1. rollout     sample y ~ pi(.|x) with the KV cache from left-padded prompts (temperature T,
                 no top-k/top-p), at most max_new_tokens, each row stopping at EOS
  2. forward     old log-probs log pi_old(y_t), reference log-probs log pi_ref(y_t) (both of
                 logits / T), values V(s_t), and the reward-model score s at the EOS; with LoRA
                 (lora_rank > 0) pi_ref is the policy with its adapters switched off
  3. score       s = r(x, y), normalised by the RM's gain/bias; with several reward models (reward_model
                 "a,b,c": an ensemble) each member's own normalised score, combined per answer by ensemble
                 (model.combine_ensemble; Coste et al. 2023): mean, min, or uwo = mean - ensemble_lambda * Var
                 (population variance over members), logged score_rm<j> and ensemble_std; an answer without EOS gets the
                 fixed score missing_eos_penalty instead (Stiennon et al. 2020, N+ "EOS trick");
                 eos_trick false scores cut answers as they are (fixed-length continuations: IMDb)
  4. rewards     kl_t = log pi_old(y_t) - log pi_ref(y_t)          (k1 estimator, per token)
                 r_t = -beta * kl_t, plus s at the last response token (the EOS)
  5. advantages  GAE (Schulman et al. 2016, Eq. 16) over response tokens, V = 0 after the last:
                 delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1}
                 returns G_t = A_t + V_t (before whitening); then A whitened over real tokens
  6. update      update_epochs passes over the rollout in shuffled minibatches (each split into
                 grad_accum micro-batches), clipped surrogate (Schulman et al. 2017, Eq. 7):
                 ratio = exp(logp - logp_old), L_pg = mean(max(-A ratio, -A clip(ratio, 1-eps, 1+eps)))
                 clipped value loss (as in OpenAI baselines / lm-human-preferences):
                 V_clip = V_old + clip(V - V_old, -eps_v, eps_v), L_v = 0.5 mean(max((V-G)^2, (V_clip-G)^2))
                 loss = L_pg + vf_coef L_v - ent_coef H + ptx_coef L_ptx (InstructGPT's PPO-ptx),
                 one AdamW step over the policy AND the value model (N+: one optimizer over policy
                 and critic), the gradient norm clipped over both jointly (as cleanrl's PPO clips
                 its one agent's)
  7. KL control  beta fixed, or adaptive (Ziegler et al. 2019, Sec. 2.2), from this rollout's KL:
                 e = clip(KL / target_kl - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon)
Means are over real response tokens of the minibatch (docs/implementation_details.md, item 13:
masked statistics). Log-prob, KL and loss arithmetic is fp32 even under bf16 autocast (item 16).
Dropout is off in all four models (item 2). Adam eps 1e-5 (item 15). The entropy H is computed
without gradients (for the log only) when ent_coef is 0, so no (B, R, V) fp32 graph is kept for it.

What vf_coef does. Policy and value model are separate networks, so vf_coef scales only the value
model's gradients, and Adam's update m / (sqrt(v) + eps) is invariant to a constant scale of a
parameter's gradients: vf_coef acts only through eps and through the joint gradient clip (a
larger vf_coef makes the value gradients a larger share of the clipped norm, so the policy's step
shrinks when the clip is active). That is what it means in N+ (one optimizer over policy and
critic, loss = pg + vf_coef * vf), kept here so its settings carry over; the direct knob of the
value model's step size is value_lr (its own parameter groups of the same AdamW).

Models: the policy (from SFT), the frozen reference (the policy's start, in the policy's precision:
item 19), the frozen reward model (or each member of an ensemble, all in bf16 under bf16 autocast),
which scores the re-encoded text of each answer (item 20), and a separate value model. value_init =
"reward": the value model is initialised from the reward model (an ensemble's first member;
InstructGPT, Stiennon et al. 2020, N+), with the reward normalisation folded into its head
(w <- gain w, b <- gain b + bias) so its values start in the units of the normalised scores, and of
the returns; "policy": from the SFT trunk with a zero-initialised head (lm-human-preferences
initialises its value head to zero).

Departures: old log-probs are recomputed by a full forward after sampling (item 19, so that the
step-0 ratio is exactly 1); the gold reward of the built-in task is logged as a metric
(data/world.py), never used for training.

Several GPUs: torchrun --nproc_per_node N ppo.py --config ... (data parallel, no DDP wrapper): each
process samples, scores and runs GAE for its own share of the rollout, and takes the step one
process would take (item 21: several processes take the step one process takes; tests/test_ddp.py).
With --fsdp true the policy, value, reference and reward models are sharded (FSDP2, model.fsdp_wrap;
item 23): the rollout gathers the policy whole, and every process runs every micro-batch (an empty
share at weight 0), since the shards' all-gathers are collective.

Run:
  CPU, built-in task:  python ppo.py --config configs/ppo_world.toml
  no KL penalty (reward hacking):  python ppo.py --config configs/ppo_world.toml --kl_coef 0 --out_dir out/ppo_nokl
  RM ensemble (worst case):  python ppo.py --config configs/ppo_world.toml --reward_model out/reward_seed1,out/reward_seed2,out/reward_seed3 \
      --ensemble min --out_dir out/ppo_min
  one GPU, GPT-2 on HH-RLHF:  python ppo.py --config configs/ppo_hh_gpt2.toml
"""

import copy
import dataclasses
import math
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
    policy: str = ""  # (required) SFT checkpoint: the policy's start and the frozen reference
    reward_model: str = ""  # (required) reward-model checkpoint (reward.py); several, comma-separated: an ensemble
    ensemble: str = "mean"  # how an ensemble's members combine per answer: mean | min | uwo (mean - ensemble_lambda * variance)
    ensemble_lambda: float = 0.5  # uwo's lambda (Coste et al. 2023), on normalised scores; a starting value, not tuned here
    value_init: str = "reward"  # "reward" (InstructGPT, N+; an ensemble's first member) or "policy" (SFT trunk, zero head)
    prompts: str = ""  # (required) JSONL of {"prompt": ...} rows
    out_dir: str = "out/ppo"  # checkpoint (ckpt/), config.json, metrics.jsonl
    template: str = "auto"  # chat template (model.CHAT_TEMPLATES); auto = the policy checkpoint's, else hh
    overwrite: bool = False  # delete an existing run in out_dir and start afresh
    resume_changed: bool = False  # resume a run in out_dir although result-affecting settings changed (recorded in metrics.jsonl)
    wandb_project: str = ""  # mirror metrics.jsonl to this Weights & Biases project (optional: pip install wandb)
    wandb_mode: str = "offline"  # offline (no network; wandb sync later) | online
    # rollout
    total_episodes: int = 16384  # sampled answers over the whole run
    rollout_batch_size: int = 64  # answers per PPO iteration (global: over all processes)
    rollout_shards: int = 0  # 0 = one per process; sampling of shard k depends on (seed, iteration, k) only
    max_prompt_len: int = 64  # prompts are cut to their last max_prompt_len tokens (counted)
    max_new_tokens: int = 48  # response length cap
    temperature: float = 1.0  # sampling temperature, also divides every log-prob's logits (item 1)
    eos_trick: bool = True  # answers that never emit EOS score missing_eos_penalty (item 9); false: the RM scores them
    missing_eos_penalty: float = -1.0  # score of an answer that never emits EOS (item 9)
    # reward and KL
    kl_coef: float = 0.05  # beta; the start value when adaptive_kl
    adaptive_kl: bool = False  # adapt beta to target_kl (Ziegler et al. 2019) instead of keeping it fixed
    target_kl: float = 6.0  # nats per sequence (Ziegler et al. 2019 sentiment)
    kl_horizon: int = 10000  # episodes
    whiten_rewards: bool = False  # whiten r_t over the rollout before GAE
    # PPO
    update_epochs: int = 4  # PPO passes over each rollout
    num_minibatches: int = 4  # minibatches per pass (optimizer steps per epoch)
    grad_accum: int = 1  # micro-batches per minibatch
    lr: float = 3e-5  # policy
    value_lr: float = 3e-5  # value model (its parameter group of the one AdamW): the value step size knob
    anneal_lr: bool = True  # linear decay to 0 over the run (N+)
    clip_coef: float = 0.2  # eps of the clipped surrogate
    vf_clip: float = 0.2  # eps_v of the clipped value loss
    vf_coef: float = 0.1  # weight of L_v in the joint loss; acts only through Adam's eps and the joint clip (docstring)
    ent_coef: float = 0.0  # entropy bonus (< 0: an entropy penalty); 0: the entropy is logged without a gradient graph
    gamma: float = 1.0  # discount
    gae_lambda: float = 0.95  # GAE lambda
    norm_adv: bool = True  # whiten advantages over the rollout's real tokens
    max_grad_norm: float = 1.0  # max gradient norm, over policy and value model jointly
    # PPO-ptx (InstructGPT Eq. 2); 0 = off
    ptx_coef: float = 0.0  # weight of the pretraining log-likelihood
    ptx_data: str = ""  # plain text, documents separated by a blank line (required when ptx_coef > 0)
    ptx_batch_size: int = 8  # pretraining windows per micro-batch
    ptx_len: int = 64  # tokens per pretraining window
    # bookkeeping
    gold: str = "auto"  # log the built-in world's gold reward (never trained on): auto = when the prompts are the world's; true; false
    log_interval: int = 1  # iterations
    sample_interval: int = 10  # print a few answers every this many iterations (item 18)
    n_show: int = 3  # answers printed every sample_interval
    ckpt_interval: int = 20  # steps between checkpoints (always one at the end)
    eval_snapshot_interval: int = 0  # write the policy alone (weights, tokenizer, config) to out_dir/snapshots/it<N> every this many iterations and at the end, for eval.py --curve; 0 = off
    seed: int = 0  # seeds init, batch order and sampling
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "bfloat16"  # autocast on CUDA; the reward model also stored in it there (item 17), the reference not
    compile: bool = False  # torch.compile the forward
    lora_rank: int = 0  # LoRA adapters of this rank, all else frozen (model.add_lora); 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA output scale alpha / rank
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # which Linears of each block get adapters
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    fsdp: bool = False  # under torchrun: shard the policy, value, reference, reward models and AdamW state (FSDP2); gradients summed as without it


# settings that cannot change the trained weights or the logged numbers: may differ on resume
SAFE_KEYS = {"log_interval", "sample_interval", "n_show", "ckpt_interval", "eval_snapshot_interval", "device"}


# --- the algorithm, as pure functions


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards r_t = -beta * kl_t, plus the score at the last response token.

    scores (B,), logprobs / ref_logprobs / mask (B, R). Returns rewards (B, R), kl (B, R)."""
    kl = (logprobs - ref_logprobs) * mask  # (B, R) k1 estimator on the sampled tokens
    rewards = -kl_coef * kl
    last = M.last_index(mask)  # (B,) the EOS, or the last token of a cut answer
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def compute_gae(rewards, values, mask, gamma, lam):
    """GAE (Schulman et al. 2016, Eq. 16) over response tokens; V = 0 after the last real token.

    rewards, values, mask (B, R), padded values 0. Returns advantages (B, R) and returns
    G_t = A_t + V_t (B, R), both 0 on padding (R is the response length, G the return)."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    R = rewards.size(1)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae * mask[:, t]  # reset across the padded tail
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_losses(logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, clip_coef, vf_clip):
    """Clipped policy loss (Schulman et al. 2017, Eq. 7) and clipped value loss, with diagnostics.

    All inputs (B, R); means over mask. Returns pg_loss, vf_loss and a dict of stats."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # (B, R)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = M.masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = torch.clamp(vpred, old_values - vf_clip, old_values + vf_clip)  # = vpred exactly when unclipped
    vf1 = (vpred - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * M.masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        # approx_kl: Schulman 2020's k2 estimator 0.5 (log ratio)^2 of KL(pi_old || pi) on the sampled tokens
        stats = {"approx_kl": M.masked_mean(0.5 * log_ratio ** 2, mask), "clipfrac": M.masked_mean((pg2 > pg1).float(), mask),
                 "vf_clipfrac": M.masked_mean((vf2 > vf1).float(), mask), "ratio": M.masked_mean(ratio, mask)}
    return pg_loss, vf_loss, stats


def fold_reward_normalisation(value_model):
    """Fold a reward model's normalisation into its head, in place: w <- gain w, b <- gain b + bias,
    then gain 1 and bias 0. Its forward() (the values) is then in the units of score(), the
    normalised scores that the rewards and returns are made of. Returns the model."""
    with torch.no_grad():
        gain, bias = value_model.reward_gain.float(), value_model.reward_bias.float()
        value_model.head.weight.mul_(gain)
        value_model.head.bias.mul_(gain).add_(bias)
        value_model.reward_gain.fill_(1.0)
        value_model.reward_bias.fill_(0.0)
    return value_model


def adaptive_kl_update(kl_coef, kl, target, n_steps, horizon):
    """Ziegler et al. 2019's proportional controller: beta *= 1 + clip(KL/target - 1, -.2, .2) * n / horizon."""
    err = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + err * n_steps / horizon)


def explained_variance(values, returns, mask, world=1):
    """1 - Var(R - V) / Var(R) over real tokens."""
    var_r = M.masked_var(returns, mask, world)
    return (1 - M.masked_var(returns - values, mask, world) / var_r).item() if var_r > 0 else float("nan")


# --- models


def init_value_model(value_init, policy, reward_model, device):
    """The value model (item 12). "reward": the reward model with its normalisation
    folded into the head, so its first values are in the units of the normalised scores (InstructGPT,
    N+); "policy": the SFT trunk with a zero head, every first value 0 (lm-human-preferences)."""
    if value_init == "reward":
        return fold_reward_normalisation(M.load_checkpoint(reward_model, device, kind="scalar")[0])
    value_model = M.scalar_from_gpt(policy)
    torch.nn.init.zeros_(value_model.head.weight)  # the bias is 0 already
    return value_model


# --- checks, before anything loads


def check_config(cfg, world):
    """Every option error before any path is checked or model loads; returns the derived sizes."""
    if cfg.value_init not in ("reward", "policy"):
        raise M.ConfigError(f"value_init must be 'reward' or 'policy', not {cfg.value_init!r}")
    if cfg.eval_snapshot_interval < 0:
        raise M.ConfigError(f"eval_snapshot_interval {cfg.eval_snapshot_interval} must be >= 0 (0 = no snapshots)")
    M.check_ensemble(cfg)
    M.check_fsdp(cfg)
    minibatch, micro, shards = M.check_rollout_sizes(cfg, world)
    return cfg.rollout_batch_size, minibatch, micro, shards


def check_inputs(cfg):
    """Every input before anything loads: the paths exist and hold what each key takes (a policy, a
    reward model), the chat template resolves, prompt and answer fit the block size. Returns whether
    the built-in world's gold reward is logged."""
    M.require(cfg, "policy", "reward_model", "prompts", *["ptx_data"] * (cfg.ptx_coef > 0))
    M.check_paths(policy=cfg.policy, prompts=cfg.prompts, ptx_data=cfg.ptx_data if cfg.ptx_coef > 0 else "")
    rm_paths = M.reward_model_paths(cfg.reward_model)
    for path in rm_paths:  # every member of an ensemble
        M.check_paths(reward_model=path)
        M.check_roles(policy=(cfg.policy, "policy"), reward_model=(path, "reward_model"))
    cfg.template = M.resolve_template(cfg.template, cfg.policy, *rm_paths)
    M.check_rl_lengths(cfg)
    from data.world import gold_on  # the built-in task's marker: its gold reward only on its own prompts
    return gold_on(cfg.gold, cfg.prompts)


# --- training


@torch.no_grad()
def rollout_forward(policy, ref, value_model, rms, seq, full_mask, P, cfg, micro, ctx, rm_ids):
    """Old/ref log-probs, values and scores of a rollout, in chunks of `micro` rows (item 17: memory).
    policy is the module the update calls (compiled or not), so the step-0 ratio is exactly 1; ref
    None: the reference is the policy with its LoRA adapters off; rms the reward models (one, or an
    ensemble's members) and rm_ids one (B, T') per member, its rows (model.rm_rows at its block size).
    "member_scores" (B, k): each member's normalised score."""
    outs = {"logprobs": [], "ref_logprobs": [], "values": [], "member_scores": []}
    for i in range(0, seq.size(0), micro):
        s, m = seq[i:i + micro], full_mask[i:i + micro]
        with ctx:
            outs["logprobs"].append(M.response_logprobs(policy, s, m, P, cfg.temperature))
            with M.adapters_off(policy) if ref is None else nullcontext():
                outs["ref_logprobs"].append(M.response_logprobs(policy if ref is None else ref, s, m, P, cfg.temperature))
            outs["values"].append(value_model(s, m)[:, P - 1:-1].float())  # V(s_t) read at the token before y_t
            r = [ids[i:i + micro] for ids in rm_ids]
            outs["member_scores"].append(torch.stack([rm.score(x, x != M.PAD_ID).float() for rm, x in zip(rms, r)], 1))  # (b, k)
    return {k: torch.cat(v) for k, v in outs.items()}


def load_models(cfg, device, ctx):
    """The policy (from SFT), its frozen reference, the frozen reward models (one, or each member of an
    ensemble) and the value model, all with dropout off (item 2). The reference is the policy's start
    (item 19): a copy of it (an SFT checkpoint's LoRA adapters merged in both, so step-0 KL is exactly
    0), or with LoRA None: the policy itself with its adapters off. Under bf16 autocast every reward
    model is stored in bf16, its gain and bias fp32 (item 17); the reference stays in the policy's
    precision path. value_init = "reward" starts the value model from the first member. Returns
    (policy, tokenizer, ref, rms, value_model), rms the list of reward models."""
    policy, tokenizer = M.load_gpt(cfg.policy, device)
    policy = M.adapt(policy, cfg)
    ref = None if cfg.lora_rank else copy.deepcopy(policy)
    rm_paths, rms = M.reward_model_paths(cfg.reward_model), []
    for path in rm_paths:
        rm, rm_tok, _ = M.load_checkpoint(path, device, kind="scalar")
        if rm_tok.ranks != tokenizer.ranks:  # every member reads the policy's answers re-encoded by the policy's tokenizer
            raise M.ConfigError(f"{path} and {cfg.policy} use different tokenizers")
        rms.append(rm)
    value_model = M.adapt(init_value_model(cfg.value_init, policy, rm_paths[0], device), cfg)
    for frozen in (m for m in (ref, *rms) if m is not None):
        frozen.eval().requires_grad_(False)
    if isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16:
        for rm in rms:
            rm.backbone.to(torch.bfloat16)
            rm.head.to(torch.bfloat16)
    policy.eval()  # eval() = no dropout; gradients still flow
    value_model.eval()
    return policy, tokenizer, ref, rms, value_model


def train(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    B, minibatch, micro, shards = check_config(cfg, M.process_count())  # option errors before path errors
    gold = check_inputs(cfg)
    rank, world, device = M.ddp_setup(cfg.device)
    master = rank == 0  # only rank 0 writes files and logs
    lo, share, shard_size, my_shards = M.process_rows(B, shards, world, rank)  # this process owns rows lo .. lo + share - 1
    iterations = cfg.total_episodes // B
    run = M.start_run(cfg, SAFE_KEYS, master)
    if run.finished:
        return M.load_checkpoint(run.ckpt, device)[0]
    torch.manual_seed(cfg.seed)
    ctx = M.autocast(device, cfg.dtype)
    policy, tokenizer, ref, rms, value_model = load_models(cfg, device, ctx)
    prompts, prompt_ids, n_cut = M.load_prompts(cfg.prompts, tokenizer, cfg.max_prompt_len, cfg.template)
    ptx = M.load_ptx(cfg.ptx_data, tokenizer, cfg.ptx_len) if cfg.ptx_coef > 0 else None
    if gold:
        from data.world import gold_reward  # the task's oracle: a metric only

    kl_coef, it = cfg.kl_coef, 0
    ckpt, state = run.ckpt, run.state
    if state is not None:  # every process resumes from the same checkpoint
        policy.load_state_dict(M.load_checkpoint(ckpt)[0].state_dict())
        value_model.load_state_dict(state["value_model"])
    if cfg.fsdp:  # every model sharded, the frozen ones too (item 23)
        for m in (policy, value_model, ref, *rms):
            if m is not None:
                M.fsdp_wrap(m, world, device, sum_grads=True)
    # one AdamW over both models (N+: one optimizer over policy and critic), the value model at value_lr
    opt = M.configure_optimizer(policy, cfg.lr, 0.0, (0.9, 0.999), eps=1e-5, device=device, extra=[(value_model, cfg.value_lr)])
    base_lrs = [group["lr"] for group in opt.param_groups]
    if state is not None:
        it = M.resume_state(opt, state, ckpt, policy, value_model)
        # the controller's current beta when adaptive; a fixed beta is the config's (a deliberate change wins)
        kl_coef = state["kl_coef"] if cfg.adaptive_kl else cfg.kl_coef
    if master:
        M.print_config(cfg)
        print(f"batch hierarchy: rollout {B} answers ({shards} shards of {shard_size}, {world} processes) -> "
              f"{cfg.num_minibatches} minibatches of {minibatch} -> {cfg.grad_accum} micro-batches of {micro}; "
              f"{cfg.update_epochs} epochs = {cfg.update_epochs * cfg.num_minibatches} optimizer steps per rollout; "
              f"{iterations} rollouts | {len(prompts)} prompts ({n_cut} cut to {cfg.max_prompt_len} tokens)")
    fwd_policy = torch.compile(policy) if cfg.compile else policy  # old AND new log-probs go through it
    fwd_ref = torch.compile(ref) if cfg.compile and ref is not None else ref  # the same path as the policy's: step-0 KL is 0
    gen, ptx_gen = torch.Generator(device=device), torch.Generator(device=device)
    stat_keys = ["approx_kl", "clipfrac", "vf_clipfrac", "ratio", "pg_loss", "vf_loss", "entropy"] + ["ptx_loss"] * (ptx is not None)
    t0, start = time.time(), it
    bar = tqdm(total=iterations, initial=it, desc="ppo", dynamic_ncols=True, disable=not master)
    while it < iterations:
        frac = M.lr_at(it, iterations, 1.0, min_lr_frac=0.0, schedule="linear") if cfg.anneal_lr else 1.0  # N+: linear to 0
        for group, base_lr in zip(opt.param_groups, base_lrs):
            group["lr"] = base_lr * frac

        t_start = M.clock(device)  # phase times: time_gen (1), time_fwd (2), time_update (6), time_iter
        # 1. rollout: one answer to each of B prompts, this process's shards only
        idx = M.prompt_batch(it, len(prompts), B, cfg.seed)  # the same B prompts on every process
        seq, full_mask, P = M.sample_rollout(policy, prompt_ids, idx, my_shards, shard_size, 1, cfg, it, tokenizer.eot_id,
                                             gen, ctx, device)  # (b, P + R) b = share
        responses = seq[:, P:]  # (b, R)
        mask = full_mask[:, P:].float()  # (b, R) 1 on response tokens up to and including EOS
        my_idx = idx[lo:lo + share]  # the prompt of each of this process's rows
        my_prompts = [prompts[i] for i in my_idx]
        texts = [tokenizer.decode(r) for r in responses.tolist()]

        # 2. forward: old and reference log-probs, values, reward-model scores (of the re-encoded text)
        t_gen = M.clock(device)
        rows = {n: M.rm_rows(tokenizer, [prompt_ids[i] for i in my_idx], responses, n).to(device)
                for n in {rm.config.block_size for rm in rms}}  # (b, T') per reward-model block size
        out = rollout_forward(fwd_policy, fwd_ref, value_model, rms, seq, full_mask, P, cfg, micro, ctx,
                              [rows[rm.config.block_size] for rm in rms])
        t_fwd = M.clock(device)
        old_logprobs, ref_logprobs = out["logprobs"], out["ref_logprobs"]
        old_values = out["values"] * mask  # padded values zeroed (item 13)

        # 3. score: an ensemble's members combined per answer (k = 1: the one model's score); answers
        #    without EOS get the fixed penalty (item 9), checked on the response only
        member_scores = out["member_scores"].T  # (k, b)
        raw_scores = M.combine_ensemble(member_scores, cfg.ensemble, cfg.ensemble_lambda)  # (b,)
        scores, ended = M.penalise_missing_eos(raw_scores, responses, tokenizer.eot_id, cfg.missing_eos_penalty)
        if not cfg.eos_trick:  # continuations cut at max_new_tokens by design (IMDb): scored as they are
            scores = raw_scores

        # 4. KL in the reward: -beta * kl per token, the score at the last response token
        beta = kl_coef  # the coefficient of this rollout's rewards
        rewards, kl = compute_rewards(scores, old_logprobs, ref_logprobs, mask, beta)
        if cfg.whiten_rewards:
            rewards = M.masked_whiten(rewards, mask, shift_mean=False, world=world)
        # means over the rollout's sequences: this process's sums, summed over processes
        seq_sums = torch.stack([raw_scores, scores, kl.sum(1), mask.sum(1), ended.float()]).sum(1)  # (5,)
        score, score_used, seq_kl, resp_len, eos_frac = (M.ddp_sum(seq_sums, world, device) / B).tolist()
        # seq_kl is objective/kl: the mean over sequences of the summed per-token KL
        score_std = max(M.ddp_sum((raw_scores.double() ** 2).sum().item(), world, device) / B - score ** 2, 0.0) ** 0.5

        # 5. advantages and returns (GAE), then whitened advantages, over the whole rollout's tokens
        advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
        adv_mean = M.masked_mean(advantages, mask, world).item()
        adv_std = M.masked_var(advantages, mask, world).sqrt().item()
        if cfg.norm_adv:
            advantages = M.masked_whiten(advantages, mask, world=world)

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
                # means over the whole minibatch's tokens, whatever grad_accum and the process count
                mb_tokens = M.ddp_sum(mask[mine].sum().item(), world, device)
                mb_stats = torch.zeros(len(stat_keys), device=device)
                for a in range(cfg.grad_accum):
                    i = [g - lo for g in mb_idx[a * micro:(a + 1) * micro] if lo <= g < lo + share]
                    if not i and not cfg.fsdp:  # none of this micro-batch's rows is ours
                        continue
                    mine_w = 1.0 if i else 0.0  # FSDP: an empty share still runs (its first row, weight 0): all-gathers are collective
                    i = torch.tensor(i or [0], device=device)
                    mb_seq, mb_full, mb_mask = seq[i], full_mask[i], mask[i]
                    w = mb_mask.sum() / mb_tokens * mine_w  # these rows' share of the minibatch mean
                    with ctx:  # fused LM head: no (b, R, V) logits (model.linear_logprobs)
                        new_logprobs, entropy = M.response_logprobs(fwd_policy, mb_seq, mb_full, P, cfg.temperature,
                                                                    entropy=True)  # (b, R) fp32 each
                        vpred = value_model(mb_seq, mb_full)[:, P - 1:-1].float()  # (b, R)
                    pg_loss, vf_loss, s = ppo_losses(new_logprobs, old_logprobs[i], advantages[i], vpred, old_values[i],
                                                     returns[i], mb_mask, cfg.clip_coef, cfg.vf_clip)
                    entropy = M.masked_mean(entropy if cfg.ent_coef != 0 else entropy.detach(), mb_mask)  # 0: logged only
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
                    if ptx is not None:  # PPO-ptx: pretraining log-likelihood on random windows (per process)
                        x = M.ptx_windows(ptx, cfg.ptx_len, cfg.ptx_batch_size, ptx_gen).to(device)  # (b, L + 1)
                        with ctx:
                            s["ptx_loss"] = M.ptx_loss(fwd_policy, x)
                        loss = loss + cfg.ptx_coef * s["ptx_loss"]
                    (loss * w).backward()
                    s.update(pg_loss=pg_loss, vf_loss=vf_loss, entropy=entropy)
                    mb_stats += torch.stack([s[k].detach().float() for k in stat_keys]) * w
                mb_stats = dict(zip(stat_keys, M.ddp_sum(mb_stats, world, device).tolist()))  # token-weighted means
                where = f"iteration {it} epoch {epoch} minibatch {mb} (last good checkpoint: {ckpt})"
                mb_stats["grad_norm"] = M.optimizer_step(opt, (policy, value_model), mb_stats, cfg.max_grad_norm, world, where)
                stats.append(mb_stats)
        t_update = M.clock(device) - t_update

        # 7. KL control: the adaptive controller (Ziegler et al. 2019) from this rollout's KL, or beta fixed
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_update(kl_coef, seq_kl, cfg.target_kl, B, cfg.kl_horizon)
        it += 1
        bar.update(1)

        # then metrics (every process joins the sums), samples, checkpoint (rank 0)
        if it % cfg.log_interval == 0 or it == iterations:
            metrics = {"step": it, "episodes": it * B, "score": score, "score_used": score_used, "kl": seq_kl,
                       "kl_coef": beta, "non_score_reward": -beta * seq_kl, "rlhf_reward": score_used - beta * seq_kl,
                       "resp_len": resp_len, "eos_frac": eos_frac,
                       "explained_var": explained_variance(old_values, returns, mask, world),
                       "adv_mean": adv_mean, "adv_std": adv_std, "score_std": score_std, "lr": cfg.lr * frac,
                       "return_mean": M.masked_mean(returns, mask, world).item(),
                       "return_std": M.masked_var(returns, mask, world).sqrt().item(),
                       "value_mean": M.masked_mean(old_values, mask, world).item()}
            metrics.update({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})
            # every rollout's first minibatch of its first epoch runs the policy that sampled it: 0 (item 3)
            metrics["approx_kl_first_mb"] = stats[0]["approx_kl"]
            if len(rms) > 1:  # each member's mean score and their spread (std across members, mean over answers)
                metrics.update(M.ensemble_metrics(member_scores, world, device, B))
            if gold:
                metrics.update(M.gold_metrics(gold_reward, my_prompts, texts, ended, world, device, B))
            metrics["s_per_it"] = round((time.time() - t0) / (it - start), 2)
            metrics.update(time_gen=t_gen - t_start, time_fwd=t_fwd - t_gen, time_update=t_update,
                           time_iter=M.clock(device) - t_start)  # this iteration's; the rest: steps 3-5, 7, gold
            if cfg.fsdp:  # what this process holds of every model and of AdamW: about 1/world of it all
                held = M.held_bytes([m for m in (policy, value_model, ref, *rms) if m is not None], opt)
                metrics.update(param_mb=held[0] / 2**20, optim_mb=held[1] / 2**20)
            if master:
                M.log_metrics(cfg.out_dir, metrics)
        if master and (it % cfg.sample_interval == 0 or it == iterations):  # reward hacking shows in the text first
            for r in range(min(cfg.n_show, len(texts))):
                tqdm.write(f"  > {my_prompts[r]}\n    {texts[r]!r} score {scores[r].item():+.2f}")
        if (master or cfg.fsdp) and cfg.eval_snapshot_interval and (it % cfg.eval_snapshot_interval == 0 or it == iterations):
            # before the checkpoint: a kill between the two redoes this iteration, snapshot included (FSDP: all gather)
            M.save_snapshot(cfg.out_dir, it, policy, tokenizer, dataclasses.asdict(cfg))
        if (master or cfg.fsdp) and (it % cfg.ckpt_interval == 0 or it == iterations):  # FSDP: all gather, rank 0 writes
            M.save_checkpoint(ckpt, policy, tokenizer, dataclasses.asdict(cfg),
                              state={"iteration": it, "kl_coef": kl_coef, "value_model": M.full_state_dict(value_model),
                                     "optimizer": M.optimizer_state(opt, policy, value_model), "rng": M.rng_state(),
                                     "finished": it == iterations})
    bar.close()
    M.ddp_cleanup(world)
    return policy


if __name__ == "__main__":
    M.main(train, Config)
