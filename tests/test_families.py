"""Tests of the Llama, Qwen2, Qwen3 and Pythia blocks in model.py: each family, built tiny and
random, keeps every promise GPT-2 keeps (left padding, KV cache, log-probs, scalar head,
checkpoints), and RoPE agrees with a slow reference.
Run: python -m pytest -q tests/test_families.py"""

import math

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import PAD_ID

# tiny shapes that still exercise each family's switches: grouped-query attention, Qwen3's
# wide heads, Llama 3's RoPE scaling, Pythia's partial rotation and untied head
TINY = {
    "gpt2": dict(),
    "llama": dict(n_kv_head=2, n_inner=48, rope_factor=8.0, rope_original_max_pos=16, tie_embeddings=False),
    "qwen2": dict(n_kv_head=2, n_inner=48),
    "qwen3": dict(n_kv_head=1, head_dim=16, n_inner=48),
    "pythia": dict(),
}


def tiny(family, vocab=97, seed=0):
    torch.manual_seed(seed)
    config = M.family_config(family, vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_embd=32,
                             **TINY[family])
    m = M.GPT(config).eval()
    for name, p in m.named_parameters():  # norms and biases away from 1 and 0, so that they matter
        if p.dim() == 1:
            torch.nn.init.normal_(p, mean=1.0 if "ln" in name or "norm" in name else 0.0, std=0.2)
    return m


FAMILIES = list(TINY)


def greedy_no_cache(m, prompt, n):
    x = torch.tensor([prompt])
    for _ in range(n):
        x = torch.cat([x, m(x)[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_and_left_padded_rows_equal_rows_alone(family):
    m = tiny(family)
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 97
    assert torch.allclose(m(x)[:, :7], m(y)[:, :7], atol=1e-6)
    rows = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    ids, mask = M.pad_left(rows)
    out = m(ids, mask)  # (B, P, V)
    for i, r in enumerate(rows):
        assert torch.allclose(out[i, -len(r):], m(torch.tensor([r]))[0], atol=1e-5), i


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_uncached_and_batch_equals_alone(family):
    m = tiny(family)
    rows = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    ids, mask = M.pad_left(rows)
    out, gen_mask, _ = m.generate(ids, 10, temperature=0, attention_mask=mask)
    for i, r in enumerate(rows):
        assert out[i, ids.size(1):].tolist() == greedy_no_cache(m, r, 10), i
    assert gen_mask.all()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_logprobs_equal_response_logprobs(family):
    m = tiny(family)
    ids, mask = M.pad_left([[5, 6, 7, 8], [11, 12]])
    g = torch.Generator().manual_seed(0)
    out, gen_mask, logps = m.generate(ids, 8, temperature=0.7, eos_id=3, return_logprobs=True, generator=g)
    re = M.response_logprobs(m, out, torch.cat([mask, gen_mask], 1), start=ids.size(1), temperature=0.7)
    assert torch.allclose(re * gen_mask, logps, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_scalar_model_left_right_padding_and_checkpoints(family, tmp_path):
    m = tiny(family, vocab=263)
    tok = M.Tokenizer({bytes([i]): i for i in range(256)} | {b"ab": 256, b"cd": 257, b"ef": 258, b"abcd": 259,
                                                              b"gh": 260, b"ij": 261})
    assert tok.n_vocab == 263
    ck = str(tmp_path / "ckpt")
    M.save_checkpoint(ck, m, tok, {})
    m2, _, info = M.load_checkpoint(ck)
    assert info["model"]["family"] == family
    x = torch.randint(0, 263, (2, 9))
    assert torch.equal(m(x), m2.eval()(x))
    rm, _, _ = M.load_checkpoint(ck, kind="scalar")  # reward model from a policy of this family
    assert torch.equal(rm.backbone.hidden(x), m.hidden(x))
    rows = [[5, 6, 7, 3], [8, 9, 3]]
    alone = [rm(torch.tensor([r]))[0, -1].item() for r in rows]
    left, lmask = M.pad_left(rows)
    assert torch.allclose(rm.score(M.pad_right(rows)), torch.tensor(alone), atol=1e-5)
    assert torch.allclose(rm.score(left, lmask), torch.tensor(alone), atol=1e-5)
    M.save_checkpoint(ck, rm, tok, {})
    back, _, _ = M.load_checkpoint(ck, kind="gpt")  # and a trunk back as a GPT
    assert torch.equal(back.hidden(x), m.hidden(x))


def test_gpt2_defaults_unchanged():
    c = M.GPTConfig()
    assert (c.family, c.norm, c.pos_emb, c.mlp, c.parallel_residual, c.tie_embeddings, c.qk_norm) == \
        ("gpt2", "layernorm", "learned", "gelu_tanh", False, True, False)
    assert c.kv_heads == 12 and c.hd == 64 and M.GPTConfig(**M.FAMILIES["gpt2"]) == c
    with pytest.raises(ValueError, match="norm"):
        M.GPTConfig(norm="batchnorm")


def test_rope_against_complex_rotation():
    # RoPE (Su et al. 2021, eq. 34) as a complex multiplication of pairs (i, i + d/2), the layout
    # Hugging Face uses for Llama, Qwen and GPT-NeoX; only the first rotary_frac of dims turn
    c = M.family_config("pythia", n_head=2, n_embd=32, rotary_frac=0.5)
    x = torch.randn(1, 2, 5, 16)  # (B, H, T, D)
    pos = torch.tensor([[0, 1, 2, 7, 30]])
    m = M.GPT(M.GPTConfig(**{**vars(c), "n_layer": 1, "vocab_size": 11}))
    cos, sin = m.rope(pos)
    out = M.apply_rope(x, cos, sin)
    d = 8
    theta = torch.tensor([10000 ** (-2 * i / d) for i in range(d // 2)])
    z = torch.complex(x[..., :d // 2], x[..., d // 2:d]) * torch.polar(torch.ones(5, d // 2), pos[0, :, None] * theta)
    ref = torch.cat([z.real, z.imag, x[..., d:]], -1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_llama3_rope_scaling_matches_the_formula():
    c = M.family_config("llama", n_head=1, n_embd=64, rope_theta=500000.0, rope_factor=8.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_pos=8192)
    got = M.rope_inv_freq(c, "cpu")
    for i, f in enumerate(500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:  # high frequencies kept
            want = f
        elif wavelen > 8192 / 1:  # low frequencies slowed by the factor
            want = f / 8
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - s) * f / 8 + s * f
        assert abs(got[i].item() - want.item()) <= 1e-6 * want.item()


def test_gqa_equals_repeated_heads():
    # grouped-query attention == multi-head attention whose key/value heads are repeated
    m = tiny("qwen2")
    attn = m.transformer.h[0].attn
    x = torch.randn(2, 6, 32)
    C, D = 32, 8
    q, k, v = attn.c_attn(x).split([4 * D, 2 * D, 2 * D], 2)
    q = q.view(2, 6, 4, D).transpose(1, 2)
    k = k.view(2, 6, 2, D).transpose(1, 2).repeat_interleave(2, 1)
    v = v.view(2, 6, 2, D).transpose(1, 2).repeat_interleave(2, 1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, C)
    assert torch.allclose(attn(x), attn.c_proj(y), atol=1e-6)
    assert m.transformer.h[0].attn.c_attn.bias is not None and m.transformer.h[0].mlp.c_fc.bias is None
