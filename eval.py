"""
eval.py: sample from any checkpoint on held-out prompts and score the answers.

For a policy checkpoint it reports, over the prompts:
  gold       the built-in task's gold reward and each of its parts (data/world.py), the fraction
             of answers ending with EOS and the fraction naming every requested entity (on topic)
  rm_score   the (normalised) reward-model score, when --reward_model is given, and the Spearman
             correlation of that score with the gold reward over every sampled answer
  kl         KL(pi || pi_ref) to --ref, the sampled estimate E_y~pi [sum_t log pi(y_t) - log pi_ref(y_t)]
             (per sequence, nats), with both log-probs at the sampling temperature
  win_rate   gold win rate against --baseline, one answer each per prompt, ties count half
  win_rate_lc  the length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval"): the win
             indicator (ties 0.5) regressed by logistic regression on x = tanh(d / sd(d)), d the answer's
             length minus the baseline answer's in tokens, P(win) = sigmoid(a + b x), fitted by Newton's
             method; win_rate_lc = sigmoid(a), the win rate predicted at zero length difference (0.5 for a
             win rate that comes from length alone). A tie enters the Bernoulli log-likelihood as target
             0.5, half a win and half a loss. Simpler than AlpacaEval's GLM, which has the same intercept
             and tanh-scaled length term for a model against its baseline, but also an instruction term
             (each instruction's difficulty, fitted across the many models of its leaderboard), with lengths
             in characters: ours has no instruction term, lengths in tokens, and a ridge of 1e-4 that keeps
             the fit finite when every answer wins.
             win_rate_lc_coef is b (with win_rate_lc_coef_ci), len_diff the mean d, len_diff_sd the scale sd(d)
  pass_at_<k> (--pass_at_k K) for k = 1, 2, 4, ..., K: pass@k on the checker's questions, from
             --pass_samples n >= K answers each (an answer cut before EOS is wrong), by the unbiased
             estimator of Chen et al. 2021, Eq. 1: the mean over questions of 1 - C(n - c, k) / C(n, k)
             (c correct of n), computed as a product; with its interval over questions. The per-question
             counts c are saved in pass_per_question
  fact_acc   the share of answers to the world's fact questions that state the true value and no
             false one (data/world.py verify_answer: grpo.py's verifiable reward); arith_acc the same
             for the addition questions of data/arith.py (--verifier arith). An answer cut before its
             EOS counts as wrong, as it scores 0 as a reward; *_acc_text is the checker on the text alone
Best-of-n (--best_of_n n): n answers per prompt, the reward model keeps its favourite. Its KL to
the sampling policy is reported twice: kl_best_of_n_bound, the formula log n - (n - 1) / n of
Stiennon et al. 2020 and Gao et al. 2022, which Beirami et al. 2024 show is only an upper bound
(loose when answers repeat, as they often do here); and kl (the one the frontier uses), the exact
KL of best-of-n over the empirical answer distribution of m >= 4n samples per prompt (Beirami et al.
2024, Lemma 1: with answers sorted by reward, F the reward CDF and F- the strict one,
pi_bon(y) = pi(y) (F(y)^n - F-(y)^n) / (F(y) - F-(y))), averaged over prompts. With --dump file.jsonl the picks are written as SFT data, so rejection-sampling
fine-tuning (Llama 2) is this followed by sft.py --data file.jsonl; --dump_verified does the same with the
checker's verdict in place of the reward model (every distinct correct answer of a prompt, from --repeats
answers each), and --dump_verified_pairs writes {"prompt", "chosen", "rejected"} pairs of a correct and a
wrong answer to the same prompt (each answer used once), preference data for dpo.py. With --dump_rankings file.jsonl
all n answers of each prompt are written as a ranking by reward-model score, preference data
labelled by a reward model: the DPO paper's IMDb pairs (4 SFT samples per prefix, ranked by the
sentiment classifier; Rafailov et al. 2023, section 6.1), ready for dpo.py or reward.py.
Uncertainty: every mean over prompts (gold, win rate, KL) comes with a 95% percentile-bootstrap
interval over prompts (the repeats of one prompt are resampled together), in `<key>_ci` (win_rate_lc:
the fit repeated on each resample; pass@k: over questions); the
per-prompt values are saved in `per_prompt`, so --pool can average runs of several seeds prompt by
prompt and bootstrap that. The gold reward is the task's oracle: eval.py and ppo.py's metrics import it from data/world.py;
no training loss ever sees it. It is on only for the world's own prompts (--gold auto, the default).

A JSON summary goes to --out (default: eval.json in the checkpoint's run directory).
--frontier "out/eval_*.json" reads such summaries and prints (and plots, with matplotlib) gold
reward against KL to SFT per method: the reward-vs-KL frontier of the DPO paper's Figure 2.
--pass_curves "out/pass_*.json" reads summaries written with --pass_at_k and prints (and plots to --plot)
pass@k against k for each run.
--proxy_table "out/overopt/bon_*.json,out/overopt/eval_rloo_*.json" sets Gao et al.'s coefficients beside the
proxy they were measured against: one row per reward model (its trunk n_layer x n_embd and parameters, its
training rankings, its held-out ranking accuracy val_acc), the best-of-n fit (alpha, beta, d*, R* with their
intervals) of its --bon_curve, and the end point (gold, KL, win rate) of each RL run trained against it (an eval JSON,
matched through its run's config.json reward_model); R*, d* and the RL gold are plotted against the
parameters, one line per amount of data, to --plot.

Curves and Gao et al. 2022's fits ("Scaling Laws for Reward Model Overoptimization", Eq. 1-2; docs/overoptimisation.md):
--curve RUN evaluates the start of an RL run (--ref, by default its policy) and each of its snapshots
(ppo.py / grpo.py --eval_snapshot_interval N) exactly as above: gold, reward-model score and sampled
KL to the start, each with its interval, and the gold gain over the start; --bon_curve n_max draws ONE
pool of --bon_pool answers per prompt and computes best-of-n for n = 1, 2, 4, ..., n_max exactly over
each prompt's pool (ties in the proxy score shared out), with the analytic KL log n - (n - 1) / n. Each
curve is fitted by least squares in d = sqrt(KL) with the gold gain R (R(0) = 0: the start's gold is
subtracted): best-of-n R = d (alpha - beta d), RL R = d (alpha - beta log d), alpha and beta with
intervals from the fit repeated on each bootstrap resample of the prompts, the RMS residual against the
points' own noise, and the peak d* (alpha / (2 beta), exp(alpha / beta - 1)) with R*, or the reason
there is none. The JSON goes to --out (defaults RUN/curve.json, bon_curve.json), the plot beside it.

Run:
  python eval.py --ckpt out/ppo --prompts data/world/prompts_val.jsonl --ref out/sft --baseline out/sft --reward_model out/reward
  python eval.py --ckpt out/sft --prompts data/world/prompts_val.jsonl --reward_model out/reward --best_of_n 16 --dump out/bon16.jsonl
  python eval.py --ckpt out/imdb_sft --reward_model out/imdb_reward --prompts data/imdb/imdb_prompts_train.jsonl \
      --best_of_n 4 --max_new_tokens 48 --dump_rankings data/imdb/imdb_prefs_train.jsonl
  python eval.py --ckpt out/sft --prompts data/world/prompts_val.jsonl --pass_at_k 64 --pass_samples 64 --out out/pass_sft.json
  python eval.py --frontier "out/sweep/eval_*.json" --plot out/frontier.png
  python eval.py --curve out/rloo --prompts data/world/prompts_val.jsonl --out out/rloo_curve.json
  python eval.py --bon_curve 256 --bon_pool 256 --ckpt out/sft --reward_model out/reward --prompts data/world/prompts_val.jsonl --out out/bon_curve.json
  python eval.py --pool "out/seed*/eval_ppo.json"
  python eval.py --pass_curves "out/pass_sft.json,out/sweep/pass_*.json" --plot out/pass_at_k.png
  python eval.py --proxy_table "out/overopt/bon_*.json,out/overopt/eval_rloo_*.json,out/sweep/eval_rloo.json" --plot out/proxy.png
"""

import dataclasses
import glob
import json
import math
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import model as M


