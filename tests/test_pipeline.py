"""The whole train.sh pipeline with tiny budgets (QUICK=1): every stage's real CLI, chained.
Slow (a few minutes on 2 cores), so excluded by default: python -m pytest -m slow. The fast test
runs train.sh's own logic (what it runs, what it skips, the results table) with a stand-in python.
Run: python -m pytest -q tests/test_pipeline.py (add -m slow for the whole pipeline)"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUB = '''#!{python}
# a stand-in for python: records each stage's command line and writes only what train.sh reads next
import json, os, sys
args = sys.argv[1:]
if args[:1] == ["-"]:  # the results table: run for real
    os.execv({python!r}, [{python!r}] + args)
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
kv = dict(zip(args[1::2], args[2::2]))
if args[0] == "sft.py" and os.path.exists(kv["--data"]) and not open(kv["--data"]).read().strip():
    sys.exit(kv["--data"] + ": no rows")  # as sft.py refuses an empty data file
if args[0] == "eval.py":
    if "--dump" in kv:
        open(kv["--dump"], "w").close()  # best-of-n kept no answer that ends with EOS
    name = os.path.basename(kv["--out"])
    kl = {{"eval_sft.json": 0.0, "eval_ppo.json": -0.035}}.get(name, 1.5)
    parts = dict(helpful=0.5, honest=0.1, harmless=0.1, eos=0.2, length=0.0, repetition=0.0)
    summary = dict(parts, gold=0.9, eos_rate=1.0, on_topic=0.5, rm_score=0.1, kl=kl, kl_ci=[kl - 0.1, kl + 0.1],
                   win_rate=0.5, gold_ci=[0.8, 1.0], answers=16)
    json.dump(summary, open(kv["--out"], "w"))
'''


def test_a_stage_with_nothing_to_learn_from_is_skipped_and_the_table_says_why(tmp_path):
    out, data, bin_ = tmp_path / "out", tmp_path / "data", tmp_path / "bin"
    for d in (out / "reward", data, bin_):
        d.mkdir(parents=True)
    (data / "prefs_stats.json").write_text(json.dumps({"train": {"rankings": 61}, "val": {
        "noise_ceiling": 0.61, "pairs": 12, "gold_agreement": 0.71, "gold_agreement_ci": [0.58, 0.83]}}))
    (out / "reward" / "metrics.jsonl").write_text(json.dumps({"step": 8, "val_acc": 0.667}) + "\n")
    log = tmp_path / "calls.txt"
    (bin_ / "python").write_text(STUB.format(python=sys.executable, log=str(log)))
    (bin_ / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "QUICK": "1", "OUT": str(out), "DATA": str(data)}
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert not [c for c in calls if c.startswith("sft.py") and "rs_bon16" in c]  # nothing to fine-tune on: not run
    assert not [c for c in calls if c.startswith("eval.py --ckpt " + str(out / "rs"))]
    why = f"none of the best-of-n picks ends with EOS (eval.py --dump leaves those out), so {out}/rs_bon16.jsonl has no rows"
    assert f"rs skipped: {why}" in r.stdout and f"rs         skipped: {why}" in r.stdout  # the line, and its row
    header = next(line for line in r.stdout.splitlines() if line.startswith("model "))
    assert header.split()[:12] == ["model", "gold", "helpful", "honest", "harmless", "eos_rate", "on_topic", "rm_score",
                                   "kl", "win_rate", "win_rate_lc", "fact_acc"]
    flat = " ".join(r.stdout.split())  # the notes are wrapped to the terminal's width
    for text in ("eos_rate share of answers that end with EOS", "QUICK=1: a smoke test", "a reward model from 61 rankings",
                 "kl < 0 (ppo): a KL is never negative, but this is a sampled estimate", "read it as about 0 (ppo [-0.135, 0.065])",
                 "fact_acc -: none of the evaluated prompts is one of the world's fact questions",
                 "ratio > 1: the noise ceiling is the accuracy that the gold order itself is expected to reach",
                 "held-out pairwise accuracy 0.667 (+-0.267 on 12 pairs)"):
        assert text in flat, text


@pytest.mark.slow
def test_quick_pipeline(tmp_path):
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "data")}
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("pretrain", "sft", "bon16", "ppo", "ppo_nokl", "dpo"):
        assert os.path.exists(tmp_path / "out" / f"eval_{name}.json"), name
    assert os.path.exists(tmp_path / "out" / "eval_rs.json") or "rs         skipped: " in r.stdout
    assert "reward model: held-out pairwise accuracy" in r.stdout and "QUICK=1: a smoke test" in r.stdout
    assert json.load(open(tmp_path / "out" / "eval_sft.json")).get("fact_acc") is not None  # the 16 prompts hold fact questions
