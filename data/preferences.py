"""
data/preferences.py: preference data for the built-in task, labelled by simulated noisy labelers.

For each prompt, K answers (K uniform in [k_min, k_max], InstructGPT's 4 to 9) are sampled from the
SFT policy and scored by the gold reward g. A labeler ranks them by noisy utilities
u_i = g_i / temperature + Gumbel noise (Plackett-Luce). For any two answers in such a ranking,
P(a ranked above b) = sigmoid((g_a - g_b) / temperature): exactly the Bradley-Terry model, since the
difference of two Gumbels is logistic. Real labelers disagree; so do ours.

Noise ceiling: the best pairwise accuracy any model can expect on these labels is that of the
Bayes predictor, which always picks the answer with the higher gold reward:
  ceiling = mean over pairs of max(p, 1 - p),  p = sigmoid((g_a - g_b) / temperature).
Its realised counterpart, gold_agreement, is how often the gold order agrees with the labels that
were actually drawn (ties count half), with a 95% bootstrap interval over rankings: what a model
that knew the gold reward would score on this very validation set.
Answers cut at the length cap (no EOS) are left out and counted: the reward model only ever scores
answers that end with EOS (ppo.py gives the others a fixed penalty). The empty answer (EOS at once)
is kept and ranked like any other: a policy can emit it, so the reward model must be told what it
is worth (gold about -0.8). Left out, it was never seen in training, the reward model scored it
above every SFT answer, and PPO learned to answer nothing. Duplicate answers to one prompt are
merged; a prompt left with fewer than 2 distinct answers is skipped and counted.

Writes to out_dir: prefs_rankings_{train,val}.jsonl ({"prompt", "responses": [best, ..., worst]}),
prefs_pairs_{train,val}.jsonl (every pair of every ranking: {"prompt", "chosen", "rejected"}),
prefs_stats.json (counts, noise ceiling, gold agreement). Train rankings come from the training prompts, val
rankings from the held-out prompts.

Run:  python data/preferences.py --policy out/sft --out_dir data/world
"""

import json
import math
import os
import random
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from data.world import gold_reward  # noqa: E402


@dataclass
class Config:
    policy: str = "out/sft"  # the SFT checkpoint whose samples get ranked
    prompts_train: str = "data/world/prompts_train.jsonl"  # training prompts whose SFT answers get ranked
    prompts_val: str = "data/world/prompts_val.jsonl"  # held-out prompts, ranked the same way
    out_dir: str = "data/world"  # where prefs_* files and prefs_stats.json go
    rounds_train: int = 2  # rankings per training prompt
    rounds_val: int = 1  # rankings per held-out prompt
    k_min: int = 4  # fewest answers per ranking
    k_max: int = 9  # most answers per ranking
    temperature: float = 0.5  # labeler noise: P(a > b) = sigmoid((g_a - g_b) / temperature)
    sample_temperature: float = 1.0  # temperature of the SFT samples
    max_new_tokens: int = 64  # length cap of the sampled answers
    batch_size: int = 128  # prompts per sampling batch
    seed: int = 0  # seeds sampling and the labelers' noise
    device: str = "auto"  # auto = cuda, then mps, then cpu


def sample_answers(model, tokenizer, prompts, cfg, gen):
    """One sampled answer per prompt: (text without EOS, ended)."""
    answers = M.sample_answers(model, tokenizer, prompts, cfg.max_new_tokens, cfg.sample_temperature, cfg.batch_size, gen)
    return [(tokenizer.decode(resp).strip(), ended) for resp, ended in answers]


def rank(prompt, answers, temperature, rng):
    """Plackett-Luce ranking of distinct answers by g / temperature + Gumbel noise, best first,
    with each answer's gold reward."""
    golds = {a: gold_reward(prompt, a, True)["gold"] for a in answers}
    noisy = {a: golds[a] / temperature - math.log(-math.log(rng.random() or 1e-12)) for a in answers}
    order = sorted(answers, key=lambda a: -noisy[a])
    return order, [golds[a] for a in order]


