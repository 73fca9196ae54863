"""benchmarks/gpu_suite.sh on a CPU machine: it parses, refuses to run without CUDA (before
installing anything), refuses a missing OUTDIR, plans every benchmark within the 8-minute budget,
and, with stand-ins for nvidia-smi and python, runs every step in order and logs a summary.

Nothing here installs, tests or benchmarks for real: the stand-in python only records its
arguments (and writes a CSV where a benchmark would)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
BENCHES = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
TOTAL_BUDGET_S = 480


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _recording_python(tmp_path: Path, *, real: bool, fail_on: str = "") -> tuple[Path, Path]:
    """A python stand-in that appends its argv to a file. ``real=True`` then runs the real
    interpreter; otherwise it pretends: ``-m pip``/``-m pytest``/``-c`` succeed and a benchmark
    script writes one CSV into its results/ folder, its commit column from ``VQIM_COMMIT`` as
    benchmarks/_common.py does (``fail_on``: a benchmark that exits 1)."""
    record = tmp_path / "python-calls.txt"
    if real:
        body = f'exec {sys.executable!r} "$@"\n'
    else:
        body = (
            'case "${1:-}" in\n'
            '  *bench_*.py)\n'
            '    name="$(basename -- "$1" .py)"\n'
            f'    if [ "$name" = {fail_on!r} ]; then echo "boom"; exit 1; fi\n'
            '    printf "device,op,commit\\nfake,%s,%s\\n" "$name" "${VQIM_COMMIT:-<unset>}" '
            '> "$(dirname -- "$1")/results/${name#bench_}.csv"\n'
            '    echo "saved $name";;\n'
            '  *) echo "pretend: $*";;\n'
            'esac\n'
            'exit 0\n'
        )
    # One line per call: newlines inside arguments (python -c "...") become spaces.
    head = "#!/usr/bin/env bash\n" + 'args="$*"\n' + "printf '%s\\n' \"${args//$'\\n'/ }\" >> " + repr(str(record)) + "\n"
    shim = _executable(tmp_path / "python-shim", head + body)
    return shim, record


def _fake_nvidia_smi(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "nvidia-smi", '#!/usr/bin/env bash\n'
                'case "$*" in *compute_cap*) echo "9.0";; *) echo "GPU 0: NVIDIA H200 (UUID: GPU-fake)";; esac\n')
    return bin_dir


def _no_cuda_here() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is checked on CPU machines")


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_missing_outdir_prints_usage_and_exits_2(tmp_path):
    r = _run()
    assert r.returncode == 2, r
    assert r.stderr.startswith("usage: bash benchmarks/gpu_suite.sh OUTDIR"), r.stderr
    assert r.stdout == ""
    r = _run("", "extra")
    assert r.returncode == 2 and r.stderr.startswith("usage:"), r


def test_refuses_without_cuda_quickly_and_installs_nothing(tmp_path):
    """Whatever this CPU machine has on PATH: a clear one-line refusal, exit 3, no step run."""
    _no_cuda_here()
    shim, record = _recording_python(tmp_path, real=True)
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = _run(str(out), env={**os.environ, "PYTHON": str(shim)})
    took = time.monotonic() - t0
    assert r.returncode == 3, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_suite.sh: error: no CUDA GPU ("), r.stderr
    assert "nothing was installed or run" in lines[0]
    assert took < 40, f"the refusal took {took:.0f}s"
    calls = record.read_text().splitlines() if record.exists() else []
    assert not any("pip" in c or "pytest" in c or "bench_" in c for c in calls), calls
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.log"]
    assert out.joinpath("gpu_suite.log").read_text().strip() == lines[0]


def test_checks_torch_cuda_before_installing_even_where_nvidia_smi_exists(tmp_path):
    """nvidia-smi alone is not enough: the torch check runs next and refuses before any install."""
    _no_cuda_here()
    shim, record = _recording_python(tmp_path, real=True)
    bin_dir = _fake_nvidia_smi(tmp_path)
    out = tmp_path / "out"
    r = _run(str(out), env={**os.environ, "PYTHON": str(shim), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == 3, r
    assert "torch.cuda.is_available() is not True" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    calls = record.read_text().splitlines()
    assert calls == ["-c import torch; assert torch.cuda.is_available()"], calls
    assert not any(out.glob("*.csv"))


def test_every_benchmark_is_in_the_script_and_the_plan_fits_8_minutes():
    text = SCRIPT.read_text()
    assert BENCHES, "no benchmarks/bench_*.py found"
    missing = [b for b in BENCHES if f'"{b}:' not in text]
    assert not missing, f"benchmarks not in gpu_suite.sh's BENCHES: {missing}"
    r = _run("--plan")
    assert r.returncode == 0, r
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+(\d+)\s", r.stdout, re.M)}
    for b in BENCHES:
        assert rows.get(b, 0) > 0, f"{b} has no budget in the plan:\n{r.stdout}"
        assert re.search(rf"benchmarks/{b}\.py --save", r.stdout), r.stdout
    steps = {k: v for k, v in rows.items() if k != "total"}
    assert sum(steps.values()) == rows["total"]
    kill_after = int(re.search(r"^readonly KILL_AFTER_S=(\d+)", text, re.M).group(1))
    assert rows["total"] + kill_after * len(steps) <= TOTAL_BUDGET_S, r.stdout
    # The install is the brief's command, offline.
    assert "pip install -v --no-index --no-build-isolation --no-deps -e ." in text
    assert "-m pytest -m gpu -q" in text


def test_runs_every_step_in_order_and_keeps_going_past_a_failure(tmp_path):
    """With stand-ins for nvidia-smi and python (nothing real runs): install, env, the gpu tests,
    every benchmark with --save writing its CSV into OUTDIR, one summary line per step."""
    shim, record = _recording_python(tmp_path, real=False, fail_on="bench_cfg_sample")
    bin_dir = _fake_nvidia_smi(tmp_path)
    out = tmp_path / "out dir"  # a space: everything is quoted
    env = {**os.environ, "PYTHON": str(shim), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VQIM_CUDA_ARCHS", None)
    env.pop("VQIM_COMMIT", None)
    r = _run(str(out), env=env, timeout=120)
    assert r.returncode == 1, r  # one benchmark failed
    calls = record.read_text().splitlines()
    assert calls[0] == "-c import torch; assert torch.cuda.is_available()"
    assert calls[1] == "-m pip install -v --no-index --no-build-isolation --no-deps -e ."
    assert calls[2].startswith("-c ")  # the version report
    assert calls[3] == "-m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors"
    benches = [Path(c.split()[0]).stem for c in calls[4:]]
    assert sorted(benches) == BENCHES, calls
    assert all(" --save" in c for c in calls[4:]), calls
    assert not any(str(ROOT / "benchmarks") in c for c in calls[4:]), "benchmarks must run from the copy"
    # CSVs land in OUTDIR (via the copy's results/ link); the checkout's results/ is untouched.
    csvs = sorted(p.stem for p in out.glob("*.csv"))
    assert csvs == sorted(b.removeprefix("bench_") for b in BENCHES if b != "bench_cfg_sample"), csvs
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".csv")) == ["gpu_suite.log"]
    # The copy has no .git: the suite hands the checkout's commit to the benchmarks.
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert {_csv_commit(p) for p in out.glob("*.csv")} == {commit}
    log = (out / "gpu_suite.log").read_text()
    assert log == r.stdout
    assert "VQIM_CUDA_ARCHS=90" in log
    summary = [ln for ln in log.splitlines() if re.match(r"gpu_suite: (install|env|tests-gpu|bench_)", ln)]
    names = [ln.split()[1] for ln in summary]
    assert names == ["install", "install-no-ext", "env", "tests-gpu", *[b for b in _plan_order()]], summary
    assert any("bench_cfg_sample" in ln and "FAILED (status 1)" in ln for ln in summary), summary
    assert sum(" ok " in ln for ln in summary) == 3 + len(BENCHES) - 1, summary
    assert log.rstrip().endswith("gpu_suite: FAIL, 1 step(s) not ok")


def _csv_commit(path: Path) -> str:
    header, row = path.read_text().splitlines()
    return dict(zip(header.split(","), row.split(",")))["commit"]


def test_a_given_VQIM_COMMIT_is_the_commit_of_every_csv(tmp_path):
    """A checkout copied without .git (a lent machine) names its commit through VQIM_COMMIT."""
    shim, _ = _recording_python(tmp_path, real=False)
    bin_dir = _fake_nvidia_smi(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(shim), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "VQIM_COMMIT": "abc1234"}
    r = _run(str(out), env=env, timeout=120)
    assert r.returncode == 0, r
    assert "gpu_suite: commit abc1234 (from VQIM_COMMIT)" in r.stdout
    assert sorted(p.stem for p in out.glob("*.csv")) == sorted(b.removeprefix("bench_") for b in BENCHES)
    assert {_csv_commit(p) for p in out.glob("*.csv")} == {"abc1234"}


def _plan_order() -> list[str]:
    r = _run("--plan")
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("bench_")]


def test_shellcheck_is_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed on this machine (not installed by the tests on purpose)")
    subprocess.run([exe, "--severity=style", str(SCRIPT)], check=True, timeout=60)
