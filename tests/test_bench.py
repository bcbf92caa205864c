"""bench.py's real CLI on a tiny model: the JSON has every number, and greedy tokens match transformers."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--vocab_size", "101", "--block_size", "64",
        "--batch_size", "2", "--prompt_len", "4", "--new_tokens", "4", "--train_batch", "2", "--train_seq", "16",
        "--repeats", "1", "--matmul_n", "64", "--matmul_iters", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    subprocess.run([sys.executable, "bench.py", *TINY, "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=120)
    with open(out) as f:
        return json.load(f)


def test_bench_numbers(results):
    for key in ("gen_ours_tok_s", "train_ours_tok_s", "matmul_peak_flops", "train_ours_flops", "mfu",
                "flops_per_token", "n_params"):
        assert results[key] > 0, key
    assert results["config"]["new_tokens"] == 4
    assert results["n_params"] == 101 * 32 + 2 * 12 * 32 * 32 + 2 * 13 * 32 + 2 * 32  # no wpe, wte counted once


def test_bench_llama_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    import bench  # in process: the CLI itself is run above
    import model as M
    results = bench.main(M.parse_config(bench.Config, [*TINY, "--family", "llama", "--n_kv_head", "1", "--n_inner", "48",
                                                        "--threads", "1", "--out", str(tmp_path / "bench.json")]))
    assert results["greedy_match"] is True and results["gen_ratio"] > 0 and results["train_ratio"] > 0
    assert results["train_loss_ours"] == pytest.approx(results["train_loss_hf"], rel=1e-5)


def test_bench_matches_transformers(results):
    pytest.importorskip("transformers")
    assert results["greedy_match"] is True
    for key in ("gen_hf_tok_s", "gen_ratio", "train_hf_tok_s", "train_ratio", "mfu_hf"):
        assert results[key] > 0, key
    assert results["train_loss_ours"] == pytest.approx(results["train_loss_hf"], rel=1e-5)  # same weights, same loss
