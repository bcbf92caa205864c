"""Anthropic HH-RLHF (Bai et al. 2022) -> our preference, SFT and prompt files.

Downloads https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz
for each subset in --subsets (helpful-base, harmless-base, helpful-online, helpful-rejection-sampled)
and each split (train, test) into --cache_dir/hh-rlhf/{subset}/{split}.jsonl.gz. An upstream line
is {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "\n\nHuman: ...\n\nAssistant: ..."}:
two transcripts that should share every turn but the last Assistant answer.

Each transcript is split at its last "\n\nAssistant:", exactly as model.split_hh does, so that
    "Human: " + prompt + "\n\nAssistant: " + answer == transcript without its leading "\n\n"
up to whitespace at the two ends of prompt and answer, which is stripped. A multi-turn prompt
keeps the earlier turns: prompt = "q1\n\nAssistant: a1\n\nHuman: q2".

Writes to --out_dir, for split in train, test (subsets concatenated in the order given):
    hh_pairs_{split}.jsonl    {"prompt", "chosen", "rejected"}   reward.py, dpo.py
    hh_sft_{split}.jsonl      {"prompt", "response"}             sft.py: the chosen answers, as the
                                                                 DPO paper's SFT on preferred answers
    hh_prompts_{split}.jsonl  {"prompt"}, each prompt once       ppo.py, eval.py
Skipped on purpose, counted and printed in one line per split:
    bad_transcript   a transcript that is not "\n\nHuman: ...\n\nAssistant: ..." (whole row)
    empty_prompt     nothing between "Human:" and the last "Assistant:" (whole row)
    empty_chosen     the chosen answer is empty (no SFT row, no pair; the prompt is kept)
    empty_rejected   the rejected answer is empty (no pair)
    mismatched       the rejected transcript differs from the chosen one before the last answer (no pair)
    identical        chosen answer == rejected answer: no preference to learn (no pair; SFT row kept)
    duplicate_prompt a prompt seen before in this split (prompts file only)
A line that is not JSON, lacks "chosen"/"rejected" or holds a non-string is an error naming the file
and line, as is a split that yields no pairs at all.

Run:      python data/prepare_hh.py --out_dir data/hh [--subsets helpful-base,harmless-base]
Offline:  python data/prepare_hh.py --out_dir data/hh --src path/to/hh-rlhf
          (--src: a directory laid out like the dataset repo, {subset}/{split}.jsonl.gz)
One file: python data/prepare_hh.py --out_dir data/mine --src my_pairs.jsonl --split train
          (rows in the upstream format; writes hh_*_train.jsonl only)
"""

import gzip
import os
import sys
import zlib
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402  (the --key value parser shared by every script)
from data._download import CACHE, download, field, json_lines, summary, write_jsonl  # noqa: E402

URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
SUBSETS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")


def split_transcript(transcript):
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> (prompt, answer), cut at the last Assistant turn; None if not HH."""
    cut = transcript.rfind("\n\nAssistant:")
    if cut < 0 or not transcript.lstrip("\n").startswith("Human:"):
        return None
    return transcript[:cut].lstrip("\n")[len("Human:"):].strip(), transcript[cut + len("\n\nAssistant:"):].strip()


def read_hh(path, max_rows=None):
    """(line number, chosen, rejected) of one upstream .jsonl.gz (or .jsonl) file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for i, (n, row) in enumerate(json_lines(path, f)):
                if max_rows is not None and i >= max_rows:
                    return
                yield n, field(row, "chosen", str, f"{path}:{n}"), field(row, "rejected", str, f"{path}:{n}")
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt
        raise ValueError(f"{path}: unreadable ({e}); a partial download? delete it and rerun") from None


def prepare(out_dir, src=None, cache_dir=CACHE, subsets=("helpful-base",), max_rows=None, split_of_file="train"):
    """Write the hh_* files for train and test (or, when src is one file, for split_of_file); return {split: counts}."""
    stats = {}
    single = src is not None and os.path.isfile(src)  # one upstream-format file of the user's
    for split in (split_of_file,) if single else SPLITS:
        pairs, sft, prompts, seen = [], [], [], set()
        skipped = dict.fromkeys(["bad_transcript", "empty_prompt", "empty_chosen", "empty_rejected",
                                 "mismatched", "identical", "duplicate_prompt"], 0)
        rows = 0
        for subset in ["(file)"] if single else subsets:
            if single:
                path = src
            elif src is not None:
                path = os.path.join(src, subset, f"{split}.jsonl.gz")
            else:
                path = download(URL.format(subset=subset, split=split),
                                os.path.join(cache_dir, "hh-rlhf", subset, f"{split}.jsonl.gz"))
            for n, chosen, rejected in read_hh(path, max_rows):
                rows += 1
                c, r = split_transcript(chosen), split_transcript(rejected)
                if c is None:
                    skipped["bad_transcript"] += 1
                    continue
                prompt, answer = c
                if not prompt:
                    skipped["empty_prompt"] += 1
                    continue
                if prompt in seen:
                    skipped["duplicate_prompt"] += 1
                else:
                    seen.add(prompt)
                    prompts.append({"prompt": prompt})
                if not answer:
                    skipped["empty_chosen"] += 1
                    continue
                sft.append({"prompt": prompt, "response": answer})
                if r is None or r[0] != prompt:
                    skipped["mismatched"] += 1
                elif not r[1]:
                    skipped["empty_rejected"] += 1
                elif r[1] == answer:
                    skipped["identical"] += 1
                else:
                    pairs.append({"prompt": prompt, "chosen": answer, "rejected": r[1]})
        if not pairs:
            raise ValueError(f"HH-RLHF {split} ({src if single else ', '.join(subsets)}): no usable pairs in {rows} rows; skipped {skipped}")
        write_jsonl(os.path.join(out_dir, f"hh_pairs_{split}.jsonl"), pairs)
        write_jsonl(os.path.join(out_dir, f"hh_sft_{split}.jsonl"), sft)
        write_jsonl(os.path.join(out_dir, f"hh_prompts_{split}.jsonl"), prompts)
        written = {"rows": rows, "pairs": len(pairs), "sft": len(sft), "prompts": len(prompts)}
        print(summary("prepare_hh", split, written, skipped))
        stats[split] = {**written, "skipped": skipped}
    return stats


@dataclass
class Config:
    out_dir: str = "data/hh"  # where the hh_*.jsonl files go
    subsets: str = "helpful-base"  # comma-separated, from helpful-base, harmless-base, helpful-online, helpful-rejection-sampled
    src: str = ""  # instead of downloading: a directory {subset}/{split}.jsonl.gz, or one .jsonl(.gz) file of upstream rows
    split: str = "train"  # the split a single --src file is written as (hh_*_{split}.jsonl)
    cache_dir: str = CACHE  # where downloads are kept
    max_rows: int = 0  # read at most this many rows of each upstream file (0 = all)


def main(argv=None):
    args = M.parse_config(Config, argv)
    subsets = args.subsets.split(",")
    if unknown := [s for s in subsets if s not in SUBSETS]:
        raise M.ConfigError(f"unknown subset(s) {unknown}; choose from {list(SUBSETS)}")
    M.check_paths(src=args.src)
    return prepare(args.out_dir, args.src or None, args.cache_dir, subsets, args.max_rows or None, args.split)


if __name__ == "__main__":
    M.main(main, errors=(ValueError, OSError))  # a bad or partial download, a missing file, no network: one line
