"""OpenAI's Reddit TL;DR summarization (Stiennon et al. 2020) -> our SFT, preference and prompt files.

Downloads into --cache_dir/tldr/ (all from https://openaipublic.blob.core.windows.net/summarize-from-feedback/):
    datasets/tldr_3_filtered/{train,valid,test}.jsonl   the filtered TL;DR posts with their reference
        summaries (116,722 / 6,447 / 6,553), a line: {"id", "subreddit", "title", "post", "summary"}
    dataset/comparisons/batch{N}.json for N in --batches (default 3-20,22: all the Reddit batches)
        the human comparisons, a line: {"info": {"id", "post", "title", "subreddit"},
        "summaries": [{"text"}, {"text"}], "choice": 0 or 1, "split": "train" / "valid1" / "valid2", ...}
The CNN/DM batches (batch0_cnndm, cnndm0, cnndm2) have articles, not posts, and are not read.

The prompt is the paper's query format (as in Huang et al. 2024, "The N+ implementation details
of RLHF with PPO"), without its truncation of long posts to 512 tokens: our stages truncate prompts
by their own documented rule.
    "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
Posts, titles and summaries are stripped; the chat template adds the space before the summary.

Writes to --out_dir:
    tldr_sft_{train,valid,test}.jsonl      {"prompt", "response": reference summary}   sft.py
    tldr_prompts_{train,valid,test}.jsonl  {"prompt"}, each prompt once                 ppo.py, eval.py
    tldr_pairs_{train,valid}.jsonl         {"prompt", "chosen": summaries[choice], "rejected"}
                                           train from split "train"; valid from "valid1" + "valid2"
                                           (the paper selected models on valid1, reported valid2)
Skipped and counted: empty summaries (empty_summary), empty posts (empty_post), comparisons of two
equal summaries (identical), repeated prompts (duplicate_prompt, prompts files only). Comparisons
keep repeats: several labelers judging one pair is the data. A line that is not JSON, lacks a key,
holds the wrong type, or names an unknown split is an error naming the file and line.

Run:      python data/prepare_tldr.py --out_dir data/tldr [--batches 3-20,22] [--max_rows N]
Offline:  python data/prepare_tldr.py --out_dir data/tldr --src dir   (dir holds train.jsonl,
          valid.jsonl, test.jsonl and the batch{N}.json files, as the cache does)
One file: python data/prepare_tldr.py --out_dir data/mine --src my_posts.jsonl --split valid   (posts:
          tldr_sft_valid / tldr_prompts_valid), or --src my_comparisons.json (tldr_pairs_{train,valid})
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402  (the --key value parser shared by every script)
from data._download import CACHE, download, field, json_lines, summary, write_jsonl  # noqa: E402

BASE = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
SFT_URL = BASE + "/datasets/tldr_3_filtered/{name}"
CMP_URL = BASE + "/dataset/comparisons/{name}"
CMP_SPLITS = {"train": "train", "valid1": "valid", "valid2": "valid"}  # upstream split -> ours


def tldr_prompt(subreddit, title, post):
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title.strip()}\n\nPOST: {post.strip()}\n\nTL;DR:"


def parse_batches(spec):
    """'3-5,22,edit_b2_eval_test' -> ['batch3.json', 'batch4.json', 'batch5.json', 'batch22.json', 'edit_b2_eval_test.json']."""
    names = []
    for part in spec.split(","):
        if "-" in part and part.replace("-", "").isdigit():
            lo, hi = map(int, part.split("-"))
            names += [f"batch{i}.json" for i in range(lo, hi + 1)]
        else:
            names.append(f"batch{part}.json" if part.isdigit() else f"{part}.json")
    return names


def local(name, url, src, cache_dir):
    if src is None:
        return download(url.format(name=name), os.path.join(cache_dir, "tldr", name))
    path = os.path.join(src, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return path


def read_lines(path, max_rows):
    with open(path, "rb") as f:
        for i, (n, row) in enumerate(json_lines(path, f)):
            if max_rows is not None and i >= max_rows:
                return
            yield n, row


def prepare(out_dir, src=None, cache_dir=CACHE, batches=parse_batches("3-20,22"), max_rows=None, split_of_file="train"):
    """Write the tldr_* files; return {name: counts}. src may be one file of the user's in an upstream
    format: posts (written as split_of_file) or comparisons (split by their own "split" field)."""
    stats = {}
    single = src is not None and os.path.isfile(src)
    if single:
        first = next(read_lines(src, 1), (0, {}))[1]
        post_splits, batches = ((), [src]) if "info" in first else ((split_of_file,), [])
    else:
        post_splits = ("train", "valid", "test")
    # --- SFT posts with reference summaries, and the prompts
    for split in post_splits:
        path = src if single else local(f"{split}.jsonl", SFT_URL, src, cache_dir)
        sft, prompts, seen = [], [], set()
        skipped = {"empty_post": 0, "empty_summary": 0, "duplicate_prompt": 0}
        for n, row in read_lines(path, max_rows):
            where = f"{path}:{n}"
            subreddit, title, post, ref = (field(row, k, str, where) for k in ("subreddit", "title", "post", "summary"))
            if not post.strip():
                skipped["empty_post"] += 1
                continue
            prompt = tldr_prompt(subreddit, title, post)
            if prompt in seen:
                skipped["duplicate_prompt"] += 1
            else:
                seen.add(prompt)
                prompts.append({"prompt": prompt})
            if not ref.strip():
                skipped["empty_summary"] += 1
                continue
            sft.append({"prompt": prompt, "response": ref.strip()})
        write_jsonl(os.path.join(out_dir, f"tldr_sft_{split}.jsonl"), sft)
        write_jsonl(os.path.join(out_dir, f"tldr_prompts_{split}.jsonl"), prompts)
        written = {"sft": len(sft), "prompts": len(prompts)}
        print(summary("prepare_tldr", f"sft {split}", written, skipped))
        stats[f"sft_{split}"] = {**written, "skipped": skipped}

    # --- human comparisons
    pairs = {"train": [], "valid": []}
    skipped = {"empty_post": 0, "empty_summary": 0, "identical": 0}
    for name in batches:
        path = src if single else local(name, CMP_URL, src, cache_dir)
        for n, row in read_lines(path, max_rows):
            where = f"{path}:{n}"
            info, summaries = field(row, "info", dict, where), field(row, "summaries", list, where)
            subreddit, title, post = (field(info, k, str, f"{where}: info") for k in ("subreddit", "title", "post"))
            choice, split = field(row, "choice", int, where), field(row, "split", str, where)
            if choice not in (0, 1) or len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
                raise ValueError(f"{where}: expected 2 summaries and choice 0 or 1, got {len(summaries)} and {choice!r}")
            if split not in CMP_SPLITS:
                raise ValueError(f"{where}: unknown split {split!r}; expected one of {list(CMP_SPLITS)}")
            texts = [field(s, "text", str, f"{where}: summaries[{i}]").strip() for i, s in enumerate(summaries)]
            if not post.strip():
                skipped["empty_post"] += 1
            elif not all(texts):
                skipped["empty_summary"] += 1
            elif texts[0] == texts[1]:
                skipped["identical"] += 1
            else:
                prompt = tldr_prompt(subreddit, title, post)
                pairs[CMP_SPLITS[split]].append({"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice]})
    if not batches:
        return stats
    if not (any(pairs.values()) if single else pairs["train"]):
        raise ValueError(f"comparisons {batches}: no usable training pairs; skipped {skipped}")
    for split, rows in pairs.items():
        write_jsonl(os.path.join(out_dir, f"tldr_pairs_{split}.jsonl"), rows)
    written = {f"pairs {split}": len(rows) for split, rows in pairs.items()}
    print(summary("prepare_tldr", f"comparisons ({len(batches)} batches)", written, skipped))
    stats["comparisons"] = {**written, "skipped": skipped}
    return stats


@dataclass
class Config:
    out_dir: str = "data/tldr"  # where the tldr_* files go
    batches: str = "3-20,22"  # comparison batches: numbers, ranges a-b, or file stems
    src: str = ""  # instead of downloading: a directory holding the upstream files, or one file of posts or comparisons
    split: str = "train"  # the split a single --src file of posts is written as
    cache_dir: str = CACHE  # where downloads are kept
    max_rows: int = 0  # read at most this many lines of each upstream file (0 = all)


def main(argv=None):
    args = M.parse_config(Config, argv)
    M.check_paths(src=args.src)
    return prepare(args.out_dir, args.src or None, args.cache_dir, parse_batches(args.batches), args.max_rows or None, args.split)


if __name__ == "__main__":
    M.main(main, errors=(ValueError, OSError))  # a bad or partial download, a missing file, no network: one line
