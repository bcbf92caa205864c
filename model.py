"""
model.py: everything the stages must agree on, in one file.

Contents
  1. GPTConfig, GPT         the GPT-2 architecture; left-padded batches; hidden states and logits
  2. KVCache, GPT.generate  batched sampling with a key/value cache, stopping each row at EOS;
                            sample_answers: one answer per chat prompt, in batches
  3. ScalarModel            GPT trunk + linear head: per-token values, reward at the last real token
  4. log-probs              response_logits, logprobs_from_logits, response_logprobs: the one
                            place where logits and tokens are shifted against each other
  5. Hugging Face GPT-2     GPT.from_pretrained / save_pretrained, safetensors read and written by hand
  6. Tokenizer              tiktoken BPE (gpt2, or a ranks file we trained) and the chat template
  7. Checkpoints            directories written atomically (temp dir + rename)
  8. Utilities              config parsing (dataclass < toml/json < --key value), device, DDP,
                            autocast, optimizer, metrics log, jsonl and preference reading

Shapes: B batch, T tokens (prompt + response), P prompt, R response, V vocab, C n_embd,
H heads, D head dim, S keys in the KV cache.

Padding: PAD_ID = -1 lies outside every vocabulary, so it is never EOS and never a token the
model can sample (docs/implementation_details.md, item 4). Prompts are left-padded for generation, training
rows are right-padded. The model reads PAD as token 0; what keeps it out of every result is the
attention mask (left padding) or causality (right padding), plus the loss masks of the stages.
"""

import atexit
import base64
import dataclasses
import glob
import hashlib
import inspect
import io
import json
import math
import os
import shutil
import struct
import sys
import textwrap
import tokenize
import tomllib
import typing
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

PAD_ID = -1
EOT = "<|endoftext|>"

# --- 1. GPT


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # tokenizer.n_vocab: every id the model can emit is a real token
    block_size: int = 1024  # max positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, H, S, D)
        p = self.dropout if self.training else 0.0
        if attn_mask is None:  # no padding, no cache: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def attention_bias(attention_mask, T):
    """Boolean attention mask for the last T queries over all S keys: causal, no padded keys.

    attention_mask (B, S): 1 for real tokens. Returns (B, 1, T, S), True = may attend. Each
    query also sees itself, so a padded query row is never fully masked (which would give NaN);
    its output is garbage that no loss reads.
    """
    B, S = attention_mask.shape
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos) & attention_mask.bool()[:, None, :]  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)
    return allowed[:, None]  # (B, 1, T, S)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def hidden(self, idx, attention_mask=None, kv_cache=None):
        """Final hidden states (after ln_f), (B, T, C).

        idx (B, T) token ids, PAD_ID allowed. attention_mask (B, S) with S = cached + T, 1 = real
        token; needed for left padding and with a cache. Position ids count real tokens only,
        cumsum(mask) - 1, so padding never shifts positions (docs/implementation_details.md, item 7).
        """
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if attention_mask is None and kv_cache is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
            attn_mask = None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
            assert attention_mask.shape == (B, past + T), f"attention_mask {tuple(attention_mask.shape)} != {(B, past + T)}"
            # positions <= S - 1, so checking the length needs no GPU sync (this runs every decode step)
            assert past + T <= self.config.block_size, f"sequence of {past + T} tokens > block_size {self.config.block_size}"
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            attn_mask = attention_bias(attention_mask, T)  # (B, 1, T, S)
        x = self.transformer.wte(idx.clamp(min=0)) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, attention_mask=None, kv_cache=None, logits_start=0):
        """Logits for positions logits_start.. (all by default): (B, T - logits_start, V).

        Skipping the prompt positions saves the (B, P, V) LM-head work; going through forward
        (not hidden) keeps torch.compile and DDP wrappers in the path."""
        return self.lm_head(self.hidden(idx, attention_mask, kv_cache)[:, logits_start:])

    # --- 2. sampling with a KV cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 attention_mask=None, eos_id=None, return_logprobs=False, generator=None):
        """Sample continuations of a batch of left-padded prompts.

        idx (B, P) prompts, left-padded with PAD_ID; attention_mask (B, P) defaults to idx != PAD_ID.
        temperature 0 is greedy. A row stops at eos_id (kept, counted) and is PAD_ID after it.
        Returns (tokens (B, P + R), mask (B, R) 1 = generated token, logprobs (B, R) or None),
        R <= max_new_tokens. logprobs are of the sampling distribution (temperature, top-k and
        top-p applied), 0 where mask is 0. For PPO use neither top-k nor top-p (docs/implementation_details.md, item 1).
        """
        B, P = idx.shape
        if attention_mask is None:
            attention_mask = idx != PAD_ID
        mask = attention_mask.long()  # (B, S) grows by one column a step
        assert P + max_new_tokens <= self.config.block_size, \
            f"prompt {P} + {max_new_tokens} new tokens > block_size {self.config.block_size}"
        cache = KVCache(self.config, B, P + max_new_tokens)
        h = self.hidden(idx, mask, cache)[:, -1]  # (B, C) prefill; logits of the last position only
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        tokens, alive, logps = [], [], []
        for step in range(max_new_tokens):
            logits = self.lm_head(h).float()  # (B, V)
            tok, logp = sample_next(logits, temperature, top_k, top_p, generator)  # (B,), (B,)
            tokens.append(tok.masked_fill(done, PAD_ID))
            logps.append(logp.masked_fill(done, 0.0))
            alive.append(~done)
            if eos_id is not None:
                done = done | (tok == eos_id)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # finished rows feed masked PAD
            h = self.hidden(tokens[-1][:, None], mask, cache)[:, -1]  # (B, C)
        out = torch.cat([idx, torch.stack(tokens, 1)], dim=1)  # (B, P + R)
        gen_mask = torch.stack(alive, 1).long()  # (B, R)
        return out, gen_mask, torch.stack(logps, 1) if return_logprobs else None


