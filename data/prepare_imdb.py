"""IMDb movie reviews (Maas et al. 2011) -> the DPO paper's controlled-sentiment generation task.

Downloads https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz (84 MB) into --cache_dir
and streams it (no extraction to disk): aclImdb/{train,test}/{pos,neg}/{id}_{rating}.txt, 12,500
reviews per split and class. Other members (train/unsup, the vocabulary, bag-of-words files) are
ignored. Reviews mark paragraphs with "<br />" tags: each run of them becomes one newline, so that
a blank line only ever separates two reviews.

Task (Rafailov et al. 2023, section 6.1): the policy continues a prefix of a review and should make
it positive; the reward is a sentiment classifier's score. The paper's prefixes are 2-8 tokens; ours
are 2-8 whitespace-separated words (length uniform, seeded), so they do not depend on a tokenizer.

Writes to --out_dir:
    imdb_pretrain.txt              train reviews, one document each, separated by a blank line
                                   (pretrain.py/sft base: fine-tune GPT-2 on the domain)
    imdb_prompts_{train,test}.jsonl   {"prompt"}: the prefix of each review (ppo.py, eval.py)
    imdb_sft_{train,test}.jsonl    {"prompt", "response"}: the same prefix and the rest of its review,
                                   to teach continuation under the chat template (sft.py)
    imdb_sentiment_{train,test}.jsonl {"prompt", "response", "label"}: the same prefix and rest, label 1
                                   positive, 0 negative: reward.py --objective classify trains the
                                   sentiment reward on exactly the (prompt, response) form it scores
Each split is shuffled with --seed; --max_rows keeps the first N reviews of each shuffled split.
Skipped and counted: reviews empty after cleaning (empty), reviews with no more words than their
prefix length (too_short; they still go into the pretraining file). A member that
is not UTF-8, an archive that is not a readable .tar.gz, or a split/class with no reviews is an
error naming the file.

Run:      python data/prepare_imdb.py --out_dir data/imdb [--seed 0]
Offline:  python data/prepare_imdb.py --out_dir data/imdb --src path/to/aclImdb_v1.tar.gz
"""

import os
import random
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402  (the --key value parser shared by every script)
from data._download import CACHE, download, summary, write_jsonl, write_text  # noqa: E402

URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
MEMBER = re.compile(r"(?:\./)?aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt")
BR = re.compile(r"\s*(?:<br\s*/?>\s*)+", re.IGNORECASE)


def clean(text):
    """'<br />' runs -> one newline; blank lines and end-of-line spaces removed."""
    lines = BR.sub("\n", text).splitlines()
    return "\n".join(line.strip() for line in lines if line.strip())


def read_imdb(path):
    """{split: [(label, id, text)]} sorted by (label, id), whatever the order inside the archive."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    reviews = {"train": [], "test": []}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar:
                m = MEMBER.fullmatch(member.name)
                if m is None or not member.isfile():
                    continue
                try:
                    text = tar.extractfile(member).read().decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: {member.name}: not UTF-8 ({e.reason} at byte {e.start})") from None
                reviews[m[1]].append((int(m[2] == "pos"), int(m[3]), clean(text)))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable .tar.gz ({e}); a partial download? delete it and rerun") from None
    for split, rows in reviews.items():
        for label in (0, 1):
            if not any(r[0] == label for r in rows):
                cls = "pos" if label else "neg"
                raise ValueError(f"{path}: no aclImdb/{split}/{cls}/<id>_<rating>.txt members; is this the IMDb archive?")
        rows.sort()
    return reviews


def prefix_split(text, rng):
    """(first k words, rest of the text) with k uniform in 2..8; None if the text has <= k words."""
    k = rng.randint(2, 8)
    words = list(re.finditer(r"\S+", text))
    if len(words) <= k:
        return None
    return " ".join(w[0] for w in words[:k]), text[words[k - 1].end():].strip()


def prepare(out_dir, src=None, cache_dir=CACHE, seed=0, max_rows=None):
    """Write the imdb_* files; return {split: counts}."""
    path = src if src is not None else download(URL, os.path.join(cache_dir, "aclImdb_v1.tar.gz"))
    reviews = read_imdb(path)
    rng = random.Random(seed)
    stats = {}
    for split in ("train", "test"):
        rows = reviews[split]
        rng.shuffle(rows)
        rows = rows[:max_rows]
        skipped = {"empty": 0, "too_short": 0}
        texts, sentiment, prompts, sft = [], [], [], []
        for label, _, text in rows:
            if not text:
                skipped["empty"] += 1
                continue
            texts.append(text)
            cut = prefix_split(text, rng)
            if cut is None:
                skipped["too_short"] += 1
                continue
            prompts.append({"prompt": cut[0]})
            sft.append({"prompt": cut[0], "response": cut[1]})
            sentiment.append({"prompt": cut[0], "response": cut[1], "label": label})
        if split == "train":
            write_text(os.path.join(out_dir, "imdb_pretrain.txt"), "\n\n".join(texts) + "\n")
        write_jsonl(os.path.join(out_dir, f"imdb_sentiment_{split}.jsonl"), sentiment)
        write_jsonl(os.path.join(out_dir, f"imdb_prompts_{split}.jsonl"), prompts)
        write_jsonl(os.path.join(out_dir, f"imdb_sft_{split}.jsonl"), sft)
        written = {"reviews": len(rows), "pretrain_docs": len(texts), "prompts": len(prompts),
                   "positive": sum(r["label"] for r in sentiment)}
        print(summary("prepare_imdb", split, written, skipped))
        stats[split] = {**written, "skipped": skipped}
    return stats


@dataclass
class Config:
    out_dir: str = "data/imdb"  # where the imdb_* files go
    src: str = ""  # local aclImdb_v1.tar.gz to use instead of downloading
    cache_dir: str = CACHE  # where downloads are kept
    seed: int = 0  # seeds the shuffle and the prefix lengths
    max_rows: int = 0  # keep at most this many reviews per split (0 = all)


def main(argv=None):
    args = M.parse_config(Config, argv)
    M.check_paths(src=args.src)
    return prepare(args.out_dir, args.src or None, args.cache_dir, args.seed, args.max_rows or None)


if __name__ == "__main__":
    M.main(main, errors=(ValueError, OSError))  # a bad or partial download, a missing file, no network: one line