@dataclass
class Config:
    ckpt: str = ""  # (required) the policy to evaluate: our checkpoint or a GPT-2 dir/name
    prompts: str = ""  # (required) JSONL of {"prompt": ...} rows
    template: str = "auto"  # chat template (model.CHAT_TEMPLATES); auto = the checkpoint's, else hh
    n_prompts: int = 0  # 0 = all
    prompt_stride: int = 1  # every k-th prompt of the file, before n_prompts: a small sample that spans every prompt kind
    repeats: int = 1  # independent answers per prompt (each compared with its own baseline answer)
    ref: str = ""  # reference policy for the KL estimate ("" = skip)
    baseline: str = ""  # baseline policy for the gold win rate ("" = skip); needs the gold reward (the world's prompts)
    reward_model: str = ""  # reward-model checkpoint ("" = skip)
    gold: str = "auto"  # score with the built-in world's gold reward: auto = when the prompts are the world's; true; false
    best_of_n: int = 1  # answers per prompt; the reward model keeps one (needs reward_model if > 1)
    bon_kl_samples: int = 4  # best-of-n KL from m = max(this * n, repeats * n) samples per prompt (Beirami et al. 2024)
    dump: str = ""  # write the kept answers as {"prompt", "response"} JSONL
    dump_rankings: str = ""  # write all best_of_n answers per prompt as {"prompt", "responses": best..worst by RM}
    verifier: str = "auto"  # checker of verifiable answers: facts (the built-in world's fact questions; auto = when gold is on), arith (data/arith.py), none
    dump_verified: str = ""  # write each prompt's distinct correct answers (checker 1, EOS) as {"prompt", "response"} JSONL
    dump_verified_pairs: str = ""  # write {"prompt", "chosen", "rejected"} pairs of a correct and a wrong answer per prompt
    pass_at_k: int = 0  # > 0: pass@k for k = 1, 2, 4, ..., pass_at_k on the checker's questions (Chen et al. 2021); 0 = off
    pass_samples: int = 64  # n answers per checker question for pass@k (n >= pass_at_k)
    temperature: float = 1.0  # sampling temperature (also of the KL's log-probs)
    max_new_tokens: int = 96  # above the longest SFT answer of the built-in task (75 tokens): the cap cuts no normal answer
    batch_size: int = 64  # sequences per generation batch
    n_show: int = 8  # sample answers printed
    out: str = ""  # summary JSON path ("" = <ckpt run dir>/eval.json)
    frontier: str = ""  # comma-separated eval JSONs (globs allowed): print gold vs KL, plot it if matplotlib is there
    pool: str = ""  # comma-separated eval JSONs of one method over several seeds: means and intervals pooled by prompt
    plot: str = "frontier.png"  # where --frontier writes its plot
    curve: str = ""  # an RL run directory with snapshots (ppo.py / grpo.py --eval_snapshot_interval), or several of one trajectory, comma-separated: gold, RM score, KL at each, Gao et al.'s RL fit
    bon_curve: int = 0  # > 0: the best-of-n curve for n = 1, 2, 4, ..., bon_curve from one pool per prompt, Gao et al.'s best-of-n fit
    bon_pool: int = 256  # answers per prompt in --bon_curve's pool
    pass_curves: str = ""  # comma-separated eval JSONs with pass@k (globs allowed): print pass@k against k for each, plot it to --plot
    proxy_table: str = ""  # comma-separated --bon_curve JSONs and eval JSONs of RL runs (globs allowed): per reward model its size, data, accuracy, best-of-n fit and RL end point; plot to --plot
    seed: int = 0  # seeds sampling
    device: str = "auto"  # auto = cuda, then mps, then cpu


# --- sampling and scoring


def sample(model, tokenizer, prompts, cfg, device, seed):
    """One answer per prompt: list of (response ids incl. EOS if emitted, ended)."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    return M.sample_answers(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.batch_size, gen, cfg.template)


def right_padded(tokenizer, prompts, responses, max_len, template="hh"):
    """Rows prompt + response, right-padded: ids (B, T) and the response mask (B, T). A prompt
    that does not fit in max_len beside its response keeps its last tokens (as when sampled)."""
    rows = [M.truncate_example(M.encode_chat(tokenizer, p, template=template), r, max_len, 0)[:2] for p, r in zip(prompts, responses)]
    return M.pad_responses([(p + r, len(p)) for p, r in rows])  # (B, T), (B, T)


@torch.no_grad()
def logprob_sums(model, tokenizer, prompts, responses, cfg, device):
    """sum_t log p(y_t | x, y_<t) of each response under model, at the sampling temperature: (N,)."""
    model.eval()
    sums = []
    for i in range(0, len(prompts), cfg.batch_size):
        ids, mask = right_padded(tokenizer, prompts[i:i + cfg.batch_size], responses[i:i + cfg.batch_size], model.config.block_size, cfg.template)
        lp = M.response_logprobs(model, ids.to(device), temperature=cfg.temperature)  # (B, T-1)
        sums.append((lp * mask[:, 1:].to(device)).sum(-1).cpu())
    return torch.cat(sums)


@torch.no_grad()
def rm_scores(rm, tokenizer, prompts, responses, batch_size, device, template="hh"):
    """Normalised reward-model score of each (prompt, response ids): (N,). The answers are
    re-encoded from their text first (model.reencode), the ids the reward model was trained on."""
    rm.eval()
    responses = [M.reencode(tokenizer, r) for r in responses]
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, _ = right_padded(tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size], rm.config.block_size, template)
        out.append(rm.score(ids.to(device), (ids != M.PAD_ID).long().to(device)).cpu())
    return torch.cat(out)


def rm_rankings(prompts, texts, scores):
    """Rows {"prompt", "responses": [best, ..., worst]} by reward-model score, texts (N * n) and
    scores (N, n). A repeated answer is kept once; a prompt left with one distinct answer carries
    no preference and is skipped. Returns (rows, skipped)."""
    rows, skipped = [], 0
    n = scores.size(1)
    for i, p in enumerate(prompts):
        order = scores[i].argsort(descending=True).tolist()
        ranked = list(dict.fromkeys(texts[i * n + j].strip() for j in order))  # keeps the first (best) copy
        if len(ranked) < 2:  # an empty answer ("") is ranked like any other
            skipped += 1
            continue
        rows.append({"prompt": p, "responses": ranked})
    return rows, skipped


def gold_scores(prompts, texts, ended):
    from data.world import ENTITY, gold_reward, parse_prompt  # the task's oracle, never a training signal
    rows = []
    for p, t, e in zip(prompts, texts, ended):
        g = gold_reward(p, t, e)
        ents = parse_prompt(p)[1]
        named = {ENTITY.get(w) for w in re.findall(r"[a-z]+", t.lower())}
        g["on_topic"] = float(bool(ents) and all(x in named for x in ents))
        rows.append(g)
    return rows


VERIFIERS = {"facts": ("data.world", "fact"), "arith": ("data.arith", "arith")}  # name: (module, key prefix)


def verifier_of(setting, gold):
    """The checker module's verify_answer and the prefix of its keys, or None: auto = facts when gold is on."""
    name = ("facts" if gold else "none") if setting == "auto" else setting
    if name == "none":
        return None
    if name not in VERIFIERS:
        raise M.ConfigError(f"verifier = {setting!r}: expected auto, none or one of {', '.join(VERIFIERS)}")
    import importlib  # the task's checker: a metric here, never a training signal
    return importlib.import_module(VERIFIERS[name][0]).verify_answer, VERIFIERS[name][1]


def verified_accuracy(prompts, texts, ended, repeats, verify, key):
    """Share of the answers to the checker's questions that it marks correct (the world's fact questions:
    the true value and no false one; data/arith.py: the sum and no other result), an answer cut before its
    EOS counting as wrong (it scores 0 as grpo.py's reward), with its interval over prompts; and
    <key>_acc_text, the checker on the text alone. {} when no prompt is one of its questions."""
    checks = [verify(p, t) for p, t in zip(prompts, texts)]
    ended_checks = [c if c is None or e else 0.0 for c, e in zip(checks, ended)]
    out = {}
    for name, values in ((f"{key}_acc", ended_checks), (f"{key}_acc_text", checks)):
        by_prompt = [mean(values[i:i + repeats]) for i in range(0, len(values), repeats) if values[i] is not None]
        if not by_prompt:
            return {}
        out.update({name: mean(by_prompt), f"{name}_ci": M.bootstrap_ci(by_prompt)})
        if name == f"{key}_acc":
            out[f"{key}_prompts"], out["_by_prompt"] = len(by_prompt), by_prompt
    return out


def verified_dumps(prompts, texts, ended, verify):
    """(rows, pairs): each prompt's distinct correct answers (the checker's 1, with EOS) as SFT rows, and
    pairs of a correct and a wrong (or cut) answer to the same prompt, each answer used at most once."""
    by_prompt = {}
    for p, t, e in zip(prompts, texts, ended):
        ok = bool(e) and verify(p, t) == 1.0 and t.strip()
        right, wrong = by_prompt.setdefault(p, ({}, {}))
        (right if ok else wrong).setdefault(t.strip(), None)  # distinct answers, in order
    rows = [{"prompt": p, "response": t} for p, (right, _) in by_prompt.items() for t in right]
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, (right, wrong) in by_prompt.items()
             for c, r in zip(right, wrong)]
    return rows, pairs


def ranks(xs):
    """Ranks 0..n-1 with ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a, b):
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm()).clamp(min=1e-12)).item()


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def per_prompt(values, repeats):
    """Mean of each prompt's `repeats` consecutive values: (N * repeats,) -> (N,) list."""
    return [mean(values[i:i + repeats]) for i in range(0, len(values), repeats)]


def best_of_n_kl(scores, answers, n):
    """KL(best-of-n || policy) of one prompt, exact for the empirical distribution of its m sampled
    answers (Beirami et al. 2024, Lemma 1). Each distinct answer is a level of probability
    p = count / m; levels sorted by reward-model score, F the CDF up to and including a level and F-
    below it, best-of-n puts q = F^n - F-^n on it, and KL = sum q log(q / p). With m distinct answers
    this is sum_j ((j/m)^n - ((j-1)/m)^n) log(m ((j/m)^n - ((j-1)/m)^n)), which tends to the bound
    log n - (n-1)/n as m grows; repeated answers make it smaller (one answer m times: 0).
    scores: m floats; answers: m hashable answers (token-id tuples), the same answer the same score."""
    m = len(scores)
    counts, score = {}, {}
    for s, a in zip(scores, answers):
        counts[a], score[a] = counts.get(a, 0) + 1, s
    levels = [counts[a] for a in sorted(counts, key=score.get)]  # ascending reward
    kl, below = 0.0, 0
    for c in levels:
        q = ((below + c) / m) ** n - (below / m) ** n
        kl += q * math.log(q * m / c) if q > 0 else 0.0
        below += c
    return kl