@torch.no_grad()
def sample_answers(model, tokenizer, prompts, max_new_tokens, temperature=1.0, batch_size=64, generator=None, template="hh"):
    """One sampled answer per prompt, in the chat template, batch_size prompts at a time (left-padded).

    Returns a list of (response ids up to and including EOS, ended). A prompt longer than
    block_size - max_new_tokens keeps its last tokens (the end is what the answer follows)."""
    max_prompt = model.config.block_size - max_new_tokens
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sample", leave=False, disable=len(prompts) <= batch_size):
        rows = [encode_chat(tokenizer, p, template=template) for p in prompts[i:i + batch_size]]
        ids, mask = pad_left(rows, min(max_prompt, max(map(len, rows))))
        dev = next(model.parameters()).device
        seq, gen_mask, _ = model.generate(ids.to(dev), max_new_tokens, temperature, attention_mask=mask.to(dev),
                                          eos_id=tokenizer.eot_id, generator=generator)
        for row, m in zip(seq[:, ids.size(1):].tolist(), gen_mask.tolist()):
            resp = row[:sum(m)]
            out.append((resp, bool(resp) and resp[-1] == tokenizer.eot_id))
    return out


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V) and its log-prob under the distribution sampled."""
    if temperature == 0:
        logp = F.log_softmax(logits, dim=-1)  # (B, V)
        tok = logp.argmax(-1)  # (B,)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    logp = F.log_softmax(logits, dim=-1)  # (B, V)
    tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # (B,)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class KVCache:
    """Keys and values of every layer, preallocated: (L, B, H, S_max, D). pos = tokens cached."""

    def __init__(self, config, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = self.v = None  # allocated at the first update, in the dtype autocast gives
        self.pos = 0

    def update(self, layer, k, v):
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]  # (B, H, S, D)


# --- 3. scalar-head model (reward and value models)


class ScalarModel(nn.Module):
    """A GPT trunk with a linear head on the final hidden state: one scalar per position.

    As a value model, forward() gives V(s_t) for every position. As a reward model, score()
    reads the head at the last real token of each row (the EOS, docs/implementation_details.md item 6) and
    applies the normalisation gain and bias fitted after training (item 10).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.backbone = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))  # Stiennon et al. 2020
        nn.init.zeros_(self.head.bias)
        self.register_buffer("reward_gain", torch.tensor(1.0))
        self.register_buffer("reward_bias", torch.tensor(0.0))

    def forward(self, idx, attention_mask=None):
        return self.head(self.backbone.hidden(idx, attention_mask)).squeeze(-1).float()  # (B, T)

    def score(self, idx, attention_mask=None):
        """Normalised reward of each row, read at its last real token: (B,)."""
        if attention_mask is None:
            attention_mask = idx != PAD_ID
        values = self(idx, attention_mask)  # (B, T)
        return self.reward_gain * values.gather(1, last_index(attention_mask)[:, None]).squeeze(1) + self.reward_bias


def last_index(mask):
    """Index of the last 1 in each row of mask (B, T), for left or right padding: (B,)."""
    T = mask.size(1)
    return (mask.long() * torch.arange(1, T + 1, device=mask.device)).argmax(-1)


# --- 4. log-probs of tokens: the one place where logits and tokens are shifted


def response_logits(model, seq, attention_mask=None, start=1):
    """Logits that predict seq[:, start:]: position t - 1 predicts token t. (B, T - start, V).

    model may be a GPT or a torch.compile / DDP wrapper of one."""
    assert start >= 1
    return model(seq, attention_mask, logits_start=start - 1)[:, :-1]  # (B, T - start, V)


def logprobs_from_logits(logits, tokens, temperature=1.0):
    """log softmax(logits / temperature) at tokens, in fp32 (item 16). (B, R, V), (B, R) -> (B, R).

    PAD_ID tokens get log-prob 0, so a padded position adds 0 to every sum and KL (item 13).
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, R, V)
    out = logp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, R)
    return out.masked_fill(tokens == PAD_ID, 0.0)


def response_logprobs(model, seq, attention_mask=None, start=1, temperature=1.0):
    """log p(seq[:, t] | seq[:, :t]) for t >= start: (B, T - start), fp32, 0 at PAD_ID.

    Pass start = P for a left-padded prompt of P columns followed by a response; start = 1 for
    right-padded prompt+response rows, then mask with the loss mask shifted the same way.
    Divide by the sampling temperature so the log-probs are of the distribution sampled (item 1).
    """
    return logprobs_from_logits(response_logits(model, seq, attention_mask, start), seq[:, start:], temperature)


# --- 5. Hugging Face GPT-2 import/export (no transformers needed)

HF_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
            "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Parse a .safetensors file: 8-byte little-endian header size, JSON header, raw tensor bytes."""
    tensors = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in ST_DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            f.seek(base + start)
            buf = bytearray(f.read(end - start))
            t = torch.frombuffer(buf, dtype=ST_DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=ST_DTYPES[info["dtype"]])
            tensors[name] = t.reshape(info["shape"])
    return tensors


def write_safetensors(tensors, path):
    names = {v: k for k, v in ST_DTYPES.items()}
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        blob = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for blob in blobs:
            f.write(blob)


