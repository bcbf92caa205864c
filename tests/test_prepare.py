"""The data/prepare_*.py scripts, offline: small files in each upstream format go in through --src,
and what comes out must read cleanly through the stages' own readers.
Run: python -m pytest -q tests/test_prepare.py"""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

import model as M
import reward
import sft
from data import _download, prepare_alpaca, prepare_hh, prepare_imdb, prepare_tldr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- HH-RLHF

def hh(*turns):
    """hh('q1', 'a1', 'q2', 'a2') -> '\\n\\nHuman: q1\\n\\nAssistant: a1\\n\\nHuman: q2\\n\\nAssistant: a2'."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


HH_TRAIN = [
    {"chosen": hh("What is 2+2?", "It is 4."), "rejected": hh("What is 2+2?", "Five.")},
    {"chosen": hh("Hi there", "Hello! How can I help?", "Tell me a joke.", "Why did the chicken cross the road?"),
     "rejected": hh("Hi there", "Hello! How can I help?", "Tell me a joke.", "No.")},
    {"chosen": hh("Same?", "Yes."), "rejected": hh("Same?", "Yes.")},  # identical: no pair, SFT kept
    {"chosen": hh("Q one", "A."), "rejected": hh("Q two", "B.")},  # mismatched prompts: no pair, SFT kept
    {"chosen": "\n\nHuman: Empty?\n\nAssistant:", "rejected": hh("Empty?", "No.")},  # empty chosen
    {"chosen": hh("What is 2+2?", "Four."), "rejected": hh("What is 2+2?", "4?")},  # repeated prompt
    {"chosen": "no transcript here", "rejected": "nor here"},  # bad transcript
]
HH_TEST = [{"chosen": hh("Capital of France?", "Paris."), "rejected": hh("Capital of France?", "Rome.")}]


def write_hh(src, subset, split, rows=None, lines=None):
    os.makedirs(src / subset, exist_ok=True)
    lines = lines if lines is not None else [json.dumps(r) for r in rows]
    with gzip.open(src / subset / f"{split}.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_hh(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_hh(src, "helpful-base", "train", HH_TRAIN)
    write_hh(src, "helpful-base", "test", HH_TEST)
    write_hh(src, "harmless-base", "train", HH_TEST)
    write_hh(src, "harmless-base", "test", HH_TEST)
    stats = prepare_hh.main(["--src", str(src), "--out_dir", str(out), "--subsets", "helpful-base,harmless-base"])
    assert stats["train"]["skipped"] == {"bad_transcript": 1, "empty_prompt": 0, "empty_chosen": 1, "empty_rejected": 0,
                                         "mismatched": 1, "identical": 1, "duplicate_prompt": 1}
    pairs = read(out / "hh_pairs_train.jsonl")
    assert [p["chosen"] for p in pairs] == ["It is 4.", "Why did the chicken cross the road?", "Four.", "Paris."]
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    # the multi-turn prompt round-trips through the chat template to the upstream transcript
    assert pairs[1]["prompt"] == "Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
    for p, row in zip(pairs[:2], HH_TRAIN[:2]):
        assert "Human: " + p["prompt"] + "\n\nAssistant: " + p["chosen"] == row["chosen"][2:]
        assert M.chat_prompt(p["prompt"]) + " " + p["rejected"] == row["rejected"][2:]
    # the same split as the stages' own reader of raw HH rows
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in HH_TRAIN[:2]))
    assert M.read_preferences(str(raw))[0] == [(p["prompt"], [p["chosen"], p["rejected"]]) for p in pairs[:2]]

    groups, pstats = M.read_preferences(str(out / "hh_pairs_train.jsonl"))
    assert len(groups) == 4 and pstats["identical_skipped"] == 0
    assert len(sft.read_pairs(str(out / "hh_sft_train.jsonl"))) == 6  # all but bad transcript and empty chosen
    prompts = M.read_jsonl(str(out / "hh_prompts_train.jsonl"), ("prompt",))
    assert len(prompts) == len({p["prompt"] for p in prompts}) == 6
    assert stats["test"]["pairs"] == 2 and stats["test"]["skipped"]["duplicate_prompt"] == 1  # HH_TEST in both subsets
    assert len(read(out / "hh_pairs_test.jsonl")) == 2 and len(read(out / "hh_prompts_test.jsonl")) == 1


@pytest.mark.parametrize("bad, match", [
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}', r"train\.jsonl\.gz:2: missing key 'rejected'"),
    ('{"chosen": "x", "rejected": 3}', r"train\.jsonl\.gz:2: 'rejected' is a int, expected str"),
    ('{"chosen": "x", "rejec', r"train\.jsonl\.gz:2: not a JSON line"),
    ('["chosen", "rejected"]', r"train\.jsonl\.gz:2: expected a JSON object"),
])
def test_hh_bad_format(tmp_path, bad, match):
    write_hh(tmp_path, "helpful-base", "train", lines=[json.dumps(HH_TRAIN[0]), bad])
    with pytest.raises(ValueError, match=match):
        prepare_hh.main(["--src", str(tmp_path), "--out_dir", str(tmp_path / "out")])


def test_hh_partial_download(tmp_path):
    write_hh(tmp_path, "helpful-base", "train", HH_TRAIN * 20)
    path = tmp_path / "helpful-base" / "train.jsonl.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"train\.jsonl\.gz: unreadable"):
        prepare_hh.main(["--src", str(tmp_path), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "hh_pairs_train.jsonl").exists()


# --- IMDb

IMDB = {  # member name -> review text, as in aclImdb_v1.tar.gz
    "aclImdb/train/pos/0_9.txt": "A wonderful film with a great cast.<br /><br />I loved every minute of it.",
    "aclImdb/train/pos/1_10.txt": "Best movie of the year, go and see it now please.",
    "aclImdb/train/neg/0_2.txt": "Dull, slow and far too long.<br />The acting was poor throughout the film.",
    "aclImdb/train/neg/1_1.txt": "Awful.",  # too short for any prefix: sentiment only
    "aclImdb/test/pos/0_8.txt": "Charming and funny from start to finish, a real treat.",
    "aclImdb/test/neg/0_3.txt": "I wanted my two hours back after this mess of a movie.",
    "aclImdb/train/unsup/0_0.txt": "unlabelled, ignored",
    "aclImdb/imdb.vocab": "the\nand\n",
}


def write_imdb(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_imdb(tmp_path):
    src, out = tmp_path / "aclImdb_v1.tar.gz", tmp_path / "out"
    write_imdb(src, IMDB)
    stats = prepare_imdb.main(["--src", str(src), "--out_dir", str(out), "--seed", "0"])
    assert stats["train"]["skipped"] == {"empty": 0, "too_short": 1} and stats["test"]["prompts"] == 2
    docs = (out / "imdb_pretrain.txt").read_text().strip().split("\n\n")  # as pretrain.py splits it
    assert len(docs) == 4 and "A wonderful film with a great cast.\nI loved every minute of it." in docs
    assert not any("<br" in t for t in docs)
    # prompts are the first 2-8 words; prompt + rest of review = the review, up to whitespace
    sft_rows = read(out / "imdb_sft_train.jsonl")
    prompts = M.read_jsonl(str(out / "imdb_prompts_train.jsonl"), ("prompt",))
    assert [r["prompt"] for r in sft_rows] == [p["prompt"] for p in prompts] and len(prompts) == 3
    for r in sft_rows:
        assert 2 <= len(r["prompt"].split()) <= 8
        assert " ".join((r["prompt"] + " " + r["response"]).split()) in {" ".join(t.split()) for t in docs}
    # the sentiment labels sit on the same (prompt, response) split that the reward model scores
    labelled = read(out / "imdb_sentiment_train.jsonl")
    assert [(r["prompt"], r["response"]) for r in labelled] == [(r["prompt"], r["response"]) for r in sft_rows]
    assert sorted(r["label"] for r in labelled) == [0, 1, 1]  # "Awful." is too short for a prefix
    assert len(reward.read_labels(str(out / "imdb_sentiment_test.jsonl"))[0]) == 2
    assert len(sft.read_pairs(str(out / "imdb_sft_test.jsonl"))) == 2
    # seeded: the same files again
    again = tmp_path / "again"
    prepare_imdb.main(["--src", str(src), "--out_dir", str(again), "--seed", "0"])
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_imdb_bad_archive(tmp_path):
    members = {k: v for k, v in IMDB.items() if not k.startswith("aclImdb/test/neg")}
    write_imdb(tmp_path / "a.tar.gz", members)
    with pytest.raises(ValueError, match=r"a\.tar\.gz: no aclImdb/test/neg/"):
        prepare_imdb.main(["--src", str(tmp_path / "a.tar.gz"), "--out_dir", str(tmp_path / "out")])
    (tmp_path / "b.tar.gz").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=r"b\.tar\.gz: not a readable \.tar\.gz"):
        prepare_imdb.main(["--src", str(tmp_path / "b.tar.gz"), "--out_dir", str(tmp_path / "out")])


# --- TL;DR

def tldr_post(i, summary=" my summary."):
    return {"id": f"t3_{i}", "subreddit": "relationships", "title": f"Title {i}", "post": f"Post {i}.\n\nMore.", "summary": summary}


def comparison(i, a, b, choice, split="train"):
    info = {"id": f"t3_{i}", "post": f"Post {i}.", "title": f"Title {i}", "subreddit": "AskReddit"}
    return {"info": info, "summaries": [{"text": a, "policy": "ref", "note": None}, {"text": b, "policy": "sup1", "note": None}],
            "choice": choice, "worker": "w", "batch": "batch3", "split": split, "extra": {"confidence": 7}}


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def write_tldr(src, batch3):
    src.mkdir(exist_ok=True)
    write_lines(src / "train.jsonl", [tldr_post(0), tldr_post(1, "  "), tldr_post(2)])
    write_lines(src / "valid.jsonl", [tldr_post(3)])
    write_lines(src / "test.jsonl", [tldr_post(4)])
    write_lines(src / "batch3.json", batch3)


def test_tldr(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_tldr(src, [comparison(0, " good one.", " bad one.", 0), comparison(1, " worse.", " better.", 1),
                     comparison(2, " same.", " same.", 0), comparison(3, "", " x.", 1),
                     comparison(4, " a.", " b.", 1, "valid1"), comparison(5, " c.", " d.", 0, "valid2")])
    stats = prepare_tldr.main(["--src", str(src), "--out_dir", str(out), "--batches", "3"])
    assert stats["sft_train"] == {"sft": 2, "prompts": 3, "skipped": {"empty_post": 0, "empty_summary": 1, "duplicate_prompt": 0}}
    assert stats["comparisons"]["skipped"] == {"empty_post": 0, "empty_summary": 1, "identical": 1}
    rows = sft.read_pairs(str(out / "tldr_sft_train.jsonl"))
    assert rows[0] == ("SUBREDDIT: r/relationships\n\nTITLE: Title 0\n\nPOST: Post 0.\n\nMore.\n\nTL;DR:", "my summary.")
    for split in ("valid", "test"):
        assert len(M.read_jsonl(str(out / f"tldr_prompts_{split}.jsonl"), ("prompt",))) == 1
    groups, _ = M.read_preferences(str(out / "tldr_pairs_train.jsonl"))
    assert [g[1] for g in groups] == [["good one.", "bad one."], ["better.", "worse."]]
    assert groups[0][0] == "SUBREDDIT: r/AskReddit\n\nTITLE: Title 0\n\nPOST: Post 0.\n\nTL;DR:"
    valid = read(out / "tldr_pairs_valid.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in valid] == [("b.", "a."), ("c.", "d.")]


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("choice"), r"batch3\.json:2: missing key 'choice'"),
    (lambda r: r["info"].pop("post"), r"batch3\.json:2: info: missing key 'post'"),
    (lambda r: r.update(split="test"), r"batch3\.json:2: unknown split 'test'"),
    (lambda r: r.update(choice=2), r"batch3\.json:2: expected 2 summaries and choice 0 or 1"),
])
def test_tldr_bad_format(tmp_path, edit, match):
    bad = comparison(1, " a.", " b.", 0)
    edit(bad)
    write_tldr(tmp_path, [comparison(0, " a.", " b.", 0), bad])
    with pytest.raises(ValueError, match=match):
        prepare_tldr.main(["--src", str(tmp_path), "--out_dir", str(tmp_path / "out"), "--batches", "3"])


def test_tldr_bad_json_and_batches(tmp_path):
    write_tldr(tmp_path, [comparison(0, " a.", " b.", 0)])
    write_lines(tmp_path / "valid.jsonl", [tldr_post(3), '{"id": "t3_', tldr_post(5)])
    with pytest.raises(ValueError, match=r"valid\.jsonl:2: not a JSON line"):
        prepare_tldr.main(["--src", str(tmp_path), "--out_dir", str(tmp_path / "out"), "--batches", "3"])
    assert prepare_tldr.parse_batches("3-5,22,edit_b2_eval_test") == [
        "batch3.json", "batch4.json", "batch5.json", "batch22.json", "edit_b2_eval_test.json"]


# --- Alpaca

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well. 2. Sleep. 3. Move."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Say nothing.", "input": "", "output": ""},  # empty output: skipped and counted
] + [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(97)]


def test_alpaca(tmp_path):
    src, out = tmp_path / "alpaca_data.json", tmp_path / "out"
    src.write_text(json.dumps(ALPACA, indent=4))
    stats = prepare_alpaca.main(["--src", str(src), "--out_dir", str(out), "--val_frac", "0.02", "--seed", "1"])
    assert stats == {"train": 97, "val": 2, "skipped": {"empty": 1}}
    train = sft.read_pairs(str(out / "alpaca_sft_train.jsonl"))
    val = sft.read_pairs(str(out / "alpaca_sft_val.jsonl"))
    # the same pairs sft.read_pairs makes of the raw Alpaca rows
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in ALPACA if r["output"]))
    assert sorted(train + val) == sorted(sft.read_pairs(str(raw)))
    assert ("Translate to French.\n\nGood morning", "Bonjour") in train + val


def test_alpaca_bad_format(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(ALPACA[:2], indent=4)[:-10])  # a cut-off download
    with pytest.raises(ValueError, match=r"bad\.json:\d+: not JSON"):
        prepare_alpaca.main(["--src", str(bad), "--out_dir", str(tmp_path / "out")])
    bad.write_text(json.dumps(ALPACA[:1] + [{"instruction": "x", "output": "y"}]))
    with pytest.raises(ValueError, match=r"bad\.json: record 2: missing key 'input'"):
        prepare_alpaca.main(["--src", str(bad), "--out_dir", str(tmp_path / "out")])


# --- the shared helpers and the command lines

def test_download_is_cached_and_atomic(tmp_path):
    (tmp_path / "upstream.json").write_text("[1, 2]")
    dest = str(tmp_path / "cache" / "sub" / "file.json")
    assert _download.download((tmp_path / "upstream.json").as_uri(), dest) == dest
    assert open(dest).read() == "[1, 2]" and not os.path.exists(dest + ".part")
    (tmp_path / "upstream.json").unlink()
    assert _download.download((tmp_path / "upstream.json").as_uri(), dest) == dest  # cached: no fetch
    with pytest.raises(RuntimeError, match="download of .*missing.json failed"):
        _download.download((tmp_path / "missing.json").as_uri(), str(tmp_path / "m.json"))


def test_cli(tmp_path):
    """Each script runs as a command from the repo root, printing its summary line."""
    write_hh(tmp_path / "hh", "helpful-base", "train", HH_TRAIN)
    write_hh(tmp_path / "hh", "helpful-base", "test", HH_TEST)
    write_imdb(tmp_path / "imdb.tar.gz", IMDB)
    write_tldr(tmp_path / "tldr", [comparison(0, " a.", " b.", 0)])
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA))
    for script, src in [("hh", "hh"), ("imdb", "imdb.tar.gz"), ("tldr", "tldr"), ("alpaca", "alpaca.json")]:
        extra = ["--batches", "3"] if script == "tldr" else []
        r = subprocess.run([sys.executable, f"data/prepare_{script}.py", "--src", str(tmp_path / src),
                            "--out_dir", str(tmp_path / "out"), *extra], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert f"prepare_{script} | " in r.stdout and "skipped:" in r.stdout
    assert len(os.listdir(tmp_path / "out")) == 6 + 7 + 8 + 2


# --- one local file in the upstream format (--src my.jsonl), not a directory of batches


def test_hh_from_one_local_file(tmp_path):
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HH_TRAIN))
    stats = prepare_hh.main(["--src", str(tmp_path / "mine.jsonl"), "--out_dir", str(tmp_path / "out"), "--split", "test"])
    assert list(stats) == ["test"] and stats["test"]["pairs"] == 3 and stats["test"]["rows"] == len(HH_TRAIN)
    assert sorted(os.listdir(tmp_path / "out")) == ["hh_pairs_test.jsonl", "hh_prompts_test.jsonl", "hh_sft_test.jsonl"]
    assert read(tmp_path / "out" / "hh_pairs_test.jsonl")[0] == {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five."}


def test_tldr_from_one_local_file(tmp_path):
    write_lines(tmp_path / "posts.jsonl", [tldr_post(0), tldr_post(1)])
    stats = prepare_tldr.main(["--src", str(tmp_path / "posts.jsonl"), "--out_dir", str(tmp_path / "a"), "--split", "valid"])
    assert list(stats) == ["sft_valid"] and stats["sft_valid"]["sft"] == 2
    assert sorted(os.listdir(tmp_path / "a")) == ["tldr_prompts_valid.jsonl", "tldr_sft_valid.jsonl"]
    write_lines(tmp_path / "cmp.json", [comparison(0, " good.", " bad.", 0), comparison(1, " c.", " d.", 1, "valid1")])
    stats = prepare_tldr.main(["--src", str(tmp_path / "cmp.json"), "--out_dir", str(tmp_path / "b")])
    assert stats["comparisons"]["pairs train"] == 1 and stats["comparisons"]["pairs valid"] == 1
    assert read(tmp_path / "b" / "tldr_pairs_valid.jsonl")[0]["chosen"] == "d."