def fit_win_logistic(x, y, weights=None, ridge=1e-4, steps=100):
    """Logistic regression of a win indicator on one feature, P(win) = sigmoid(a + b x), by Newton's
    method (with step halving) on the Bernoulli log-likelihood with a small ridge penalty,
      l(a, b) = sum_i w_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - ridge / 2 (a^2 + b^2),  p_i = sigmoid(a + b x_i),
    gradient X^T w (y - p) - ridge theta, Hessian -(X^T diag(w p (1 - p)) X + ridge I), X = [1, x].
    y in [0, 1]: a tie enters as y = 0.5, half a win and half a loss; l stays concave and the fit
    still makes sum_i w_i (y_i - p_i) = ridge a (~0), so ties count half, as in win_rate. The ridge
    keeps the fit finite where the maximum likelihood is at infinity (every answer wins, or the longer
    answer always wins) and moves a fitted win rate by less than 1e-5 here (hundreds of answers).
    x, y (N,); weights (n, N) or None (all 1): n fits at once, one per row (the bootstrap's resamples).
    Returns (a, b), each (n,) float64."""
    X = torch.stack([torch.ones_like(x), x], 1).double()  # (N, 2)
    XX = (X[:, :, None] * X[:, None, :]).reshape(len(x), 4)  # (N, 4) the outer products x_i x_i^T
    y = y.double()
    W = torch.ones(1, len(x), dtype=torch.float64) if weights is None else weights.double()  # (n, N)
    theta = torch.zeros(W.size(0), 2, dtype=torch.float64)  # (n, 2) = (a, b)

    def objective(th):  # (n,) the penalised log-likelihood
        z = th @ X.T  # (n, N)
        return (W * (y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))).sum(1) - 0.5 * ridge * (th ** 2).sum(1)

    obj = objective(theta)
    for _ in range(steps):
        p = torch.sigmoid(theta @ X.T)  # (n, N)
        grad = (W * (y - p)) @ X - ridge * theta  # (n, 2)
        H = ((W * p * (1 - p)) @ XX).view(-1, 2, 2) + ridge * torch.eye(2, dtype=torch.float64)  # (n, 2, 2) minus the Hessian
        step = torch.linalg.solve(H, grad[..., None])[..., 0]  # (n, 2) Newton's step
        t = torch.ones(W.size(0), 1, dtype=torch.float64)  # (n, 1) step sizes, halved where the objective would fall
        for _ in range(30):
            new_obj = objective(theta + t * step)
            worse = new_obj < obj - 1e-12 * obj.abs()  # a fall beyond rounding
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        t = torch.where(worse[:, None], 0.0, t)  # still worse after 30 halvings: stay
        theta = theta + t * step
        obj = objective(theta)
        if step.abs().max() < 1e-10:
            break
    return theta[:, 0], theta[:, 1]


def length_controlled_win_rate(wins, len_diff, repeats, n_boot=2000, level=0.95, seed=0):
    """The length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval"), simplified:
    the win indicator (1, 0.5 for a tie, 0) regressed on x = tanh(d / sd(d)), d the policy answer's
    length minus the baseline answer's (tokens, EOS counted), by fit_win_logistic, and the predicted
    win rate at zero length difference, sigmoid(a). A win rate that comes from length alone goes to 0.5;
    one independent of length stays the raw rate. Every d equal (sd 0): no length difference to control
    for, x = 0 and the fit is the raw rate. wins, len_diff: N = prompts * repeats answers, each prompt's
    repeats consecutive. The interval: the percentile bootstrap over prompts (all answers of a prompt
    resampled together, the draws of model.bootstrap_ci), one refit per resample, sd(d) kept at the
    full data's. Returns (lc, [lo, hi], b, [lo_b, hi_b], sd): the length slope b with its interval too."""
    y, d = torch.tensor(wins, dtype=torch.float64), torch.tensor(len_diff, dtype=torch.float64)  # (N,)
    sd = d.std(correction=0).item()
    x = torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)  # (N,)
    a, b = fit_win_logistic(x, y)
    n = len(wins) // repeats
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))  # (n_boot, n) as bootstrap_ci
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))
    a_boot, b_boot = fit_win_logistic(x, y, counts.repeat_interleave(repeats, 1))  # (n_boot,) a prompt's answers together
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.sigmoid(a).item(), torch.quantile(torch.sigmoid(a_boot), q).tolist(), b.item(), torch.quantile(b_boot, q).tolist(), sd