def hf_hub_snapshot(name):
    """A complete snapshot of a GPT-2 name in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub), or None."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    for snap in sorted(glob.glob(os.path.join(hub, "models--" + HF_NAMES[name].replace("/", "--"), "snapshots", "*"))):
        if all(os.path.exists(os.path.join(snap, f)) for f in ("config.json", "vocab.json", "merges.txt", "model.safetensors")):
            return snap
    return None


def hf_gpt2_dir(path_or_name):
    """A local GPT-2 directory: path_or_name itself, or for gpt2..gpt2-xl our download cache
    (PLAINRLHF_CACHE, ~/.cache/plainrlhf), else the Hugging Face cache, else a download."""
    if os.path.isdir(path_or_name):
        return path_or_name
    if path_or_name not in HF_NAMES:
        raise FileNotFoundError(f"{path_or_name!r} is neither a directory nor one of {sorted(HF_NAMES)}")
    cache = os.path.join(os.environ.get("PLAINRLHF_CACHE", os.path.expanduser("~/.cache/plainrlhf")), path_or_name)
    files = ("config.json", "vocab.json", "merges.txt", "model.safetensors")
    if not all(os.path.exists(os.path.join(cache, f)) for f in files) and hf_hub_snapshot(path_or_name):
        return hf_hub_snapshot(path_or_name)
    os.makedirs(cache, exist_ok=True)
    for fname in files:
        dest = os.path.join(cache, fname)
        if not os.path.exists(dest):
            url = f"https://huggingface.co/{HF_NAMES[path_or_name]}/resolve/main/{fname}"
            print(f"downloading {url}")
            try:
                urllib.request.urlretrieve(url, dest + ".part")
            except OSError as e:  # URLError and friends: no network
                raise ConfigError(f"{path_or_name}: not in {cache} nor in the Hugging Face cache, and the download of "
                                  f"{url} failed ({e}). Pass a local GPT-2 directory instead") from None
            os.replace(dest + ".part", dest)  # a kill mid-download leaves only the .part file
    return cache


def load_hf_gpt2(path_or_name, dropout=0.0):
    d = hf_gpt2_dir(path_or_name)
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{d}/config.json: model_type {hf['model_type']!r} cannot be loaded; this loader reads GPT-2 only")
    if hf.get("activation_function", "gelu_new") != "gelu_new" or hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{d}/config.json: only GPT-2's gelu_new MLP of width 4*n_embd is supported")
    config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True)
    if os.path.exists(os.path.join(d, "model.safetensors")):
        sd = read_safetensors(os.path.join(d, "model.safetensors"))
    elif os.path.exists(os.path.join(d, "pytorch_model.bin")):
        sd = torch.load(os.path.join(d, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{d} has neither model.safetensors nor pytorch_model.bin")
    model = GPT(config)
    ours = model.state_dict()
    loaded = set()
    for name, t in sd.items():
        key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        if key not in ours:
            raise KeyError(f"{d}: unexpected tensor {name}")
        if key.endswith(CONV1D):
            t = t.t()
        if t.shape != ours[key].shape:
            raise ValueError(f"{d}: {name} has shape {tuple(t.shape)}, expected {tuple(ours[key].shape)}")
        with torch.no_grad():
            ours[key].copy_(t.float())
        loaded.add(key)
    missing = set(ours) - loaded - {"lm_head.weight"}  # lm_head is tied to wte
    if missing:
        raise KeyError(f"{d}: missing tensors {sorted(missing)}")
    return model


def save_hf_gpt2(model, out_dir, tokenizer=None):
    """Write a Hugging Face GPT2LMHeadModel directory: config.json, model.safetensors, and the
    tokenizer as vocab.json + merges.txt when given."""
    os.makedirs(out_dir, exist_ok=True)
    c = model.config
    if not c.bias:
        raise ValueError("Hugging Face GPT-2 has biases; this model was built with bias=False")
    eos = tokenizer.eot_id if tokenizer is not None else c.vocab_size - 1
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
          "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
          "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
          "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
          "initializer_range": 0.02, "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    sd = {}
    for k, t in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        sd[k] = t.t().contiguous() if k.endswith(CONV1D) else t
    write_safetensors(sd, os.path.join(out_dir, "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_hf(out_dir)


GPT.from_pretrained = staticmethod(load_hf_gpt2)
GPT.save_pretrained = save_hf_gpt2

# --- 6. tokenizer and chat template

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's map from bytes to printable unicode characters, used by vocab.json and merges.txt."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_split(ranks, token, max_rank):
    """Byte-pair merge `token` using only merges ranked below max_rank (recovers merges.txt)."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


