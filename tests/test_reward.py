"""Tests of reward.py and data/preferences.py: the loss against hand-computed values, a ranking
equal to its pairs, the score at the EOS, data formats and errors, normalisation, the CLI.
Run: python -m pytest -q tests/test_reward.py"""

import json
import math

import pytest
import torch

import model as M
import reward
from data import preferences


def test_reward_loss_hand_computed():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    w = torch.tensor([0.5, 0.5])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = 0.5 * -math.log(sig(1.0)) + 0.5 * -math.log(sig(-1.0))
    assert reward.reward_loss(rc, rr, w).item() == pytest.approx(expected, abs=1e-6)
    expected_m = 0.5 * -math.log(sig(0.5)) + 0.5 * -math.log(sig(-1.5))
    assert reward.reward_loss(rc, rr, w, margin=0.5).item() == pytest.approx(expected_m, abs=1e-6)
    e = 0.1
    expected_ls = sum(0.5 * (-(1 - e) * math.log(sig(d)) - e * math.log(sig(-d))) for d in (1.0, -1.0))
    assert reward.reward_loss(rc, rr, w, label_smoothing=e).item() == pytest.approx(expected_ls, abs=1e-6)


def test_ranking_is_all_its_pairs_with_one_forward_per_answer():
    groups = [[[1, 2], [3], [4, 5, 6]], [[7], [8]]]  # a ranking of 3 and a pair
    ids, w, l, weight = reward.collate(groups)
    assert ids.shape == (5, 3)  # 5 answers, each once
    assert list(zip(w.tolist(), l.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    assert torch.allclose(weight, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))  # each group weighs 1/2
    s = torch.tensor([3.0, 1.0, 0.0, 2.0, 2.5])
    by_hand = 0.5 * sum(-math.log(1 / (1 + math.exp(-d))) for d in (2.0, 3.0, 1.0)) / 3 + 0.5 * -math.log(1 / (1 + math.exp(0.5)))
    assert reward.reward_loss(s[w], s[l], weight).item() == pytest.approx(by_hand, abs=1e-6)


def test_score_read_at_eos(tokenizer):
    torch.manual_seed(0)
    rm = M.ScalarModel(M.GPTConfig(vocab_size=tokenizer.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()
    g, _ = reward.encode_groups([("describe the cat.", ["the cat is black.", "the cat is a very black cat indeed."])], tokenizer, 64, 8)
    ids, _, _, _ = reward.collate(g)
    s = reward.scores_of(rm, ids)
    for i, row in enumerate(g[0]):
        assert row[-1] == tokenizer.eot_id
        assert s[i].item() == pytest.approx(rm(torch.tensor([row]))[0, -1].item(), abs=1e-5)


def test_read_preferences_formats_and_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "responses": ["a", "b", "c"]},
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "responses": ["a", " "]}]  # the empty answer is an answer
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups, stats = M.read_preferences(str(p))
    assert groups == [("q", ["a", "b"]), ("q", ["a", "b", "c"]), ("q", ["a", "b"]), ("q", ["a", ""])]
    assert stats == {"rows": 5, "identical_skipped": 1}
    for bad, msg in (({"prompt": "q", "responses": ["a"]}, "at least 2 responses"),
                     ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty or non-string prompt"),
                     ({"prompt": "q", "chosen": None, "rejected": "b"}, "non-string response"),
                     ({"prompt": "q", "answer": "a"}, "expected keys"),
                     ({"chosen": "no transcript", "rejected": "x"}, "HH transcript")):
        p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=rf"p.jsonl:2: .*{msg}"):
            M.read_preferences(str(p))


def test_noise_ceiling_and_bradley_terry_labels():
    # two answers whose gold differs by T*log(3): the labeler prefers the better one 3 times in 4
    T = 0.5
    assert preferences.noise_ceiling([[T * math.log(3), 0.0]], T) == pytest.approx(0.75)
    assert preferences.noise_ceiling([[1.0, 1.0]], T) == pytest.approx(0.5)
    import random
    rng = random.Random(0)
    prompt = "what colour is the fox?"
    from data.world import gold_reward
    a, b = "the fox is red.", "the fox is stupid."
    p = 1 / (1 + math.exp(-(gold_reward(prompt, a, True)["gold"] - gold_reward(prompt, b, True)["gold"]) / T))
    wins = sum(preferences.rank(prompt, [a, b], T, rng)[0][0] == a for _ in range(4000)) / 4000
    assert abs(wins - p) < 0.03


