"""Bad input gets a clear error naming the file, the line and what was expected, or a documented
handling that is counted; nothing is dropped silently. The cases of
read_jsonl, read_preferences and sft.read_pairs are in test_model, test_reward and test_sft.
Run: python -m pytest -q tests/test_bad_input.py"""

import json

import pytest
import torch

import eval as evaluate
import model as M
import pretrain


def test_pretrain_text_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"a fine line\nanother\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"c.txt:3: not valid UTF-8"):
        pretrain.read_documents(str(p), "\n\n")
    p.write_text("   \n\n  ")
    with pytest.raises(ValueError, match="no text"):
        pretrain.read_documents(str(p), "\n\n")


def test_ppo_prompts_errors_and_cut_counted(tmp_path, tokenizer):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "what colour is the fox?"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing key\(s\) \['prompt'\]"):
        M.load_prompts(str(p), tokenizer, 64)
    p.write_text(json.dumps({"prompt": "what colour is the fox?"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl: row 2: empty prompt"):
        M.load_prompts(str(p), tokenizer, 64)
    p.write_text(json.dumps({"prompt": "tell me about the fox. " * 30}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    prompts, ids, cut = M.load_prompts(str(p), tokenizer, 32)
    assert cut == 1 and len(ids[0]) == 32 and ids[0][-3:] == M.encode_chat(tokenizer, "x")[-3:]  # keeps "Assistant:"


def test_prompt_longer_than_context_is_cut_not_crashed(tmp_path, tiny_ckpt):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "tell me about the fox. " * 60}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    cfg = M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(p), "--gold", "false", "--ref", tiny_ckpt,
                                           "--max_new_tokens", "8", "--out", str(tmp_path / "e.json")])
    summary = evaluate.evaluate(cfg)
    assert summary["prompts_cut"] == 1 and summary["kl"] == pytest.approx(0.0, abs=1e-5)


def test_pad_left_keeps_the_end_of_long_rows():
    ids, mask = M.pad_left([[1, 2, 3, 4, 5], [6]], max_len=3)
    assert ids.tolist() == [[3, 4, 5], [M.PAD_ID, M.PAD_ID, 6]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_logprob_math_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(vocab_size=101, block_size=32, n_layer=1, n_head=2, n_embd=32))
    seq = torch.randint(0, 101, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = M.response_logprobs(m, seq, start=4)
        assert M.response_logits(m, seq, start=4).dtype == torch.bfloat16  # the matmuls did run in bf16
    assert lp.dtype == torch.float32
    assert (lp - M.response_logprobs(m, seq, start=4)).abs().max() < 0.1  # bf16 matmuls, fp32 softmax


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_ckpt, tokenizer):
    other = M.Tokenizer({bytes([i]): i for i in range(256)})
    rm = M.ScalarModel(M.GPTConfig(vocab_size=other.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16))
    M.save_checkpoint(str(tmp_path / "rm"), rm, other, {})
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hi"}) + "\n")
    cfg = M.parse_config(evaluate.Config, ["--ckpt", tiny_ckpt, "--prompts", str(p), "--reward_model", str(tmp_path / "rm"),
                                           "--max_new_tokens", "16"])
    with pytest.raises(M.ConfigError, match="uses another tokenizer"):
        evaluate.evaluate(cfg)