class Tokenizer:
    """tiktoken byte-level BPE with <|endoftext|> as EOS (id = number of ranks); PAD_ID is -1."""

    def __init__(self, ranks, name="bpe"):
        self.ranks = ranks
        self.name = name
        self.eot_id = len(ranks)
        self.n_vocab = len(ranks) + 1
        self.enc = tiktoken.Encoding(name, pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})

    def encode(self, text):
        # special tokens written in the data are plain text: only the template adds a real EOS
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if i != PAD_ID and i != self.eot_id])

    def save(self, path):
        write_ranks(self.ranks, path)

    def save_hf(self, out_dir):
        b2u = bytes_to_unicode()
        to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
        vocab = {to_str(tok): rank for tok, rank in self.ranks.items()}
        vocab[EOT] = self.eot_id
        merges = []
        for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            if len(tok) > 1:
                a, b = bpe_split(self.ranks, tok, rank)
                merges.append(f"{to_str(a)} {to_str(b)}")
        with open(os.path.join(out_dir, "vocab.json"), "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(out_dir, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_ranks(ranks, path):
    """The tiktoken ranks format: base64(token bytes) rank, one per line, sorted by rank."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def read_ranks(path):
    """A tiktoken ranks file, read directly: tiktoken.load caches by path and would return stale ranks."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{n}: expected 'base64 rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


def load_tokenizer(spec):
    """spec: a tiktoken ranks file, a directory holding tokenizer.tiktoken or GPT-2's vocab.json
    (+ merges.txt), or a name: 'gpt2' (tiktoken's own; gpt2-medium etc. share it)."""
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "tokenizer.tiktoken")):
            return load_tokenizer(os.path.join(spec, "tokenizer.tiktoken"))
        if os.path.exists(os.path.join(spec, "vocab.json")):
            u2b = {u: b for b, u in bytes_to_unicode().items()}
            with open(os.path.join(spec, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            ranks = {bytes(u2b[ch] for ch in tok): i for tok, i in vocab.items() if tok != EOT}
            if sorted(ranks.values()) != list(range(len(ranks))) or vocab.get(EOT) != len(ranks):
                raise ValueError(f"{spec}/vocab.json: ids must be 0..n-1 with {EOT} last")
            return Tokenizer(ranks, "gpt2")
        raise FileNotFoundError(f"{spec} holds neither tokenizer.tiktoken nor vocab.json")
    if os.path.isfile(spec):
        return Tokenizer(read_ranks(spec), os.path.basename(spec))
    if spec in HF_NAMES:
        try:
            return Tokenizer(tiktoken.get_encoding("gpt2")._mergeable_ranks, "gpt2")
        except Exception:  # offline and not cached: use the files of the GPT-2 directory
            return load_tokenizer(hf_gpt2_dir(spec))
    raise FileNotFoundError(f"tokenizer {spec!r}: not a ranks file, a directory, or one of {sorted(HF_NAMES)}")


# name -> (prompt format, response prefix). The answer is encoded as prefix + response + EOS, apart
# from the prompt (item 8 of docs/implementation_details.md). "hh": Anthropic HH-RLHF's dialogue
# format, for chat data; "none": the prompt as it is, for tasks whose prompt already says what comes
# next (TL;DR posts ending in "TL;DR:", Stiennon et al. 2020; IMDb review prefixes, Rafailov et al.
# 2023). A model family's own chat format is one more entry.
CHAT_TEMPLATES = {"hh": ("Human: {prompt}\n\nAssistant:", " "), "none": ("{prompt}", " ")}


def chat_prompt(prompt, template="hh"):
    """The templated prompt text, e.g. 'Human: {prompt}\\n\\nAssistant:' for 'hh'."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"template {template!r}: expected one of {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[template][0].format(prompt=prompt)


def encode_chat(tokenizer, prompt, response=None, template="hh"):
    """Token ids of the templated prompt and, if given, of the response prefix + response + EOS.

    Prompt and response are encoded separately and concatenated (item 8 of
    docs/implementation_details.md), so the boundary is the same at training and at generation;
    EOS ends every target (item 5).
    """
    p = tokenizer.encode(chat_prompt(prompt, template))
    if response is None:
        return p
    return p, tokenizer.encode(CHAT_TEMPLATES[template][1] + response) + [tokenizer.eot_id]


def truncate_example(p, r, max_len, min_prompt):
    """The one truncation rule, for prompt ids p and response ids r (with EOS) longer than max_len:
    cut the prompt from the left (keep its last tokens) but keep at least min_prompt of them; if
    still too long, cut the response on the right (it loses its EOS). Returns (p, r, cut_p, cut_r)."""
    cut_p = cut_r = False
    if len(p) + len(r) > max_len:
        keep = max(min(len(p), min_prompt), max_len - len(r))
        if keep < len(p):
            p, cut_p = p[-keep:], True
        if len(p) + len(r) > max_len:
            r, cut_r = r[:max_len - len(p)], True
    return p, r, cut_p, cut_r


def pad_left(rows, max_len=None):
    """Left-pad lists of ids with PAD_ID: (B, P) ids and (B, P) attention mask; rows longer than
    max_len keep their last max_len ids (the end of a prompt is what the answer follows)."""
    P = max_len or max(len(r) for r in rows)
    ids = torch.full((len(rows), P), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[-P:]  # a longer row keeps its last P tokens
        if r:
            ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
    return ids, (ids != PAD_ID).long()


def pad_right(rows, max_len=None):
    """Right-pad lists of ids with PAD_ID: (B, T)."""
    T = max_len or max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :min(len(r), T)] = torch.tensor(r[:T], dtype=torch.long)
    return ids


def pad_responses(rows):
    """Rows (ids, n_prompt) of prompt + response (+ EOS), right-padded: ids (B, T) and the response
    mask (B, T), 1 on the response tokens and the EOS, 0 on the prompt and the padding."""
    ids = pad_right([seq for seq, _ in rows])  # (B, T)
    mask = torch.zeros_like(ids)
    for i, (seq, n_prompt) in enumerate(rows):
        mask[i, n_prompt:len(seq)] = 1
    return ids, mask


# --- 7. checkpoints: a directory, written atomically


def save_checkpoint(ckpt_dir, model, tokenizer, train_config, state=None, meta=None):
    """Write weights, model config, tokenizer, resolved training config and (for resume) the
    optimizer/RNG/step state into ckpt_dir. Everything goes to ckpt_dir.tmp first, then two
    renames swap it in; a kill at any moment leaves ckpt_dir or ckpt_dir.old complete, and
    load_checkpoint reads whichever is there."""
    tmp, old = ckpt_dir + ".tmp", ckpt_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    raw = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    torch.save(raw.state_dict(), os.path.join(tmp, "model.pt"))
    tokenizer.save(os.path.join(tmp, "tokenizer.tiktoken"))
    info = {"kind": "scalar" if isinstance(raw, ScalarModel) else "gpt", "model": dataclasses.asdict(raw.config),
            "tokenizer": tokenizer.name, "train": train_config, "meta": meta or {}}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(info, f, indent=2)
    if state is not None:
        torch.save(state, os.path.join(tmp, "state.pt"))
    if os.path.exists(ckpt_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(path):
    """Resolve a run directory (holding ckpt/) or a checkpoint directory, surviving a kill mid-swap."""
    for p in (os.path.join(path, "ckpt"), path, os.path.join(path, "ckpt.old"), path + ".old"):
        if os.path.exists(os.path.join(p, "model.pt")) and os.path.exists(os.path.join(p, "config.json")):
            return p
    raise FileNotFoundError(f"no checkpoint at {path} (expected {path}/ckpt/model.pt or {path}/model.pt)")


def load_checkpoint(path, device="cpu", kind=None, dropout=0.0):
    """(model, tokenizer, info) from a checkpoint directory. kind 'gpt' or 'scalar' converts:
    a GPT checkpoint loads as a ScalarModel trunk (reward model from SFT), a ScalarModel's trunk
    loads as a GPT. dropout overrides the saved value (0 for every RLHF model, item 2)."""
    d = checkpoint_dir(path)
    with open(os.path.join(d, "config.json")) as f:
        info = json.load(f)
    config = GPTConfig(**{**info["model"], "dropout": dropout})
    sd = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
    kind = kind or info["kind"]
    model = ScalarModel(config) if kind == "scalar" else GPT(config)
    if kind == info["kind"]:
        model.load_state_dict(sd)
    elif kind == "scalar":
        model.backbone.load_state_dict(sd)  # head keeps its fresh init
    else:
        model.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    tokenizer = load_tokenizer(os.path.join(d, "tokenizer.tiktoken"))
    if tokenizer.n_vocab != config.vocab_size:
        raise ValueError(f"{d}: tokenizer has {tokenizer.n_vocab} ids but the model {config.vocab_size}")
    info["dir"] = d
    return model.to(device), tokenizer, info


def load_gpt(init, device="cpu", dropout=0.0):
    """(GPT, tokenizer) from one of our checkpoints, a Hugging Face GPT-2 directory or a GPT-2 name."""
    is_hf = os.path.exists(os.path.join(init, "model.safetensors")) or os.path.exists(os.path.join(init, "pytorch_model.bin"))
    if is_hf or init in HF_NAMES:
        return load_hf_gpt2(init, dropout).to(device), load_tokenizer(init)
    model, tokenizer, _ = load_checkpoint(init, device, kind="gpt", dropout=dropout)
    return model, tokenizer


def load_train_state(path):
    """The optimizer/RNG/step state saved with a checkpoint, or None."""
    try:
        d = checkpoint_dir(path)
    except FileNotFoundError:
        return None
    p = os.path.join(d, "state.pt")
    return torch.load(p, map_location="cpu", weights_only=False) if os.path.exists(p) else None


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- 8. utilities: config, device, optimizer, logging, data


class ConfigError(SystemExit):
    """A bad config file or flag: the message says which key and what is valid."""


def _coerce(value, typ, key, where, from_cli):
    """Check a TOML/JSON value, or parse a --flag string, against the field type."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None or (from_cli and value.lower() in ("none", "null")):
            return None
        typ = next(a for a in args if a is not type(None))
    if from_cli and typ is not str:
        try:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return typ(value)
        except ValueError:
            raise ConfigError(f"{where}: {key} = {value!r} is not a valid {typ.__name__}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} = {value!r} should be {typ.__name__}, not {type(value).__name__}")
    return value


def field_docs(cls):
    """[(key or None, comment)] in source order: each field with the comment written beside it, and
    (None, text) for a comment line of its own (a section title). Read from the dataclass source."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return [(k, "") for k in typing.get_type_hints(cls)]
    fields, lines = set(typing.get_type_hints(cls)), {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            lines.setdefault(tok.start[0], []).append(tok)
    out = []
    for _, toks in sorted(lines.items()):
        comment = toks[-1].string.lstrip("#").strip() if toks[-1].type == tokenize.COMMENT else ""
        if toks[0].type == tokenize.NAME and toks[0].string in fields and len(toks) > 1 and toks[1].string == ":":
            out.append((toks[0].string, comment))
        elif len(toks) == 1 and comment and toks[0].start[1] > 0:  # a comment line inside the class body
            out.append((None, comment))
    return out


def print_help(cls):
    """--help: usage, the script's first docstring line, and every key with type, default and comment."""
    mod = sys.modules.get(cls.__module__)
    script = os.path.relpath(getattr(mod, "__file__", None) or "script.py")
    print(f"usage: python {script} [--config file.toml] [--key value ...]")
    doc = (getattr(mod, "__doc__", None) or "").strip().splitlines()
    if doc:
        print(doc[0])
    print("\nkeys (dataclass defaults < --config file < --key value; bools: true/false):")
    print(f"  {'--config PATH':36s} a TOML file of these keys, or a run's config.json")
    hints, defaults = typing.get_type_hints(cls), dataclasses.asdict(cls())
    for key, comment in field_docs(cls):
        if key is None:
            print(f"  # {comment}")
            continue
        typ = hints[key]
        name = getattr(typ, "__name__", None) if typing.get_origin(typ) is None else str(typ).replace("typing.", "")
        left = f"--{key} {name} = {defaults[key]!r}"
        print(f"  {left:36s} {comment}" if len(left) < 37 else f"  {left}\n  {'':36s} {comment}")


def parse_config(cls, argv=None):
    """Dataclass defaults < --config file.toml (or an earlier run's config.json) < --key value.
    --help or -h prints every key with its type, default and comment, and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print_help(cls)
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    valid = ", ".join(hints)
    cfg = cls()

    def set_key(key, value, where, from_cli=False):
        if key not in hints:
            raise ConfigError(f"{where}: unknown key {key!r}. Valid keys: {valid} (--help describes each)")
        setattr(cfg, key, _coerce(value, hints[key], key, where, from_cli))

    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key value (--help lists the keys)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv):
            key, value = arg[2:], argv[i + 1]
            i += 2
        else:
            raise ConfigError(f"{arg} needs a value")
        pairs.append((key.replace("-", "_"), value))
    for key, path in [p for p in pairs if p[0] == "config"]:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file")
        try:
            with open(path, "rb") as f:
                values = json.load(f) if path.endswith(".json") else tomllib.load(f)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        values = values.get("train", values) if path.endswith(".json") else values  # a checkpoint's config.json
        for key, value in values.items():
            set_key(key, value, path)
    for key, value in pairs:
        if key != "config":
            set_key(key, value, f"--{key}", from_cli=True)
    return cfg


def require(cfg, *keys):
    """Keys that have no default (data paths, input checkpoints): missing ones are one error naming
    each with its description, before anything loads."""
    docs = dict(field_docs(type(cfg)))
    missing = [k for k in keys if not getattr(cfg, k)]
    if missing:
        raise ConfigError("missing " + "; ".join(f"--{k} ({docs.get(k) or 'required'})" for k in missing) +
                          ". Set them on the command line or in a --config file (--help lists every key)")


def print_config(cfg):
    for k, v in dataclasses.asdict(cfg).items():
        print(f"  {k:24s} {v}")


def save_config(cfg, out_dir):
    """out_dir/config.json, written to a temp file and renamed over (never half-written)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg, f, indent=2)
    os.replace(path + ".tmp", path)


def get_device(name="auto"):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def ddp_setup(device="auto"):
    """(rank, world_size, device). Under torchrun (RANK in the environment) join the process
    group: nccl on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU. Batch sizes in the
    configs stay global: each rank takes its slice of every batch (rows rank::world_size)."""
    device = get_device(device)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def ddp_wrap(model, world, device):
    """DistributedDataParallel when world > 1 (gradients all-reduced, averaged over ranks)."""
    if world == 1:
        return model
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def ddp_sum(x, world, device):
    """Sum a float or a tensor over ranks (identity for one process)."""
    if world == 1:
        return x
    t = torch.as_tensor(x, dtype=torch.float64).to(device)
    torch.distributed.all_reduce(t)
    return t.item() if t.dim() == 0 else t.cpu()


def ddp_cleanup(world):
    """Leave the process group together: rank 0 may still be writing its last checkpoint, and a
    rank that tears gloo down while another still talks to it can abort at exit."""
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def autocast(device, dtype="bfloat16"):
    """bf16 autocast on CUDA; fp32 elsewhere. Log-prob and loss math is cast to fp32 regardless."""
    if device.startswith("cuda") and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return nullcontext()


def configure_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-5, device="cpu"):
    """AdamW with weight decay on matrices only; fused on CUDA. eps 1e-5 (docs/implementation_details.md, item 15)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.startswith("cuda"))


def clip_grad_checked(params, max_norm, where):
    """Clip the gradient norm and return it; a NaN or inf gradient stops the run before the
    optimizer step, with a message saying where (the last checkpoint stays the last good one)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    if not math.isfinite(norm):
        raise FloatingPointError(f"{where}: gradient norm is {norm}; stopped before the optimizer step")
    return norm


