"""
plot.py: learning curves of one or several runs, from their metrics.jsonl, to one PNG.

Each key gets a panel with one line per run, against `x` (step, or episodes for RL runs). With no
--keys it draws the usual RLHF diagnostics that the runs logged: the proxy score, the gold reward,
the KL to the reference, entropy, the clip fractions and the losses. A partial last line (a run
killed mid-write) is skipped. matplotlib is an optional extra (pip install matplotlib); nothing
else in plainrlhf needs it.

Run:
  python plot.py --runs out/ppo,out/ppo_nokl --out docs/ppo_curves.png
  python plot.py --runs "out/sweep/ppo_*" --keys score,gold,kl --x episodes --smooth 3
"""

import glob
import math
import os
from dataclasses import dataclass

import model as M


@dataclass
class Config:
    runs: str = ""  # comma-separated run directories (each holding metrics.jsonl); globs allowed
    keys: str = ""  # comma-separated metric names; "" = the RLHF diagnostics each run logged
    x: str = "step"  # the x axis: step, or episodes for ppo.py runs
    smooth: int = 1  # moving average over this many logged points (1 = raw)
    out: str = "curves.png"  # the PNG to write
    title: str = ""  # a title over all the panels ("" = none)


DEFAULT_KEYS = ["score", "gold", "kl", "rlhf_reward", "entropy", "clipfrac", "approx_kl", "vf_clipfrac",
                "explained_var", "pg_loss", "vf_loss", "loss", "val_loss", "val_acc", "reward_margin", "lr"]


def read_metrics(run):
    """The rows of run/metrics.jsonl (model.read_metrics: a partial last line, a kill mid-write, is skipped)."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise M.ConfigError(f"--runs: {path} does not exist")
    try:
        return M.read_metrics(path)
    except ValueError as e:
        raise M.ConfigError(str(e)) from None


def curve(rows, key, x, smooth):
    """(xs, ys) of the rows that logged key (and x), ys a trailing moving average of `smooth` points."""
    pts = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and x in r and math.isfinite(r[key])]
    ys = [v for _, v in pts]
    avg = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
    return [u for u, _ in pts], avg


def plot(cfg):
    matched = sorted({r for pattern in cfg.runs.split(",") if pattern.strip() for r in glob.glob(pattern.strip())})
    if not matched:
        raise M.ConfigError(f"--runs {cfg.runs!r}: no run directory matches")
    runs = [r for r in matched if os.path.isfile(os.path.join(r, "metrics.jsonl"))]
    for r in sorted(set(matched) - set(runs)):  # "out/*" also matches eval JSONs, data files, ...
        print(f"skipped {r}: not a run (no metrics.jsonl)")
    if not runs:
        raise M.ConfigError(f"--runs {cfg.runs!r}: none of {matched} is a run: a run is a directory holding "
                            f"metrics.jsonl, as every stage writes in its out_dir")
    data = {r: read_metrics(r) for r in runs}
    logged = {k for rows in data.values() for row in rows for k in row}
    keys = [k.strip() for k in cfg.keys.split(",") if k.strip()] or [k for k in DEFAULT_KEYS if k in logged]
    missing = [k for k in keys if k not in logged]
    if missing or not keys:
        raise M.ConfigError(f"--keys: {missing or 'none of the defaults'} not logged by {runs}; logged: {sorted(logged)}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.8 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run, rows in data.items():
            xs, ys = curve(rows, key, cfg.x, cfg.smooth)
            ax.plot(xs, ys, label=os.path.basename(run.rstrip("/")))
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(cfg.x, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if cfg.title:
        fig.suptitle(cfg.title)
    fig.tight_layout()
    fig.savefig(cfg.out, dpi=110)
    print(f"{len(keys)} curves of {len(runs)} runs written to {cfg.out}")
    return keys


if __name__ == "__main__":
    M.main(plot, Config)
