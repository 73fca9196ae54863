"""``vqim bench`` on what it is given (a model directory, presets), the shared timing helpers, and
the commit column of benchmarks/_common.py. CPU only: the numbers are not checked, the plumbing is."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vqim.engine.api import BUNDLED_MODEL
from vqim.engine.entrypoints.cli import main
from vqim.engine.profiling.timing import print_table, timeit

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(out: str) -> list[list[str]]:
    return [line.split() for line in out.strip().splitlines()]


def test_bench_model_dir_benches_that_model(capsys):
    assert main(["bench", "--model", str(BUNDLED_MODEL), "--batch", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    header, *rows = _table(out.out)
    assert header[:5] == ["preset", "dtype", "batch", "rows", "mode"]
    assert [r[:5] for r in rows] == [["shapes-demo", "float32", "1", "2", "eager"]]
    assert "shapes-demo: CPU timings" in out.err


def test_bench_presets_and_preset_option_add_up(capsys):
    assert main(["bench", "tiny-vim", "--preset", "tiny-vim", "--model-seed", "1", "--batch", "1",
                 "--device", "cpu"]) == 0
    _, *rows = _table(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["tiny-vim", "tiny-vim"]


def test_bench_of_a_missing_model_dir_exits_2(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "none"), "--batch", "1", "--device", "cpu"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_timeit_and_print_table(capsys):
    calls = []
    t = timeit(lambda: calls.append(1), device=torch.device("cpu"), warmup=2, iters=5)
    assert len(calls) == 7 and set(t) == {"ms", "p20", "p80"} and t["p20"] <= t["ms"] <= t["p80"]
    print_table([{"a": 1.23456, "b": "x"}, {"a": 2}], ["a", "b"])
    assert capsys.readouterr().out.splitlines() == ["    a  b", "1.235  x", "    2   "]


def test_results_commit_comes_from_VQIM_COMMIT_when_set(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setenv("VQIM_COMMIT", "abc1234")
    assert common.git_commit() == "abc1234"
    monkeypatch.delenv("VQIM_COMMIT")
    assert common.git_commit() != "abc1234"