def pass_at_k(n, c, k):
    """pass@k of one question from n sampled answers of which c are correct: the unbiased estimator of
    Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", Eq. 1), 1 - C(n - c, k) / C(n, k),
    the chance that k answers drawn without replacement from the n hold a correct one. Computed as their
    stable product, C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i), with no huge binomials."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} from {n} answers: the unbiased estimator needs 1 <= k <= n (draw more answers)")
    if not 0 <= c <= n:
        raise ValueError(f"{c} correct answers of {n}")
    if n - c < k:  # every k-subset holds a correct answer
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(k_max):
    """The k of pass@k reported: 1, 2, 4, ... up to k_max, and k_max itself."""
    return sorted({2 ** j for j in range(k_max.bit_length()) if 2 ** j <= k_max} | {k_max})


# --- curves: best-of-n exactly over one pool, and Gao et al. 2022's scaling forms


def best_of_n_expected(scores, values, n):
    """E[value of the best-of-n pick], exact over the empirical distribution of each prompt's pool of N
    answers: n draws with replacement, the pick the one with the highest score. scores, values (P, N):
    the proxy's score and any value (gold, the score itself) of each pooled answer; returns (P,) float64.
    Sorted by score, the answer of rank i is the maximum of the n draws with probability
    (i/N)^n - ((i-1)/N)^n (order statistics of draws from the pool's empirical distribution: a plug-in
    estimate of the policy's best-of-n, defined for n > N too; no sampling noise beyond the pool's own).
    Ties: the c answers tied at one score form a level of CDF F (answers scoring <= it, over N) and F-
    (strictly below); the maximum lands on the level with probability F^n - F-^n, and the pick is then
    uniform over its c members (draws with replacement are exchangeable, so any tie rule blind to which
    answer is which gives that), each member weighted (F^n - F-^n) / c. Untied, that is the rank formula;
    ordering tied answers arbitrarily instead would make the result depend on that order."""
    scores, values = scores.double(), values.double()  # (P, N)
    N = scores.size(1)
    ordered = scores.sort(-1).values  # (P, N)
    hi = torch.searchsorted(ordered, scores, right=True).double()  # (P, N) answers scoring <= this one
    lo = torch.searchsorted(ordered, scores, right=False).double()  # (P, N) answers scoring < this one
    w = ((hi / N) ** n - (lo / N) ** n) / (hi - lo)  # (P, N) each answer's chance of being the pick; rows sum to 1
    return (w * values).sum(-1)  # (P,)


def best_of_n_kl_bound(n):
    """KL(best-of-n || policy) <= log n - (n - 1) / n (Stiennon et al. 2020, appendix; Gao et al. 2022, section
    2.2): the value for a continuous, untied reward, which Beirami et al. 2024 ("Theoretical guarantees on the
    best-of-n alignment policy") show is an upper bound of the true KL."""
    return math.log(n) - (n - 1) / n


GAO_FORMS = {"bon": "R(d) = d (alpha - beta d)", "rl": "R(d) = d (alpha - beta log d)"}  # Gao et al. 2022, Eq. 1 and 2


def gao_design(d, form):
    """The forms of Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") are linear in
    (alpha, beta): R = alpha x1 - beta x2 with x1 = d and x2 = d^2 (best-of-n, Eq. 1) or d log d (RL, Eq. 2;
    0 at d = 0, its limit). d (..., K) -> (..., K, 2) the columns [x1, -x2]."""
    if form not in GAO_FORMS:
        raise ValueError(f"form {form!r}: expected one of {', '.join(GAO_FORMS)}")
    x2 = d * d if form == "bon" else torch.where(d > 0, d * torch.log(d.clamp(min=1e-300)), torch.zeros_like(d))
    return torch.stack([d, -x2], -1)


def fit_gao(d, r, form):
    """Least-squares (alpha, beta) of a Gao et al. 2022 form (gao_design) to points (d_k, R_k): d = sqrt(KL)
    and R the gold gain over the start (R(0) = 0, so no intercept). d, r (..., K), batched over leading dims
    (the bootstrap's resamples); returns alpha, beta (...,) float64. Exact on noise-free points of the form."""
    X = gao_design(d.double(), form)  # (..., K, 2)
    coef = torch.linalg.lstsq(X, r.double()[..., None]).solution[..., 0]  # (..., 2)
    return coef[..., 0], coef[..., 1]


def gao_peak(alpha, beta, form):
    """Where the fitted gold peaks, (d*, R*), or None with the reason when the form has no peak at d > 0.
    Best-of-n: R' = alpha - 2 beta d = 0 at d* = alpha / (2 beta), R* = alpha^2 / (4 beta), a maximum for
    beta > 0 and at d > 0 for alpha > 0. RL: R' = alpha - beta (log d + 1) = 0 at d* = exp(alpha / beta - 1),
    R* = beta d*, a maximum for beta > 0 (for any alpha). beta <= 0: gold never turns down within the form."""
    if not beta > 0:
        return None, f"beta {beta:.4g} <= 0: the fitted gold never turns down (no peak)"
    if form == "bon":
        if not alpha > 0:
            return None, f"alpha {alpha:.4g} <= 0: the fitted gold falls from d = 0 (no peak at d > 0)"
        return (alpha / (2 * beta), alpha * alpha / (4 * beta)), None
    z = alpha / beta - 1
    if z > 700:  # exp overflows: a peak far beyond any KL a run reaches
        return None, f"d* = exp({z:.4g}) overflows: no peak within any reachable KL"
    return (math.exp(z), beta * math.exp(z)), None


def gao_fit(gain, kl, form, n_boot=2000, level=0.95, seed=0):
    """Gao et al. 2022's form fitted to a curve of K points, with intervals from the bootstrap over prompts.
    gain (P, K): each prompt's gold gain over the start at each point (the curve's first point is the start,
    gain 0); kl (P, K) each prompt's KL to the start (a sampled estimate: the mean is clamped at 0 before the
    square root), or (K,) one KL per point (best-of-n's analytic one). The points are d_k = sqrt(mean_p kl),
    R_k = mean_p gain. Returns a dict: alpha, beta and their percentile intervals (the fit repeated on each of
    n_boot resamples of the prompts, the draws of model.bootstrap_ci), the points with the fit and residuals,
    rms (the root-mean-square residual) beside noise (the mean standard error of the points off d = 0, each
    the half-width of its 95% interval / 1.96), and fits: chi2 = sum_k (residual_k / se_k)^2 over the points
    off d = 0 against a chi-square of (points - 2) degrees of freedom, fits when its p_value >= 0.05 (None
    with 2 points or fewer: the fit is exact). An approximate check: it treats the points as independent,
    which the points of one curve (the same prompts, the same pool) are not, and the peak d*, R*, KL* = d*^2 with intervals over the
    resamples that have one (peak_share: their fraction), or peak None and why."""
    gain = torch.as_tensor(gain, dtype=torch.float64)  # (P, K)
    kl = torch.as_tensor(kl, dtype=torch.float64)  # (P, K) or (K,)
    P, K = gain.shape
    point_d = lambda g_kl: g_kl.clamp(min=0).sqrt()  # noqa: E731
    d = point_d(kl.mean(0) if kl.dim() == 2 else kl)  # (K,)
    r = gain.mean(0)  # (K,)
    out = {"form": form, "formula": GAO_FORMS[form], "points": K}
    if int((d > 0).sum()) < 2:
        return {**out, "alpha": None, "beta": None, "peak": None, "why": "fewer than 2 points with KL > 0: nothing to fit"}
    alpha, beta = (x.item() for x in fit_gao(d, r, form))
    fitted = (gao_design(d, form) @ torch.tensor([alpha, beta], dtype=torch.float64))  # (K,)
    idx = torch.randint(P, (n_boot, P), generator=torch.Generator().manual_seed(seed))  # (n_boot, P) as bootstrap_ci
    r_boot = gain[idx].mean(1)  # (n_boot, K)
    d_boot = point_d(kl[idx].mean(1)) if kl.dim() == 2 else d.expand(n_boot, K)  # (n_boot, K)
    a_boot, b_boot = fit_gao(d_boot, r_boot, form)  # (n_boot,)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    se = (torch.quantile(r_boot, q[1], 0) - torch.quantile(r_boot, q[0], 0)) / (2 * 1.96)  # (K,) each point's standard error
    off = (d > 0) & (se > 0)  # the start (d = 0) is exact
    noise = se[off].mean().item()
    rms = (r - fitted).pow(2).mean().sqrt().item()
    chi2, dof = ((r - fitted)[off] / se[off]).pow(2).sum().item(), int(off.sum()) - 2
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2)).item() if dof > 0 else None
    out.update(alpha=alpha, beta=beta, alpha_ci=torch.quantile(a_boot, q).tolist(), beta_ci=torch.quantile(b_boot, q).tolist(),
               d=d.tolist(), gain=r.tolist(), fitted=fitted.tolist(), residuals=(r - fitted).tolist(), rms=rms,
               noise=noise, chi2=chi2, dof=dof, p_value=p_value, fits=None if p_value is None else p_value >= 0.05,
               d_max=d.max().item())
    peak, why = gao_peak(alpha, beta, form)
    peaks = [p for p in (gao_peak(a, b, form)[0] for a, b in zip(a_boot.tolist(), b_boot.tolist())) if p is not None]
    out["peak_share"] = len(peaks) / n_boot
    if peak is None:
        out.update(peak=None, why=why)
        return out
    out.update(peak=True, d_star=peak[0], r_star=peak[1], kl_star=peak[0] ** 2, beyond_range=peak[0] > d.max().item())
    if peaks:
        ps = torch.tensor(peaks, dtype=torch.float64)  # (n, 2)
        out.update(d_star_ci=torch.quantile(ps[:, 0], q).tolist(), r_star_ci=torch.quantile(ps[:, 1], q).tolist())
    return out


def describe_fit(name, fit):
    """One line of a fit for the console."""
    if fit.get("alpha") is None:
        return f"{name}: {fit['why']}"
    line = (f"{name}: {fit['formula']}, alpha {fit['alpha']:.4g} {fmt_ci(fit['alpha_ci'])} beta {fit['beta']:.4g} "
            f"{fmt_ci(fit['beta_ci'])} | rms residual {fit['rms']:.3g}, the points' standard error {fit['noise']:.3g}, "
            + (f"chi2 {fit['chi2']:.3g} on {fit['dof']} dof, p {fit['p_value']:.3g}: {'fits' if fit['fits'] else 'does NOT fit'}"
               if fit["fits"] is not None else "too few points to judge the fit"))
    if fit["peak"] is None:
        return line + f" | {fit['why']}"
    ci = lambda k: fmt_ci(fit[k]) if k in fit else ""  # noqa: E731
    return (line + f" | peak d* {fit['d_star']:.3g} {ci('d_star_ci')} (KL {fit['kl_star']:.3g}), R* {fit['r_star']:.3g} "
            f"{ci('r_star_ci')}{' (beyond the last point: extrapolated)' if fit['beyond_range'] else ''}")


# --- main


def setup(cfg):
    """evaluate()'s checks and loading, shared by the curves: every option and path error before a model
    loads, then (device, policy, tokenizer, prompts, n_cut, rm, gold, verifier), prompts repeated
    cfg.repeats times each, rm None without --reward_model, gold whether the world's gold reward is on."""
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    M.require(cfg, "ckpt", "prompts")
    M.check_paths(ckpt=cfg.ckpt, prompts=cfg.prompts, ref=cfg.ref, baseline=cfg.baseline, reward_model=cfg.reward_model)
    M.check_roles(ckpt=(cfg.ckpt, "policy"), ref=(cfg.ref, "policy"), baseline=(cfg.baseline, "policy"),
                  reward_model=(cfg.reward_model, "reward_model"))
    cfg.template = M.resolve_template(cfg.template, cfg.ckpt, cfg.ref, cfg.baseline, cfg.reward_model)
    from data.world import gold_on  # the built-in task's marker: its gold reward only on its own prompts
    gold = gold_on(cfg.gold, cfg.prompts)
    verifier = verifier_of(cfg.verifier, gold)
    if (cfg.dump_verified or cfg.dump_verified_pairs) and verifier is None:
        raise M.ConfigError("dump_verified and dump_verified_pairs need a checker: --verifier facts or arith")
    if cfg.pass_at_k and verifier is None:
        raise M.ConfigError("pass_at_k needs a checker of the answers: --verifier facts or arith")
    if cfg.pass_at_k < 0 or cfg.pass_at_k > cfg.pass_samples:
        raise M.ConfigError(f"pass_at_k {cfg.pass_at_k} with pass_samples {cfg.pass_samples}: the unbiased estimator "
                            f"(Chen et al. 2021) needs k <= n answers per question; raise --pass_samples")
    if cfg.prompt_stride < 1:
        raise M.ConfigError(f"prompt_stride {cfg.prompt_stride}: expected 1 (every prompt) or more")
    if cfg.baseline and not gold:  # the win rate is judged by the gold reward: without it --baseline would do nothing
        raise M.ConfigError(f"--baseline {cfg.baseline}: the win rate against it is judged by the built-in world's gold "
                            f"reward, which is off here (--gold {cfg.gold}, prompts {cfg.prompts}); drop --baseline")
    if cfg.max_new_tokens >= M.block_size_of(cfg.ckpt):
        raise M.ConfigError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the block_size "
                            f"{M.block_size_of(cfg.ckpt)} of {cfg.ckpt}")
    for key in ("dump", "dump_rankings", "dump_verified", "dump_verified_pairs", "out"):
        folder = os.path.dirname(getattr(cfg, key))
        if getattr(cfg, key) and folder and not os.path.isdir(folder):
            raise M.ConfigError(f"--{key} {getattr(cfg, key)}: the directory {folder} does not exist")
    device = M.get_device(cfg.device)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = M.load_gpt(cfg.ckpt, device)
    prompts = [r["prompt"] for r in M.read_jsonl(cfg.prompts, ("prompt",))][::cfg.prompt_stride]
    prompts = prompts[:cfg.n_prompts] if cfg.n_prompts else prompts
    prompts = [p for p in prompts for _ in range(cfg.repeats)]
    max_prompt = policy.config.block_size - cfg.max_new_tokens
    n_cut = sum(len(M.encode_chat(tokenizer, p, template=cfg.template)) > max_prompt for p in prompts)
    if n_cut:
        print(f"{n_cut} of {len(prompts)} prompts are longer than block_size - max_new_tokens = {max_prompt}: they keep their last tokens")
    rm = None
    if cfg.reward_model:
        rm, rm_tok, _ = M.load_checkpoint(cfg.reward_model, device, kind="scalar")
        if rm_tok.ranks != tokenizer.ranks:
            raise M.ConfigError(f"{cfg.reward_model} uses another tokenizer than {cfg.ckpt}")
    if cfg.best_of_n > 1 and rm is None:
        raise M.ConfigError("best_of_n > 1 needs --reward_model to pick the best answer")
    if cfg.dump_rankings and cfg.best_of_n < 2:
        raise M.ConfigError("dump_rankings needs best_of_n >= 2 answers per prompt to rank")
    return device, policy, tokenizer, prompts, n_cut, rm, gold, verifier