FILE_KEYS = {"data", "val_data", "prompts", "ptx_data", "prompts_train", "prompts_val", "rankings"}


def check_paths(**paths):
    """Fail before any heavy work when an input path is missing, or is a directory where a data
    file is expected (GPT-2 names are not paths)."""
    for key, path in paths.items():
        if path and path not in HF_NAMES and not os.path.exists(path):
            raise ConfigError(f"--{key} {path}: no such file or directory")
        if path and key in FILE_KEYS and os.path.isdir(path):
            raise ConfigError(f"--{key} {path} is a directory; expected a file")


def lr_at(step, max_steps, lr, warmup=0, min_lr_frac=0.1, schedule="cosine"):
    """Linear warmup, then cosine (or linear) decay to min_lr_frac * lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return lr * (min_lr_frac + (1 - min_lr_frac) * decay)


def log_metrics(out_dir, metrics):
    """Print one '|'-separated line and append the same dict to out_dir/metrics.jsonl (flushed)."""
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    tqdm.write(" | ".join(parts))
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()


def read_metrics(path):
    """Rows of a metrics.jsonl. A kill in the middle of an append leaves a partial last line: it is
    dropped with a warning. A bad line anywhere else is an error naming it."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if n == len(lines):  # the last line, without its newline: a cut append
                print(f"warning: {path}:{n}: dropped a partial last line ({len(line)} bytes) left by a killed run")
                continue
            raise ValueError(f"{path}:{n}: not a JSON line") from None
    return rows


