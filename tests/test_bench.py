"""bench.py's real CLI on a tiny model: the JSON has every number, greedy tokens match transformers,
and the RLHF-shaped rollouts run on a random model and on a world checkpoint.
Run: python -m pytest -q tests/test_bench.py"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--vocab_size", "101", "--block_size", "64",
        "--batch_size", "2", "--prompt_len", "4", "--new_tokens", "4", "--train_batch", "2", "--train_seq", "16",
        "--rollout_prompts", "2", "--world_rollout_prompts", "2", "--group", "2", "--rollout_prompt_len", "6", "--rollout_new_tokens", "12",
        "--eos_prob", "0.2", "--world_new_tokens", "8",
        "--repeats", "1", "--matmul_n", "64", "--matmul_iters", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_ckpt, world):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    subprocess.run([sys.executable, "bench.py", *TINY, "--world_sft", tiny_ckpt,
                    "--world_prompts", str(world / "prompts_val.jsonl"), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=180)
    with open(out) as f:
        return json.load(f)


def test_bench_numbers(results):
    for key in ("gen_ours_tok_s", "train_ours_tok_s", "matmul_peak_flops"):
        assert results[key] > 0, key  # measured speeds: only their sign is known in advance
    assert results["config"]["new_tokens"] == 4
    assert results["n_params"] == 101 * 32 + 2 * 12 * 32 * 32 + 2 * 13 * 32 + 2 * 32  # no wpe, wte counted once
    # the derived numbers, by hand: 6 N + 12 L T C FLOPs a token (PaLM appendix B), T = train_seq 16
    assert results["flops_per_token"] == 6 * results["n_params"] + 12 * 2 * 16 * 32
    assert results["train_ours_flops"] == pytest.approx(results["flops_per_token"] * results["train_ours_tok_s"], rel=1e-12)
    assert results["mfu"] == pytest.approx(results["train_ours_flops"] / results["matmul_peak_flops"], rel=1e-12)
    for name, cap in (("random", 12), ("world", 8)):
        r = results[f"rollout_{name}"]
        assert r["ours_tok_s"] > 0 and 1 <= r["ours_len"] <= cap, name
        assert len(r["ours_tokens"]) == 1 and r["ours_tokens"][0] == round(r["ours_len"] * 4)  # 2 prompts x 2 answers


def test_bench_llama_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    import bench  # in process: the CLI itself is run above
    import model as M
    results = bench.main(M.parse_config(bench.Config, [*TINY, "--family", "llama", "--n_kv_head", "1", "--n_inner", "48",
                                                        "--threads", "1", "--repeats", "3", "--out", str(tmp_path / "bench.json")]))
    assert results["greedy_match"] is True and results["gen_ratio"] > 0 and results["train_ratio"] > 0
    mean, lo, hi = results["train_ratio_mean_ci"]  # the mean of the 3 paired ratios, in its interval
    assert mean == pytest.approx(sum(h / o for o, h in zip(results["train_ours_s"], results["train_hf_s"])) / 3)
    assert lo <= mean <= hi
    assert results["train_loss_ours"] == pytest.approx(results["train_loss_hf"], rel=1e-5)


def test_bench_matches_transformers(results):
    pytest.importorskip("transformers")
    assert results["greedy_match"] is True
    for key in ("gen_hf_tok_s", "train_hf_tok_s"):
        assert results[key] > 0, key
    # one repeat: each ratio is the one pair's t_hf / t_ours, i.e. ours tok/s over theirs for the same tokens
    assert results["gen_ratio"] == pytest.approx(results["gen_ours_tok_s"] / results["gen_hf_tok_s"], rel=1e-9)
    assert results["train_ratio"] == pytest.approx(results["train_ours_tok_s"] / results["train_hf_tok_s"], rel=1e-9)
    assert results["mfu_hf"] == pytest.approx(results["flops_per_token"] * results["train_hf_tok_s"] / results["matmul_peak_flops"], rel=1e-12)
    assert results["world_greedy_match"] is True  # left-padded prompts, stopped at EOS
    for name in ("random", "world"):
        assert results[f"rollout_{name}"]["ratio"] > 0
    assert results["train_loss_ours"] == pytest.approx(results["train_loss_hf"], rel=1e-5)  # same weights, same loss


@pytest.mark.slow  # ~10 s of page-fault counting in child processes: behind -m slow to keep the default suite within 3 minutes
def test_malloc_keep_removes_the_page_faults_of_freshly_mapped_memory(tmp_path):
    # (4, 64, 50304) fp32 logits are 51 MB, above glibc's largest mmap threshold: without malloc_keep
    # they (and their gradient) are mapped afresh every step, about 12.5k faults each; with it, few.
    # With it in a subprocess (mallopt changes the whole process's allocator), without it in this one
    import bench
    import model as M
    small = ["--sections", "train", "--vocab_size", "50304", "--train_batch", "4", "--train_seq", "64", "--n_layer", "1",
             "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--repeats", "4", "--matmul_n", "64",
             "--matmul_iters", "2", "--device", "cpu"]
    out = tmp_path / "bench_keep.json"
    subprocess.run([sys.executable, "bench.py", *small, "--malloc_keep", "true", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=180)
    kept = json.loads(out.read_text())["train_ours_faults_per_step"]
    mapped = bench.main(M.parse_config(bench.Config, [*small, "--out", str(tmp_path / "bench.json")]))["train_ours_faults_per_step"]
    # every step maps its logits afresh without it; with it, once the heap has grown to hold both
    # models' steps (a step or two), a step faults no more than a few pages
    assert len(mapped) == len(kept) == 4 and min(mapped) > 25_000 and min(kept) < 1_000, (mapped, kept)


@pytest.mark.slow  # ~30 s: a subprocess that loads transformers and times every section
def test_bench_on_real_weights_from_a_gguf_file(tmp_path, tokenizer):
    pytest.importorskip("gguf")
    from test_gguf import SPECIALS, tiny, write_gguf
    from data.arith import generate
    generate(str(tmp_path))
    path = write_gguf(tmp_path / "real.gguf", tiny("llama", len(tokenizer.ranks) + len(SPECIALS) + 1), tokenizer,
                      template="")  # hh: SmolLM2's system message would not fit the tiny block
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "bench.py", *TINY, "--init", path, "--init_prompts", str(tmp_path / "prompts_val.jsonl"),
                    "--world_new_tokens", "6", "--out", str(out)], cwd=ROOT, check=True, capture_output=True, text=True, timeout=180)
    res = json.load(open(out))
    assert "rollout_random" not in res and res["rollout_real"]["ours_tok_s"] > 0 and res["real_greedy_match"] is True
    assert res["greedy_match"] is True and res["train_ratio"] > 0
    model = tiny("llama", len(tokenizer.ranks) + len(SPECIALS) + 1)  # untied: the input embedding is a lookup, not counted
    assert res["n_params"] == sum(p.numel() for p in model.parameters()) - model.transformer.wte.weight.numel()


def test_lengths_are_checked_before_any_model_is_built(monkeypatch):
    import bench
    import model as M
    monkeypatch.setattr(bench, "GPT", lambda *a, **k: pytest.fail("a model was built before the check"))
    with pytest.raises(M.ConfigError, match=r"train_seq = 256 > block_size 128 \(section train\)"):
        bench.main(M.parse_config(bench.Config, ["--block_size", "128", "--device", "cpu"]))
    with pytest.raises(M.ConfigError, match=r"prompt_len \+ new_tokens = 96 > block_size 64 \(section gen\)"):
        bench.main(M.parse_config(bench.Config, ["--block_size", "64", "--sections", "gen", "--device", "cpu"]))


def test_rl_section_times_both_paths_and_the_fused_one_saves_less(tmp_path, tiny_ckpt):
    out = tmp_path / "rl.json"
    subprocess.run([sys.executable, "bench.py", *TINY, "--sections", "rl", "--rl_rows", "4", "--rl_prompt_len", "8",
                    "--rl_resp", "8", "--world_sft", tiny_ckpt, "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    res = json.load(open(out))
    for name in ("model", "world"):
        r = res[f"rl_{name}"]
        assert r["ratio"] > 0 and len(r["fused_s"]) == len(r["logits_s"]) == 1
        assert 0 < r["fused_saved_bytes"] < r["logits_saved_bytes"], r  # the (B, R, V) logits are not kept
