"""The layering rule of docs/design.md §2: imports go one way, kernels <- engine <- train (a layer
imports only the layers below it), inside ``engine/`` entry points > profiling > api > scheduler >
{requests, parallel} > {runner, tp, images, quantize} > {text, weights} > models >
{llama, cnn_vq, superres} > {state, config}, and no two modules import each other, directly or round a
longer loop.

Every ``.py`` under engine/, kernels/ and train/ is parsed with ``ast``; every import counts,
module-level or inside a function (a lazy import only moves the loop to the first call), and
relative imports are resolved through setup.py's package mapping. An import of ``vqim.a.b``
is an edge to ``vqim.a.b`` (not to the package ``vqim.a``, whose ``__init__`` every sibling
shares); ``from vqim.a import b`` is an edge to the module ``vqim.a.b`` if there is one, else to
``vqim.a``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower layers first: a module may import its own layer and those before it.
LAYERS = ("kernels", "engine", "train")


SETUP = ast.parse((ROOT / "setup.py").read_text())


def _package_dirs() -> dict[str, str]:
    """setup.py's ``PACKAGES`` (import name -> folder), read without running setup.py."""
    for node in SETUP.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PACKAGES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no PACKAGES mapping")


def _extension_modules() -> set[str]:
    """The compiled modules setup.py builds (``*Extension("vqim.kernels._C", ...)``): modules with
    no .py, so that ``from vqim.kernels import _C`` is an edge to ``_C``, not to its package."""
    return {node.args[0].value for node in ast.walk(SETUP)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Extension")
            and node.args and isinstance(node.args[0], ast.Constant)}


def _module_name(path: str, packages: dict[str, str]) -> tuple[str, bool]:
    """``"engine/api.py"`` -> ``("vqim.engine.api", False)``; an ``__init__.py`` is its package (True)."""
    folder, *rest = Path(path).with_suffix("").parts
    package = {d: name for name, d in packages.items()}[folder]
    if rest[-1] == "__init__":
        return ".".join([package, *rest[:-1]]), True
    return ".".join([package, *rest]), False


def _imports(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The ``vqim`` modules ``source`` (the module ``module``) imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                anchor = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m.split(".")[0] == "vqim"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


# Inside the engine, top first: a module may import its own level and those below it. Every
# engine module must be listed (a new one is placed here on purpose, not by accident).
ENGINE_LEVELS = (
    ("entrypoints",),
    ("profiling",),
    ("api",),
    ("scheduler",),
    ("requests", "parallel"),
    ("runner", "tp", "images", "quantize", "convert"),
    ("text", "weights"),
    ("models",),
    ("llama", "cnn_vq", "superres"),
    ("state", "config"),
)


def _engine_level(module: str) -> int | None:
    """The level of ``vqim.engine.<name>[.sub]`` in ENGINE_LEVELS (a sub-package is its name's);
    None outside the engine and for the package itself. An engine module nowhere in the table
    is an error."""
    parts = module.split(".")
    if parts[:2] != ["vqim", "engine"] or len(parts) < 3:
        return None
    for level, names in enumerate(ENGINE_LEVELS):
        if parts[2] in names:
            return level
    raise AssertionError(f"{module} has no place in ENGINE_LEVELS (tests/test_layering.py): put it at its level")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
    """``{relative path: source}`` -> ``{module: vqim modules it imports}``."""
    packages = _package_dirs()
    names = {p: _module_name(p, packages) for p in files}
    known = {m for m, _ in names.values()} | _extension_modules()
    return {m: _imports(files[p], m, pkg, known) for p, (m, pkg) in names.items()}


def layering_problems(files: dict[str, str]) -> list[str]:
    """Every upward import of ``files`` (``{relative path: source}``), and one import loop if any."""
    graph = import_graph(files)
    problems = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if _layer(d) is not None and LAYERS.index(_layer(d)) > LAYERS.index(_layer(m)):
                problems.append(f"upward import: {m} ({_layer(m)}) imports {d} ({_layer(d)})")
            lm, ld = _engine_level(m), _engine_level(d)
            if lm is not None and ld is not None and ld < lm:
                problems.append(f"upward import inside the engine: {m} ({'/'.join(ENGINE_LEVELS[lm])}) imports {d} "
                                f"({'/'.join(ENGINE_LEVELS[ld])})")
    loop = _cycle({m: {d for d in deps if d in graph} for m, deps in graph.items()})
    if loop:
        problems.append("import loop: " + " -> ".join(loop))
    return problems


def _tree() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text() for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}