def sample_scored(policy, tokenizer, rm, prompts, n, cfg, device, gold):
    """evaluate()'s step 1 before the pick: n answers to each of the N prompts, in order (prompt i's answers
    at i * n ... i * n + n - 1). Returns (flat prompts, answers [(ids, ended)], texts, gold rows or None,
    reward-model scores (N, n) or None)."""
    flat = [p for p in prompts for _ in range(n)]
    answers = sample(policy, tokenizer, flat, cfg, device, cfg.seed)
    texts = [tokenizer.decode(a[0]) for a in answers]
    golds = gold_scores(flat, texts, [a[1] for a in answers]) if gold else None
    scores = None if rm is None else rm_scores(rm, tokenizer, flat, [a[0] for a in answers], cfg.batch_size, device,
                                               cfg.template).view(len(prompts), n)  # (N, n)
    return flat, answers, texts, golds, scores


def default_out(ckpt, name):
    """Where a summary goes without --out: `name` in the checkpoint's run directory (ckpt, or the run
    holding ckpt/), else in the working directory."""
    run_dir = os.path.dirname(ckpt.rstrip("/")) if os.path.basename(ckpt.rstrip("/")) == "ckpt" else ckpt
    return os.path.join(run_dir if os.path.isdir(run_dir) else ".", name)


def evaluate(cfg):
    device, policy, tokenizer, prompts, n_cut, rm, gold, verifier = setup(cfg)

    # 1. n answers per prompt; the reward model keeps the best (n = 1: the only one)
    n = cfg.best_of_n
    flat, answers, all_texts, all_gold, scores = sample_scored(policy, tokenizer, rm, prompts, n, cfg, device, gold)
    responses = [a[0] for a in answers]
    summary = {"ckpt": cfg.ckpt, "prompts": len(prompts) // cfg.repeats, "answers": len(prompts),
               "prompts_cut": n_cut // cfg.repeats, "best_of_n": n, "temperature": cfg.temperature}
    pp = {"prompt": prompts[::cfg.repeats]}  # per-prompt means, for intervals and for pooling seeds
    if rm is not None:
        if all_gold:  # how well the proxy tracks the truth on every sampled answer
            summary["rm_gold_spearman"] = spearman(scores.view(-1).tolist(), [g["gold"] for g in all_gold])
        pick = scores.argmax(-1)  # (N,)
        keep = [i * n + int(pick[i]) for i in range(len(prompts))]
        pp["rm_score"] = per_prompt(scores.gather(1, pick[:, None])[:, 0].tolist(), cfg.repeats)
        summary["rm_score"] = scores.gather(1, pick[:, None]).mean().item()
        summary["rm_score_ci"] = M.bootstrap_ci(pp["rm_score"])
        summary["rm_score_all"] = scores.mean().item()
    else:
        keep = list(range(len(prompts)))
    responses = [responses[i] for i in keep]
    ended = [answers[i][1] for i in keep]
    texts = [all_texts[i] for i in keep]
    summary["eos_rate"] = mean(ended)
    summary["resp_tokens"] = mean(len(r) for r in responses)
    if n > 1:  # the bound, and the exact KL of best-of-n over >= 4n samples of each prompt
        summary["kl_best_of_n_bound"] = math.log(n) - (n - 1) / n
        k = cfg.repeats * n  # every sample of a prompt so far; more are drawn if fewer than bon_kl_samples * n
        kl_scores, kl_answers = scores.view(-1, k).tolist(), [[tuple(a[0]) for a in answers[i:i + k]] for i in range(0, len(flat), k)]
        extra = max(0, cfg.bon_kl_samples - cfg.repeats) * n
        if extra:
            more_prompts = [p for p in prompts[::cfg.repeats] for _ in range(extra)]
            more = [a[0] for a in sample(policy, tokenizer, more_prompts, cfg, device, cfg.seed + 2)]
            more_scores = rm_scores(rm, tokenizer, more_prompts, more, cfg.batch_size, device).view(-1, extra).tolist()
            for i in range(len(kl_scores)):
                kl_scores[i] += more_scores[i]
                kl_answers[i] += [tuple(r) for r in more[i * extra:(i + 1) * extra]]
        kls = [best_of_n_kl(s, a, n) for s, a in zip(kl_scores, kl_answers)]
        summary["kl"], summary["kl_ci"], summary["bon_kl_m"] = mean(kls), M.bootstrap_ci(kls), len(kl_scores[0])

    # 2. gold reward and its parts
    gold = [all_gold[i] for i in keep] if all_gold else None
    if gold:
        for k in gold[0]:
            summary[k] = mean(g[k] for g in gold)
        pp["gold"] = per_prompt([g["gold"] for g in gold], cfg.repeats)
        summary["gold_ci"] = M.bootstrap_ci(pp["gold"])

    if verifier is not None:  # the checker's accuracy (the world's fact questions, or data/arith.py's sums)
        acc = verified_accuracy(prompts, texts, ended, cfg.repeats, *verifier)
        if "_by_prompt" in acc:
            pp[f"{verifier[1]}_acc"] = acc.pop("_by_prompt")
        summary.update(acc)

    # 3. KL to the reference, sampled: E_pi [log pi(y) - log pi_ref(y)] per sequence (best-of-n picks are
    # not samples of the policy: their KL is the analytic kl_best_of_n above)
    if cfg.ref and n == 1 and cfg.temperature == 0:
        print("--ref: no KL at temperature 0 (greedy answers are not samples of a distribution)")
    if cfg.ref and n == 1 and cfg.temperature > 0:
        ref, ref_tok = M.load_gpt(cfg.ref, device)
        if ref_tok.ranks != tokenizer.ranks:
            raise M.ConfigError(f"{cfg.ref} uses another tokenizer than {cfg.ckpt}")
        lp = logprob_sums(policy, tokenizer, prompts, responses, cfg, device)
        lp_ref = logprob_sums(ref, tokenizer, prompts, responses, cfg, device)
        summary["kl"] = (lp - lp_ref).mean().item()
        pp["kl"] = per_prompt((lp - lp_ref).tolist(), cfg.repeats)
        summary["kl_ci"] = M.bootstrap_ci(pp["kl"])
        del ref

    # 4. gold win rate against the baseline, one answer each, ties half
    if cfg.baseline and gold:
        base, _ = M.load_gpt(cfg.baseline, device)
        base_ans = sample(base, tokenizer, prompts, cfg, device, cfg.seed + 1)
        base_gold = gold_scores(prompts, [tokenizer.decode(a[0]) for a in base_ans], [a[1] for a in base_ans])
        wins = [1.0 if g["gold"] > b["gold"] else 0.5 if g["gold"] == b["gold"] else 0.0 for g, b in zip(gold, base_gold)]
        summary["win_rate"] = mean(wins)
        pp["win"] = per_prompt(wins, cfg.repeats)
        summary["win_rate_ci"] = M.bootstrap_ci(pp["win"])
        summary["baseline_gold"] = mean(b["gold"] for b in base_gold)
        # the length-controlled win rate: the win rate the fit predicts at zero length difference
        len_diff = [len(r) - len(b[0]) for r, b in zip(responses, base_ans)]  # tokens, EOS counted
        lc, lc_ci, coef, coef_ci, sd = length_controlled_win_rate(wins, len_diff, cfg.repeats)
        summary.update(win_rate_lc=lc, win_rate_lc_ci=lc_ci, win_rate_lc_coef=coef, win_rate_lc_coef_ci=coef_ci, len_diff=mean(len_diff),
                       len_diff_sd=sd, baseline_resp_tokens=mean(len(b[0]) for b in base_ans))

    # 4b. pass@k on the checker's questions: n answers each, pass@k by Chen et al.'s unbiased estimator
    if cfg.pass_at_k:
        verify = verifier[0]
        questions = [p for p in prompts[::cfg.repeats] if verify(p, "") is not None]
        n = cfg.pass_samples
        if not questions:
            raise M.ConfigError(f"pass_at_k: none of the prompts of {cfg.prompts} is one of the checker's questions")
        flat_q = [q for q in questions for _ in range(n)]
        q_answers = sample(policy, tokenizer, flat_q, cfg, device, cfg.seed + 3)
        ok = [bool(e) and verify(q, tokenizer.decode(r)) == 1.0 for q, (r, e) in zip(flat_q, q_answers)]  # cut = wrong
        correct = [sum(ok[i * n:(i + 1) * n]) for i in range(len(questions))]
        for k in pass_ks(cfg.pass_at_k):
            values = [pass_at_k(n, c, k) for c in correct]
            summary[f"pass_at_{k}"], summary[f"pass_at_{k}_ci"] = mean(values), M.bootstrap_ci(values)
        summary.update(pass_samples=n, pass_questions=len(questions))
        summary["pass_per_question"] = {"prompt": questions, "correct": correct, "n": n}
        print(f"pass@k over {len(questions)} questions, {n} answers each: " + " | ".join(
            f"k={k} {summary[f'pass_at_{k}']:.3f} {fmt_ci(summary[f'pass_at_{k}_ci'])}" for k in pass_ks(cfg.pass_at_k)))

    # 5. a table of answers, the dump, the summary
    for p, t, e, g in list(zip(prompts, texts, ended, gold or [None] * len(prompts)))[:cfg.n_show]:
        tag = f"gold {g['gold']:+.2f}" if g else ""
        print(f"> {p}\n  {t!r}{'' if e else ' [no EOS]'} {tag}")
    if cfg.dump:
        keep_rows = [(p, t.strip()) for p, t, e in zip(prompts, texts, ended) if e and t.strip()]
        with open(cfg.dump + ".tmp", "w") as f:  # renamed when complete: a kill never leaves half a dump
            # an answer cut at the length cap would teach the model not to stop; an empty one is no SFT target
            f.writelines(json.dumps({"prompt": p, "response": t}) + "\n" for p, t in keep_rows)
        os.replace(cfg.dump + ".tmp", cfg.dump)
        summary["dumped"] = len(keep_rows)
        summary["dump_skipped_no_eos"] = len(ended) - sum(ended)
        summary["dump_skipped_empty"] = sum(bool(e) and not t.strip() for t, e in zip(texts, ended))
        print(f"--dump: {len(keep_rows)} answers written to {cfg.dump}; left out: {summary['dump_skipped_no_eos']} "
              f"without EOS, {summary['dump_skipped_empty']} empty")
    if cfg.dump_verified or cfg.dump_verified_pairs:
        rows, pairs = verified_dumps(prompts, texts, ended, verifier[0])
        for path, data, key in ((cfg.dump_verified, rows, "verified_dumped"), (cfg.dump_verified_pairs, pairs, "pairs_dumped")):
            if path:
                with open(path + ".tmp", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in data)
                os.replace(path + ".tmp", path)
                summary[key] = len(data)
                print(f"--{'dump_verified' if key == 'verified_dumped' else 'dump_verified_pairs'}: {len(data)} rows "
                      f"written to {path}")
    if cfg.dump_rankings:
        rows, summary["rankings_skipped"] = rm_rankings(prompts, all_texts, scores)
        with open(cfg.dump_rankings, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        summary["rankings_dumped"] = len(rows)
    summary["per_prompt"] = pp
    out = cfg.out or default_out(cfg.ckpt, "eval.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {fmt_ci(v)}" if k.endswith("_ci") else f"{k} {v}"
                     for k, v in summary.items() if k not in ("per_prompt", "pass_per_question")))
    return summary


def fmt_ci(ci):
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def paths_in_order(patterns):
    """The files of comma-separated globs, in the order given (each pattern's matches sorted), each once."""
    return list(dict.fromkeys(p for pattern in patterns.split(",") for p in sorted(glob.glob(pattern.strip()))))


def pool(cfg):
    """One method over several seeds: each prompt's value averaged over the runs, then the mean over
    prompts with its bootstrap interval; the per-run means show the spread between seeds."""
    paths = paths_in_order(cfg.pool)  # so the per-run values read as the seeds named
    runs = [json.load(open(p)) for p in paths]
    if not runs or any(r["per_prompt"]["prompt"] != runs[0]["per_prompt"]["prompt"] for r in runs):
        raise M.ConfigError(f"--pool {cfg.pool!r}: needs eval JSONs of the same prompts ({len(runs)} found)")
    out = {"runs": paths}
    for key, name in (("gold", "gold"), ("win", "win_rate"), ("kl", "kl"), ("fact_acc", "fact_acc")):  # fact_acc: one value per fact question
        if all(key in r["per_prompt"] for r in runs):
            by_prompt = [mean(vals) for vals in zip(*(r["per_prompt"][key] for r in runs))]
            out[name], out[f"{name}_ci"] = mean(by_prompt), M.bootstrap_ci(by_prompt)
            out[f"{name}_per_run"] = [mean(r["per_prompt"][key]) for r in runs]
    print(f"{len(runs)} runs: " + " | ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {fmt_ci(v)}" if k.endswith("_ci") else
        f"{k} {' '.join(format(x, '.3f') for x in v)}" for k, v in out.items() if k != "runs"))
    return out


