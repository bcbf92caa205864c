#!/usr/bin/env bash
# sweep.sh: the reward-vs-KL frontier on the built-in task (the DPO paper's Figure 2, on our world).
# Run after train.sh (it reuses out/sft, out/reward, out/ppo, out/ppo_nokl, out/dpo). Adds PPO at
# three more KL coefficients, DPO at three more betas, and best-of-n for n = 1..64, evaluates every
# run on the held-out prompts, and prints gold reward against KL to SFT (plotted to
# out/frontier.png when matplotlib is installed). About 40 minutes on 2 CPU cores with the defaults;
# NS, KLS and BETAS choose the points (e.g. KLS="0.2" BETAS="0.3 1.0" bash sweep.sh). A point whose
# eval JSON exists is not run again.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
DATA=${DATA:-data/world}
S="$OUT/sweep"
mkdir -p "$S"
EV="--prompts $DATA/prompts_val.jsonl --reward_model $OUT/reward --ref $OUT/sft --baseline $OUT/sft --n_show 0"

# --- best-of-n from the SFT policy, picked by the reward model
for n in ${NS:-1 2 4 8 16 32 64}; do
  [ -f "$S/eval_bon$n.json" ] || python eval.py --ckpt "$OUT/sft" $EV --best_of_n "$n" --out "$S/eval_bon$n.json"
done

# --- PPO at several KL coefficients (train.sh's config value and 0 come from train.sh)
for kl in ${KLS:-0.03 0.2 0.4}; do
  [ -f "$S/eval_ppo_kl$kl.json" ] && continue
  python ppo.py --config configs/ppo_world.toml --policy "$OUT/sft" --reward_model "$OUT/reward" \
    --prompts "$DATA/prompts_train.jsonl" --out_dir "$S/ppo_kl$kl" --kl_coef "$kl"
  python eval.py --ckpt "$S/ppo_kl$kl" $EV --out "$S/eval_ppo_kl$kl.json"
done

# --- DPO at several betas (0.1 comes from train.sh)
for beta in ${BETAS:-0.03 0.3 1.0}; do
  [ -f "$S/eval_dpo_beta$beta.json" ] && continue
  python dpo.py --config configs/dpo_world.toml --data "$DATA/prefs_pairs_train.jsonl" --val_data "$DATA/prefs_pairs_val.jsonl" \
    --init "$OUT/sft" --out_dir "$S/dpo_beta$beta" --beta "$beta"
  python eval.py --ckpt "$S/dpo_beta$beta" $EV --out "$S/eval_dpo_beta$beta.json"
done

# --- the frontier: every evaluated run, gold reward against KL to SFT
python eval.py --frontier "$S/eval_*.json,$OUT/eval_sft.json,$OUT/eval_ppo.json,$OUT/eval_ppo_nokl.json,$OUT/eval_dpo.json" \
  --plot "$OUT/frontier.png"
