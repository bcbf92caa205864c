"""Stanford Alpaca (Taori et al. 2023) -> our SFT files.

Downloads https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json
(52,002 instructions, one JSON array of {"instruction", "input", "output"}) into --cache_dir.

prompt = instruction, plus "\n\n" + input when the input is not empty: the rule sft.read_pairs
applies to Alpaca rows, here with every field stripped. response = output. The chat template then
gives "Human: {instruction}\n\n{input}\n\nAssistant: {output}<|endoftext|>"; Alpaca's own
"### Instruction:" template is not used.

Writes to --out_dir, split at random with --seed (a --val_frac share, at least 1 row, to val):
    alpaca_sft_train.jsonl, alpaca_sft_val.jsonl    {"prompt", "response"}    sft.py
Skipped and counted: records with an empty instruction or output (empty). A file that is not a
JSON array, or a record that is not an object of three strings, is an error naming the file and the
line or record.

Run:      python data/prepare_alpaca.py --out_dir data/alpaca [--val_frac 0.02] [--seed 0]
Offline:  python data/prepare_alpaca.py --out_dir data/alpaca --src path/to/alpaca_data.json
"""

import json
import os
import random
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402  (the --key value parser shared by every script)
from data._download import CACHE, download, field, summary, write_jsonl  # noqa: E402

URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


def read_alpaca(path):
    """The records of one JSON array, each checked to hold string instruction, input and output."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg} at column {e.colno}); a partial download?") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    for i, rec in enumerate(records, 1):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
        yield tuple(field(rec, k, str, where).strip() for k in ("instruction", "input", "output"))


def prepare(out_dir, src=None, cache_dir=CACHE, val_frac=0.02, seed=0, max_rows=None):
    """Write alpaca_sft_{train,val}.jsonl; return the counts."""
    path = src if src is not None else download(URL, os.path.join(cache_dir, "alpaca_data.json"))
    rows, skipped = [], {"empty": 0}
    for i, (instruction, inp, output) in enumerate(read_alpaca(path)):
        if max_rows is not None and i >= max_rows:
            break
        if not instruction or not output:
            skipped["empty"] += 1
            continue
        rows.append({"prompt": instruction + (f"\n\n{inp}" if inp else ""), "response": output})
    if len(rows) < 2:
        raise ValueError(f"{path}: {len(rows)} usable records, need at least 2 for a train/val split")
    random.Random(seed).shuffle(rows)
    n_val = min(max(1, round(len(rows) * val_frac)), len(rows) - 1)
    write_jsonl(os.path.join(out_dir, "alpaca_sft_val.jsonl"), rows[:n_val])
    write_jsonl(os.path.join(out_dir, "alpaca_sft_train.jsonl"), rows[n_val:])
    written = {"train": len(rows) - n_val, "val": n_val}
    print(summary("prepare_alpaca", "sft", written, skipped))
    return {**written, "skipped": skipped}


@dataclass
class Config:
    out_dir: str = "data/alpaca"  # where alpaca_sft_{train,val}.jsonl go
    src: str = ""  # local alpaca_data.json to use instead of downloading
    cache_dir: str = CACHE  # where downloads are kept
    val_frac: float = 0.02  # share of the records held out for validation
    seed: int = 0  # seeds the train/val split
    max_rows: int = 0  # read at most this many records (0 = all)


def main(argv=None):
    args = M.parse_config(Config, argv)
    M.check_paths(src=args.src)
    return prepare(args.out_dir, args.src or None, args.cache_dir, args.val_frac, args.seed, args.max_rows or None)


if __name__ == "__main__":
    M.main(main, errors=(ValueError, OSError))  # a bad or partial download, a missing file, no network: one line
