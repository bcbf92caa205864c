"""data/rm_probe.py: where a reward model of the built-in task goes wrong, and what its trunk knows.

1. Agreement with the gold order on held-out rankings, split by the part of the gold reward
   (data/world.py: helpful, honest, harmless, length, repetition; eos is equal in a ranking, which
   holds only answers that ended) whose difference is the largest in each pair. Ties in gold are left
   out. This is agreement with the truth, not with the noisy labels: 1.0 is reachable.
2. A fact probe of the reward model's trunk: the checkpoint's LM (--lm, e.g. the SFT model) scores
   "the x is <colour>", "the x lives in the <place>", "the x is found in the <place>" for every value;
   the fraction of entities whose true value it ranks first.

Run:  python data/rm_probe.py --reward_model out/reward --rankings data/world/prefs_rankings_val.jsonl --lm out/sft
"""

import collections
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import reward  # noqa: E402
from data.world import COLOUR, COLOURS, FOUND, LIVES, PLACES, gold_reward  # noqa: E402


@dataclass
class Config:
    reward_model: str = "out/reward"  # the reward-model checkpoint to probe
    rankings: str = "data/world/prefs_rankings_val.jsonl"  # rankings whose gold order the RM is compared with
    lm: str = "out/sft"  # "" = skip the fact probe
    device: str = "cpu"  # cpu, cuda or auto


@torch.no_grad()
def agreement_by_part(rm, tokenizer, groups):
    """{part: (agreeing pairs, pairs)} over every pair with different gold, and the total."""
    counts = collections.defaultdict(lambda: [0, 0])
    for (prompt, answers), rows in zip(groups, reward.encode_groups(groups, tokenizer, rm.config.block_size, 16)[0]):
        ids, _, _, _ = reward.collate([rows])
        s = reward.scores_of(rm, ids)  # (K,)
        g = [gold_reward(prompt, a, True) for a in answers]
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                if g[i]["gold"] == g[j]["gold"]:
                    continue
                part = max((k for k in g[i] if k != "gold"), key=lambda k: abs(g[i][k] - g[j][k]))
                agree = bool((s[i] > s[j]) == (g[i]["gold"] > g[j]["gold"]))
                for key in (part, "all"):
                    counts[key][0] += agree
                    counts[key][1] += 1
    return dict(counts)


@torch.no_grad()
def fact_probe(lm, tokenizer):
    """{relation: fraction of entities whose true value the LM ranks first}."""
    out = {}
    for rel, table, values, template in (("colour", COLOUR, COLOURS, "the {} is"), ("lives", LIVES, PLACES, "the {} lives in the"),
                                         ("found", FOUND, PLACES, "the {} is found in the")):
        right = 0
        for x, truth in table.items():
            ctx = tokenizer.encode(template.format(x))
            rows = [ctx + tokenizer.encode(" " + v) for v in values]
            ids, mask = M.pad_responses([(r, len(ctx)) for r in rows])  # (V, T), (V, T)
            lp = (M.response_logprobs(lm, ids) * mask[:, 1:]).sum(1)  # (V,) log p(value | template)
            right += values[lp.argmax().item()] == truth
        out[rel] = right / len(table)
    return out


def main(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    M.check_roles(reward_model=(cfg.reward_model, "reward_model"), lm=(cfg.lm, "policy"))
    device = M.get_device(cfg.device)
    rm, tokenizer, _ = M.load_checkpoint(cfg.reward_model, device, kind="scalar")
    groups, _ = M.read_preferences(cfg.rankings)
    counts = agreement_by_part(rm.eval(), tokenizer, groups)
    print("agreement of the reward model with the gold order, by the part that dominates the pair:")
    for part, (agree, n) in sorted(counts.items(), key=lambda kv: -kv[1][1]):
        print(f"  {part:11s} {agree / n:.3f}  ({n} pairs)")
    if cfg.lm:
        lm, lm_tok = M.load_gpt(cfg.lm, device)
        print("facts the LM ranks first:", " | ".join(f"{k} {v:.3f}" for k, v in fact_probe(lm.eval(), lm_tok).items()))
    return counts


if __name__ == "__main__":
    M.main(main, Config)
