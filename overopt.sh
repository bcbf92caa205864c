#!/bin/bash
# overopt.sh: the over-optimisation suite's proxy experiments on the built-in task
# (docs/overoptimisation.md, "The proxy's size and data" and "Reward-model ensembles").
# Run after train.sh and sweep.sh's rloo run (it reuses out/sft, out/reward, out/sweep/rloo; a missing
# out/sweep/rloo is run here with sweep.sh's flags).
#  1. The proxy's size and data (Gao et al. 2022, Figures 2-3): reward models on trunks of SIZES
#     (n_layer x n_embd, heads 32 wide; default 2x64 3x96 4x128, 4x128 being train.sh's own) x DATAS
#     (full: all training rankings; quarter: the first quarter of them). Each smaller trunk is pretrained
#     and fine-tuned as train.sh's stages 3-4. Against each reward model: best-of-n from the SFT policy
#     (one pool of 256 answers per prompt, Gao et al.'s best-of-n fit) and RLOO (sweep.sh's rloo flags).
#  2. Ensembles (Coste et al. 2023): reward models with seeds ENS_SEEDS (default 1 2 3), optimised by RLOO
#     under ENS_RUNS (default single single_kl0 mean_kl0 min_kl0 uwo_kl0 mean min uwo: the rule, and _kl0 for
#     kl_coef 0 instead of 0.1; single is train.sh's one reward model, and single at 0.1 is sweep's rloo,
#     run here when missing, so run section 2 before section 1 needs it).
#     The kl_coef 0 runs save snapshots every 16 iterations, and the single one is evaluated along them.
# Every run is evaluated like train.sh's rows (5 answers per held-out prompt); a point whose JSON exists
# is not run again, so two instances with disjoint sections can run side by side, one thread each:
#   OMP_NUM_THREADS=1 ENS_SEEDS="" ENS_RUNS="" bash overopt.sh &   # sizes and data
#   OMP_NUM_THREADS=1 SIZES="" bash overopt.sh        # ensembles
# Measured on 2 cores, the two instances side by side: 43 minutes for sizes and data (with the two smaller
# trunks' pretraining and SFT done beforehand, 6 minutes) and 51 for the ensembles (docs/overoptimisation.md).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
DATA=${DATA:-data/world}
O="$OUT/overopt"
S="$OUT/sweep"
mkdir -p "$O" "$S"
EV5="--prompts $DATA/prompts_val.jsonl --reward_model $OUT/reward --ref $OUT/sft --baseline $OUT/sft --n_show 0 --repeats 5"
RLOO="--config configs/grpo_world.toml --advantage rloo --kl_in reward --kl_estimator k1 --loss_agg token_mean"

rloo() {  # rloo <run dir> <eval json> <grpo.py flags...>: RLOO with those flags, then its evaluation
  local dir=$1 json=$2; shift 2
  [ -f "$json" ] && return
  echo "[overopt $SECONDS s] $dir"
  python grpo.py $RLOO --policy "$OUT/sft" --prompts "$DATA/prompts_train.jsonl" --out_dir "$dir" "$@"
  python eval.py --ckpt "$dir" $EV5 --out "$json"
}
# --- 1. reward models of three trunk sizes x two amounts of preference data
if [ -n "${SIZES-x}" ]; then
  n=$(wc -l < "$DATA/prefs_rankings_train.jsonl")
  head -n $((n / 4)) "$DATA/prefs_rankings_train.jsonl" > "$O/prefs_rankings_train_quarter.jsonl.tmp"
  mv "$O/prefs_rankings_train_quarter.jsonl.tmp" "$O/prefs_rankings_train_quarter.jsonl"
fi
for size in ${SIZES-2x64 3x96 4x128}; do
  L=${size%x*}; W=${size#*x}
  sft="$OUT/sft"
  if [ "$size" != 4x128 ]; then  # train.sh's stages 3-4 at this size (a finished run is not run again)
    sft="$O/sft_$size"
    python pretrain.py --config configs/pretrain_world.toml --data "$DATA/pretrain.txt" --tokenizer "$DATA/tokenizer.tiktoken" \
      --n_layer "$L" --n_embd "$W" --n_head $((W / 32)) --out_dir "$O/pretrain_$size"
    python sft.py --config configs/sft_world.toml --data "$DATA/sft_train.jsonl" --val_data "$DATA/sft_val.jsonl" \
      --init "$O/pretrain_$size" --out_dir "$sft"
  fi
  for data in ${DATAS-full quarter}; do
    name="${size}_$data"
    rm="$O/reward_$name"
    if [ "$name" = 4x128_full ]; then
      rm="$OUT/reward"
    else
      prefs="$DATA/prefs_rankings_train.jsonl"
      [ "$data" = quarter ] && prefs="$O/prefs_rankings_train_quarter.jsonl"
      python reward.py --config configs/reward_world.toml --data "$prefs" --val_data "$DATA/prefs_rankings_val.jsonl" \
        --init "$sft" --out_dir "$rm"
    fi
    [ -f "$O/bon_$name.json" ] || python eval.py --bon_curve 256 --bon_pool 256 --ckpt "$OUT/sft" --reward_model "$rm" \
      --prompts "$DATA/prompts_val.jsonl" --n_show 0 --out "$O/bon_$name.json"
    # 4x128 on all the data is train.sh's reward model: its RLOO run is sweep's rloo (section 2's single)
    [ "$name" = 4x128_full ] || rloo "$O/rloo_$name" "$O/eval_rloo_$name.json" --reward_model "$rm"
  done
done

# --- 2. ensembles of reward models: seeds, then RLOO under each rule at kl_coef 0 and 0.1
members=""
for s in ${ENS_SEEDS-1 2 3}; do
  python reward.py --config configs/reward_world.toml --data "$DATA/prefs_rankings_train.jsonl" \
    --val_data "$DATA/prefs_rankings_val.jsonl" --init "$OUT/sft" --seed "$s" --out_dir "$O/reward_seed$s"
  members="${members:+$members,}$O/reward_seed$s"
done
for run in ${ENS_RUNS-single single_kl0 mean_kl0 min_kl0 uwo_kl0 mean min uwo}; do
  rule=${run%_kl0}
  kl="--kl_coef 0.1"
  [ "$run" != "$rule" ] && kl="--kl_coef 0 --eval_snapshot_interval 16"
  rm="--reward_model $members --ensemble $rule"
  [ "$rule" = single ] && rm="--reward_model $OUT/reward"
  if [ "$run" = single ]; then rloo "$S/rloo" "$S/eval_rloo.json" $rm $kl; else rloo "$O/rloo_$run" "$O/eval_rloo_$run.json" $rm $kl; fi
done
if [ -d "$O/rloo_single_kl0" ] && [ ! -f "$O/curve_single_kl0.json" ]; then
  python eval.py --curve "$O/rloo_single_kl0" --prompts "$DATA/prompts_val.jsonl" --repeats 5 --n_show 0 \
    --out "$O/curve_single_kl0.json"
fi