def test_build_split_ranks_the_empty_answer_and_drops_cut_ones(monkeypatch):
    # one prompt, K = 4: an answer, the empty answer (EOS at once), an answer cut at the cap, the answer again
    import random
    group = [("the fox is red.", True), ("", True), ("the fox is", False), ("the fox is red.", True)]
    monkeypatch.setattr(preferences, "sample_answers", lambda *a: group)
    cfg = preferences.Config(k_min=4, k_max=4)
    rankings, stats = preferences.build_split(None, None, ["what colour is the fox?"], 1, cfg, random.Random(0), None)
    assert sorted(rankings[0]["responses"]) == ["", "the fox is red."]
    assert stats["empty_ranked"] == 1 and stats["no_eos_dropped"] == 1 and stats["pairs"] == 1


def test_gold_agreement_is_the_realised_ceiling():
    # a ranking labelled best to worst: golds (2, 0, 1) -> pairs (2>0 yes, 2>1 yes, 0>1 no): 2/3; a tie counts half
    agree, pairs = preferences.gold_agreement([[2.0, 0.0, 1.0], [1.0, 1.0]])
    assert agree == pytest.approx([2 / 3, 0.5]) and pairs == [3, 1]


def test_cli_trains_normalises_and_evaluates(world, tiny_ckpt, tmp_path):
    rankings = [{"prompt": "what colour is the fox?", "responses": ["the fox is red.", "the fox is blue.", "fox fox stupid fox"]},
                {"prompt": "where does the owl live?", "responses": ["the owl lives in the forest.", "i do not know."]}] * 8
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    cfg = M.parse_config(reward.Config, ["--data", str(tmp_path / "r.jsonl"), "--val_data", str(tmp_path / "r.jsonl"),
                                         "--init", tiny_ckpt, "--max_len", "64", "--out_dir", str(tmp_path / "rm"), "--epochs", "8",
                                         "--batch_size", "4", "--lr", "3e-3", "--log_interval", "4", "--eval_interval", "100"])
    rm = reward.train(cfg)
    last = [json.loads(x) for x in open(tmp_path / "rm" / "metrics.jsonl")][-1]
    assert last["val_acc"] == 1.0 and last["val_margin"] > 0  # a tiny set it can memorise
    loaded, tok, info = M.load_checkpoint(str(tmp_path / "rm"))
    assert info["kind"] == "scalar" and loaded.reward_gain.item() == rm.reward_gain.item() != 1.0
    g, _ = reward.encode_groups(M.read_preferences(str(tmp_path / "r.jsonl"))[0], tok, 128, 16)
    ids, _, _, _ = reward.collate(g)
    with torch.no_grad():
        s = loaded.score(ids, (ids != M.PAD_ID).long())
    assert abs(s.mean().item()) < 1e-4 and abs(s.std().item() - 1) < 1e-3  # normalised on the training answers


def test_labelled_answers_are_pairs_against_a_constant_zero(tmp_path):
    rows = [{"prompt": "the film", "response": "was wonderful.", "label": 1},
            {"prompt": "the film", "response": "was awful.", "label": 0}]
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups, stats = reward.read_labels(str(p))
    assert groups == [("the film", ["was wonderful.", None]), ("the film", [None, "was awful."])]
    assert stats == {"rows": 2, "positive": 1}
    ids, w, l, weight = reward.collate([[[5, 6], None], [None, [7]]])
    assert ids.shape == (2, 2) and w.tolist() == [0, -1] and l.tolist() == [-1, 1]
    # the loss is the classifier's logistic loss (binary cross-entropy on the logit r)
    r = torch.tensor([1.5, 0.7])  # raw scores of the two answers
    s = torch.nn.functional.pad(r, (0, 1))  # as pair_scores builds it
    bce = torch.nn.functional.binary_cross_entropy_with_logits(r, torch.tensor([1.0, 0.0]))
    assert reward.reward_loss(s[w], s[l], weight).item() == pytest.approx(bce.item(), abs=1e-6)
    for bad, msg in (({"prompt": "a", "response": "b", "label": 2}, "label must be 1"),
                     ({"prompt": "a", "response": "b", "label": "1"}, "label must be 1"),
                     ({"prompt": "a", "response": " ", "label": 1}, "empty"),
                     ({"prompt": "a", "response": "b"}, r"missing key\(s\) \['label'\]")):
        p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=rf"s.jsonl:2: .*{msg}"):
            reward.read_labels(str(p))


