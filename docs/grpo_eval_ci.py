"""
docs/grpo_eval_ci.py: eval.py's evaluation of one checkpoint, plus 95% bootstrap intervals over prompts
and the fact-question accuracy (data/world.py verify_answer) on the same answers. Used for
docs/grpo_results.md until eval.py reports intervals itself.

It runs eval.evaluate() unchanged (same sampling, seeds and summary) and records the per-answer
values eval.py computes on the way (gold parts, the baseline's gold, the policy and reference
log-probs), then resamples the prompts with replacement (all repeats of a prompt together).

Run (the arguments are eval.py's):
  python docs/grpo_eval_ci.py --ckpt out/grpo --prompts data/world/prompts_val.jsonl --reward_model out/reward \
      --ref out/sft --baseline out/sft --repeats 5 --out out/eval_grpo.json
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as E  # noqa: E402
import model as M  # noqa: E402
from data.world import verify_answer  # noqa: E402


def bootstrap(values, groups, n_boot=2000, seed=0):
    """95% percentile interval of the mean of values (N,), resampling whole groups (prompts)."""
    keys = sorted(set(groups))
    per = torch.tensor([[sum(v for v, g in zip(values, groups) if g == k), sum(g == k for g in groups)] for k in keys],
                       dtype=torch.float64)  # (prompts, 2): sum and count per prompt
    pick = torch.randint(len(keys), (n_boot, len(keys)), generator=torch.Generator().manual_seed(seed))
    means = per[pick, 0].sum(1) / per[pick, 1].sum(1)  # (n_boot,)
    return [means.quantile(0.025).item(), means.quantile(0.975).item()]


def main(argv):
    cfg = M.parse_config(E.Config, argv)
    seen = {"gold": [], "texts": [], "prompts": [], "lp": []}
    gold_scores, logprob_sums = E.gold_scores, E.logprob_sums

    def record_gold(prompts, texts, ended):
        rows = gold_scores(prompts, texts, ended)
        seen["gold"].append(rows)
        seen["texts"].append(texts)
        seen["prompts"].append(prompts)
        return rows

    def record_lp(*a, **k):
        out = logprob_sums(*a, **k)
        seen["lp"].append(out)
        return out

    E.gold_scores, E.logprob_sums = record_gold, record_lp
    summary = E.evaluate(cfg)
    assert cfg.best_of_n == 1, "intervals are for plain sampling (best_of_n 1)"
    prompts, gold, texts = seen["prompts"][0], seen["gold"][0], seen["texts"][0]
    per = {k: [g[k] for g in gold] for k in gold[0]}  # per answer
    if len(seen["gold"]) > 1:  # the baseline's answers, one per policy answer
        per["win_rate"] = [1.0 if g["gold"] > b["gold"] else 0.5 if g["gold"] == b["gold"] else 0.0
                           for g, b in zip(gold, seen["gold"][1])]
    if len(seen["lp"]) == 2:
        per["kl"] = (seen["lp"][0] - seen["lp"][1]).tolist()
    checks = [verify_answer(p, t) for p, t in zip(prompts, texts)]
    facts = [i for i, c in enumerate(checks) if c is not None]
    summary["fact_acc"] = sum(checks[i] for i in facts) / max(len(facts), 1)
    summary["fact_answers"] = len(facts)
    summary["ci95"] = {k: bootstrap(v, prompts) for k, v in per.items()}
    summary["ci95"]["fact_acc"] = bootstrap([checks[i] for i in facts], [prompts[i] for i in facts])
    with open(summary_path(cfg), "w") as f:
        json.dump(summary, f, indent=2)
    with open(summary_path(cfg).replace(".json", "_answers.jsonl"), "w") as f:  # for paired comparisons between runs
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt": p, "text": texts[i], "fact": checks[i], **{k: v[i] for k, v in per.items()}}) + "\n")
    print("95% intervals over prompts: " + " | ".join(f"{k} [{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in summary["ci95"].items()))
    print(f"fact_acc {summary['fact_acc']:.3f} over {len(facts)} answers to fact questions")


def summary_path(cfg):
    return cfg.out or "eval_ci.json"


if __name__ == "__main__":
    main(sys.argv[1:])