def curve(cfg):
    """--curve RUN: an RL run as a curve (Gao et al. 2022, Figure 1's RL curves). The start (--ref, by default
    the run's policy) and each snapshot of RUN/snapshots (ppo.py, grpo.py eval_snapshot_interval) are evaluated
    by evaluate() on the same prompts and sampling seed: gold, reward-model score and the sampled KL to the
    start, each with its interval over prompts, and the gold gain over the start (per prompt, so its interval is
    paired). Each point's summary goes to <out>.it<N>.json; the curve, with the RL form's fit (gao_fit) of gold
    gain against d = sqrt(KL), to --out (default RUN/curve.json) and a plot beside it. RUN may name several run
    directories of one trajectory (curve_runs): a run, and a rerun of it with snapshots more often early on."""
    runs = [r.strip().rstrip("/") for r in cfg.curve.split(",")]
    run = ",".join(runs)
    train, snaps = curve_runs(runs)
    ref, rm = cfg.ref or train.get("policy", ""), cfg.reward_model or train.get("reward_model", "")
    if not ref or not rm or "," in rm:
        raise M.ConfigError(f"--curve {run}: needs the start (--ref, the run's policy {ref!r}) and one reward model "
                            f"(--reward_model, the run's {rm!r}; an ensemble's proxy needs one member named)")
    if cfg.temperature <= 0:
        raise M.ConfigError("--curve: the KL to the start is sampled, so it needs temperature > 0")
    out = cfg.out or os.path.join(runs[0], "curve.json")
    stem = os.path.splitext(out)[0]
    summaries = []
    for it, path in [(0, ref)] + snaps:  # the start first: KL 0, gain 0
        print(f"--- curve point: iteration {it}, {path}")
        point = dataclasses.replace(cfg, ckpt=path, ref=ref, reward_model=rm, best_of_n=1, curve="", out=f"{stem}.it{it}.json")
        summaries.append((it, path, evaluate(point)))
    if "gold" not in summaries[0][2]:
        raise M.ConfigError(f"--curve: the prompts {cfg.prompts} have no gold reward (the built-in world's prompts do)")
    gold = torch.tensor([s["per_prompt"]["gold"] for _, _, s in summaries], dtype=torch.float64).T  # (P, K)
    kl = torch.tensor([s["per_prompt"]["kl"] for _, _, s in summaries], dtype=torch.float64).T  # (P, K)
    gain = gold - gold[:, :1]  # (P, K) gold over the start's, prompt by prompt
    rows = [{"iteration": it, "episodes": it * train.get("rollout_batch_size", 0), "ckpt": path,
             "sqrt_kl": math.sqrt(max(s["kl"], 0.0)), "gold_gain": gain[:, k].mean().item(),
             "gold_gain_ci": M.bootstrap_ci(gain[:, k].tolist()), "eval": f"{stem}.it{it}.json",
             **{key: s[key] for key in ("kl", "kl_ci", "gold", "gold_ci", "rm_score", "rm_score_ci", "eos_rate", "resp_tokens")}}
            for k, (it, path, s) in enumerate(summaries)]
    fit = gao_fit(gain, kl, "rl")
    result = {"run": run, "ref": ref, "reward_model": rm, "prompts": cfg.prompts, "rows": rows, "fit_rl": fit,
              "per_prompt": {"prompt": summaries[0][2]["per_prompt"]["prompt"], "gold": gold.T.tolist(), "kl": kl.T.tolist()}}
    return write_curve(result, rows, "iteration", [("fit_rl", fit)], out, f"RL curve: {run}")


def curve_runs(runs):
    """(the first run's config, [(iteration, snapshot dir)]) of one or more run directories that are one
    trajectory: a run and a rerun of it with snapshots at other iterations (a deterministic run repeats
    bit for bit). Their configs must agree but for the run-directory keys and the intervals; an iteration
    that several runs hold must have the same weights in each, or they are not one trajectory."""
    configs, snaps = [], {}
    for run in runs:
        found = M.list_snapshots(run)
        if not found:
            raise M.ConfigError(f"--curve {run}: no snapshots in {run}/snapshots (train with --eval_snapshot_interval N)")
        with open(os.path.join(run, "config.json")) as f:
            configs.append(json.load(f))
        for it, path in found:
            if it in snaps:
                a, b = (M.load_checkpoint(p)[0].state_dict() for p in (snaps[it], path))
                if any(not torch.equal(a[k], b[k]) for k in a):
                    raise M.ConfigError(f"--curve: {snaps[it]} and {path} differ: the runs are not one trajectory")
            snaps.setdefault(it, path)
    skip = M.RUN_KEYS | {"n_show", "device"}
    differ = sorted({k for c in configs[1:] for k in set(c) | set(configs[0])
                     if k not in skip and not k.endswith("_interval") and c.get(k) != configs[0].get(k)})
    if differ:
        raise M.ConfigError(f"--curve {','.join(runs)}: the runs differ in {', '.join(differ)}: not one trajectory")
    return configs[0], sorted(snaps.items())


