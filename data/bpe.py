"""Train a byte-level BPE tokenizer (GPT-2 style) and write it as a tiktoken ranks file.

Byte-pair encoding (Sennrich et al. 2016) on UTF-8 bytes, as in GPT-2 (Radford et al. 2019):
the 256 single bytes get ranks 0..255, then each merge of the most frequent adjacent pair
gets the next rank (ties: the lexicographically smallest (left bytes, right bytes)). The text
is first split into pre-tokens ("words") so merges never cross a word boundary; pairs are
counted over unique words weighted by frequency and updated incrementally after each merge.

Pre-splitting uses SPLIT_PAT, GPT-2's pattern rewritten for the stdlib `re` (\\p{L} ->
[^\\W\\d_], \\p{N} -> \\d). It only decides which pairs are counted at training time: at encode
time tiktoken uses model.GPT2_PAT, and since a merge never spans two pre-tokens, every
merged token stays reachable. The file format is tiktoken's: one `base64(bytes) rank` line per
token, sorted by rank. The model's vocabulary is len(ranks) + 1: `<|endoftext|>` gets id
len(ranks).

The file is written and read by model.write_ranks / model.read_ranks, the one tokenizer format
of the project (tiktoken.load caches files by path, so a retrained file could load stale).

Run:  python data/bpe.py --input data/world/pretrain.txt,data/world/sft_train.jsonl --vocab_size 2048 \\
          --out data/world/tokenizer.tiktoken
"""
import heapq
import os
import re
import time
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402  (the ranks file format and the tokenizer live there)

# the same split for the stdlib re: what training counts
SPLIT_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""


def _merge(word, a, b, z):
    """replace every adjacent (a, b) in word by z"""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(z)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text, vocab_size):
    """{token bytes: rank} with vocab_size entries (fewer if the text runs out of pairs)"""
    assert vocab_size >= 256, "the 256 single bytes are always in the vocabulary"
    counts = Counter(re.findall(SPLIT_PAT, text))
    words = [list(w.encode("utf-8")) for w in counts]  # token ids of each unique word
    freqs = list(counts.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes; the id is the rank
    ranks = {t: i for i, t in enumerate(vocab)}
    pair_count, where = defaultdict(int), defaultdict(set)  # pair -> weighted count, word ids
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freqs[wi]
            where[p].add(wi)
    # max-heap of (count, then smallest bytes) with lazy deletion: an entry is live while its
    # count equals the pair's current count; every count change pushes a fresh entry
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if -neg != pair_count.get((a, b), 0) or neg == 0:
            continue
        new = vocab[a] + vocab[b]
        if new not in ranks:  # two merge orders can spell the same bytes: keep one rank
            ranks[new] = len(vocab)
            vocab.append(new)
        z, changed = ranks[new], set()
        for wi in list(where[(a, b)]):
            w, f = words[wi], freqs[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                where[p].discard(wi)
                changed.add(p)
            w = words[wi] = _merge(w, a, b, z)
            for p in zip(w, w[1:]):
                pair_count[p] += f
                where[p].add(wi)
                changed.add(p)
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], vocab[p[0]], vocab[p[1]], p[0], p[1]))
            else:
                pair_count.pop(p, None)
                where.pop(p, None)
    return ranks




@dataclass
class Config:
    input: str = ""  # (required) training text files (utf-8), comma-separated; add sft_train.jsonl so prompt words get merges
    vocab_size: int = 2048  # TOTAL model vocabulary including <|endoftext|>: 2048 -> 2047 ranks, 1791 merges
    out: str = ""  # (required) the tiktoken ranks file to write


if __name__ == "__main__":
    args = M.parse_config(Config)
    M.require(args, "input", "out")
    text = ""
    for path in args.input.split(","):
        with open(path, encoding="utf-8") as f:
            text += f.read() + "\n\n"
    t0 = time.time()
    ranks = train_bpe(text, args.vocab_size - 1)
    dt = time.time() - t0
    M.write_ranks(ranks, args.out)
    # check: the file loads back and round-trips text through tiktoken with the real pattern
    enc = M.load_tokenizer(args.out).enc
    sample = text[:200_000]
    ids = enc.encode_ordinary(sample)
    assert enc.decode(ids) == sample, "round trip failed"
    n_merges = len(ranks) - 256
    short = "" if len(ranks) == args.vocab_size - 1 else f" (text ran out of pairs before {args.vocab_size - 1})"
    print(f"bpe: {args.out} | {len(ranks)} ranks{short}, vocab_size {len(ranks) + 1} with {M.EOT} | "
          f"{n_merges} merges in {dt:.1f}s ({n_merges / max(dt, 1e-9):.0f} merges/s) | "
          f"{len(ids) / len(sample):.3f} tokens/char")
