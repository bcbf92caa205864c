"""Every TOML in configs/ parses against its stage's Config: no unknown key, no wrong type."""

import glob
import os
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
    # each task with a PPO or DPO config has the SFT and reward-model configs its chain starts from,
    # and the built-in task has every stage (train.sh runs them all)
    names = {os.path.basename(p)[:-len(".toml")] for p in CONFIGS}
    for name in names:
        stage, task = name.split("_", 1)
        if stage in ("ppo", "dpo"):
            assert {f"sft_{task}", f"reward_{task}"} <= names, name
    assert {f"{s}_world" for s in ("pretrain", "sft", "reward", "ppo", "dpo")} <= names