def test_cli_classify_learns_a_sentiment_reward(tiny_ckpt, tmp_path):
    good, bad = ["was wonderful.", "was lovely and kind.", "is a happy film."], ["was awful.", "was stupid and rude.", "is a nasty film."]
    rows = [{"prompt": f"the {x} film", "response": r, "label": y}
            for x in ("new", "old") for rs, y in ((good, 1), (bad, 0)) for r in rs]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    cfg = M.parse_config(reward.Config, ["--objective", "classify", "--data", str(tmp_path / "s.jsonl"),
                                         "--val_data", str(tmp_path / "s.jsonl"), "--init", tiny_ckpt, "--max_len", "64",
                                         "--out_dir", str(tmp_path / "rm"), "--epochs", "6", "--batch_size", "8",
                                         "--lr", "3e-3", "--log_interval", "4", "--eval_interval", "100"])
    rm = reward.train(cfg)
    metrics = [json.loads(x) for x in open(tmp_path / "rm" / "metrics.jsonl")]
    assert metrics[-1]["val_acc"] == 1.0 and metrics[-1]["val_loss"] < metrics[0]["loss"]
    tok = M.load_tokenizer(tiny_ckpt)
    g, _ = reward.encode_groups([("the new film", ["was wonderful.", "was awful."])], tok, 128, 16)
    ids, _, _, _ = reward.collate(g)
    with torch.no_grad():
        s = rm.score(ids, (ids != M.PAD_ID).long())
    assert s[0] > s[1]  # positive above negative after normalisation too
    with pytest.raises(M.ConfigError, match="objective must be"):
        reward.train(M.parse_config(reward.Config, ["--objective", "pointwise", "--init", tiny_ckpt, "--data", str(tmp_path / "s.jsonl"),
                                                    "--val_data", str(tmp_path / "s.jsonl"), "--out_dir", str(tmp_path / "x")]))


def test_rm_probe_splits_agreement_by_part(tiny_rm, tiny_ckpt, tmp_path):
    from data import rm_probe
    from data.world import gold_reward
    prompt, answers = "what colour is the fox?", ["the fox is red.", "the fox is blue.", "the fox is red and stupid.", "a cat."]
    (tmp_path / "r.jsonl").write_text(json.dumps({"prompt": prompt, "responses": answers}) + "\n")
    counts = rm_probe.main(M.parse_config(rm_probe.Config, ["--reward_model", tiny_rm, "--rankings", str(tmp_path / "r.jsonl"),
                                                            "--lm", tiny_ckpt]))
    rm, tok, _ = M.load_checkpoint(tiny_rm, kind="scalar")
    g, _ = reward.encode_groups([(prompt, answers)], tok, 96, 16)
    s = reward.scores_of(rm.eval(), reward.collate(g)[0]).tolist()
    gold = [gold_reward(prompt, a, True)["gold"] for a in answers]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4) if gold[i] != gold[j]]  # gold ties left out
    assert counts["all"] == [sum((s[i] > s[j]) == (gold[i] > gold[j]) for i, j in pairs), len(pairs)] and len(pairs) >= 4
    assert sum(n for part, (_, n) in counts.items() if part != "all") == len(pairs)
    assert set(counts) <= {"all", "helpful", "honest", "harmless", "length", "repetition"}


def test_ranking_answers_share_one_truncated_prompt(tokenizer):
    prompt = "describe the cat and the dog and the owl and the forest and the town where they all live."
    answers = ["no.", "the cat is black.", "the cat is a very black cat that sleeps in the town with the dog."]
    p = M.encode_chat(tokenizer, prompt)
    long_ = M.encode_chat(tokenizer, prompt, answers[2])[1]
    max_len = len(p) + len(long_) - 5
    (rows,), stats = reward.encode_groups([(prompt, answers)], tokenizer, max_len, 4)
    for row, a in zip(rows, answers):
        assert row[:len(p) - 5] == p[5:] and row[len(p) - 5:] == M.encode_chat(tokenizer, prompt, a)[1]
    assert stats == {"groups": 1, "prompt_truncated": 3, "response_truncated": 0}
    (rows,), _ = reward.encode_groups([(prompt, [answers[2], None])], tokenizer, max_len, 4)  # a labelled answer
    assert rows[1] is None and rows[0][:len(p) - 5] == p[5:]