def write_metrics(path, rows):
    """Replace metrics.jsonl with rows: a new file renamed over the old one, so a kill at any moment
    leaves the old file or the new one, never a mix."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def truncate_metrics(out_dir, step):
    """On resume, drop metrics logged after the checkpoint, so the log equals an uninterrupted run's."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(path):
        write_metrics(path, [r for r in read_metrics(path) if r.get("step", 0) <= step])


# --- 8b. runs: a run directory is written only by the command that owns it

RUN_KEYS = {"out_dir", "overwrite", "resume_changed"}  # never change what a run computes
RUN_FILES = ("ckpt", "ckpt.old", "ckpt.tmp", "metrics.jsonl", "config.json", "data_stats.json")


@dataclass
class Run:
    out_dir: str
    ckpt: str  # out_dir/ckpt
    state: dict = None  # the optimizer/RNG/step state to resume from; None = a fresh start
    finished: bool = False  # the checkpoint is the run's last: nothing to do


def _drop_if_unused(out_dir):
    """At exit: a run that failed before it wrote anything but config.json leaves no directory."""
    try:
        if set(os.listdir(out_dir)) <= {"config.json"}:
            shutil.rmtree(out_dir)
    except OSError:
        pass


def start_run(cfg, safe_keys=(), master=True):
    """Decide, before any model loads, whether this command starts, resumes or refuses out_dir.

    - a new or empty out_dir: a fresh start (config.json written, the directory removed again at exit
      if the run fails before writing anything else);
    - an out_dir holding a run of ours: the stored config (the checkpoint's, else config.json) is
      compared key by key with cfg, skipping RUN_KEYS and the stage's safe_keys (the ones that cannot
      change results: log intervals, device, ...). The same config resumes (or, with no checkpoint
      yet, starts afresh, clearing the old metrics); a finished run says so and writes nothing. A
      difference is an error naming each key and both values, unless --resume_changed true (resume
      anyway; the change is recorded in metrics.jsonl) or --overwrite true (delete the run's files
      and start afresh);
    - anything else in out_dir is an error: it is not ours to write into.
    A key missing from an older stored config counts as its default. Under torchrun rank 0 (master)
    decides and writes first; the other processes then read the same decision. Returns a Run."""
    sync = torch.distributed.is_available() and torch.distributed.is_initialized()
    run = _decide_run(cfg, safe_keys, write=True) if master else None
    if sync:
        torch.distributed.barrier()  # rank 0 has refused, cleared or resumed out_dir
    return run or _decide_run(cfg, safe_keys, write=False)


