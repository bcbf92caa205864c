"""Tests of plot.py: curves read from metrics.jsonl (a partial last line skipped), the moving
average, the default keys, and a PNG written.
Run: python -m pytest -q tests/test_plot.py"""

import json

import pytest

import model as M
import plot


def write_run(path, rows, tail=""):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(path)


def test_curve_and_moving_average():
    rows = [{"step": 1, "kl": 1.0}, {"step": 2}, {"step": 3, "kl": 3.0}, {"step": 4, "kl": 5.0}]
    assert plot.curve(rows, "kl", "step", 1) == ([1, 3, 4], [1.0, 3.0, 5.0])
    assert plot.curve(rows, "kl", "step", 2) == ([1, 3, 4], [1.0, 2.0, 4.0])


def test_plot_runs_to_png(tmp_path):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "ppo", [{"step": i, "score": 0.1 * i, "gold": 1.0, "kl": i} for i in range(1, 5)],
                  tail='{"step": 5, "sco')  # killed mid-write: the partial line is skipped
    b = write_run(tmp_path / "ppo_nokl", [{"step": i, "score": 0.2 * i, "gold": -1.0, "kl": 9 * i} for i in range(1, 5)])
    assert plot.read_metrics(a)[-1]["step"] == 4
    out = tmp_path / "c.png"
    keys = plot.plot(M.parse_config(plot.Config, ["--runs", f"{a},{b}", "--out", str(out)]))
    assert keys == ["score", "gold", "kl"] and out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(M.ConfigError, match="entropy"):
        plot.plot(M.parse_config(plot.Config, ["--runs", a, "--keys", "entropy", "--out", str(out)]))
    with pytest.raises(M.ConfigError, match="no run directory"):
        plot.plot(M.parse_config(plot.Config, ["--runs", str(tmp_path / "nothing*")]))


def test_a_corrupt_line_before_the_end_is_an_error(tmp_path):
    a = write_run(tmp_path / "r", [], tail='{"step": 1\n{"step": 2}\n')
    with pytest.raises(M.ConfigError, match=r"metrics\.jsonl:1: not a JSON line"):
        plot.read_metrics(a)


def test_a_glob_skips_what_is_not_a_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "ppo", [{"step": i, "kl": i} for i in range(1, 4)])
    (tmp_path / "eval_ppo.json").write_text("{}")  # what else lives beside runs
    (tmp_path / "data").mkdir()
    keys = plot.plot(M.parse_config(plot.Config, ["--runs", str(tmp_path / "*"), "--out", str(tmp_path / "c.png")]))
    out = capsys.readouterr().out
    assert keys == ["kl"] and f"skipped {tmp_path / 'data'}: not a run (no metrics.jsonl)" in out and "eval_ppo.json" in out
    with pytest.raises(M.ConfigError, match="none of .* is a run: a run is a directory holding metrics.jsonl"):
        plot.plot(M.parse_config(plot.Config, ["--runs", str(tmp_path / "d*")]))
