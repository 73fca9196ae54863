"""Builds and loads the CPU execution harness of the csrc/ CUDA kernels (DESIGN §6).

The harness is the extension ``_C`` compiled by the host C++ compiler from the same csrc/ files
the CUDA build compiles (nothing copied): each ``.cu`` goes to the compiler on stdin with
``tests/cuda_host/cuda_host.h`` force-included and its launch tokens ``<<<`` / ``>>>`` replaced
(the one CUDA syntax no header can express), ``#line`` pointing every message back at the
source. ``tests/cuda_host/runtime.cpp`` runs the launches. It needs the CUDA toolkit's headers
(found as setup.py finds nvcc) and a host C++ compiler; without them the tests skip.

One build per set of inputs: it is cached under the system temp folder, keyed by a hash of
every input (sources, flags, compiler, toolkit, Python), so a test session compiles at most
once. ``VQIM_HARNESS_SANITIZE=1`` builds with AddressSanitizer and UBSan (see ``SANITIZE_HELP``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HOST = Path(__file__).resolve().parent / "cuda_host"

# CUDA's default shared memory per block; must match runtime.cpp kDynamicSharedBytes.
DYNAMIC_SHARED_BYTES = 48 * 1024

SANITIZE = os.environ.get("VQIM_HARNESS_SANITIZE", "0") not in ("", "0")
# ASan must be loaded before Python, and libstdc++ with it so it intercepts the extension's C++
# exceptions; -s shows a sanitizer's report, which ends the process, instead of capturing it.
SANITIZE_HELP = (
    "VQIM_HARNESS_SANITIZE=1 needs the sanitizer runtime loaded before Python: "
    'LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" '
    "ASAN_OPTIONS=detect_leaks=0 VQIM_HARNESS_SANITIZE=1 python -m pytest -s tests/test_cuda_harness.py"
)

_FLAGS = [
    "-std=c++17", "-fPIC", "-fvisibility=hidden",
    # Each rounding as written: the kernels' __f*_rn are exact either way, the rest is not
    # contracted into FMAs here (nvcc does contract: one of the harness's stated limits).
    "-ffp-contract=off",
    # `extern __shared__` arrays are thread_local (cuda_host.h) with no dynamic initialization.
    "-fno-extern-tls-init",
    # Distinct kernels keep distinct addresses, so each launch maps back to its kernel's name.
    "-fno-ipa-icf",
    "-Wno-unknown-pragmas",
]
# -O1: the build is most of the file's time; -O2 compiles 40% longer for kernels barely faster here.
_OPT = ["-O1"]
_SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=all"]


class Unavailable(Exception):
    """The harness cannot be built here (no CUDA toolkit headers or no C++ compiler)."""


# ------------------------------------------------------------------------------------ kernels

def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", src, flags=re.S)


def global_kernels() -> dict[str, str]:
    """Every ``__global__`` function in csrc/: name -> file."""
    found = {}
    for path in sorted(CSRC.glob("*")):
        if path.suffix not in (".cu", ".cuh", ".h"):
            continue
        code = _strip_comments(path.read_text())
        code = re.sub(r"__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)", " ", code)
        for m in re.finditer(r"\b__global__\b[^;{(]*?\b([A-Za-z_]\w*)\s*\(", code):
            found[m.group(1)] = path.name
    return found


def rewrite_launches(src: str) -> str:
    """``kernel<<<cfg>>>(args)`` -> ``kernel % ::vqim_host::LaunchConfig(cfg)(args)``; every other
    character, newlines included, stays where it was."""
    out = re.sub(r"<<<(.*?)>>>", lambda m: f" % ::vqim_host::LaunchConfig({m.group(1)})", src, flags=re.S)
    if "<<<" in out:
        raise ValueError("a '<<<' without its '>>>'")
    return out


def kernel_base_name(mangled: str) -> str | None:
    """The unqualified function name of an Itanium-mangled symbol (``_ZN4vqim...`` -> its last
    nested name), without template arguments; None for anything else."""
    m = re.match(r"_Z(N?)", mangled)
    if m is None:
        return None
    i, names = m.end(), []
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        names.append(mangled[j:j + n])
        i = j + n
        if not m.group(1):
            break
    return names[-1] if names else None


# ------------------------------------------------------------------------------------ toolchain

def _find_nvcc() -> str | None:
    """setup.py's search: $CUDACXX, nvcc on PATH, $CUDA_HOME/bin/nvcc (default /usr/local/cuda)."""
    for candidate in (
        os.environ.get("CUDACXX"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _toolkit_root(nvcc: str) -> Path:
    """The toolkit nvcc belongs to, as nvcc itself reports it (``TOP=`` of a dry run): nvcc may be
    a wrapper script or a link outside the toolkit."""
    r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                       text=True)
    m = re.search(r"^#\$ TOP=(.+)$", r.stdout + r.stderr, flags=re.M)
    return Path(m.group(1)).resolve() if m else Path(nvcc).resolve().parents[1]


@dataclass(frozen=True)
class Toolchain:
    cuda_include: Path
    cxx: str


def toolchain() -> Toolchain:
    """The CUDA headers (beside the nvcc setup.py would use) and the host compiler, or Unavailable."""
    nvcc = _find_nvcc()
    if nvcc is None:
        raise Unavailable("no CUDA toolkit: nvcc not found ($CUDACXX, PATH, $CUDA_HOME/bin), and the CUDA harness "
                          "needs its headers")
    include = _toolkit_root(nvcc) / "include"
    missing = [h for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h") if not (include / h).is_file()]
    if missing:
        raise Unavailable(f"the CUDA toolkit beside {nvcc} lacks {', '.join(missing)} in {include}")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise Unavailable("no host C++ compiler (g++ or $CXX) for the CUDA harness")
    return Toolchain(include, cxx)


def _run(cmd: list[str], *, stdin: str | None = None) -> str:
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}):\n{r.stderr[-6000:]}")
    return r.stdout


