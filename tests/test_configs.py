"""Every TOML in configs/ parses against its stage's Config: no unknown key, no wrong type."""

import glob
import os

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
    M.parse_config(STAGES[stage].Config, ["--config", path])


def test_there_are_configs():
    assert len(CONFIGS) >= 5
