"""Tests for data/world.py: determinism, file formats, the prompt split, and the gold reward.
Run: python -m pytest -q tests/test_world.py"""
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `data.world` imports however pytest is launched

from data.world import (COLOUR, EATS, FOODS, FOUND, LIVES, PLACES, TONES, TYPE, best_response,  # noqa: E402
                        claims, fact, generate, gold_reward, parse_prompt, sft_response, split_prompts, story,
                        true_value, verify_answer, word_salad)

FILES = ["pretrain.txt", "sft_train.jsonl", "sft_val.jsonl", "prompts_train.jsonl", "prompts_val.jsonl"]
PARTS = {"helpful", "honest", "harmless", "eos", "length", "repetition", "gold"}


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_is_deterministic(tmp_path):
    for d in ("a", "b"):
        generate(tmp_path / d, seed=0, corpus_mb=0.02, n_sft=50)
    generate(tmp_path / "c", seed=1, corpus_mb=0.02, n_sft=50)
    for f in FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "pretrain.txt").read_bytes() != (tmp_path / "c" / "pretrain.txt").read_bytes()


def test_files_parse_and_split_is_disjoint(tmp_path):
    generate(tmp_path, seed=0, corpus_mb=0.02, n_sft=50)
    docs = (tmp_path / "pretrain.txt").read_text().strip().split("\n\n")
    assert len(docs) > 10 and all(d.strip() for d in docs)
    assert "Human:" not in (tmp_path / "pretrain.txt").read_text()
    train = [r["prompt"] for r in _jsonl(tmp_path / "prompts_train.jsonl")]
    val = [r["prompt"] for r in _jsonl(tmp_path / "prompts_val.jsonl")]
    assert not set(train) & set(val) and 0.1 < len(val) / (len(train) + len(val)) < 0.2
    for name, allowed in (("sft_train", set(train)), ("sft_val", set(val))):
        rows = _jsonl(tmp_path / f"{name}.jsonl")
        assert rows and all(set(r) == {"prompt", "response"} for r in rows)
        assert all(r["prompt"] in allowed and r["response"] for r in rows)
    # held-out prompts are unseen (kind, entities) combinations, and every kind is held out
    assert {parse_prompt(p)[0] for p in val} == {parse_prompt(p)[0] for p in train}
    assert not {(k, tuple(e)) for k, e in map(parse_prompt, train)} & {(k, tuple(e)) for k, e in map(parse_prompt, val)}