def bon_curve(cfg):
    """--bon_curve n_max: best-of-n as a curve over n = 1, 2, 4, ..., n_max (Gao et al. 2022, Figure 1's BoN
    curves) from ONE pool of --bon_pool answers per prompt of --ckpt, drawn and scored by evaluate()'s step 1:
    the expected gold and reward-model score of the best-of-n pick exact over each prompt's pool
    (best_of_n_expected), KL the analytic log n - (n - 1) / n (an upper bound: Beirami et al. 2024) and,
    beside it, kl_pool, Beirami et al.'s exact KL over the pool (it saturates at log bon_pool), the gold gain
    over n = 1 (the policy itself) with intervals over prompts, and the best-of-n form's fit (gao_fit) of gain
    against d = sqrt(analytic KL) over n <= bon_pool: for n beyond the pool (rows beyond_pool) the pick is
    nearly always the pool's top answer, so the curve flattens while the analytic KL grows, an artefact of
    the pool, not of the policy. To --out (default bon_curve.json in the checkpoint's run directory), a plot beside it."""
    if not cfg.reward_model:
        raise M.ConfigError("--bon_curve needs --reward_model: it picks the best of n")
    if cfg.bon_pool < 1 or cfg.repeats != 1 or cfg.best_of_n != 1:
        raise M.ConfigError(f"--bon_curve: bon_pool {cfg.bon_pool} must be >= 1, and repeats and best_of_n are 1 "
                            f"(the pool is each prompt's answers)")
    device, policy, tokenizer, prompts, n_cut, rm, gold, _ = setup(cfg)
    if not gold:
        raise M.ConfigError(f"--bon_curve: the prompts {cfg.prompts} have no gold reward (the built-in world's prompts do)")
    t0 = time.time()
    _, answers, _, golds, scores = sample_scored(policy, tokenizer, rm, prompts, cfg.bon_pool, cfg, device, gold)
    seconds = time.time() - t0
    gold_t = torch.tensor([g["gold"] for g in golds], dtype=torch.float64).view(len(prompts), cfg.bon_pool)  # (P, N)
    ns = pass_ks(cfg.bon_curve)
    e_gold = torch.stack([best_of_n_expected(scores, gold_t, n) for n in ns], 1)  # (P, K)
    e_proxy = torch.stack([best_of_n_expected(scores, scores, n) for n in ns], 1)  # (P, K)
    gain = e_gold - gold_t.mean(1, keepdim=True)  # (P, K) over the policy's own mean gold (n = 1)
    kl = torch.tensor([best_of_n_kl_bound(n) for n in ns], dtype=torch.float64)  # (K,)
    pool_scores = scores.tolist()
    rows = [{"n": n, "kl": kl[k].item(), "sqrt_kl": kl[k].sqrt().item(),
             "kl_pool": mean(best_of_n_kl(p, p, n) for p in pool_scores),  # answers tied in score: one level, as above
             "gold": e_gold[:, k].mean().item(), "gold_ci": M.bootstrap_ci(e_gold[:, k].tolist()),
             "gold_gain": gain[:, k].mean().item(), "gold_gain_ci": M.bootstrap_ci(gain[:, k].tolist()),
             "rm_score": e_proxy[:, k].mean().item(), "rm_score_ci": M.bootstrap_ci(e_proxy[:, k].tolist()),
             "beyond_pool": n > cfg.bon_pool}
            for k, n in enumerate(ns)]
    fitted = [k for k, n in enumerate(ns) if n <= cfg.bon_pool]  # beyond the pool every pick is near its top answer
    fit = {**gao_fit(gain[:, fitted], kl[fitted], "bon"), "n_max": ns[fitted[-1]]}
    result = {"ckpt": cfg.ckpt, "reward_model": cfg.reward_model, "prompts": cfg.prompts, "n_prompts": len(prompts),
              "prompts_cut": n_cut, "bon_pool": cfg.bon_pool, "temperature": cfg.temperature, "seconds_sampling": seconds,
              "eos_rate": mean(a[1] for a in answers), "rows": rows, "fit_bon": fit,
              "per_prompt": {"prompt": prompts, "gold": e_gold.T.tolist(), "rm_score": e_proxy.T.tolist()}}
    out = cfg.out or default_out(cfg.ckpt, "bon_curve.json")
    print(f"pool: {cfg.bon_pool} answers to each of {len(prompts)} prompts, sampled and scored in {seconds:.0f} s")
    return write_curve(result, rows, "n", [("fit_bon", fit)], out, f"best-of-n: {cfg.ckpt}, pool of {cfg.bon_pool}")


def write_curve(result, rows, x, fits, out, title):
    """Print a curve's table and fits, write its JSON to out and its plot (plot_curve) to out's .png."""
    print(f"{x:>9s} {'KL':>7s} {'sqrt KL':>7s} {'gold':>7s} {'gold gain':>9s} {'interval':>16s} {'RM score':>8s}")
    for r in rows:
        print(f"{r[x]:9d} {r['kl']:7.3f} {r['sqrt_kl']:7.3f} {r['gold']:7.3f} {r['gold_gain']:9.3f} "
              f"{fmt_ci(r['gold_gain_ci']):>16s} {r['rm_score']:8.3f}")
    for name, fit in fits:
        print(describe_fit(name, fit))
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"curve written to {out}")
    plot_curve(rows, fits, os.path.splitext(out)[0] + ".png", title)
    return result


def plot_curve(rows, fits, path, title):
    """Gold gain against sqrt(KL), the points with their intervals and each fitted form over them, its peak
    marked; matplotlib is optional (the printed table and the JSON are the result)."""
    plt = pyplot_or_none("no plot (the table and the JSON are the curve)")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    d = [r["sqrt_kl"] for r in rows]
    for beyond in (False, True):  # best-of-n beyond its pool: drawn hollow, not fitted
        pts = [r for r in rows if r.get("beyond_pool", False) == beyond]
        if pts:
            g = [r["gold_gain"] for r in pts]
            err = [[gg - r["gold_gain_ci"][0] for gg, r in zip(g, pts)], [r["gold_gain_ci"][1] - gg for gg, r in zip(g, pts)]]
            ax.errorbar([r["sqrt_kl"] for r in pts], g, yerr=err, fmt="o", capsize=3, color="C0", mfc="none" if beyond else "C0",
                        label="n beyond the pool (not fitted)" if beyond else "measured (95% interval over prompts)")
    for name, fit in fits:
        if fit.get("alpha") is None:
            continue
        top = max(d + ([fit["d_star"]] if fit["peak"] and not fit["beyond_range"] else []))
        xs = torch.linspace(0, top * 1.05, 200, dtype=torch.float64)
        ys = gao_design(xs, fit["form"]) @ torch.tensor([fit["alpha"], fit["beta"]], dtype=torch.float64)
        ax.plot(xs.tolist(), ys.tolist(), color="C1", label=f"{fit['formula']}: alpha {fit['alpha']:.3g}, beta {fit['beta']:.3g}")
        if fit["peak"] and not fit["beyond_range"]:
            ax.axvline(fit["d_star"], linestyle="--", color="grey", label=f"d* {fit['d_star']:.3g}, R* {fit['r_star']:.3g}")
    ax.set_xlabel("d = sqrt(KL to the start), sqrt(nats)")
    ax.set_ylabel("gold gain over the start")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, path)


def pyplot_or_none(instead):
    """matplotlib.pyplot for a file plot (matplotlib is an optional extra), or None after saying what stands instead."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {instead}")
        return None
    return plt


def save_figure(plt, fig, path):
    """Lay out, write (120 dpi) and close a figure, and say where it went."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def method_of(summary):
    """The curve a run belongs to, from its checkpoint path and best-of-n."""
    if summary.get("best_of_n", 1) > 1:
        return "best-of-n"
    name = os.path.basename(summary["ckpt"].rstrip("/").removesuffix("/ckpt"))
    name = re.sub(r"_seed\d+$", "", name)  # sweep.sh's seeds of a run are the same method
    return next((m for m in ("ppo", "dpo", "sft") if m in name), name)


def frontier(cfg):
    """Gold reward against KL to SFT for every run (the DPO paper's Figure 2, on our task)."""
    paths = sorted({p for pattern in cfg.frontier.split(",") for p in glob.glob(pattern.strip())})
    rows = []
    for path in paths:
        r = json.load(open(path))
        kl = r.get("kl", r.get("kl_best_of_n"))  # best-of-n: its sampled KL (older summaries: the bound)
        if kl is not None and "gold" in r:
            rows.append((method_of(r), kl, r["gold"], r.get("win_rate"), path))
    rows.sort()
    print(f"{'method':10s} {'KL to SFT':>10s} {'gold':>8s} {'win rate':>9s}  run")
    for m, kl, g, w, path in rows:
        print(f"{m:10s} {kl:10.3f} {g:8.3f} {'-' if w is None else format(w, '.3f'):>9}  {path}")
    plt = pyplot_or_none("the table above is the frontier (pip install matplotlib for the plot)")
    if plt is None:
        return rows
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, m in enumerate(sorted({r[0] for r in rows})):
        pts = sorted((kl, g) for mm, kl, g, _, _ in rows if mm == m)
        marker = "osD^v<>ph*Xd"[i % 12]  # colours repeat after ten methods; markers tell them apart
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-" if len(pts) > 1 else "", label=m)
    ax.set_xscale("symlog", linthresh=1.0)  # linear below 1 nat, logarithmic above: runs far from SFT stay on the chart
    ax.set_xlabel("KL(policy || SFT), nats per answer (symlog)")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, cfg.plot)
    return rows