def _decide_run(cfg, safe_keys, write):
    """start_run's decision; write=False (ranks other than 0) reads only and prints nothing."""
    out, ckpt = cfg.out_dir, os.path.join(cfg.out_dir, "ckpt")
    new = dataclasses.asdict(cfg)
    defaults = dataclasses.asdict(type(cfg)())
    state = load_train_state(ckpt) if os.path.isdir(out) else None
    stored = None
    if state is not None:
        with open(os.path.join(checkpoint_dir(ckpt), "config.json")) as f:
            stored = json.load(f).get("train")
    elif os.path.exists(os.path.join(out, "config.json")):
        with open(os.path.join(out, "config.json")) as f:
            stored = json.load(f)
    elif os.path.isdir(out) and [f for f in os.listdir(out) if not f.endswith(".tmp")]:
        raise ConfigError(f"--out_dir {out} is not empty and holds no run of ours (no config.json, no ckpt/); "
                          f"choose another out_dir")
    skip = RUN_KEYS | set(safe_keys)
    changed = {k: (stored.get(k, defaults[k]), v) for k, v in new.items()
               if stored is not None and k not in skip and stored.get(k, defaults[k]) != v}
    if changed and not (cfg.overwrite or cfg.resume_changed):
        lines = "\n".join(f"  {k}: stored {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"{out} holds a run with other settings:\n{lines}\nRerun with the stored settings to "
                          f"resume it, --resume_changed true to resume with the change (recorded in "
                          f"metrics.jsonl), --overwrite true to start afresh, or another --out_dir")
    metrics = os.path.join(out, "metrics.jsonl")
    if cfg.overwrite or state is None:  # a fresh start: no old rows, no old checkpoint
        if write:
            if cfg.overwrite and stored is not None:
                for name in RUN_FILES:
                    p = os.path.join(out, name)
                    if os.path.isdir(p):
                        shutil.rmtree(p)
                    elif os.path.exists(p):
                        os.remove(p)
                print(f"--overwrite: removed the run in {out}")
            elif os.path.exists(metrics):
                os.remove(metrics)  # rows of a run killed before its first checkpoint
            if not os.path.isdir(out):
                atexit.register(_drop_if_unused, out)
            save_config(cfg, out)
        return Run(out, ckpt)
    step = state.get("step", state.get("iteration"))
    if state.get("finished") and not changed:
        if write:
            print(f"{out} is finished (step {step}, checkpoint {checkpoint_dir(ckpt)}): nothing to do; "
                  f"--overwrite true starts it afresh")
        return Run(out, ckpt, state, finished=True)
    if write:
        truncate_metrics(out, step)
        if changed:
            with open(metrics, "a") as f:
                f.write(json.dumps({"step": step, "config_changed": {k: list(ab) for k, ab in changed.items()}}) + "\n")
            print(f"--resume_changed: resuming at step {step} with " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        save_config(cfg, out)
        print(f"resuming {out} from {checkpoint_dir(ckpt)} at step {step}")
    return Run(out, ckpt, state)


# --- 8c. the built-in world's gold reward, only on the world's prompts

WORLD_MARKER = "world.json"  # written by data/world.py beside its files: {file name: sha256}


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_world_file(path):
    """True when path is a file data/world.py wrote, unchanged (its hash is in the marker beside it)."""
    marker = os.path.join(os.path.dirname(os.path.abspath(path)), WORLD_MARKER)
    if not os.path.isfile(path) or not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f).get(os.path.basename(path)) == file_sha256(path)