def test_the_tree_imports_one_way_without_loops():
    assert layering_problems(_tree()) == []


def test_the_checker_sees_the_tree_s_imports():
    # A parser that found nothing would pass the test above: known edges of each kind.
    graph = import_graph(_tree())
    assert "vqim.kernels.adafactor_hparams" in graph["vqim.train.optim"]  # absolute
    assert "vqim.kernels.adafactor_hparams" in graph["vqim.kernels.adafactor8"]  # relative
    assert "vqim.kernels" in graph["vqim.engine.models"]  # `from vqim import kernels as K`
    assert "vqim.engine.api" in graph["vqim.engine.entrypoints.cli"]  # inside a function
    assert "vqim.engine.entrypoints.cli" in graph["vqim.train.main"]
    assert "vqim.kernels._C" in graph["vqim.kernels._ext"]  # the compiled extension


BASE = {"kernels/__init__.py": "", "engine/__init__.py": "", "train/__init__.py": "", "train/optim.py": "",
        "engine/weights.py": ""}


@pytest.mark.parametrize("files, want", [
    # What kernels/adafactor8.py did: the int8 optimizer took its hyper-parameters from train.
    ({"kernels/adafactor8.py": "from vqim.train.optim import BETA1\n"},
     ["upward import: vqim.kernels.adafactor8 (kernels) imports vqim.train.optim (train)"]),
    ({"kernels/adafactor8.py": "from ..train import optim\n"},
     ["upward import: vqim.kernels.adafactor8 (kernels) imports vqim.train.optim (train)"]),
    # What engine/cli.py did, lazily: the engine's CLI ran eval and train.
    ({"engine/entrypoints/cli.py": "def _eval():\n    from vqim.train import eval_shapes\n"},
     ["upward import: vqim.engine.entrypoints.cli (engine) imports vqim.train (train)"]),
    ({"engine/entrypoints/cli.py": "import vqim.train.optim\n"},
     ["upward import: vqim.engine.entrypoints.cli (engine) imports vqim.train.optim (train)"]),
    # Inside the engine: the runner may not reach up into the scheduler, the models into the runner.
    ({"engine/runner.py": "from .scheduler import Scheduler\n", "engine/scheduler.py": ""},
     ["upward import inside the engine: vqim.engine.runner (runner/tp/images/quantize/convert) imports "
      "vqim.engine.scheduler (scheduler)"]),
    ({"engine/models.py": "def f():\n    from vqim.engine import runner\n", "engine/runner.py": ""},
     ["upward import inside the engine: vqim.engine.models (models) imports vqim.engine.runner "
      "(runner/tp/images/quantize/convert)"]),
    # What engine/api.py and engine/tp.py did: a loop, one side hidden in a function.
    ({"engine/api.py": "def f():\n    from .tp import engine_from_pretrained\n",
      "engine/tp.py": "from .api import Engine\n"},
     ["upward import inside the engine: vqim.engine.tp (runner/tp/images/quantize/convert) imports vqim.engine.api (api)",
      "import loop: vqim.engine.api -> vqim.engine.tp -> vqim.engine.api"]),
    ({"train/a.py": "from . import b\n", "train/b.py": "from vqim.train import c\n",
      "train/c.py": "import vqim.train.a\n"},
     ["import loop: vqim.train.a -> vqim.train.b -> vqim.train.c -> vqim.train.a"]),
    # Downward and sideways imports are fine, and so is a package importing its submodules.
    ({"train/run.py": "from vqim import kernels as K\nfrom vqim.engine.weights import x\nfrom .optim import A\n",
      "engine/api.py": "from vqim.kernels import y\nfrom .weights import z\n",
      "engine/__init__.py": "from .api import Engine\n",
      "engine/requests.py": "from .parallel import p\n", "engine/parallel.py": ""}, []),
])
def test_the_checker_on_synthetic_trees(files, want):
    assert layering_problems({**BASE, **files}) == want


def test_a_relative_import_beyond_the_top_is_an_error():
    with pytest.raises(ValueError, match="beyond the top-level package"):
        layering_problems({**BASE, "kernels/x.py": "from ... import y\n"})


def test_an_engine_module_without_a_level_is_named():
    with pytest.raises(AssertionError, match="vqim.engine.extra has no place in ENGINE_LEVELS"):
        layering_problems({**BASE, "engine/extra.py": "from .weights import z\n"})