@dataclass
class Symbol:
    value: int
    size: int
    kind: str  # FUNC, OBJECT, TLS, ...
    ndx: str  # section index, UND where undefined
    name: str


def _symbols(path: Path) -> list[Symbol]:
    """readelf's full symbol table (locals included: the kernels live in anonymous namespaces)."""
    out = []
    for line in _run(["readelf", "-sW", str(path)]).splitlines():
        parts = line.split()
        if len(parts) < 8 or not parts[0].rstrip(":").isdigit():
            continue
        size = int(parts[2], 16) if parts[2].startswith("0x") else int(parts[2])
        out.append(Symbol(int(parts[1], 16), size, parts[3], parts[6], parts[7]))
    return out


# ------------------------------------------------------------------------------------ build

def _inputs_key(tc: Toolchain, flags: list[str]) -> str:
    h = hashlib.sha256()
    for path in sorted([*CSRC.glob("*"), *HOST.glob("*"), Path(__file__)]):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    version = _run([tc.cxx, "--version"])
    import pybind11

    for part in (version, str(tc.cuda_include), (tc.cuda_include / "cuda_runtime_api.h").read_text()[:4000],
                 sys.version, sysconfig.get_config_var("EXT_SUFFIX"), pybind11.__version__, " ".join(flags)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def _dynamic_shared_source(names: list[str]) -> str:
    """Defines each `extern __shared__` array the kernels declare (thread_local, see cuda_host.h),
    named by its mangled symbol, and lists this thread's copies for the runtime."""
    lines = ["#include <cstddef>", f"constexpr std::size_t kBytes = {DYNAMIC_SHARED_BYTES};"]
    for i, name in enumerate(names):
        lines.append(f'alignas(16) thread_local unsigned char vqim_dyn_{i}[kBytes] __asm__("{name}");')
    items = ", ".join(f"vqim_dyn_{i}" for i in range(len(names)))
    lines += [
        'extern "C" __attribute__((visibility("hidden"))) int vqim_host_dynamic_shared(void** out, int max) {',
        f"  void* all[] = {{{items or 'nullptr'}}};",
        f"  const int n = {len(names)};",
        "  for (int i = 0; i < n && i < max; ++i) out[i] = all[i];",
        "  return n;",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _build(tc: Toolchain, sanitize: bool, out_dir: Path) -> None:
    import pybind11

    flags = [*_FLAGS, *(_SANITIZE_FLAGS if sanitize else _OPT)]
    inc = ["-I", str(CSRC), "-isystem", str(tc.cuda_include), "-isystem", pybind11.get_include(),
           "-isystem", sysconfig.get_paths()["include"]]
    force = ["-include", str(HOST / "cuda_host.h")]
    # csrc/ and the harness's own probe kernels, compiled alike; VQIM_BUILD_JOBS at a time, as
    # setup.py builds _C.
    jobs = []
    for src in [*sorted(CSRC.glob("*.cu")), *sorted(HOST.glob("*.cu"))]:
        text = f'#line 1 "{src}"\n' + rewrite_launches(src.read_text())
        jobs.append((out_dir / f"{src.stem}.o", ["-x", "c++", "-c", "-"], text))
    kernel_objects = [obj for obj, _, _ in jobs]
    for src in (CSRC / "module.cpp", HOST / "runtime.cpp"):
        jobs.append((out_dir / f"{src.stem}.o", ["-c", str(src)], None))
    workers = int(os.environ.get("VQIM_BUILD_JOBS", str(os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda job: _run([tc.cxx, *flags, *inc, *force, *job[1], "-o", str(job[0])], stdin=job[2]),
                      jobs))
    objects = [obj for obj, _, _ in jobs]
    # Each `extern __shared__` array is an undefined thread_local symbol of a kernel object.
    dynamic = sorted({s.name for o in kernel_objects for s in _symbols(o) if s.kind == "TLS" and s.ndx == "UND"})
    dyn_src = out_dir / "dynamic_shared.cpp"
    dyn_src.write_text(_dynamic_shared_source(dynamic))
    objects.append(out_dir / "dynamic_shared.o")
    _run([tc.cxx, *flags, "-c", str(dyn_src), "-o", str(objects[-1])])
    so = out_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    _run([tc.cxx, *flags, "-shared", *map(str, objects), "-o", str(so)])
    # The static __shared__ arrays: the thread_local objects the kernel objects define and the
    # files with no kernel (pybind11's own thread_locals) do not, found in the module by name
    # (offsets into its thread_local block), so the runtime can poison them.
    def tls_defined(objs):
        return {s.name for o in objs for s in _symbols(o) if s.kind == "TLS" and s.ndx != "UND"}

    shared_names = tls_defined(kernel_objects) - tls_defined([o for o in objects if o not in kernel_objects])
    symbols = _symbols(so)
    shared = [s for s in symbols if s.kind == "TLS" and s.ndx != "UND" and s.name in shared_names and s.size > 0]
    ranges = sorted({(s.value, s.size) for s in shared})
    # A kernel's static shared bytes: its function-local __shared__ arrays, `_ZZ<its encoding>E<name>`
    # (arrays in the __device__ functions it calls would count on a GPU too; csrc has none), each
    # rounded up to 8 bytes: at least the alignment padding ptxas adds between them (its report,
    # benchmarks/results/ptxas_*.txt, is exact; this may count a few bytes more, never fewer).
    per_kernel = {}
    for f in symbols:
        if f.kind == "FUNC" and f.ndx != "UND" and f.name.startswith("_Z"):
            local = "_ZZ" + f.name[2:] + "E"
            size = sum(-(-s.size // 8) * 8 for s in shared if s.name.startswith(local))
            if size:
                per_kernel[f.value] = size
    (out_dir / "shared.json").write_text(json.dumps({"ranges": ranges, "per_kernel": sorted(per_kernel.items())}))


@dataclass
class Harness:
    """The loaded harness extension: ``module`` is a ``_C`` whose kernels run on the CPU."""

    module: ModuleType
    path: Path
    functions: dict[int, str] = field(default_factory=dict, repr=False)  # offset -> kernel base name
    checked: set[str] = field(default_factory=set, repr=False)

    def launches(self) -> Counter:
        """Launches so far per kernel name (a template's instantiations count as one kernel)."""
        c: Counter = Counter()
        for offset, n in self.module.cuda_host_launches():
            c[self.functions.get(offset, f"<unknown kernel at {offset:#x}>")] += n
        return c

    @contextlib.contextmanager
    def checking(self) -> Iterator[None]:
        """The kernels launched inside the block count as checked if the block finishes: wrap the
        launches and the comparisons with their references."""
        before = self.launches()
        yield
        after = self.launches()
        self.checked |= {k for k, n in after.items() if n > before.get(k, 0)}

    @contextlib.contextmanager
    def launch(self, t: torch.Tensor) -> Iterator[tuple[ModuleType, int]]:
        """Stands in for ``kernels._ext.launch``: this module, stream 0, for CPU tensors."""
        if t.device.type != "cpu":
            raise ValueError(f"the CUDA harness runs CPU tensors, got {t.device}")
        yield self.module, 0


def check_sanitizer_runtime() -> None:
    """With VQIM_HARNESS_SANITIZE=1: a RuntimeError saying how to run, unless ASan was preloaded."""
    with open("/proc/self/maps") as f:
        asan = "libasan" in f.read()
    if SANITIZE and not (asan and "libstdc++" in os.environ.get("LD_PRELOAD", "")):
        raise RuntimeError(SANITIZE_HELP)


# Builds kept in the cache: the newest, for the sessions that may still use them.
_KEEP_BUILDS = 4


@functools.cache
def load() -> Harness:
    """Build (or reuse) and import the harness; Unavailable where it cannot be built."""
    tc = toolchain()
    check_sanitizer_runtime()
    flags = [*_FLAGS, *(_SANITIZE_FLAGS if SANITIZE else _OPT)]
    key = _inputs_key(tc, flags)
    cache = Path(tempfile.gettempdir()) / "vqim-cuda-host"
    out_dir = cache / (key + ("-sanitize" if SANITIZE else ""))
    if not (out_dir / "shared.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix="build-"))
        try:
            _build(tc, SANITIZE, tmp)
            try:
                tmp.rename(out_dir)
            except OSError:  # another session finished the same build first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        builds = [d for d in cache.iterdir() if not d.name.startswith("build-")]
        for old in sorted(builds, key=lambda d: d.stat().st_mtime)[:-_KEEP_BUILDS]:
            shutil.rmtree(old, ignore_errors=True)
    so = next(out_dir.glob("_C*.so"))
    spec = importlib.util.spec_from_file_location("vqim_cuda_host._C", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shared = json.loads((out_dir / "shared.json").read_text())
    module.cuda_host_set_shared([tuple(r) for r in shared["ranges"]], [tuple(k) for k in shared["per_kernel"]])
    functions = {}
    for s in _symbols(so):
        if s.kind == "FUNC" and s.ndx != "UND" and (name := kernel_base_name(s.name)) is not None:
            functions.setdefault(s.value, name)
    return Harness(module, so, functions)