def gold_on(setting, prompts):
    """Whether to score with the built-in world's gold reward: "auto" = when the prompts are the
    world's; "true" = the same, but other prompts are an error; "false" = never."""
    if setting not in ("auto", "true", "false"):
        raise ConfigError(f"gold = {setting!r}: expected 'auto', 'true' or 'false'")
    world = is_world_file(prompts)
    if setting == "true" and not world:
        raise ConfigError(f"--gold true: {prompts} are not the built-in world's prompts (no matching "
                          f"{WORLD_MARKER} beside them); its gold reward means nothing on other prompts")
    return world if setting == "auto" else setting == "true"


# --- 8d. the chat template of a run, from the checkpoints it starts from


def checkpoint_template(path):
    """The template one of our checkpoints was trained with, or None (GPT-2 weights, a pretraining
    run, a checkpoint older than the setting: they read as "hh")."""
    try:
        d = checkpoint_dir(path)
    except FileNotFoundError:
        return None
    with open(os.path.join(d, "config.json")) as f:
        return (json.load(f).get("train") or {}).get("template")


def resolve_template(setting, *ckpts):
    """The template a stage uses: "auto" = the one its input checkpoints were trained with ("hh" when
    they name none); an explicit name must agree with every checkpoint that names one."""
    if setting != "auto" and setting not in CHAT_TEMPLATES:
        raise ConfigError(f"template = {setting!r}: expected 'auto' or one of {sorted(CHAT_TEMPLATES)}")
    named = {p: t for p in ckpts if p for t in [checkpoint_template(p)] if t}
    if len(set(named.values())) > 1:
        raise ConfigError(f"the input checkpoints were trained with different templates: {named}")
    have = next(iter(named.values()), None)
    if setting != "auto" and have and have != setting:
        raise ConfigError(f"template {setting!r}, but {next(iter(named))} was trained with {have!r}")
    return (have or "hh") if setting == "auto" else setting


def block_size_of(path):
    """The block_size of a checkpoint (ours or GPT-2), read from its config.json without loading it."""
    if path in HF_NAMES:
        return 1024  # every GPT-2 size
    is_hf = os.path.exists(os.path.join(path, "model.safetensors")) or os.path.exists(os.path.join(path, "pytorch_model.bin"))
    d = path if is_hf else checkpoint_dir(path)
    with open(os.path.join(d, "config.json")) as f:
        info = json.load(f)
    return info["model"]["block_size"] if "model" in info else info["n_positions"]


def split_hh(transcript, path, n):
    """An HH-RLHF transcript '\n\nHuman: ...\n\nAssistant: answer' -> (prompt, answer), split at the
    last 'Assistant:', so that chat_prompt(prompt) + ' ' + answer reproduces the transcript."""
    cut = transcript.rfind("\n\nAssistant:")
    if not transcript.lstrip("\n").startswith("Human:") or cut < 0:
        raise ValueError(f"{path}:{n}: expected an HH transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    prompt = transcript[:cut].lstrip("\n")[len("Human:"):].strip()
    return prompt, transcript[cut + len("\n\nAssistant:"):].strip()


def read_preferences(path):
    """Preference data as groups (prompt, [response best, ..., worst]).

    Rows: {"prompt", "chosen", "rejected"}; HH transcripts {"chosen", "rejected"}; InstructGPT
    rankings {"prompt", "responses": [best, ..., worst]}. Empty texts and rankings of fewer than
    two answers are errors naming the line. Pairs whose chosen equals rejected carry no preference:
    they are skipped and counted (returned in stats), never dropped silently.
    """
    groups, stats = [], {"rows": 0, "identical_skipped": 0}
    for n, row in enumerate(read_jsonl(path), 1):
        stats["rows"] += 1
        if "responses" in row:
            prompt, responses = row.get("prompt"), row["responses"]
            if not isinstance(responses, list) or len(responses) < 2:
                raise ValueError(f"{path}:{n}: a ranking needs a list of at least 2 responses, got {responses!r:.80}")
        elif "chosen" in row and "rejected" in row:
            if "prompt" in row:
                prompt, responses = row["prompt"], [row["chosen"], row["rejected"]]
            else:
                prompt, chosen = split_hh(row["chosen"], path, n)
                prompt_r, rejected = split_hh(row["rejected"], path, n)
                if prompt_r != prompt:
                    raise ValueError(f"{path}:{n}: chosen and rejected transcripts have different prompts")
                responses = [chosen, rejected]
        else:
            raise ValueError(f"{path}:{n}: expected keys prompt+chosen+rejected, chosen+rejected (HH) or prompt+responses; got {sorted(row)}")
        texts = [prompt] + list(responses)
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{path}:{n}: empty or non-string prompt or response")
        responses = [r.strip() for r in responses]
        if len(set(responses)) < len(responses):
            if len(responses) == 2:
                stats["identical_skipped"] += 1
                continue
            raise ValueError(f"{path}:{n}: a ranking lists the same response twice")
        groups.append((prompt, responses))
    return groups, stats


def read_jsonl(path, required=()):
    """Rows of a JSONL file; a bad line is an error naming the file, the line and what was expected."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing key(s) {missing}; expected keys {list(required)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
