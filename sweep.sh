#!/usr/bin/env bash
# sweep.sh: the reward-vs-KL frontier on the built-in task (the DPO paper's Figure 2, on our world),
# and the seeds behind train.sh's numbers.
# Run after train.sh (it reuses out/sft, out/reward, out/ppo, out/ppo_nokl, out/dpo, out/rs). Adds
# PPO at three more KL coefficients, DPO at three more betas, and best-of-n for n = 1..64, evaluates
# every run on the held-out prompts, and prints gold reward against KL to SFT (plotted to
# out/frontier.png when matplotlib is installed). Then PPO, DPO and rejection sampling again with
# training seeds SEEDS (default 1 2; train.sh's runs are seed 0), evaluated like train.sh (5 answers
# per held-out prompt), and pooled with seed 0 prompt by prompt (eval.py --pool). About 40 minutes on
# 2 CPU cores for the frontier and 25 for the seeds; NS, KLS, BETAS and SEEDS choose the points (e.g.
# KLS="0.2" BETAS="0.3 1.0" SEEDS="" bash sweep.sh). A point whose eval JSON exists is not run again.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
DATA=${DATA:-data/world}
S="$OUT/sweep"
mkdir -p "$S"
EV="--prompts $DATA/prompts_val.jsonl --reward_model $OUT/reward --ref $OUT/sft --baseline $OUT/sft --n_show 0"

# --- best-of-n from the SFT policy, picked by the reward model
for n in ${NS-1 2 4 8 16 32 64}; do
  [ -f "$S/eval_bon$n.json" ] || python eval.py --ckpt "$OUT/sft" $EV --best_of_n "$n" --out "$S/eval_bon$n.json"
done

# --- PPO at several KL coefficients (train.sh's config value and 0 come from train.sh)
for kl in ${KLS-0.03 0.2 0.4}; do
  [ -f "$S/eval_ppo_kl$kl.json" ] && continue
  python ppo.py --config configs/ppo_world.toml --policy "$OUT/sft" --reward_model "$OUT/reward" \
    --prompts "$DATA/prompts_train.jsonl" --out_dir "$S/ppo_kl$kl" --kl_coef "$kl"
  python eval.py --ckpt "$S/ppo_kl$kl" $EV --out "$S/eval_ppo_kl$kl.json"
done

# --- DPO at several betas (0.1 comes from train.sh)
for beta in ${BETAS-0.03 0.3 1.0}; do
  [ -f "$S/eval_dpo_beta$beta.json" ] && continue
  python dpo.py --config configs/dpo_world.toml --data "$DATA/prefs_pairs_train.jsonl" --val_data "$DATA/prefs_pairs_val.jsonl" \
    --init "$OUT/sft" --out_dir "$S/dpo_beta$beta" --beta "$beta"
  python eval.py --ckpt "$S/dpo_beta$beta" $EV --out "$S/eval_dpo_beta$beta.json"
done

