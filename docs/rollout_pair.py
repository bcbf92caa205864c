"""
docs/rollout_pair.py: one rollout's generation, an older model.py's generate against this one, paired.

Times the sampling of a rollout exactly as ppo.py (64 prompts, one answer each) and grpo.py (8
prompts x 8 answers) do it on the built-in task: the same SFT weights loaded by both model.py
files, back to back in alternating order, a warm-up then `repeats` timed pairs, one thread. An
old generate without num_samples gets each prompt's G copies as separate rows. Prints the median
of the per-repeat ratios of generated tokens/s (new / old). Numbers: docs/rollout_speed.md.

Run (the old file from git, e.g. the commit before the rollout work):
    git show 99fca7b:model.py > /tmp/old_model.py
    python docs/rollout_pair.py --old /tmp/old_model.py --sft out/sft --prompts data/world/prompts_train.jsonl
"""

import argparse
import importlib.util
import inspect
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as new  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--old", required=True, help="path of the older model.py")
ap.add_argument("--sft", default="out/sft")
ap.add_argument("--prompts", default="data/world/prompts_train.jsonl")
ap.add_argument("--max_new_tokens", type=int, default=48)
ap.add_argument("--repeats", type=int, default=5)
args = ap.parse_args()
spec = importlib.util.spec_from_file_location("old_model", args.old)
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
torch.set_num_threads(1)
m_new, tok = new.load_gpt(args.sft)
m_old, _ = old.load_gpt(args.sft)
m_new.eval()
m_old.eval()
old_groups = "num_samples" in inspect.signature(m_old.generate).parameters
prompts = [r["prompt"] for r in new.read_jsonl(args.prompts, required=("prompt",))]
for shape, (n, G) in {"ppo 64 x 1": (64, 1), "grpo 8 x 8": (8, 8)}.items():
    ids, mask = new.pad_left([new.encode_chat(tok, p) for p in prompts[:n]])

    def run_new(seed):
        g = torch.Generator().manual_seed(seed)
        return m_new.generate(ids, args.max_new_tokens, 1.0, attention_mask=mask, eos_id=tok.eot_id, generator=g,
                              num_samples=G)[1].sum().item()

    def run_old(seed):
        g = torch.Generator().manual_seed(seed)
        if old_groups:
            return m_old.generate(ids, args.max_new_tokens, 1.0, attention_mask=mask, eos_id=tok.eot_id, generator=g,
                                  num_samples=G)[1].sum().item()
        return m_old.generate(ids.repeat_interleave(G, 0), args.max_new_tokens, 1.0, attention_mask=mask.repeat_interleave(G, 0),
                              eos_id=tok.eot_id, generator=g)[1].sum().item()

    rates = {"old": [], "new": []}
    for r in range(-1, args.repeats):  # r = -1: warm-up
        for name, fn in (("old", run_old), ("new", run_new)) if r % 2 == 0 else (("new", run_new), ("old", run_old)):
            t = time.perf_counter()
            k = fn(r)
            if r >= 0:
                rates[name].append(k / (time.perf_counter() - t))
    ratios = [a / b for a, b in zip(rates["new"], rates["old"])]
    print(f"{shape}: new / old tok/s {statistics.median(ratios):.2f} (per repeat {[round(x, 2) for x in ratios]}) | "
          f"old {statistics.median(rates['old']):.0f} tok/s | new {statistics.median(rates['new']):.0f} tok/s", flush=True)