def noise_ceiling(golds_per_ranking, temperature):
    """Expected accuracy of the Bayes predictor over all pairs of all rankings."""
    accs = []
    for g in golds_per_ranking:
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                p = 1 / (1 + math.exp(-(g[i] - g[j]) / temperature))
                accs.append(max(p, 1 - p))
    return sum(accs) / len(accs)


def gold_agreement(golds_per_ranking):
    """Per ranking (golds listed best to worst by the labeler): the fraction of its pairs whose gold
    order agrees with the label (ties half), and its number of pairs."""
    agree, pairs = [], []
    for g in golds_per_ranking:
        hits = [1.0 if g[i] > g[j] else 0.5 if g[i] == g[j] else 0.0 for i in range(len(g)) for j in range(i + 1, len(g))]
        agree.append(sum(hits) / len(hits))
        pairs.append(len(hits))
    return agree, pairs


def build_split(model, tokenizer, prompts, rounds, cfg, rng, gen):
    jobs = [(p, rng.randint(cfg.k_min, cfg.k_max)) for _ in range(rounds) for p in prompts]
    flat = [p for p, k in jobs for _ in range(k)]
    answers = sample_answers(model, tokenizer, flat, cfg, gen)
    rankings, golds, i = [], [], 0
    stats = {"sampled": len(flat), "no_eos_dropped": 0, "empty_ranked": 0, "prompts_skipped": 0}
    for p, k in jobs:
        group = answers[i:i + k]
        i += k
        ended = list(dict.fromkeys(a for a, e in group if e))  # distinct, in sampling order; "" is the empty answer
        stats["no_eos_dropped"] += sum(not e for _, e in group)
        stats["empty_ranked"] += "" in ended
        if len(ended) < 2:
            stats["prompts_skipped"] += 1
            continue
        order, g = rank(p, ended, cfg.temperature, rng)
        rankings.append({"prompt": p, "responses": order})
        golds.append(g)
    stats["rankings"] = len(rankings)
    stats["pairs"] = sum(len(g) * (len(g) - 1) // 2 for g in golds)
    stats["noise_ceiling"] = noise_ceiling(golds, cfg.temperature)
    agree, pairs = gold_agreement(golds)
    stats["gold_agreement"] = sum(a * n for a, n in zip(agree, pairs)) / sum(pairs)
    stats["gold_agreement_ci"] = M.bootstrap_ci(agree, pairs)
    stats["mean_k"] = sum(len(g) for g in golds) / len(golds)
    return rankings, stats


def write_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def main(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    M.check_paths(policy=cfg.policy, prompts_train=cfg.prompts_train, prompts_val=cfg.prompts_val)
    M.check_roles(policy=(cfg.policy, "policy"))
    os.makedirs(cfg.out_dir, exist_ok=True)
    device = M.get_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer = M.load_gpt(cfg.policy, device)
    model.eval()
    rng, gen = random.Random(cfg.seed), torch.Generator(device=device).manual_seed(cfg.seed)
    all_stats = {"labeler_temperature": cfg.temperature}
    for split, path, rounds in (("train", cfg.prompts_train, cfg.rounds_train), ("val", cfg.prompts_val, cfg.rounds_val)):
        prompts = [r["prompt"] for r in M.read_jsonl(path, ("prompt",))]
        rankings, stats = build_split(model, tokenizer, prompts, rounds, cfg, rng, gen)
        write_jsonl(os.path.join(cfg.out_dir, f"prefs_rankings_{split}.jsonl"), rankings)
        pairs = [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
                 for r in rankings for i in range(len(r["responses"])) for j in range(i + 1, len(r["responses"]))]
        write_jsonl(os.path.join(cfg.out_dir, f"prefs_pairs_{split}.jsonl"), pairs)
        all_stats[split] = stats
        print(f"{split}: " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()
                                      if not k.endswith("_ci")) + " | gold_agreement 95% CI [{:.3f}, {:.3f}]".format(*stats["gold_agreement_ci"]))
    path = os.path.join(cfg.out_dir, "prefs_stats.json")  # written last and renamed: it marks the data complete
    with open(path + ".tmp", "w") as f:
        json.dump(all_stats, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    M.main(main, Config)
