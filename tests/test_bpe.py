"""Tests for data/bpe.py: BPE training against a slow reference, tiktoken round trips, the file format.
Run: python -m pytest -q tests/test_bpe.py"""
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import tiktoken.load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `data.bpe` imports however pytest is launched

import model as M  # noqa: E402
from data.bpe import SPLIT_PAT, train_bpe  # noqa: E402

TEXT = " ".join(f"the quick brown fox {i} jumps over the lazy dog's back, and the dog doesn't mind."
                for i in range(150)) + "\n\nnaïve café, déjà vu!\t\n"
ODD = "héllo 世界 🙂\x00\t\n  ZEBRA 12345 __init__ <|endoftext|> \r\n\u200b"


def _slow_bpe(text, vocab_size):
    """reference: recount every pair after every merge"""
    words = [[bytes([c]) for c in w.encode("utf-8")] for w in re.findall(SPLIT_PAT, text)]
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        ranks.setdefault(a + b, len(ranks))
        for w in words:
            i = 0
            while i + 1 < len(w):
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    return ranks


def test_hand_computed_merges():
    # pairs: (a,b) x3, (' ',a) x2, (' ',c), (c,d): first "ab", then " ab"
    r = train_bpe("ab ab ab cd", 258)
    assert r[b"ab"] == 256 and r[b" ab"] == 257 and len(r) == 258
    # all pairs tie at 1: the smallest bytes win, and b" " < b"a" < b"x"
    assert train_bpe("xy ab", 257)[b" a"] == 256


def test_matches_slow_reference():
    assert train_bpe(TEXT, 330) == _slow_bpe(TEXT, 330)


def test_valid_vocabulary_and_deterministic():
    r = train_bpe(TEXT, 300)
    assert r == train_bpe(TEXT, 300)
    assert sorted(r.values()) == list(range(len(r))) and len(r) == 300
    assert all(r[bytes([i])] == i for i in range(256))
    by_rank = sorted(r, key=r.get)
    for rank, tok in enumerate(by_rank[256:], 256):  # each merge joins two earlier tokens
        assert any(r.get(tok[:k], rank) < rank and r.get(tok[k:], rank) < rank for k in range(1, len(tok)))


def test_tiktoken_round_trip_and_compression():
    r = train_bpe(TEXT, 300)
    enc = M.Tokenizer(r).enc
    for s in [TEXT, ODD, "", " ", "the fox", "\x00\xff\U0010ffff"]:
        assert enc.decode(enc.encode_ordinary(s)) == s
    assert enc.encode("a<|endoftext|>", allowed_special="all")[-1] == len(r) == enc.eot_token
    assert len(enc.encode_ordinary(TEXT)) < 0.4 * len(TEXT.encode("utf-8"))


def test_ranks_file_loads_in_tiktoken(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken caches files by path otherwise
    r = train_bpe(TEXT, 300)
    path = tmp_path / "tok.tiktoken"
    M.write_ranks(r, path)
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == r == M.read_ranks(path)
    assert path.read_text().splitlines()[0] == "AA== 0"


def test_cli(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    out = tmp_path / "tok.tiktoken"
    res = subprocess.run([sys.executable, "data/bpe.py", "--input", str(tmp_path / "a.txt"), "--vocab_size", "301",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert M.read_ranks(out) == train_bpe(TEXT + "\n\n", 300)  # vocab_size counts <|endoftext|>
