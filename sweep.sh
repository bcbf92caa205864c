#!/usr/bin/env bash
# sweep.sh: the reward-vs-KL frontier on the built-in task (the DPO paper's Figure 2, on our world),
# and the seeds behind train.sh's numbers.
# Run after train.sh (it reuses out/sft, out/reward, out/ppo, out/ppo_nokl, out/dpo, out/rs). Adds
# best-of-n for n = 1..64, PPO at three more KL coefficients, DPO at three more betas, and the
# critic-free family (grpo.py: GRPO, Dr. GRPO, RLOO, REINFORCE++, GRPO with k1 in the reward and k2
# in the loss, GRPO on the verifiable fact checker; docs/grpo_results.md), evaluates every run on
# the held-out prompts, and prints gold reward against KL to SFT (plotted to out/frontier.png when
# matplotlib is installed). Then PPO, DPO and rejection sampling again with training seeds SEEDS
# (default 1 2; train.sh's runs are seed 0), and the critic-free runs GRPO_SEED_RUNS (default rloo
# grpo_k1_reward, the ones the README ranks against PPO; any name of GRPO_RUNS works) with the same
# seeds (the critic-free section's runs are seed 0; their pool is skipped until that run's eval
# exists), all evaluated like train.sh (5 answers per held-out prompt) and pooled with seed 0
# prompt by prompt (eval.py --pool). Last, pass@k on the held-out fact questions for SFT and the runs
# PASS_RUNS (default out/ppo and the sweep's rloo and 4x verifiable runs, with and without PPO-ptx), in
# one plot, out/pass_at_k.png. NS, KLS, BETAS, GRPO_RUNS, SEEDS, GRPO_SEED_RUNS and PASS_RUNS choose the
# points; an empty value skips its section. A point whose eval JSON exists is not run again, so
# instances with disjoint sections can run side by side, e.g. with one thread each:
#   OMP_NUM_THREADS=1 NS="" KLS="" BETAS="" SEEDS="" bash sweep.sh &    # the critic-free family
#   OMP_NUM_THREADS=1 GRPO_RUNS="" SEEDS="" bash sweep.sh &             # best-of-n, PPO, DPO
#   OMP_NUM_THREADS=1 NS="" KLS="" BETAS="" GRPO_RUNS="" bash sweep.sh  # the seeds
# Measured on 2 cores (README): about 70 minutes for three such instances with a reduced frontier.
# The ten verifiable-GRPO follow-ups (grpo_verifiable_b*) take 20-35 minutes each on one core;
# run them as their own instance, e.g. GRPO_RUNS="grpo_verifiable_b256 grpo_verifiable_b512".
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
DATA=${DATA:-data/world}
S="$OUT/sweep"
mkdir -p "$S"
EV="--prompts $DATA/prompts_val.jsonl --reward_model $OUT/reward --ref $OUT/sft --baseline $OUT/sft --n_show 0"
EV5="$EV --repeats 5"  # train.sh's evaluation: 5 answers per held-out prompt (540)

# --- best-of-n from the SFT policy, picked by the reward model
for n in ${NS-1 2 4 8 16 32 64}; do
  [ -f "$S/eval_bon$n.json" ] || python eval.py --ckpt "$OUT/sft" $EV --best_of_n "$n" --out "$S/eval_bon$n.json"
done

# --- PPO at several KL coefficients (train.sh's config value and 0 come from train.sh)
for kl in ${KLS-0.03 0.2 0.4}; do
  [ -f "$S/eval_ppo_kl$kl.json" ] && continue
  python ppo.py --config configs/ppo_world.toml --policy "$OUT/sft" --reward_model "$OUT/reward" \
    --prompts "$DATA/prompts_train.jsonl" --out_dir "$S/ppo_kl$kl" --kl_coef "$kl"
  python eval.py --ckpt "$S/ppo_kl$kl" $EV5 --out "$S/eval_ppo_kl$kl.json"
done

# --- DPO at several betas (0.1 comes from train.sh)
for beta in ${BETAS-0.03 0.3 1.0}; do
  [ -f "$S/eval_dpo_beta$beta.json" ] && continue
  python dpo.py --config configs/dpo_world.toml --data "$DATA/prefs_pairs_train.jsonl" --val_data "$DATA/prefs_pairs_val.jsonl" \
    --init "$OUT/sft" --out_dir "$S/dpo_beta$beta" --beta "$beta"
  python eval.py --ckpt "$S/dpo_beta$beta" $EV5 --out "$S/eval_dpo_beta$beta.json"
done

