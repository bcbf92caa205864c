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
  EVAL="--n_prompts 16 --max_new_tokens 24"
else
  WORLD="" PRETRAIN="" SFT="" EVAL=""
fi

# --- 1. the world: pretraining corpus, SFT pairs, train/held-out prompts (seconds)
python data/world.py --out_dir "$DATA" $WORLD

# --- 2. our BPE tokenizer, trained on the corpus and the SFT text (seconds)
python data/bpe.py --input "$DATA/pretrain.txt" "$DATA/sft_train.jsonl" --vocab_size 2048 --out "$DATA/tokenizer.tiktoken"

# --- 3. pretraining: a base model that knows the world's language
python pretrain.py --config configs/pretrain_world.toml --data "$DATA/pretrain.txt" --tokenizer "$DATA/tokenizer.tiktoken" \
  --out_dir "$OUT/pretrain" $PRETRAIN

# --- 4. supervised fine-tuning on prompt/response pairs (loss on the response and its EOS)
python sft.py --config configs/sft_world.toml --data "$DATA/sft_train.jsonl" --val_data "$DATA/sft_val.jsonl" \
  --init "$OUT/pretrain" --out_dir "$OUT/sft" $SFT

# --- 5. evaluation on held-out prompts: gold reward of the pretrained and the SFT model
python eval.py --ckpt "$OUT/pretrain" --prompts "$DATA/prompts_val.jsonl" --out "$OUT/eval_pretrain.json" --n_show 3 $EVAL
python eval.py --ckpt "$OUT/sft" --prompts "$DATA/prompts_val.jsonl" --baseline "$OUT/pretrain" --out "$OUT/eval_sft.json" $EVAL

# --- results
python - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
cols = ["gold", "helpful", "honest", "harmless", "eos_rate", "on_topic", "rm_score", "kl", "win_rate"]
print(f"\n{'model':12s}" + "".join(f"{c:>10s}" for c in cols))
for name in ["pretrain", "sft"]:
    path = os.path.join(out, f"eval_{name}.json")
    if os.path.exists(path):
        r = json.load(open(path))
        print(f"{name:12s}" + "".join(f"{r[c]:10.3f}" if c in r else f"{'-':>10s}" for c in cols))
EOF
