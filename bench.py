"""
bench.py: how fast our GPT samples and trains, against transformers' GPT-2 and the machine's peak.

In one run, on the same random weights (seeded init, exported with GPT.save_pretrained and read
back by transformers' GPT2LMHeadModel.from_pretrained), it measures:
  1. generation   greedy sampling with the KV cache: our GPT.generate vs GPT2LMHeadModel.generate,
                  batch_size prompts of prompt_len random tokens, exactly new_tokens steps each (no
                  EOS), tokens/s = batch_size * new_tokens / wall time (prefill included). Checks that
                  both produce the same greedy tokens (they should in fp32).
  2. train step   forward + backward + AdamW step at (train_batch, train_seq), next-token cross
                  entropy, tokens/s; the same for GPT2LMHeadModel(labels=idx).
  3. MFU          the machine's matmul peak (an n x n @ n x n matmul, 2 n^3 FLOPs, timed between
                  the train steps) and the model FLOPs utilization of our train step (nanoGPT/PaLM
                  formula, see below).
The two contenders are timed back to back in every repeat (who goes first alternates), so load
from other jobs lands on both alike: tokens/s are medians over repeats, a ratio is the median of
the per-repeat ratios, ours / transformers in speed (> 1: ours is faster). On a shared CPU, load
makes torch's threads wait for each other at every op; --threads 1 gives steadier ratios.

Run (CPU, GPT-2 small: about 4 minutes on 2 idle cores, 9 with --repeats 5 on a busy machine):
    python bench.py
    python bench.py --repeats 5 --threads 1 --out bench.json
One GPU:
    python bench.py --dtype bfloat16 --compile true --batch_size 64 --train_batch 16 --train_seq 1024
"""

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, autocast, configure_optimizer, get_device, parse_config, print_config

try:
    import transformers
    from transformers import GPT2LMHeadModel
except ImportError:  # the benchmark still measures ours alone
    transformers = None


@dataclass
class Config:
    # model (random weights; GPT-2 small by default)
    n_layer: int = 12  # transformer blocks (GPT-2 small: 12)
    n_head: int = 12  # attention heads
    n_embd: int = 768  # width (GPT-2 small: 768)
    vocab_size: int = 50257  # vocabulary of the benchmark model
    block_size: int = 1024  # max positions (the context length)
    # generation
    batch_size: int = 16  # prompts sampled at once
    prompt_len: int = 32  # tokens per prompt (no padding)
    new_tokens: int = 64  # greedy steps, all taken: EOS is disabled in both models
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


def paired_ratio(times):
    """Speed of ours over theirs: the median over repeats of t_hf / t_ours, each pair timed back to
    back, so a burst of load from another job lands in one pair instead of skewing one side."""
    if "hf" not in times:
        return None
    return statistics.median(h / o for o, h in zip(times["ours"], times["hf"]))


def fmt(value, width, spec):
    return format("-" if value is None else format(value, spec), f">{width}")


def print_line(title, ours, hf, ratio, extra=""):
    theirs = f" | transformers {hf:.1f} tok/s | ours/hf {ratio:.3f}" if hf is not None else ""
    print(f"{title} | ours {ours:.1f} tok/s{theirs}{extra}")


def main(cfg):
    print_config(cfg)
    device = get_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mconf = GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=True)
    model = GPT(mconf).to(device)
    hf = None
    if transformers is None:
        print("transformers is not installed: measuring ours alone")
    else:
        transformers.logging.set_verbosity_error()  # no progress bar or notes between our lines
        transformers.logging.disable_progress_bar()
        with tempfile.TemporaryDirectory() as d:  # the same weights, through the export path
            model.save_pretrained(d)
            hf = GPT2LMHeadModel.from_pretrained(d).to(device)
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

    model.eval()
    idx = torch.randint(cfg.vocab_size, (B, P), device=device)  # (B, P)

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

    # --- 2. train step: forward + backward + AdamW, next-token cross entropy on random tokens

    x = torch.randint(cfg.vocab_size, (cfg.train_batch, cfg.train_seq), device=device)  # (B, T)
    targets = F.pad(x[:, 1:], (0, 1), value=-1)  # (B, T) the last position predicts nothing
    model.train()
    train_ours = torch.compile(model) if cfg.compile and device.startswith("cuda") else model

    def loss_ours():
        logits = train_ours(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    steps = [("ours", model, loss_ours)]
    if hf is not None:
        hf.train()
        train_hf = torch.compile(hf) if cfg.compile and device.startswith("cuda") else hf
        steps.append(("hf", hf, lambda: train_hf(input_ids=x, labels=x).loss))  # shifts labels inside
    opts = {name: configure_optimizer(m, cfg.lr, weight_decay=0.1, device=device) for name, m, _ in steps}

    def train_step(name, loss_fn):
        with ctx:
            loss = loss_fn()
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return loss.item()

    # 3. the matmul peak is measured between the train steps, so it sees the same load
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
    res["train_ours_s"], res["train_hf_s"] = times["ours"], times.get("hf")
    res["train_loss_ours"], res["train_loss_hf"] = losses["ours"], losses.get("hf")
    print_line("train step", res["train_ours_tok_s"], res["train_hf_tok_s"], res["train_ratio"])

    # --- 3. MFU
    # nanoGPT's estimate_mfu (PaLM, Chowdhery et al. 2022, appendix B): per token, 6 N FLOPs for
    # the weight matmuls forward + backward, N = parameters without the position embedding (wte
    # counted once: it is tied to lm_head, whose matmul it stands for), plus 12 L T C for the
    # attention scores and weighted sum (causal masking not discounted). T = train_seq.
    N = model.num_params()
    flops_per_token = 6 * N + 12 * cfg.n_layer * cfg.train_seq * cfg.n_embd
    res["n_params"] = N
    res["flops_per_token"] = flops_per_token
    res["matmul_peak_flops"] = 2 * cfg.matmul_n ** 3 * cfg.matmul_iters / statistics.median(peak_s)
    res["train_ours_flops"] = flops_per_token * res["train_ours_tok_s"]
    res["mfu"] = res["train_ours_flops"] / res["matmul_peak_flops"]
    res["mfu_hf"] = flops_per_token * res["train_hf_tok_s"] / res["matmul_peak_flops"] if hf is not None else None
    print(f"mfu        | peak {res['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({dt}) | ours "
          f"{res['train_ours_flops'] / 1e9:.1f} GFLOP/s | mfu {res['mfu']:.1%}")

    # --- summary

    print(f"\n{'':12s} {'ours':>10s} {'transformers':>13s} {'ours/hf':>8s}")
    print(f"{'gen tok/s':12s} {fmt(res['gen_ours_tok_s'], 10, '.1f')} {fmt(res['gen_hf_tok_s'], 13, '.1f')} "
          f"{fmt(res['gen_ratio'], 8, '.3f')}   greedy tokens match: {res['greedy_match']}")
    print(f"{'train tok/s':12s} {fmt(res['train_ours_tok_s'], 10, '.1f')} {fmt(res['train_hf_tok_s'], 13, '.1f')} "
          f"{fmt(res['train_ratio'], 8, '.3f')}")
    print(f"{'mfu':12s} {fmt(res['mfu'], 10, '.1%')} {fmt(res['mfu_hf'], 13, '.1%')} {'':8s}   "
          f"matmul peak {res['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {cfg.out}")
    return res


if __name__ == "__main__":
    main(parse_config(Config))