# --- the critic-free family (grpo.py) on PPO's reward model and budget, the KL table (GRPO's
#     advantages with k1 in the reward, k2 or k3 in the loss; k3 in the loss is the "grpo" run), and
#     GRPO against the verifiable fact checker (no reward model), also with 4x the answers per step
#     (32 prompts x 8, the same 256 iterations and optimizer steps) and with DAPO's equal-group drop
#     on top, or with a KL anchor (k1 in the reward, the RM runs' 0.1), and with 8x the answers per
#     step on the 4x run's answers (half its iterations), with an entropy penalty, and with PPO-ptx on the
#     pretraining text (docs/grpo_results.md, section 3); GSPO, CISPO and DAPO, and the sampler-trainer
#     mismatch lab: the RLOO run with a stale, a bf16 or a top-p sampler, without and with a correction
#     (sections 4-5). GRPO_RUNS picks the runs.
grpo_flags() {
  case $1 in
    grpo) echo "--config configs/grpo_world.toml" ;;
    dr_grpo) echo "--config configs/grpo_world.toml --advantage dr_grpo --loss_agg seq_mean_token_sum_norm" ;;
    rloo) echo "--config configs/grpo_world.toml --advantage rloo --kl_in reward --kl_estimator k1 --loss_agg token_mean" ;;
    reinforce_pp) echo "--config configs/grpo_world.toml --advantage reinforce_pp --kl_in reward --kl_estimator k1 --loss_agg token_mean" ;;
    grpo_k1_reward) echo "--config configs/grpo_world.toml --kl_in reward --kl_estimator k1" ;;
    grpo_k2_loss) echo "--config configs/grpo_world.toml --kl_estimator k2" ;;
    grpo_verifiable) echo "--config configs/grpo_world_verifiable.toml" ;;
    grpo_verifiable_b256) echo "--config configs/grpo_world_verifiable.toml --rollout_batch_size 256 --total_episodes 65536" ;;
    grpo_verifiable_b256_drop) echo "$(grpo_flags grpo_verifiable_b256) --drop_equal_groups true" ;;
    grpo_verifiable_b256_kl) echo "$(grpo_flags grpo_verifiable_b256) --kl_coef 0.1 --kl_in reward --kl_estimator k1" ;;
    grpo_verifiable_b512) echo "--config configs/grpo_world_verifiable.toml --rollout_batch_size 512 --total_episodes 65536" ;;
    grpo_verifiable_b256_ent0.1) echo "$(grpo_flags grpo_verifiable_b256) --ent_coef -0.1" ;;
    grpo_verifiable_b256_ent0.3) echo "$(grpo_flags grpo_verifiable_b256) --ent_coef -0.3" ;;
    grpo_verifiable_b256_ent0.1_kl) echo "$(grpo_flags grpo_verifiable_b256_kl) --ent_coef -0.1" ;;
    grpo_verifiable_b256_ent0.3_kl) echo "$(grpo_flags grpo_verifiable_b256_kl) --ent_coef -0.3" ;;
    grpo_verifiable_ptx) echo "$(grpo_flags grpo_verifiable) --ptx_coef 1 --ptx_data $DATA/pretrain.txt" ;;
    grpo_verifiable_b256_ptx) echo "$(grpo_flags grpo_verifiable_b256) --ptx_coef 1 --ptx_data $DATA/pretrain.txt" ;;
    grpo_verifiable_b256_ent0.1_kl_ptx) echo "$(grpo_flags grpo_verifiable_b256_ent0.1_kl) --ptx_coef 1 --ptx_data $DATA/pretrain.txt" ;;
    # the 2025-26 objectives (docs/grpo_results.md, section 4), each one change (two for GSPO, whose mean over
    # answers needs its aggregation) from the rloo run, on its budget; on the checker dapo_verifiable (from the
    # 4x run) and gspo_verifiable, cispo_verifiable (from grpo_verifiable, on its budget)
    gspo) echo "$(grpo_flags rloo) --policy_loss gspo --loss_agg seq_mean_token_mean --clip_low 3e-4 --clip_high 4e-4" ;;
    cispo) echo "$(grpo_flags rloo) --policy_loss cispo --clip_low 1 --clip_high 0.28" ;;
    dapo) echo "$(grpo_flags rloo) --advantage grpo --clip_high 0.28 --overlong_buffer 16 --dynamic_sampling true" ;;
    dapo_verifiable) echo "$(grpo_flags grpo_verifiable_b256) --clip_high 0.28 --loss_agg token_mean --overlong_buffer 16 --dynamic_sampling true" ;;
    gspo_verifiable) echo "$(grpo_flags grpo_verifiable) --policy_loss gspo --clip_low 3e-4 --clip_high 4e-4" ;;
    cispo_verifiable) echo "$(grpo_flags grpo_verifiable) --policy_loss cispo --clip_low 1 --clip_high 0.28" ;;
    # the mismatch lab (section 5): the rloo run with its sampler a dose away, without and with a correction
    stale[0-9]*_tis) echo "$(grpo_flags "${1%_tis}") --is_correction tis" ;;  # stale<k>: k iterations stale
    stale[0-9]*_seqmask) echo "$(grpo_flags "${1%_seqmask}") --is_correction seq_mask" ;;
    stale[0-9]*_mask) echo "$(grpo_flags "${1%_mask}") --is_correction token_mask" ;;
    stale[0-9]*) echo "$(grpo_flags rloo) --staleness ${1#stale}" ;;
    bf16) echo "$(grpo_flags rloo) --sampler_dtype bfloat16" ;;
    bf16_tis) echo "$(grpo_flags bf16) --is_correction tis" ;;
    topp0.9) echo "$(grpo_flags rloo) --sampler_top_p 0.9" ;;
    topp0.9_tis) echo "$(grpo_flags topp0.9) --is_correction tis" ;;
    *) echo "sweep.sh: unknown GRPO run $1" >&2; exit 1 ;;
  esac
}
grpo_rm_flag() {  # the verifiable runs need no reward model
  case $1 in *_verifiable*) ;; *) echo "--reward_model $OUT/reward" ;; esac
}
for name in ${GRPO_RUNS-grpo dr_grpo rloo reinforce_pp grpo_k1_reward grpo_k2_loss grpo_verifiable grpo_verifiable_b256 grpo_verifiable_b256_drop grpo_verifiable_b256_kl grpo_verifiable_b512 grpo_verifiable_b256_ent0.1 grpo_verifiable_b256_ent0.3 grpo_verifiable_b256_ent0.1_kl grpo_verifiable_b256_ent0.3_kl grpo_verifiable_ptx grpo_verifiable_b256_ptx grpo_verifiable_b256_ent0.1_kl_ptx gspo cispo dapo dapo_verifiable gspo_verifiable cispo_verifiable stale4 stale4_tis stale4_mask stale4_seqmask bf16 bf16_tis topp0.9 topp0.9_tis stale1 stale1_tis stale2 stale2_tis stale8 stale8_tis}; do
  [ -f "$S/eval_$name.json" ] && continue
  python grpo.py $(grpo_flags "$name") --policy "$OUT/sft" $(grpo_rm_flag "$name") --prompts "$DATA/prompts_train.jsonl" \
    --out_dir "$S/$name"
  python eval.py --ckpt "$S/$name" $EV5 --out "$S/eval_$name.json"
