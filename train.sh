#!/usr/bin/env bash
# train.sh: the whole plainrlhf pipeline on the built-in task (a synthetic world with a known gold
# reward, data/world.py), on CPU, with no download. Each stage writes out/<stage>/ (checkpoint,
# config.json, metrics.jsonl); the next stage reads it. Running it again resumes each stage from
# its last checkpoint, and a finished stage is skipped at once.
#
#   bash train.sh            the full run (2 CPU cores: see the README for measured times)
#   QUICK=1 bash train.sh    a smoke test of every stage in about a minute (tiny budgets; numbers meaningless)
#   OUT=dir DATA=dir         where runs and generated data go (default out/ and data/world/)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
DATA=${DATA:-data/world}
if [ "${QUICK:-0}" = 1 ]; then
  WORLD="--corpus_mb 0.3 --n_sft 600"
  PRETRAIN="--max_steps 30 --eval_interval 30 --eval_iters 2 --log_interval 10 --ckpt_interval 30 --n_embd 32 --n_layer 2 --n_head 2 --block_size 64"
  SFT="--epochs 1 --batch_size 32 --max_len 64 --eval_interval 10 --log_interval 5 --n_samples 2 --max_new_tokens 16"
  EVAL="--n_prompts 16 --max_new_tokens 24 --repeats 1"
  PREFS="--rounds_train 1 --k_max 4 --max_new_tokens 24"
  REWARD="--max_len 64 --eval_interval 10"
  PPO="--total_episodes 64 --rollout_batch_size 16 --max_prompt_len 48 --max_new_tokens 16 --log_interval 1 --sample_interval 2"
  DPO="--epochs 0.02 --max_len 64 --eval_interval 4 --log_interval 2 --n_samples 1 --max_new_tokens 16"
  RS_PICK="--n_prompts 8 --max_new_tokens 24 --best_of_n 4 --repeats 1"
  RS="--epochs 1 --max_len 64 --eval_interval 5 --log_interval 5 --n_samples 1 --max_new_tokens 16"
else
  WORLD="" PRETRAIN="" SFT="" EVAL="" PREFS="" REWARD="" PPO="" DPO="" RS_PICK="" RS=""
fi

# --- 1. the world: pretraining corpus, SFT pairs, train/held-out prompts (seconds)
echo "[train.sh $SECONDS s] stage 1"
python data/world.py --out_dir "$DATA" $WORLD

# --- 2. our BPE tokenizer, trained on the corpus and the SFT text (seconds)
echo "[train.sh $SECONDS s] stage 2"
python data/bpe.py --input "$DATA/pretrain.txt,$DATA/sft_train.jsonl" --vocab_size 2048 --out "$DATA/tokenizer.tiktoken"

# --- 3. pretraining: a base model that knows the world's language
echo "[train.sh $SECONDS s] stage 3"
python pretrain.py --config configs/pretrain_world.toml --data "$DATA/pretrain.txt" --tokenizer "$DATA/tokenizer.tiktoken" \
  --out_dir "$OUT/pretrain" $PRETRAIN

# --- 4. supervised fine-tuning on prompt/response pairs (loss on the response and its EOS)
echo "[train.sh $SECONDS s] stage 4"
python sft.py --config configs/sft_world.toml --data "$DATA/sft_train.jsonl" --val_data "$DATA/sft_val.jsonl" \
  --init "$OUT/pretrain" --out_dir "$OUT/sft" $SFT

# --- 5. preferences: K = 4..9 SFT answers per prompt, ranked by noisy gold labelers (Bradley-Terry)
echo "[train.sh $SECONDS s] stage 5"
if [ ! -s "$DATA/prefs_stats.json" ]; then  # written last: the preference files are complete
  python data/preferences.py --policy "$OUT/sft" --prompts_train "$DATA/prompts_train.jsonl" --prompts_val "$DATA/prompts_val.jsonl" \
    --out_dir "$DATA" $PREFS
fi

# --- 6. reward model from the rankings (all K(K-1)/2 pairs of a ranking in one batch element)
echo "[train.sh $SECONDS s] stage 6"
python reward.py --config configs/reward_world.toml --data "$DATA/prefs_rankings_train.jsonl" \
  --val_data "$DATA/prefs_rankings_val.jsonl" --init "$OUT/sft" --out_dir "$OUT/reward" $REWARD

# --- 7. PPO against the reward model with a KL penalty to SFT; and without it (reward hacking)
echo "[train.sh $SECONDS s] stage 7"
python ppo.py --config configs/ppo_world.toml --policy "$OUT/sft" --reward_model "$OUT/reward" \
  --prompts "$DATA/prompts_train.jsonl" --ptx_data "$DATA/pretrain.txt" --out_dir "$OUT/ppo" $PPO
python ppo.py --config configs/ppo_world.toml --policy "$OUT/sft" --reward_model "$OUT/reward" \
  --prompts "$DATA/prompts_train.jsonl" --ptx_data "$DATA/pretrain.txt" --out_dir "$OUT/ppo_nokl" --kl_coef 0 $PPO