def pass_curves(cfg):
    """pass@k against k for several runs' eval JSONs (each from --pass_at_k): a table, and one plot."""
    paths = paths_in_order(cfg.pass_curves)
    runs = [(path, json.load(open(path))) for path in paths]
    missing = [path for path, r in runs if "pass_at_1" not in r]
    if not runs or missing:
        raise M.ConfigError(f"--pass_curves {cfg.pass_curves!r}: needs eval JSONs written with --pass_at_k"
                            + (f"; without pass@k: {', '.join(missing)}" if missing else " (none found)"))
    ks = sorted({int(key[len("pass_at_"):]) for _, r in runs for key in r if re.fullmatch(r"pass_at_\d+", key)})
    print(f"{'run':40s} " + " ".join(f"{'k=' + str(k):>21s}" for k in ks))
    for path, r in runs:
        cells = [f"{r[f'pass_at_{k}']:.3f} {fmt_ci(r[f'pass_at_{k}_ci'])}" if f"pass_at_{k}" in r else "-" for k in ks]
        print(f"{path:40s} " + " ".join(f"{c:>21s}" for c in cells))
    plt = pyplot_or_none("the table above is the curve (pip install matplotlib for the plot)")
    if plt is None:
        return runs
    fig, ax = plt.subplots(figsize=(6, 4))
    for path, r in runs:
        k_run = [k for k in ks if f"pass_at_{k}" in r]
        v = [r[f"pass_at_{k}"] for k in k_run]
        err = [[x - r[f"pass_at_{k}_ci"][0] for x, k in zip(v, k_run)], [r[f"pass_at_{k}_ci"][1] - x for x, k in zip(v, k_run)]]
        ax.errorbar(k_run, v, yerr=err, marker="o", capsize=3, label=os.path.basename(path).removesuffix(".json"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (answers drawn per question)")
    ax.set_ylabel(f"pass@k, {runs[0][1]['pass_questions']} held-out fact questions")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(plt, fig, cfg.plot)
    return runs


def reward_run(reward_model):
    """The reward.py run directory of a reward model named by its run or its checkpoint directory."""
    run = os.path.normpath(reward_model)
    return run if os.path.exists(os.path.join(run, "data_stats.json")) else os.path.dirname(run)


def proxy_of(run):
    """A reward model (its reward.py run directory) as the proxy of Gao et al.'s Figures 2-3: its trunk,
    parameters, training rankings (data_stats.json) and its last held-out ranking accuracy (metrics.jsonl)."""
    model, _, _ = M.load_checkpoint(run)
    stats_path = os.path.join(run, "data_stats.json")
    if not os.path.exists(stats_path):
        raise M.ConfigError(f"--proxy_table: {stats_path} is missing (reward.py writes it): is {run} a reward.py run?")
    with open(stats_path) as f:
        stats = json.load(f)["train"]
    val = [r["val_acc"] for r in M.read_metrics(os.path.join(run, "metrics.jsonl")) if "val_acc" in r]
    return {"reward_model": run, "trunk": f"{model.config.n_layer}x{model.config.n_embd}",
            "params": sum(p.numel() for p in model.parameters()), "rankings": stats["rows"],
            "val_acc": val[-1] if val else None}


def rl_reward_model(summary, path):
    """The one reward model an RL run's eval summary was trained against, from its checkpoint's training config."""
    rm = M.checkpoint_info(summary["ckpt"])["train"].get("reward_model", "")
    if not rm or "," in rm:
        raise M.ConfigError(f"--proxy_table: {path} evaluates {summary['ckpt']}, trained against {rm!r}, not one reward model")
    return rm


def proxy_table(cfg):
    """Gao et al. 2022's Figures 2-3 on our proxies: per reward model, its size, data and accuracy beside its
    best-of-n fit (from --bon_curve JSONs) and the end points of the RL runs trained against it (eval JSONs)."""
    paths = paths_in_order(cfg.proxy_table)
    if not paths:
        raise M.ConfigError(f"--proxy_table {cfg.proxy_table!r}: no files match")
    rows = {}  # reward model (its run directory) -> row

    def row_of(rm):  # each reward model's checkpoint is loaded once, at its first mention
        run = reward_run(rm)
        if run not in rows:
            rows[run] = {**proxy_of(run), "bon": None, "rl": []}
        return rows[run]

    for path in paths:
        with open(path) as f:
            r = json.load(f)
        if "fit_bon" in r:
            row_of(r["reward_model"])["bon"] = {"path": path, **r["fit_bon"]}
        elif "gold" in r and "kl" in r and r.get("ckpt"):
            row_of(rl_reward_model(r, path))["rl"].append({"path": path, "win_rate": r.get("win_rate"),
                                                           **{k: r[k] for k in ("gold", "gold_ci", "kl", "kl_ci")}})
        else:
            raise M.ConfigError(f"--proxy_table: {path} is neither a --bon_curve JSON nor an eval summary with gold and KL")
    table = sorted(rows.values(), key=lambda x: (-x["rankings"], x["params"]))
    ci = lambda fit, k: fmt_ci(fit[k]) if fit and k in fit else "-"  # noqa: E731
    num = lambda fit, k: format(fit[k], ".3f") if fit and fit.get(k) is not None else "-"  # noqa: E731
    print(f"{'trunk':>7s} {'params':>8s} {'rankings':>8s} {'val_acc':>7s} | best-of-n: {'alpha':>6s} {'interval':>16s} "
          f"{'beta':>6s} {'interval':>16s} {'d*':>6s} {'interval':>16s} {'R*':>6s} {'interval':>16s} {'p':>6s} | RL: gold, KL, win rate")
    for x in table:
        b = x["bon"]
        rl = "; ".join(f"{e['gold']:.3f} {fmt_ci(e['gold_ci'])} at {e['kl']:.2f}"
                       + (f", win {e['win_rate']:.3f}" if e["win_rate"] is not None else "") for e in x["rl"]) or "-"
        print(f"{x['trunk']:>7s} {x['params']:8d} {x['rankings']:8d} {num(x, 'val_acc'):>7s} | {'':10s} {num(b, 'alpha'):>6s} "
              f"{ci(b, 'alpha_ci'):>16s} {num(b, 'beta'):>6s} {ci(b, 'beta_ci'):>16s} {num(b, 'd_star'):>6s} {ci(b, 'd_star_ci'):>16s} "
              f"{num(b, 'r_star'):>6s} {ci(b, 'r_star_ci'):>16s} {num(b, 'p_value'):>6s} | RL: {rl}")
    plot_proxy_table(table, cfg.plot)
    return table


def plot_proxy_table(table, path):
    """The proxy's accuracy, R*, d* (best-of-n fit) and the RL run's end gold against the proxy's parameters, one line
    per amount of data."""
    plt = pyplot_or_none("the table above is the result (pip install matplotlib for the plot)")
    if plt is None:
        return

    def bon(key):  # a best-of-n peak value and its interval, or None (no curve, or no peak)
        return lambda x: (x["bon"][key], x["bon"].get(key + "_ci")) if x["bon"] and x["bon"].get(key) is not None else None

    def rl_gold(x):  # the first RL run's end gold and its interval, or None
        return (x["rl"][0]["gold"], x["rl"][0]["gold_ci"]) if x["rl"] else None

    panels = [("held-out ranking accuracy (val_acc)", lambda x: (x["val_acc"], None) if x["val_acc"] is not None else None),
              ("R* (best-of-n peak gold gain)", bon("r_star")), ("d* (best-of-n peak sqrt KL)", bon("d_star")),
              ("RL end gold", rl_gold)]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    for ax, (label, value) in zip(axes, panels):
        for i, n in enumerate(sorted({x["rankings"] for x in table}, reverse=True)):
            pts = [(x["params"], *value(x)) for x in table if x["rankings"] == n and value(x) is not None]  # (params, v, ci)
            if pts:
                # a percentile interval of a fitted peak can miss its point estimate: no negative bar
                err = [[max(v - c[0], 0) if c else 0 for _, v, c in pts], [max(c[1] - v, 0) if c else 0 for _, v, c in pts]]
                ax.errorbar([p for p, _, _ in pts], [v for _, v, _ in pts], yerr=err, marker="osD^"[i % 4], capsize=3,
                            label=f"{n} training rankings")
        ax.set_xscale("log")
        ax.set_xlabel("reward model parameters")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(plt, fig, path)


if __name__ == "__main__":
    M.main(lambda cfg: frontier(cfg) if cfg.frontier else pool(cfg) if cfg.pool else curve(cfg) if cfg.curve
           else bon_curve(cfg) if cfg.bon_curve else pass_curves(cfg) if cfg.pass_curves
           else proxy_table(cfg) if cfg.proxy_table else evaluate(cfg), Config)