done

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
  for name in ${GRPO_SEED_RUNS-rloo grpo_k1_reward}; do
    [ -f "$D/eval_${name}_seed$seed.json" ] && continue
    python grpo.py $(grpo_flags "$name") --policy "$OUT/sft" $(grpo_rm_flag "$name") --prompts "$DATA/prompts_train.jsonl" \
      --out_dir "$D/${name}_seed$seed" --seed "$seed"
    python eval.py --ckpt "$D/${name}_seed$seed" $EV5 --out "$D/eval_${name}_seed$seed.json"
  done
done
for m in ppo dpo rs; do
  ls "$OUT"/seeds/eval_"$m"_seed*.json >/dev/null 2>&1 && python eval.py --pool "$OUT/eval_$m.json,$OUT/seeds/eval_${m}_seed*.json"
done
for name in ${GRPO_SEED_RUNS-rloo grpo_k1_reward}; do  # seed 0 is the critic-free section's run
  if [ -f "$S/eval_$name.json" ] && ls "$OUT"/seeds/eval_"$name"_seed*.json >/dev/null 2>&1; then
    python eval.py --pool "$S/eval_$name.json,$OUT/seeds/eval_${name}_seed*.json"
  fi
done

# --- pass@k (Chen et al. 2021's unbiased estimator) on the 34 held-out fact questions, 64 answers each:
#     SFT and each run of PASS_RUNS (run directories) whose checkpoint exists, then one plot of the curves
#     (docs/overoptimisation.md)
PASS_RUNS=${PASS_RUNS-$OUT/ppo $S/rloo $S/grpo_verifiable_b256 $S/grpo_verifiable_b256_ptx}
if [ -n "$PASS_RUNS" ]; then
  P="--prompts $DATA/prompts_val.jsonl --pass_at_k 64 --pass_samples 64 --n_show 0"
  [ -f "$S/pass_sft.json" ] || python eval.py --ckpt "$OUT/sft" $P --out "$S/pass_sft.json"
  for run in $PASS_RUNS; do
    name=$(basename "$run")
    [ -f "$S/pass_$name.json" ] && continue
    if [ -d "$run" ]; then python eval.py --ckpt "$run" $P --out "$S/pass_$name.json"; else echo "sweep.sh: no $run, its pass@k skipped"; fi
  done
  python eval.py --pass_curves "$S/pass_*.json" --plot "$OUT/pass_at_k.png"
fi