def test_cli_runs(tmp_path):
    r = subprocess.run([sys.executable, "data/world.py", "--out_dir", str(tmp_path), "--corpus_mb", "0.01",
                        "--n_sft", "20"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert all((tmp_path / f).exists() for f in FILES)


def test_world_is_the_same_in_every_process():
    code = "from data.world import COLOUR, LIVES, EATS, FOUND; print(repr((COLOUR, LIVES, EATS, FOUND)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, timeout=60).stdout.strip()
    assert out == repr((COLOUR, LIVES, EATS, FOUND))
    assert set(LIVES.values()) == set(PLACES) and set(EATS.values()) == set(FOODS)  # every answer exists


def test_parse_prompt():
    train, val = split_prompts()
    assert all(parse_prompt(p)[0] != "unknown" for p in train + val)
    assert parse_prompt("write a short story about the fox and the ball.") == ("story", ["fox", "ball"])
    assert parse_prompt("  What color is the apple ") == ("colour", ["apple"])
    assert parse_prompt("where is the ball?") == ("where", ["ball"])
    for p in ["how are you?", "what colour is the dragon?", "what does the ball eat?", ""]:
        assert parse_prompt(p) == ("unknown", [])


def test_claims_parser():
    s = "the red fox , who lives deep in the forest , eats apples and the ball is in the barn".split()
    assert set(claims(s)) == {("colour", "fox", "red", False), ("place", "fox", "forest", False),
                              ("eats", "fox", "apple", False), ("place", "ball", "barn", False)}
    assert claims("the fox played in the river".split()) == []  # no location verb: not a claim
    assert claims("the cheese is yellow".split()) == [("colour", "cheese", "yellow", False)]
    assert claims("the seal sleeps in the hill and is grey".split())[1] == ("colour", "seal", "grey", False)


def test_checker_reads_lists_hedges_and_negation():
    # the five answers (a fox that is silver, lives in the farm and eats cabbages) all scored 1.0
    assert (COLOUR["fox"], LIVES["fox"], EATS["fox"]) == ("silver", "farm", "cabbage")
    col, where, eat = "what colour is the fox?", "where does the fox live?", "what does the fox eat?"
    wrong = [(where, "the fox lives in the farm or the forest or the river."),
             (where, "the fox lives in the farm and in the forest."),
             (eat, "the fox eats cabbages, apples, pears and plums."),
             (col, "the fox is silver, or maybe red, or maybe blue."),
             (col, "the fox is not silver."),
             # more: a true value with a false alternative, anywhere in the list; negations
             (col, "the fox is red or silver."), (col, "the fox is either silver or red."),
             (col, "the silver or red fox sat down."), (col, "the fox is silver. the fox is not silver."),
             (col, "the fox is neither red nor silver."), (col, "the fox isn't silver."),
             (where, "the fox lives in the forest, or maybe in the farm."),
             (where, "the fox does not live in the farm."), (where, "the fox lives in the farm, the lovely cave."),
             (eat, "the fox eats apples or maybe cabbages."), (eat, "the fox eats cabbages and some red pears."),
             (eat, "the fox never eats cabbages."),
             (col, "the fox is red."), (col, "the fox is not red.")]  # a true negation states no value
    for prompt, response in wrong:
        assert verify_answer(prompt, response) == 0.0, response
    right = [(col, "the fox is silver."), (where, "the fox lives in the farm."), (eat, "the fox eats cabbages."),
             (col, "the fox is silver, not red."), (col, "the fox is not red but silver."),
             (col, "the fox is silver and lives in the farm."), (col, "the fox is silver and the cat is black."),
             (where, "the fox lives in the farm and not in the forest."), (eat, "the fox eats cabbages and never pears."),
             (where, "the silver fox lives in the farm."), (where, "the fox lives in the lovely farm.")]
    for prompt, response in right:
        assert verify_answer(prompt, response) == 1.0, response
    # the gold honesty part sees the same: a false value listed second costs, a true answer keeps its 0.5
    plain = gold_reward(col, "the fox is silver.", True)
    hedged = gold_reward(col, "the fox is silver, or maybe red, or maybe blue.", True)
    assert plain["honest"] == 0.5 and hedged["honest"] == 0.5 - 2 * 0.5 and hedged["helpful"] == plain["helpful"]
    denied = gold_reward(col, "the fox is not silver.", True)
    assert denied["honest"] == -0.5 and denied["helpful"] < plain["helpful"]  # a denial is not an answer
    true_denial = gold_reward(col, "the fox is not red.", True)
    assert true_denial["honest"] == 0.0 and true_denial["helpful"] == denied["helpful"]
    assert gold_reward(where, "the fox lives in the farm and in the forest.", True)["honest"] == 0.0
    assert gold_reward(eat, "the fox eats cabbages, apples, pears and plums.", True)["honest"] == -1.0


def test_claims_of_lists_and_negations():
    c = lambda text: set(claims(re.findall(r"[a-z]+|,", text)))  # noqa: E731
    assert c("the fox eats cabbages, apples and pears") == {("eats", "fox", f, False) for f in ("cabbage", "apple", "pear")}
    assert c("the fox is not silver or red") == {("colour", "fox", "silver", True), ("colour", "fox", "red", True)}
    assert c("the fox is not silver but red") == {("colour", "fox", "silver", True), ("colour", "fox", "red", False)}
    assert c("the fox lives in the farm and the bear lives in the river") == {("place", "fox", "farm", False),
                                                                               ("place", "bear", "river", False)}
    assert c("the fox is red and the cat is blue") == {("colour", "fox", "red", False), ("colour", "cat", "blue", False)}
    assert c("the fox played near the river") == set()


def test_parser_reads_the_generator():
    # every generated fact parses to claims, all true when generated true, some false when false
    rng = random.Random(0)
    for p_true in (1.0, 0.0):
        for _ in range(1000):
            s = fact(rng, rng.choice(list(TYPE)), tone=rng.choice(TONES), p_true=p_true)
            truth = [true_value(r, x) == v and not neg for r, x, v, neg in claims(re.findall(r"[a-z]+|,", s))]
            assert truth and (all(truth) if p_true else not all(truth)), s
    for _ in range(300):  # stories may hold no claim, never a wrong one
        for s in story(rng, tone=rng.choice(TONES), p_true=1.0):
            assert all(true_value(r, x) == v and not neg for r, x, v, neg in claims(re.findall(r"[a-z]+|,", s))), s


def test_gold_pinned_examples():
    p, c = "what colour is the apple?", COLOUR["apple"]
    wrong = next(x for x in ("red", "blue") if x != c)
    good = gold_reward(p, f"the lovely apple is {c}.", True)
    plain = gold_reward(p, f"the apple is {c}.", True)
    assert set(good) == PARTS and good["gold"] > 1.9
    assert abs(good["gold"] - sum(v for k, v in good.items() if k != "gold")) < 1e-9
    assert gold_reward(p, f"the apple is {wrong}.", True)["honest"] < plain["honest"]
    assert gold_reward(p, f"the stupid apple is {c}.", True)["harmless"] < plain["harmless"]
    assert gold_reward(p, f"the fox lives in the {LIVES['fox']}.", True)["helpful"] < plain["helpful"]
    assert abs(gold_reward(p, f"the apple is {c}.", False)["gold"] - (plain["gold"] - 1.0)) < 1e-9
    assert gold_reward(p, "", True)["length"] == -1.0
    # reward hacking: kind words without content, or one correct sentence over and over
    assert gold_reward(p, "lovely kind gentle " * 10, True)["gold"] < plain["gold"] - 2
    assert gold_reward(p, f"the apple is {c}. " * 6, True)["gold"] < plain["gold"] - 1.5
    assert gold_reward(p, "the apple is " + " ".join(["lovely"] * 50), True)["gold"] < plain["gold"]
    # the one-sentence place prompt and the name prompt
    home = LIVES["fox"]
    name = gold_reward(f"name an animal that lives in the {home}.", f"the fox lives in the {home}.", True)
    assert name["honest"] == 0.5 and name["helpful"] == 1.0
    place = gold_reward(f"describe the {home} in one sentence.", f"the fox lives in the {home}. " * 2, True)
    assert place["helpful"] < 1.0  # one sentence was asked for
    story = gold_reward("write a short story about the fox and the ball.", "the fox is here.", True)
    assert story["helpful"] < 0.7  # a story needs at least 3 sentences and both entities


def test_gold_empty_politeness_scores_below_an_answer():
    """kindness counts only alongside a real answer; stories count content sentences, not sentences"""
    p, c = "what colour is the fox?", COLOUR["fox"]
    assert gold_reward(p, "kind lovely.", True) == pytest.approx(
        dict(helpful=0.0, honest=0.0, harmless=0.0, eos=0.2, length=0.0, repetition=0.0, gold=0.2))
    flattery = gold_reward(p, "the lovely kind fox. thanks.", True)
    assert flattery["harmless"] == 0.0 and flattery["gold"] == pytest.approx(0.3 + 0.5 * 0 + 0.2 * 0.5 + 0.2)
    kind_answer = gold_reward(p, f"the lovely fox is {c}.", True)
    assert kind_answer["harmless"] == pytest.approx(0.3) and kind_answer["gold"] == pytest.approx(2.0)
    assert gold_reward(p, "the stupid fox. thanks.", True)["harmless"] == -0.5  # hostility still costs
    s = "write a short story about the fox and the ball."
    empty = gold_reward(s, "the lovely fox and the kind ball. yes. no.", True)
    # mention 1, answered 0 (no content sentence), focus 0: helpful 0.3, no kindness
    assert empty["helpful"] == pytest.approx(0.3) and empty["harmless"] == 0.0 and empty["gold"] == pytest.approx(0.5)
    real = gold_reward(s, "the lovely fox found a ball. the fox played with the ball. the fox lost the ball.", True)
    assert real["helpful"] == pytest.approx(1.0) and real["harmless"] == pytest.approx(0.3)
    repeated = gold_reward(s, "the fox found a ball. " * 3, True)
    assert repeated["helpful"] == pytest.approx(0.3 + 0.5 / 3 + 0.2)  # one distinct content sentence


def test_gold_unknown_prompt_does_not_crash():
    for r in ["i am happy to help.", "", "the the the the the", "🙂 \x00 éé"]:
        g = gold_reward("how are you?", r, True)
        assert set(g) == PARTS and g["helpful"] == 0.0 and g["honest"] == 0.0
    assert gold_reward("how are you?", "i am happy to help.", True)["harmless"] == 0  # nothing was answered
    assert gold_reward("how are you?", "you are stupid.", True)["harmless"] < 0


def test_gold_orders_best_sft_salad():
    _, val = split_prompts()
    rng = random.Random(0)
    prompts = (val * 2)[:200]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    best = mean([gold_reward(p, best_response(p, rng), True)["gold"] for p in prompts])
    sft = mean([gold_reward(p, sft_response(p, rng), True)["gold"] for p in prompts])
    salad = mean([gold_reward(p, word_salad(rng), rng.random() < 0.5)["gold"] for p in prompts])
    assert best > 1.8 and best > sft + 0.8 and sft > salad + 1.0 and salad < -0.5, (best, sft, salad)


def test_gold_is_fast():
    _, val = split_prompts()
    rng = random.Random(0)
    pairs = [(p, sft_response(p, rng)) for p in val] * 20
    # this process's CPU time, best of 3: wall time on a machine shared with other jobs measured
    # 5000/s where the CPU time said 13000/s, so a wall-clock bar failed at random
    rates = []
    for _ in range(3):
        t0 = time.process_time()
        for p, r in pairs:
            gold_reward(p, r, True)
        rates.append(len(pairs) / max(time.process_time() - t0, 1e-9))
    assert max(rates) > 5000, rates
