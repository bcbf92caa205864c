"""A real verifiable task for a real model: adding two whole numbers, checked by code.

The built-in world (data/world.py) trains models of our own; this task is for a pretrained one
(SmolLM2-135M-Instruct, `smollm2.sh`), where RL from verifiable rewards has room to improve: the
model adds 1-20 + 1-20 right about a quarter of the time, greedy, and often rambles past its answer.

Questions: "What is {a} + {b}?" for every pair a, b in 1..20 (400 questions). A fixed split
(random.Random(0), never the CLI seed) holds out 100 pairs; the other 300 are training prompts.
Held-out pairs are unseen as (a, b) pairs, not as numbers: the task is the skill, not the facts.

The checker, verify_answer(prompt, response) -> 1.0 or 0.0 (None for a prompt that is not one of
these questions). The rule, written before any model was scored with it:
  - the numbers of the response are every number written in digits (-?[0-9]+(.[0-9]+)?, so "13",
    "13.0" and "-13" are numbers; words like "thirteen" are not), read as values;
  - the operands a and b may appear (restating the question, "7 + 6 = 13", is fine); every other
    number is a candidate answer;
  - correct iff the candidates are exactly {a + b}: the sum is stated (once or more) and nothing
    else is offered as a result. A hedge ("13 or 14", "13, or maybe 14"), a list of guesses, or
    working that writes other numbers ("7 + 3 = 10, 10 + 3 = 13") is wrong;
  - a negated candidate ("not", "n't", "never" among the 3 words before it: "the answer is not 13")
    is not a statement of it: the response is wrong.
  Since a, b >= 1, a + b is never an operand. Tone, length and EOS play no part here; an answer cut
  at the length cap (no EOS) scores 0 where it is used as a reward or an accuracy (grpo.py's
  missing-EOS rule with missing_eos_penalty 0, eval.py's accuracy), as for the world's fact questions.

Run:  python data/arith.py --out_dir data/arith
Use:  from data.arith import verify_answer, parse_prompt
"""
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402  (config parsing)

LO, HI = 1, 20  # operands
N_HELD_OUT = 100
QUESTION = "What is {} + {}?"
_QUESTION_RE = re.compile(r"\s*what is (\d+) \+ (\d+)\?\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_NEGATIONS = {"not", "never"}  # and any word ending in n't


def parse_prompt(prompt):
    """(a, b) of a question "What is a + b?", or None."""
    m = _QUESTION_RE.fullmatch(prompt)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _negated(text, start):
    """Is the number at text[start:] preceded by a negation among its 3 words before?"""
    words = re.findall(r"[a-z']+", text[:start].lower())[-3:]
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def verify_answer(prompt, response):
    """1.0 if the response states a + b and no other result (the rule in the docstring), else 0.0;
    None when the prompt is not an addition question."""
    q = parse_prompt(prompt)
    if q is None:
        return None
    a, b = q
    candidates, negated = set(), False
    for m in _NUMBER_RE.finditer(response):
        value = float(m.group())
        if value in (a, b):
            continue
        candidates.add(value)
        negated = negated or _negated(response, m.start())
    return float(candidates == {float(a + b)} and not negated)


def split_prompts():
    """(train, held_out) question lists; fixed, whatever the CLI seed."""
    pairs = [(a, b) for a in range(LO, HI + 1) for b in range(LO, HI + 1)]
    random.Random(0).shuffle(pairs)
    qs = [QUESTION.format(a, b) for a, b in pairs]
    return qs[N_HELD_OUT:], qs[:N_HELD_OUT]


def generate(out_dir):
    """Write prompts_train.jsonl and prompts_val.jsonl; returns their sizes."""
    os.makedirs(out_dir, exist_ok=True)
    train, held_out = split_prompts()
    for name, prompts in (("train", train), ("val", held_out)):
        with open(os.path.join(out_dir, f"prompts_{name}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return {"prompts_train": len(train), "prompts_val": len(held_out)}


@dataclass
class Config:
    out_dir: str = "data/arith"  # where prompts_train.jsonl and prompts_val.jsonl go


if __name__ == "__main__":
    args = M.parse_config(Config)
    t0 = time.time()
    sizes = generate(args.out_dir)
    print(f"arith: {args.out_dir} | " + " | ".join(f"{k} {v}" for k, v in sizes.items()) + f" | {time.time() - t0:.2f}s")
