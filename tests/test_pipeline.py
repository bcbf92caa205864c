"""The whole train.sh pipeline with tiny budgets (QUICK=1): every stage's real CLI, chained.
Slow (a few minutes on 2 cores), so excluded by default: python -m pytest -m slow"""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_pipeline(tmp_path):
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "data")}
    r = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("pretrain", "sft", "bon16", "ppo", "ppo_nokl", "dpo"):
        assert os.path.exists(tmp_path / "out" / f"eval_{name}.json"), name
    assert "reward model: held-out pairwise accuracy" in r.stdout
