"""Every TOML in configs/ parses against its stage's Config (no unknown key, no wrong type), every RL
config's checkpoints come from another config or from outside, and the README's commands run as typed.
Run: python -m pytest -q tests/test_configs.py"""

import glob
import re
import os
import subprocess
import tomllib

import pytest

import dpo
import eval as evaluate
import grpo
import model as M
import ppo
import pretrain
import reward
import sft

STAGES = {"pretrain": pretrain, "sft": sft, "reward": reward, "ppo": ppo, "grpo": grpo, "dpo": dpo, "eval": evaluate}
CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.toml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses(path):
    stage = os.path.basename(path).split("_")[0]
    assert stage in STAGES, f"{path}: name it <stage>_<task>.toml with stage in {sorted(STAGES)}"
    cfg = M.parse_config(STAGES[stage].Config, ["--config", path])
    with open(path, "rb") as f:
        values = tomllib.load(f)
    assert values and {k: getattr(cfg, k) for k in values} == values  # every key of the file reached the config


def test_every_rl_config_has_its_chain():
    # every checkpoint a config starts from or scores with is written by another config (its out_dir), or is
    # a model from outside (a Hugging Face name, a models/ directory, a packaged GGUF); a PPO config's task
    # has its SFT and reward-model configs; the built-in task has every stage (train.sh runs them all)
    values = {os.path.basename(p)[:-len(".toml")]: tomllib.load(open(p, "rb")) for p in CONFIGS}
    written = {v["out_dir"] for v in values.values() if "out_dir" in v}
    for name, v in values.items():
        for key in ("init", "reward_model", "ref"):
            if str(v.get(key, "")).startswith("out/"):
                assert v[key] in written, f"{name}: {key} = {v[key]!r} is no config's out_dir"
        stage, task = name.split("_", 1)
        if stage == "ppo":
            assert {f"sft_{task}", f"reward_{task}"} <= set(values), name
    assert {f"{s}_world" for s in ("pretrain", "sft", "reward", "ppo", "dpo")} <= set(values)


def readme_block(title):
    """The first ```bash block under the README heading `title`."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split(f"\n## {title}\n", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_readme_quick_start_is_what_a_newcomer_types():
    block = readme_block("Quick start")
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in block  # inside the block, not after it
    assert re.search(r"^QUICK=1 bash train.sh .*about \d+ minutes", block, re.M)
    assert re.search(r"^python -m pytest -q .*about [\d.]+ minutes", block, re.M)


def test_readme_stage_commands_start_from_the_data_they_make():
    import importlib
    lines = [line.split("#")[0].split() for line in readme_block("Running each stage").splitlines() if line.startswith("python ")]
    assert [a[1] for a in lines[:2]] == ["data/world.py", "data/bpe.py"]  # a fresh clone has no data/world/ yet
    made = set()
    for argv in lines:
        mod = importlib.import_module(argv[1][:-len(".py")].replace("/", "."))
        cfg = M.parse_config(mod.Config, argv[2:])  # every flag is a key of its script
        if argv[1] == "data/world.py":
            made |= {os.path.join(cfg.out_dir, f) for f in ("pretrain.txt", "sft_train.jsonl", "sft_val.jsonl", "prompts_train.jsonl", "prompts_val.jsonl")}
        if argv[1] == "data/bpe.py":
            assert set(cfg.input.split(",")) <= made
            made.add(cfg.out)
    pre = M.parse_config(pretrain.Config, ["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain_world.toml")])
    assert {pre.data, pre.tokenizer} <= made


def sweep_grpo_runs():
    """(name, flags) of every critic-free run sweep.sh trains by default, from its own grpo_flags."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "sweep.sh")).read()
    names = re.search(r"for name in \$\{GRPO_RUNS-([^}]*)\}", text).group(1).split()
    fn = re.search(r"^grpo_flags\(\) \{.*?^\}", text, re.S | re.M).group(0)
    script = fn + "\n" + "".join(f"echo \"$(grpo_flags {n})\"\n" for n in names)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"DATA": "data/world", "PATH": os.environ["PATH"]},
                         cwd=os.path.join(os.path.dirname(__file__), ".."), check=True).stdout.splitlines()
    return list(zip(names, out))


def test_every_sweep_grpo_run_passes_check_config():
    """A name sweep.sh runs has flags grpo.py accepts: a wrong pattern (a name caught by another case)
    or a refused combination fails here, not an hour into a sweep."""
    runs = sweep_grpo_runs()
    assert len(runs) > 30
    for name, flags in runs:
        assert flags, name
        cwd = os.getcwd()
        os.chdir(os.path.join(os.path.dirname(__file__), ".."))
        try:
            cfg = M.parse_config(grpo.Config, flags.split())
        finally:
            os.chdir(cwd)
        grpo.check_config(cfg, 1)
        if name.startswith("stale") and name[5].isdigit():
            assert cfg.staleness == int(re.match(r"stale(\d+)", name).group(1)), name
        for suffix, correction in (("_tis", "tis"), ("_mask", "token_mask"), ("_seqmask", "seq_mask")):
            if name.endswith(suffix):
                assert cfg.is_correction == correction, name
