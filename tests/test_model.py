"""Tests of model.py: attention masks and positions, KV cache, log-prob shift, reward index,
Hugging Face import/export, tokenizer, checkpoints and config parsing.
Run: python -m pytest -q tests/test_model.py"""

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import PAD_ID, GPT, GPTConfig, ScalarModel


def tiny(vocab=97, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


def left_batch(rows):
    return M.pad_left(rows)


# --- attention, positions, padding


def test_causal_future_token_does_not_change_past_logits():
    m = tiny()
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 97
    a, b = m(x), m(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


def test_left_padded_rows_equal_rows_alone():
    m = tiny()
    rows = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    ids, mask = left_batch(rows)
    out = m(ids, mask)  # (B, P, V)
    for i, r in enumerate(rows):
        alone = m(torch.tensor([r]))[0]
        assert torch.allclose(out[i, -len(r):], alone, atol=1e-5), i


def test_no_position_attends_to_padding():
    m = tiny()
    ids, mask = left_batch([[5, 6, 7], [8, 9]])
    other = ids.clone()
    other[1, 0] = 42  # a different token where the mask says padding
    a, b = m(ids, mask), m(other, mask)
    assert torch.equal(a[:, 1:], b[:, 1:])


def test_attention_bias_masks_pad_keys_and_future():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    bias = M.attention_bias(mask, 3)[:, 0]  # (B, T, S)
    assert bias[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert bias[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_positions_count_real_tokens_only():
    m = tiny()
    ids, mask = left_batch([[5, 6], [7, 8, 9, 10]])
    # row 0's first real token must use position 0: compare with the hand-built embedding path
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    assert pos[0].tolist() == [0, 0, 0, 1]
    h = m.hidden(ids, mask)
    assert torch.allclose(h[0, 2:], m.hidden(torch.tensor([[5, 6]]))[0], atol=1e-5)


# --- sampling with the KV cache


def greedy_no_cache(m, prompt, n, eos_id=None):
    x = torch.tensor([prompt])
    for _ in range(n):
        nxt = m(x)[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
        if eos_id is not None and nxt.item() == eos_id:
            break
    return x[0, len(prompt):].tolist()


def test_greedy_with_cache_equals_without_and_batch_equals_alone():
    m = tiny()
    rows = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    ids, mask = left_batch(rows)
    out, gen_mask, _ = m.generate(ids, 12, temperature=0, attention_mask=mask)
    for i, r in enumerate(rows):
        assert out[i, ids.size(1):].tolist() == greedy_no_cache(m, r, 12)
        alone, _, _ = m.generate(torch.tensor([r]), 12, temperature=0)
        assert alone[0, len(r):].tolist() == out[i, ids.size(1):].tolist()
    assert gen_mask.all()


def test_generation_stops_at_eos_and_pads_after():
    m = tiny()
    rows = [[5, 6, 7], [11, 12]]
    ids, mask = left_batch(rows)
    ref = [greedy_no_cache(m, r, 10) for r in rows]
    k = next(i for i in range(1, 10) if ref[0][i] not in ref[0][:i])  # a token first seen at index k
    eos = ref[0][k]  # becomes the EOS: row 0 must stop after k + 1 tokens
    out, gen_mask, logps = m.generate(ids, 10, temperature=0, eos_id=eos, return_logprobs=True)
    resp = out[:, ids.size(1):]
    for i, r in enumerate(rows):
        expected = greedy_no_cache(m, r, 10, eos_id=eos)
        n = len(expected)
        assert resp[i, :n].tolist() == expected
        assert (resp[i, n:] == PAD_ID).all() and gen_mask[i, :n].all() and not gen_mask[i, n:].any()
        assert (logps[i, n:] == 0).all()
    assert gen_mask[0].sum() == k + 1  # the EOS itself counts


def test_generate_logprobs_equal_recomputed_logprobs():
    # the step-0 identity of PPO: what the sampler reports is what training recomputes (item 1, 3)
    m = tiny()
    ids, mask = left_batch([[5, 6, 7, 8], [11, 12]])
    g = torch.Generator().manual_seed(0)
    out, gen_mask, logps = m.generate(ids, 8, temperature=0.7, eos_id=3, return_logprobs=True, generator=g)
    full_mask = torch.cat([mask, gen_mask], 1)
    re = M.response_logprobs(m, out, full_mask, start=ids.size(1), temperature=0.7)
    assert torch.allclose(re * gen_mask, logps, atol=1e-5)


def test_sampling_equals_rows_alone_uncached_token_for_token():
    # the fast path (left-padded batch, KV cache, finished rows compacted out) against the plain one:
    # each prompt alone, no cache, the same uniforms. A small vocabulary makes EOS common, so rows
    # finish at many different steps and the cache is compacted several times on the way.
    m = tiny(vocab=11, seed=3)
    eos, R = 4, 24
    rows = [[5, 6, 7, 8, 9], [1, 2], [3, 5, 6], [7], [8, 9, 10, 1], [2, 3], [6, 6, 6], [9, 1, 2, 3, 5, 7]] * 2
    ids, mask = left_batch(rows)
    out, gen_mask, logps = m.generate(ids, R, 0.9, attention_mask=mask, eos_id=eos, return_logprobs=True,
                                      generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    us = [torch.rand(len(rows), generator=g) for _ in range(R)]  # generate draws one uniform per row a step
    lengths = []
    for i, r in enumerate(rows):
        seq, lps = list(r), []
        for step in range(R):
            logits = m(torch.tensor([seq]))[:, -1]  # (1, V) no cache, no padding
            tok, lp = M.sample_next(logits, 0.9, u=us[step][i:i + 1])
            seq.append(tok.item())
            lps.append(lp.item())
            if tok.item() == eos:
                break
        n = len(seq) - len(r)
        lengths.append(n)
        assert out[i, ids.size(1):ids.size(1) + n].tolist() == seq[len(r):], i
        assert (out[i, ids.size(1) + n:] == PAD_ID).all() and gen_mask[i].sum() == n
        assert torch.allclose(logps[i, :n], torch.tensor(lps), atol=1e-5)
    assert len(set(lengths)) >= 5 and min(lengths) < R // 4  # rows did finish at different times
    # and what the sampler reports is what training recomputes (item 1, 3)
    re = M.response_logprobs(m, out, torch.cat([mask, gen_mask], 1), start=ids.size(1), temperature=0.9)
    assert torch.allclose(re * gen_mask, logps, atol=1e-5)


def static_vs_dynamic(m):
    ids, mask = left_batch([[5, 6, 7, 8, 9], [1, 2], [3, 5, 6], [7], [8, 9, 10, 1], [2, 3]])
    run = lambda **kw: m.generate(ids, 20, 0.9, attention_mask=mask, eos_id=4, return_logprobs=True,  # noqa: E731
                                  generator=torch.Generator().manual_seed(0), num_samples=2, **kw)
    a, b, c = run(), run(compile=True), run(compile=True)  # c: the second call reuses b's static cache
    for x in (b, c):
        assert torch.equal(a[0], x[0]) and torch.equal(a[1], x[1]) and torch.allclose(a[2], x[2], atol=1e-5)
    assert len(set(a[1].sum(1).tolist())) > 2  # answers of several lengths: rows finished while others went on


def test_static_shape_decode_draws_the_same_tokens(monkeypatch):
    # compile=True's static shapes (attention over every slot, a slot tensor, finished rows kept in
    # the batch) against the compacting path; torch.compile itself is the identity here (see the slow test)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    static_vs_dynamic(tiny(vocab=11, seed=3))


@pytest.mark.slow
def test_compiled_decode_draws_the_same_tokens():
    static_vs_dynamic(tiny(vocab=11, seed=3))  # inductor on CPU: about a minute to compile


def test_inverse_cdf_sampling_by_hand_and_in_distribution():
    # probabilities 0.5, 0.25, 0, 0.25: u * total falls in [0, .5) -> 0, [.5, .75) -> 1, [.75, 1) -> 3
    logits = torch.tensor([[0.5, 0.25, 0.0, 0.25]]).log().expand(6, 4)
    u = torch.tensor([0.0, 0.49, 0.51, 0.74, 0.76, 0.9999])  # not on a boundary: those are float rounding
    tok, logp = M.sample_next(logits, 1.0, u=u)
    assert tok.tolist() == [0, 0, 1, 1, 3, 3]  # the zero-probability token is never drawn
    assert torch.allclose(logp, torch.tensor([0.5, 0.5, 0.25, 0.25, 0.25, 0.25]).log())
    # drawn from a generator: the frequencies follow softmax(logits / T)
    torch.manual_seed(0)
    logits = torch.randn(1, 7) * 2
    tok, _ = M.sample_next(logits.expand(40000, 7), 0.8, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=7).float() / 40000
    assert (freq - (logits[0] / 0.8).softmax(-1)).abs().max() < 0.01  # 4 standard errors at most


def test_kv_cache_compaction_keeps_rows():
    cache = M.KVCache(GPTConfig(n_layer=2, n_head=4, n_embd=32), 4, 6)
    k = torch.randn(4, 4, 3, 8)  # (B, H, T, D)
    for layer in range(2):
        cache.update(layer, k, -k)
    cache.pos = 3
    cache.keep(torch.tensor([1, 3]))
    assert torch.equal(cache.k[0, :, :, :3], k[[1, 3]]) and torch.equal(cache.v[1, :, :, :3], -k[[1, 3]])
    kk, vv = cache.update(0, torch.ones(2, 4, 1, 8), torch.ones(2, 4, 1, 8))  # the next step's keys go after
    assert kk.shape == (2, 4, 4, 8) and torch.equal(kk[:, :, :3], k[[1, 3]]) and (kk[:, :, 3] == 1).all()

    gqa = M.GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32)  # fewer key/value heads than query heads
    assert M.KVCache(gqa, 3, 5).shape == (2, 3, 2, 5, 8)


def test_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        tok, logp = M.sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(tok, greedy) and torch.allclose(logp, torch.zeros(4), atol=1e-6)
    for _ in range(20):  # top-k 5 never samples outside the 5 largest; log-prob renormalised over them
        tok, logp = M.sample_next(logits, 1.0, top_k=5)
        top5 = logits.topk(5).indices
        assert (top5 == tok[:, None]).any(-1).all()
        expected = F.log_softmax(logits.gather(-1, top5), -1).gather(-1, (top5 == tok[:, None]).int().argmax(-1, keepdim=True))
        assert torch.allclose(logp, expected.squeeze(-1), atol=1e-5)


# --- the log-prob helper and the reward index


def test_response_logprobs_against_slow_loop():
    m = tiny()
    seq = torch.randint(0, 97, (2, 10))
    fast = M.response_logprobs(m, seq, start=4, temperature=0.8)  # (B, 6)
    for b in range(2):
        for t in range(4, 10):
            logits = m(seq[b:b + 1, :t])[0, -1] / 0.8  # the prefix alone, last position
            assert abs(F.log_softmax(logits, -1)[seq[b, t]].item() - fast[b, t - 4].item()) < 1e-5


@pytest.mark.parametrize("rows", [1, 3, 1000])  # one row per chunk, chunks that do not divide N, one chunk
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(monkeypatch, rows):
    torch.manual_seed(0)
    N, C, V = 11, 8, 29
    monkeypatch.setattr(M, "CE_CHUNK_BYTES", 4 * V * rows)
    h, W = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    y = torch.randint(V, (N,))
    y[4] = PAD_ID  # a weight-0 position may hold any id
    w = torch.rand(N)
    w[4] = w[7] = 0.0
    fused = M.linear_cross_entropy(h, W, y, w)
    (2.5 * fused).backward()  # the upstream gradient scales both
    got = fused.item(), h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    ref = (w * F.cross_entropy(h @ W.t(), y.clamp(min=0), reduction="none")).sum()
    (2.5 * ref).backward()
    assert got[0] == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(got[1], h.grad, atol=1e-6) and torch.allclose(got[2], W.grad, atol=1e-6)
    assert (got[1][[4, 7]] == 0).all()  # weight 0: no gradient to those positions


@pytest.mark.parametrize("tie", [True, False])
def test_forward_with_targets_gives_every_parameter_the_gradient_of_the_logits_loss(tie):
    m = tiny(tie_embeddings=tie).train()
    x, y = torch.randint(0, 97, (3, 12)), torch.randint(0, 97, (3, 12))
    w = (torch.rand(3, 12) > 0.3).float()
    loss = m(x, targets=y, weights=w)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = (w.flatten() * F.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction="none")).sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in m.named_parameters():  # the tied head and embedding included
        assert torch.allclose(fused[n], p.grad, atol=1e-5), n


def test_linear_cross_entropy_frozen_head_no_grad_and_bf16_autocast(monkeypatch):
    torch.manual_seed(0)
    h, W, y, w = torch.randn(6, 8, requires_grad=True), torch.randn(29, 8), torch.randint(29, (6,)), torch.ones(6)
    ref = F.cross_entropy(h @ W.t(), y, reduction="sum")
    M.linear_cross_entropy(h, W, y, w).backward()  # a frozen head (LoRA): the hidden states still get theirs
    assert h.grad is not None and torch.allclose(h.grad, torch.autograd.grad(ref, h)[0], atol=1e-6)
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
    with torch.no_grad():  # evaluation: the logits matmul only, no gradient work
        assert M.linear_cross_entropy(h, W, y, w).item() == pytest.approx(ref.item(), rel=1e-6)
    assert len(calls) == 1
    M.linear_cross_entropy(h, W, y, w)  # with grad: the logits and the hidden states' gradient
    assert len(calls) == 3
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax: as on CUDA
        fused = M.linear_cross_entropy(h, W, y, w)
        bf16_ref = F.cross_entropy(F.linear(h, W).float(), y, reduction="sum")
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(bf16_ref.item(), rel=1e-4)


def test_response_logprobs_pad_is_zero_and_left_pad_invariant():
    m = tiny()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids, mask = left_batch(rows)
    resp = torch.tensor([[20, 21, 3], [22, 3, PAD_ID]])
    rmask = (resp != PAD_ID).long()
    seq = torch.cat([ids, resp], 1)
    lp = M.response_logprobs(m, seq, torch.cat([mask, rmask], 1), start=ids.size(1))
    assert lp[1, 2] == 0
    alone = M.response_logprobs(m, torch.tensor([rows[1] + [22, 3]]), start=3)
    assert torch.allclose(lp[1, :2], alone[0], atol=1e-5)


def test_last_index_and_reward_read_at_last_real_token():
    assert M.last_index(torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])).tolist() == [2, 4, 0]
    torch.manual_seed(0)
    rm = ScalarModel(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    rows = [[5, 6, 7, 3], [8, 9, 3]]
    alone = [rm(torch.tensor([r]))[0, -1].item() for r in rows]  # value at the EOS
    right = M.pad_right(rows)
    left, lmask = left_batch(rows)
    for ids, mask in ((right, (right != PAD_ID).long()), (left, lmask)):
        s = rm.score(ids, mask)
        assert torch.allclose(s, torch.tensor(alone), atol=1e-5)
    rm.reward_gain.fill_(2.0)
    rm.reward_bias.fill_(-1.0)
    assert torch.allclose(rm.score(right), 2 * torch.tensor(alone) - 1, atol=1e-5)


def test_scalar_head_init():
    torch.manual_seed(0)
    rm = ScalarModel(GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=5, n_embd=255))
    assert rm.head.bias.item() == 0
    assert abs(rm.head.weight.std().item() - 1 / 16) < 0.01  # N(0, 1/sqrt(n_embd + 1))


# --- Hugging Face GPT-2 import/export


def test_safetensors_roundtrip(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4)}
    M.write_safetensors(ts, tmp_path / "x.safetensors")
    back = M.read_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(ts) and all(torch.equal(back[k], ts[k]) for k in ts)


def test_save_and_load_pretrained_roundtrip(tmp_path):
    m = tiny()
    m.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model_type"] == "gpt2" and cfg["n_layer"] == 2
    m2 = GPT.from_pretrained(str(tmp_path))
    x = torch.randint(0, 97, (2, 9))
    assert torch.equal(m(x), m2.eval()(x))


def test_parity_with_transformers_both_directions(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    for p in hf.parameters():  # non-trivial biases and norms
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 101, (3, 20))
    for safe in (True, False):  # model.safetensors and pytorch_model.bin
        d = tmp_path / f"hf{safe}"
        hf.save_pretrained(d, safe_serialization=safe)
        ours = GPT.from_pretrained(str(d)).eval()
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4
    ours.save_pretrained(str(tmp_path / "ours"))
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert (back(x).logits - ours(x)).abs().max().item() < 1e-4
    # left padding: ours with our positions == transformers with the same position ids
    ids, mask = left_batch([[5, 6, 7, 8], [9, 10]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf(ids.clamp(min=0), attention_mask=mask, position_ids=pos).logits
    assert (ours(ids, mask) - ref)[mask.bool()].abs().max().item() < 1e-4


def test_from_pretrained_rejects_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "n_positions": 8, "n_layer": 1, "n_head": 1, "n_embd": 4}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(str(tmp_path))


# --- tokenizer and chat template


def tiny_ranks():
    ranks = {bytes([i]): i for i in range(256)}
    for tok in (b"he", b"ll", b"hell", b"hello", b" w", b" wo"):
        ranks[tok] = len(ranks)
    return ranks


def test_tokenizer_ranks_file_roundtrip(tmp_path):
    tok = M.Tokenizer(tiny_ranks())
    tok.save(tmp_path / "t.tiktoken")
    tok2 = M.load_tokenizer(str(tmp_path / "t.tiktoken"))
    assert tok2.ranks == tok.ranks and tok2.eot_id == 262 and tok2.n_vocab == 263
    text = "hello world, héllo 世界 🙂\x00\t\n"
    assert tok2.decode(tok2.encode(text)) == text
    assert tok2.encode("hello")[0] == tok.ranks[b"hello"]
    assert M.EOT not in [tok2.decode([i]) for i in tok2.encode("a <|endoftext|> b")]  # data text is not special
    assert tok2.eot_id not in tok2.encode("a <|endoftext|> b")


def test_gpt2_style_vocab_json_roundtrip(tmp_path):
    tok = M.Tokenizer(tiny_ranks())
    tok.save_hf(str(tmp_path))
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[1:] == ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
    back = M.load_tokenizer(str(tmp_path))
    assert back.ranks == tok.ranks
    transformers = pytest.importorskip("transformers")
    tiny(vocab=263).save_pretrained(str(tmp_path / "export"), tokenizer=tok)  # model + tokenizer, as for vLLM
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "hello world hellow"
    assert hf_tok(text)["input_ids"] == tok.encode(text)


def test_chat_template_and_separate_encoding():
    tok = M.Tokenizer(tiny_ranks())
    p, r = M.encode_chat(tok, "say hello", "hello world")
    assert tok.decode(p) == "Human: say hello\n\nAssistant:"
    assert r[-1] == tok.eot_id and tok.decode(r) == " hello world"
    assert p + r[:-1] == tok.encode("Human: say hello\n\nAssistant:") + tok.encode(" hello world")


# --- checkpoints


def test_checkpoint_roundtrip_and_kind_conversion(tmp_path):
    m = tiny(vocab=263)
    tok = M.Tokenizer(tiny_ranks())
    opt = torch.optim.AdamW(m.parameters())
    ck = str(tmp_path / "run" / "ckpt")
    os.makedirs(tmp_path / "run")
    M.save_checkpoint(ck, m, tok, {"lr": 1.0}, state={"step": 7, "optimizer": opt.state_dict()})
    m2, tok2, info = M.load_checkpoint(str(tmp_path / "run"))
    x = torch.randint(0, 263, (2, 5))
    assert torch.equal(m(x), m2.eval()(x)) and tok2.ranks == tok.ranks and info["train"] == {"lr": 1.0}
    assert M.load_train_state(ck)["step"] == 7
    rm, _, _ = M.load_checkpoint(ck, kind="scalar")  # reward model trunk from an SFT policy
    assert torch.equal(rm.backbone.hidden(x), m.hidden(x))
    M.save_checkpoint(ck, rm, tok, {})
    back, _, info = M.load_checkpoint(ck, kind="gpt")
    assert info["kind"] == "scalar" and torch.equal(back(x), m(x))


def test_checkpoint_records_what_it_is(tmp_path):
    m = tiny(vocab=263)
    tok = M.Tokenizer(tiny_ranks())
    M.save_checkpoint(str(tmp_path / "p"), m, tok, {}, state={"iteration": 3})
    info = json.load(open(tmp_path / "p" / "config.json"))
    assert (info["kind"], info["role"], info["step"]) == ("gpt", "policy", 3) and "normalisation" not in info
    rm = M.scalar_from_gpt(m)
    rm.reward_gain.fill_(2.0)
    M.save_checkpoint(str(tmp_path / "rm"), rm, tok, {}, role="reward_model", fitted=True)
    info = json.load(open(tmp_path / "rm" / "config.json"))
    assert info["role"] == "reward_model" and info["normalisation"] == {"gain": 2.0, "bias": 0.0, "fitted": True}
    M.save_checkpoint(str(tmp_path / "v"), rm, tok, {}, role="value_model")
    assert M.checkpoint_role(str(tmp_path / "v")) == "value_model" and M.checkpoint_role("gpt2") == "policy"
    with pytest.raises(M.ConfigError, match="is a value model .* takes a reward model"):
        M.check_roles(reward_model=(str(tmp_path / "v"), "reward_model"))
    for model, role in ((m, "reward_model"), (rm, "policy"), (rm, "critic")):
        with pytest.raises(ValueError, match="does not fit"):
            M.save_checkpoint(str(tmp_path / "bad"), model, tok, {}, role=role)


def test_checkpoint_survives_kill_mid_swap(tmp_path):
    m = tiny(vocab=263)
    tok = M.Tokenizer(tiny_ranks())
    ck = str(tmp_path / "ckpt")
    M.save_checkpoint(ck, m, tok, {"v": 1})
    # a kill after `ckpt -> ckpt.old` and before `ckpt.tmp -> ckpt`: the old one is still found
    os.replace(ck, ck + ".old")
    os.makedirs(ck + ".tmp")
    (tmp_path / "ckpt.tmp" / "model.pt").write_bytes(b"half-written")
    _, _, info = M.load_checkpoint(ck)
    assert info["train"] == {"v": 1}
    M.save_checkpoint(ck, m, tok, {"v": 2})  # the next save cleans up
    assert not os.path.exists(ck + ".tmp") and not os.path.exists(ck + ".old")
    assert M.load_checkpoint(ck)[2]["train"] == {"v": 2}


def test_checkpoint_rejects_mismatched_tokenizer(tmp_path):
    m = tiny(vocab=97)
    with pytest.raises(ValueError, match="tokenizer has 263 ids but the model 97"):
        M.save_checkpoint(str(tmp_path / "c"), m, M.Tokenizer(tiny_ranks()), {})
        M.load_checkpoint(str(tmp_path / "c"))


# --- config


@dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10
    name: str = "x"
    compile: bool = False
    init: Optional[str] = None


def test_config_precedence_and_types(tmp_path):
    (tmp_path / "c.toml").write_text('lr = 2\nsteps = 5\nname = "toml"\n')
    cfg = M.parse_config(Cfg, ["--config", str(tmp_path / "c.toml"), "--steps", "7", "--compile", "true", "--init=a/b"])
    assert cfg == Cfg(lr=2.0, steps=7, name="toml", compile=True, init="a/b")
    assert isinstance(cfg.lr, float)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert M.parse_config(Cfg, ["--config", str(tmp_path / "config.json"), "--init", "none"]).init is None


def test_config_errors_name_the_key():
    with pytest.raises(M.ConfigError, match=r"--lrr: unknown key 'lrr'; did you mean 'lr'\?$"):
        M.parse_config(Cfg, ["--lrr", "1"])
    with pytest.raises(M.ConfigError, match="unknown key 'xyzzy'; no key is close to it, --help lists the keys$"):
        M.parse_config(Cfg, ["--xyzzy", "1"])
    with pytest.raises(M.ConfigError, match="steps = 'ten' is not a valid int"):
        M.parse_config(Cfg, ["--steps", "ten"])
    with pytest.raises(M.ConfigError, match="compile = 'yes'"):
        M.parse_config(Cfg, ["--compile", "yes"])


def test_config_file_errors(tmp_path):
    (tmp_path / "bad.toml").write_text('steps = "5"\n')
    with pytest.raises(M.ConfigError, match=r"bad.toml:1: steps = '5' should be int, not str"):
        M.parse_config(Cfg, ["--config", str(tmp_path / "bad.toml")])
    (tmp_path / "u.toml").write_text('# a comment\nlr = 1.0\n\n"nmae" = "y"\n')  # the line of the key, quoted or not
    with pytest.raises(M.ConfigError, match=r"u.toml:4: unknown key 'nmae'; did you mean 'name'\?$"):
        M.parse_config(Cfg, ["--config", str(tmp_path / "u.toml")])
    (tmp_path / "j.json").write_text(json.dumps({"train": {"stepz": 5}}))  # a run's config.json: the file, no line
    with pytest.raises(M.ConfigError, match=r"j.json: unknown key 'stepz'; did you mean 'steps'\?$"):
        M.parse_config(Cfg, ["--config", str(tmp_path / "j.json")])
    with pytest.raises(M.ConfigError, match="no such file"):
        M.parse_config(Cfg, ["--config", str(tmp_path / "missing.toml")])


def test_missing_keys_are_named_once_each_with_its_comment():
    @dataclasses.dataclass
    class C:
        data: str = ""  # (required) the pairs; one per line
        ref: str = ""  # (required when beta > 0) the reference
        out: str = "x"  # where to write
        extra: str = ""
    with pytest.raises(M.ConfigError) as e:
        M.require(C(), "data", "ref", "out", "extra")
    assert str(e.value) == ("missing --data, --ref, --extra: set them on the command line or in a --config file "
                            "(--help lists every key)\n  --data: (required) the pairs; one per line\n"
                            "  --ref: (required when beta > 0) the reference\n  --extra: (required)")


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: malformed JSON"):
        M.read_jsonl(str(p), ("prompt", "response"))
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: missing key\(s\) \['response'\]"):
        M.read_jsonl(str(p), ("prompt", "response"))
    p.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: not valid UTF-8"):
        M.read_jsonl(str(p))
    p.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        M.read_jsonl(str(p))


def test_lr_schedule():
    assert M.lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert M.lr_at(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert M.lr_at(100, 100, 1.0, warmup=10, min_lr_frac=0.1) == pytest.approx(0.1)
    assert M.lr_at(55, 100, 1.0, warmup=10, min_lr_frac=0.0, schedule="linear") == pytest.approx(0.5)


def test_nan_gradient_stops_before_the_step():
    m = tiny()
    m(torch.randint(0, 97, (1, 4))).sum().backward()
    next(m.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 7: gradient norm is nan"):
        M.clip_grad_checked(m.parameters(), 1.0, "step 7")


def test_missing_paths_fail_early(tmp_path):
    M.check_paths(init=str(tmp_path), ref="gpt2", val_data="")  # present, a name, unset
    with pytest.raises(M.ConfigError, match="--data .*nope.jsonl: no such file"):
        M.check_paths(data=str(tmp_path / "nope.jsonl"))
    with pytest.raises(M.ConfigError, match="--data .* is a directory; expected a file"):
        M.check_paths(data=str(tmp_path))


def test_truncate_group_cuts_the_prompt_once_by_the_longest_answer():
    p, short, long_ = list(range(100, 120)), [1, 2, 99], list(range(1, 11)) + [99]  # 20 prompt, 3 and 11 answer tokens
    # max_len 24: the longest answer leaves 13 prompt tokens, and the short answer sees the same 13
    got_p, rs, cut_p, cut_r = M.truncate_group(p, [short, long_], 24, 4)
    assert got_p == p[-13:] and rs == [short, long_] and cut_p and cut_r == [False, False]
    # alone, the short answer would keep 21 > 20: every prompt token (what the rows used to disagree on)
    assert M.truncate_example(p, short, 24, 4)[0] == p
    # too long even at min_prompt: the prompt keeps min_prompt, only the answer that does not fit is cut
    got_p, rs, cut_p, cut_r = M.truncate_group(p, [short, long_], 10, 4)
    assert got_p == p[-4:] and rs == [short, long_[:6]] and cut_r == [False, True]
    # a group of one is truncate_example
    assert M.truncate_group(p, [long_], 24, 4) == (p[-13:], [long_], True, [False])


def test_reencode_gives_the_canonical_ids_of_sampled_text(tokenizer):
    text = " the cat is black."
    spelled = [tokenizer.ranks[bytes([b])] for b in text.encode()]  # the same text, one byte a token
    assert spelled != tokenizer.encode(text) and tokenizer.decode(spelled) == text
    assert M.reencode(tokenizer, spelled + [tokenizer.eot_id]) == tokenizer.encode(text) + [tokenizer.eot_id]
    assert M.reencode(tokenizer, spelled + [M.PAD_ID, M.PAD_ID]) == tokenizer.encode(text)  # a cut answer gets no EOS


def test_the_empty_answer_is_eos_alone_in_training_and_in_scoring(tokenizer):
    # a policy that says nothing samples EOS at once (or a blank then EOS); the reward model and DPO
    # read the ranked text "" -- all three must be the same ids, or the reward model is never told
    eos = tokenizer.eot_id
    p, r = M.encode_chat(tokenizer, "what colour is the fox?", "")
    assert r == [eos] and M.encode_chat(tokenizer, "what colour is the fox?", " ")[1] == [eos]
    assert M.reencode(tokenizer, [eos]) == [eos]
    assert M.reencode(tokenizer, tokenizer.encode(" ") + [eos]) == [eos]
    assert M.reencode(tokenizer, tokenizer.encode(" ") + [M.PAD_ID]) == []  # cut, not ended
    assert M.encode_chat(tokenizer, "q", "the fox.")[1] == tokenizer.encode(" the fox.") + [eos]  # others unchanged


def test_combine_ensemble_hand_values_population_variance():
    scores = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5], [2.0, -1.0, 0.5]])  # (k = 3 members, B = 3 answers)
    assert M.combine_ensemble(scores, "mean").tolist() == [2.0, -1.0, 0.5]
    assert M.combine_ensemble(scores, "min").tolist() == [1.0, -2.0, 0.5]
    # population variance over members: (1 + 1 + 0) / 3 = 2/3 (the sample variance would be 1)
    assert M.combine_ensemble(scores, "uwo", 1.5).tolist() == pytest.approx([2.0 - 1.0, -1.0 - 1.0, 0.5], abs=1e-6)
    assert M.combine_ensemble(scores, "uwo", 0.0).tolist() == [2.0, -1.0, 0.5]  # lambda 0 is the mean
    one = scores[:1]  # (1, B): an ensemble of one is its member, bit for bit, under every rule
    for rule in M.ENSEMBLE_RULES:
        assert torch.equal(M.combine_ensemble(one, rule, 3.0), scores[0])
    with pytest.raises(ValueError, match="ensemble must be one of mean, min, uwo, not 'max'"):
        M.combine_ensemble(scores, "max")
    stats = M.ensemble_metrics(scores, 1, "cpu", 3)  # members' means, mean population std across members
    assert stats["score_rm0"] == pytest.approx(-0.5 / 3) and stats["score_rm1"] == pytest.approx(3.5 / 3)
    assert stats["ensemble_std"] == pytest.approx(2 * (2 / 3) ** 0.5 / 3)