# --- the critic-free family (grpo.py) on PPO's reward model and budget, then the KL table: GRPO's
#     advantages with k1 in the reward, k2 and k3 in the loss (k3 in the loss is the "grpo" run)
EV5="--prompts $DATA/prompts_val.jsonl --reward_model $OUT/reward --ref $OUT/sft --baseline $OUT/sft --repeats 5 --n_show 0"
GR="--config configs/grpo_world.toml --policy $OUT/sft --reward_model $OUT/reward --prompts $DATA/prompts_train.jsonl"
grpo_run() {  # name, then grpo.py flags
  [ -f "$S/eval_$1.json" ] && return
  python grpo.py $GR --out_dir "$S/$1" "${@:2}"
  python eval.py --ckpt "$S/$1" $EV5 --out "$S/eval_$1.json"
}
if [ "${GRPO:-1}" = 1 ]; then
  grpo_run grpo
  grpo_run dr_grpo --advantage dr_grpo --loss_agg seq_mean_token_sum_norm
  grpo_run rloo --advantage rloo --kl_in reward --kl_estimator k1 --loss_agg token_mean
  grpo_run reinforce_pp --advantage reinforce_pp --kl_in reward --kl_estimator k1 --loss_agg token_mean
  grpo_run grpo_k1_reward --kl_in reward --kl_estimator k1
  grpo_run grpo_k2_loss --kl_estimator k2
  # GRPO against the verifiable fact checker (no reward model), on the training fact questions
  if [ ! -f "$S/eval_grpo_verifiable.json" ]; then
    python grpo.py --config configs/grpo_world_verifiable.toml --policy "$OUT/sft" --prompts "$DATA/prompts_train.jsonl" \
      --out_dir "$S/grpo_verifiable"
    python eval.py --ckpt "$S/grpo_verifiable" $EV5 --out "$S/eval_grpo_verifiable.json"
  fi
  # the same with no KL term (the checker cannot be won by tone or length) and twice the episodes
  if [ ! -f "$S/eval_grpo_verifiable_kl0.json" ]; then
    python grpo.py --config configs/grpo_world_verifiable.toml --policy "$OUT/sft" --prompts "$DATA/prompts_train.jsonl" \
      --kl_coef 0 --total_episodes 16384 --out_dir "$S/grpo_verifiable_kl0"
    python eval.py --ckpt "$S/grpo_verifiable_kl0" $EV5 --out "$S/eval_grpo_verifiable_kl0.json"
  fi
fi

# --- the frontier: every evaluated run, gold reward against KL to SFT
python eval.py --frontier "$S/eval_*.json,$OUT/eval_sft.json,$OUT/eval_ppo.json,$OUT/eval_ppo_nokl.json,$OUT/eval_dpo.json,$OUT/eval_rs.json" \
  --plot "$OUT/frontier.png"

# --- seeds: PPO, DPO and rejection-sampling fine-tuning with other training seeds, pooled with seed 0
for seed in ${SEEDS-1 2}; do
  D="$OUT/seeds"
  mkdir -p "$D"
  if [ ! -f "$D/eval_ppo_seed$seed.json" ]; then
    python ppo.py --config configs/ppo_world.toml --policy "$OUT/sft" --reward_model "$OUT/reward" \
      --prompts "$DATA/prompts_train.jsonl" --out_dir "$D/ppo_seed$seed" --seed "$seed"
    python eval.py --ckpt "$D/ppo_seed$seed" $EV5 --out "$D/eval_ppo_seed$seed.json"
  fi
  if [ ! -f "$D/eval_dpo_seed$seed.json" ]; then
    python dpo.py --config configs/dpo_world.toml --data "$DATA/prefs_pairs_train.jsonl" --val_data "$DATA/prefs_pairs_val.jsonl" \
      --init "$OUT/sft" --out_dir "$D/dpo_seed$seed" --seed "$seed"
    python eval.py --ckpt "$D/dpo_seed$seed" $EV5 --out "$D/eval_dpo_seed$seed.json"
  fi
  if [ ! -f "$D/eval_rs_seed$seed.json" ]; then
    [ -s "$D/rs_bon16_seed$seed.jsonl" ] || python eval.py --ckpt "$OUT/sft" --prompts "$DATA/prompts_train.jsonl" \
      --reward_model "$OUT/reward" --best_of_n 16 --repeats 2 --bon_kl_samples 0 --n_show 0 --seed "$seed" \
      --dump "$D/rs_bon16_seed$seed.jsonl" --out "$D/rs_pick_seed$seed.json"
    python sft.py --config configs/sft_rs_world.toml --data "$D/rs_bon16_seed$seed.jsonl" --val_data "$DATA/sft_val.jsonl" \
      --init "$OUT/sft" --out_dir "$D/rs_seed$seed" --seed "$seed"
    python eval.py --ckpt "$D/rs_seed$seed" $EV5 --out "$D/eval_rs_seed$seed.json"
  fi
done
for m in ppo dpo rs; do
  ls "$OUT"/seeds/eval_"$m"_seed*.json >/dev/null 2>&1 && python eval.py --pool "$OUT/eval_$m.json,$OUT/seeds/eval_${m}_seed*.json"
done