# --- 8. DPO on the same preference pairs (no reward model, no sampling)
echo "[train.sh $SECONDS s] stage 8"
python dpo.py --config configs/dpo_world.toml --data "$DATA/prefs_pairs_train.jsonl" --val_data "$DATA/prefs_pairs_val.jsonl" \
  --init "$OUT/sft" --out_dir "$OUT/dpo" $DPO

# --- 9. rejection-sampling fine-tuning (Llama 2): best of 16 SFT answers by the reward model, twice per
#       training prompt, then SFT on the picks
echo "[train.sh $SECONDS s] stage 9"
if [ ! -s "$OUT/rs_bon16.jsonl" ]; then
  python eval.py --ckpt "$OUT/sft" --prompts "$DATA/prompts_train.jsonl" --reward_model "$OUT/reward" --best_of_n 16 --repeats 2 \
    --bon_kl_samples 0 --n_show 0 --dump "$OUT/rs_bon16.jsonl" --out "$OUT/rs_pick.json" $RS_PICK
fi
python sft.py --config configs/sft_rs_world.toml --data "$OUT/rs_bon16.jsonl" --val_data "$DATA/sft_val.jsonl" \
  --init "$OUT/sft" --out_dir "$OUT/rs" $RS

# --- 10. evaluation on held-out prompts: gold reward and its parts, RM score, KL to SFT, gold win rate vs SFT
echo "[train.sh $SECONDS s] stage 10"
# five answers per held-out prompt (540 in all): one answer each leaves a win rate +-4 points of noise
EV="--prompts $DATA/prompts_val.jsonl --reward_model $OUT/reward --ref $OUT/sft --baseline $OUT/sft --repeats 5 $EVAL"
python eval.py --ckpt "$OUT/pretrain" --prompts "$DATA/prompts_val.jsonl" --out "$OUT/eval_pretrain.json" --n_show 3 --repeats 5 $EVAL
python eval.py --ckpt "$OUT/sft" $EV --out "$OUT/eval_sft.json"
python eval.py --ckpt "$OUT/sft" $EV --best_of_n 16 --out "$OUT/eval_bon16.json"
python eval.py --ckpt "$OUT/ppo" $EV --out "$OUT/eval_ppo.json"
python eval.py --ckpt "$OUT/ppo_nokl" $EV --out "$OUT/eval_ppo_nokl.json"
python eval.py --ckpt "$OUT/dpo" $EV --out "$OUT/eval_dpo.json"
python eval.py --ckpt "$OUT/rs" $EV --out "$OUT/eval_rs.json"

# --- results
echo "[train.sh $SECONDS s] results"
python - "$OUT" "$DATA" <<'PY'
import json, os, sys
out = sys.argv[1]
cols = ["gold", "helpful", "honest", "harmless", "eos_rate", "on_topic", "rm_score", "kl", "win_rate", "fact_acc"]
parts = ["helpful", "honest", "harmless", "eos", "length", "repetition"]  # gold is their sum
stats = json.load(open(os.path.join(sys.argv[2], "prefs_stats.json")))["val"]
rm = [json.loads(l) for l in open(os.path.join(out, "reward", "metrics.jsonl"))][-1]
ci = lambda c: f"[{c[0]:.3f}, {c[1]:.3f}]"
print(f"\nreward model: held-out pairwise accuracy {rm['val_acc']:.3f} | noise ceiling {stats['noise_ceiling']:.3f} "
      f"(realised: gold order agrees with {stats['gold_agreement']:.3f} {ci(stats['gold_agreement_ci'])} of the labels) "
      f"| ratio {rm['val_acc'] / stats['noise_ceiling']:.3f}")
runs = {}
for name in ["pretrain", "sft", "bon16", "rs", "ppo", "ppo_nokl", "dpo"]:
    path = os.path.join(out, f"eval_{name}.json")
    if os.path.exists(path):
        runs[name] = json.load(open(path))
print(f"\n{'model':10s}" + "".join(f"{c[:9]:>10s}" for c in cols) + "  gold 95% CI        win rate 95% CI")
for name, r in runs.items():
    print(f"{name:10s}" + "".join(f"{r[c]:10.3f}" if r.get(c) is not None else f"{'-':>10s}" for c in cols)
          + f"  {ci(r['gold_ci']) if 'gold_ci' in r else '-':18s} {ci(r['win_rate_ci']) if 'win_rate_ci' in r else '-'}")
if "sft" in runs:  # where each method's gold gain over SFT comes from
    print(f"\ngain over SFT by gold part\n{'model':10s}{'gold':>10s}" + "".join(f"{p:>11s}" for p in parts))
    for name, r in runs.items():
        if name not in ("pretrain", "sft"):
            print(f"{name:10s}{r['gold'] - runs['sft']['gold']:+10.3f}" + "".join(f"{r[p] - runs['sft'][p]:+11.3f}" for p in parts))
PY
