"""Registers, spills, stack and shared memory of every csrc/ kernel, as ptxas reports them.

    python benchmarks/ptxas_report.py            # writes benchmarks/results/ptxas_sm80.txt, ptxas_sm90.txt
    python benchmarks/ptxas_report.py --arch 90  # one architecture

No GPU needed: CMakeLists.txt configures and builds the extension in a temporary folder, once per
architecture, with ``-Xptxas=-v`` added (the same flags as the real build otherwise, warnings
as errors included), and this parses what ptxas prints for each kernel instantiation. The
reports are committed, so a change in register pressure or a new spill shows in the diff.
Needs nvcc (found as setup.py finds it), cmake, ninja (optional) and pybind11.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ("file", "kernel", "registers", "spill_stores", "spill_loads", "stack", "smem", "barriers")


def find_nvcc() -> str:
    """setup.py's search: $CUDACXX, nvcc on PATH, $CUDA_HOME/bin/nvcc (default /usr/local/cuda)."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    sys.exit("ptxas_report: nvcc not found ($CUDACXX, PATH, $CUDA_HOME/bin)")


def build_log(nvcc: str, arch: str, jobs: int) -> str:
    """Everything the build printed (ninja shows each compile's ptxas lines as one block)."""
    import pybind11

    with tempfile.TemporaryDirectory(prefix="vqim-ptxas-") as tmp:
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(ROOT), "-B", tmp, *generator, f"-DCMAKE_CUDA_COMPILER={nvcc}",
                        f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DCMAKE_CUDA_FLAGS=-Xptxas=-v",
                        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                        "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True, text=True)
        r = subprocess.run(["cmake", "--build", tmp, "-j", str(jobs), "--verbose"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"ptxas_report: the sm_{arch} build failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}")
        return r.stdout + r.stderr


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> str:
    """``void vqim::(anonymous namespace)::k<float, 8>(float const*, ...)`` -> ``k<float, 8>``."""
    depth, end = 0, len(demangled)
    for i in range(len(demangled) - 1, -1, -1):  # the parameter list is the last balanced (...)
        depth += {")": 1, "(": -1}.get(demangled[i], 0)
        if depth == 0 and demangled[i] == "(":
            end = i
            break
    return re.sub(r"^(void )?(vqim::)?(\(anonymous namespace\)::)?", "", demangled[:end])


def source_file(mangled: str) -> str:
    """The .cu a kernel comes from: nvcc names each file's anonymous namespace after it
    (``_GLOBAL__N__<hash>_13_cfg_sample_cu_<hash>``); parallel compiles interleave the log."""
    m = re.search(r"_GLOBAL__N__[0-9a-f]+_(\d+)_", mangled)
    if m is None:
        return "?"
    name = mangled[m.end():m.end() + int(m.group(1))]
    return name[:-3] + ".cu" if name.endswith("_cu") else name


def parse(log: str) -> list[dict]:
    """One row per entry function: ptxas prints, per kernel, 'Compiling entry function', then the
    'Function properties' (stack, spills) and 'Used N registers' lines."""
    rows, current = {}, None
    props: dict[str, tuple[int, int, int]] = {}
    pending_props = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = m.group(1)
            rows[current] = {"file": source_file(current)}
        elif m := re.search(r"Function properties for (\S+)", line):
            pending_props = m.group(1)
        elif pending_props and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                                               r"spill loads", line)):
            props[pending_props] = tuple(int(g) for g in m.groups())
            pending_props = None
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            row = rows[current]
            row["registers"] = int(m.group(1))
            row["barriers"] = int(b.group(1)) if (b := re.search(r"used (\d+) barriers", line)) else 0
            row["smem"] = int(s.group(1)) if (s := re.search(r"(\d+) bytes smem", line)) else 0
    names = demangle(list(rows))
    out = []
    for mangled, row in rows.items():
        stack, spill_st, spill_ld = props.get(mangled, (0, 0, 0))
        out.append({**row, "kernel": short_name(names[mangled]), "stack": stack, "spill_stores": spill_st,
                    "spill_loads": spill_ld})
    return sorted(out, key=lambda r: (r["file"], r["kernel"]))


def report(rows: list[dict], arch: str, nvcc: str) -> str:
    version = next(line for line in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
                   .splitlines() if "release" in line)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = [f"# ptxas -v for sm_{arch}, {version}: bytes for spill_stores, spill_loads, stack and smem (static "
             f"shared memory; the launch adds its dynamic bytes).",
             "# Generated by benchmarks/ptxas_report.py from the CMakeLists.txt build; compare across commits.",
             "  ".join(c.ljust(widths[c]) if c in ("file", "kernel") else c.rjust(widths[c]) for c in COLUMNS)]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) if c in ("file", "kernel") else str(r[c]).rjust(widths[c])
                               for c in COLUMNS))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="compute capability without the dot (default: 80 and 90)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("VQIM_BUILD_JOBS", os.cpu_count() or 1)))
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for ptxas_sm<arch>.txt")
    args = ap.parse_args(argv)
    nvcc = find_nvcc()
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch or ["80", "90"]:
        rows = parse(build_log(nvcc, arch, args.jobs))
        if not rows:
            sys.exit(f"ptxas_report: no ptxas lines in the sm_{arch} build")
        path = args.out / f"ptxas_sm{arch}.txt"
        path.write_text(report(rows, arch, nvcc))
        spills = [r["kernel"] for r in rows if r["spill_stores"] or r["spill_loads"]]
        print(f"{path}: {len(rows)} kernel instantiations, max {max(r['registers'] for r in rows)} registers, "
              f"{len(spills)} with spills{': ' + ', '.join(spills) if spills else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
