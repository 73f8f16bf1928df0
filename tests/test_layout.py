"""The layout is the architecture: each room imports only the rooms listed before it.

The rule, checked over every module's imports (those inside functions included): a module in
room R may import modules of R itself and of rooms above R in ROOMS, never of a room below.
Code that a saved variant needs at run time lives in `runtime/`, below loading (`models`) and
measuring (`measure/`, `bench/`), so neither ever reaches up into `techniques/`.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "frugalm"
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("frugalm.errors",)),
    ("atomic", ("frugalm.atomic",)),
    ("assets", ("frugalm.assets",)),
    ("text", ("frugalm.text",)),
    ("runtime", ("frugalm.runtime",)),
    ("models", ("frugalm.models",)),
    ("measure", ("frugalm.measure",)),
    ("store and pareto", ("frugalm.store", "frugalm.pareto")),
    ("training", ("frugalm.training",)),
    ("techniques", ("frugalm.techniques",)),
    ("registry and recipe", ("frugalm.registry", "frugalm.recipe", "frugalm.space")),
    ("benchmark", ("frugalm.benchmark",)),
    ("report", ("frugalm.report",)),
    (
        "run, export, search, optimize",
        (
            "frugalm.run",
            "frugalm.export",
            "frugalm.export_gguf",
            "frugalm.search",
            "frugalm.trials",
            "frugalm.ray_trials",
            "frugalm.search_run",
            "frugalm.optimize",
        ),
    ),
    ("cli", ("frugalm.cli", "frugalm.__main__")),
]
CLI_MAY_DEFER = "frugalm.cli"
DEFERRED_MARK = "deferred:"
"""An import of a third-party module inside a function must say why it is deferred (an optional
extra, say) in a comment with this mark; otherwise it belongs at the module's top."""
"""The CLI imports the API inside its commands on purpose: `frugalm --help` and `frugalm ls` stay
free of torch. Everywhere else a frugalm import inside a function hides a cycle."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _room(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(ROOMS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported frugalm module, line, inside a function) for every import statement."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(
                    [(a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "frugalm"]
                )
            elif (
                isinstance(child, ast.ImportFrom)
                and child.level == 0
                and child.module
                and child.module.split(".")[0] == "frugalm"
            ):
                # `from frugalm import errors` imports the module frugalm.errors
                targets = [
                    f"{child.module}.{a.name}" if child.module == "frugalm" else child.module for a in child.names
                ]
                found.extend((t, child.lineno, in_function) for t in targets)
            visit(child, inside)

    visit(tree, False)
    return found


def test_every_module_has_a_room():
    homeless = [m for m in _modules() if m != "frugalm" and _room(m) is None]
    assert not homeless, f"modules in no room of ROOMS: {homeless}; put them in a room (and a folder) or add the room"


def test_imports_run_one_way_down_the_rooms():
    """Rule: a module imports only its own room and the rooms listed above it in ROOMS."""
    upward, deferred = [], []
    for module, path in _modules().items():
        own = _room(module)
        for target, line, in_function in _imports(path, module):
            if target == "frugalm" or target == "frugalm.__version__":
                continue  # the package root: __version__ and the lazy API, imports nothing at load
            rank = _room(target)
            if own is not None and rank is not None and rank > own:
                upward.append(
                    f"{path.relative_to(SRC.parent)}:{line} ({ROOMS[own][0]}) imports {target} ({ROOMS[rank][0]})"
                )
            if in_function and not module.startswith(CLI_MAY_DEFER) and module != "frugalm":
                deferred.append(f"{path.relative_to(SRC.parent)}:{line} imports {target} inside a function")
    assert not upward, "imports that run up the rooms:\n" + "\n".join(upward)
    assert not deferred, "frugalm imports deferred into functions (a hidden cycle):\n" + "\n".join(deferred)


IMPORT_EACH = """
import importlib, json, sys, traceback
failed = {}
for module in json.loads(sys.argv[1]):
    for name in [n for n in sys.modules if n == "frugalm" or n.startswith("frugalm.")]:
        del sys.modules[name]  # frugalm afresh for each module; torch and the rest stay loaded (not ours)
    try:
        importlib.import_module(module)
    except Exception:
        failed[module] = traceback.format_exc()[-1500:]
print(json.dumps(failed))
"""


def test_each_module_imports_on_its_own():
    """No cycle at import time: every module loads first, by itself, with no other frugalm module
    loaded (one interpreter, frugalm's modules dropped before each: a process per module would
    spend minutes importing torch again)."""
    modules = sorted(m for m in _modules() if m != "frugalm.__main__")
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, json.dumps(modules)], capture_output=True, text=True, check=True
    )
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"{m}:\n{tb}" for m, tb in failed.items())


def test_import_frugalm_and_its_cli_stay_light():
    code = "import sys, frugalm, frugalm.cli; frugalm.cli.build_parser(); print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_technique_module_is_registered_under_its_own_name():
    from frugalm.registry import TECHNIQUES, get_technique

    for key in TECHNIQUES:
        assert get_technique(key).name == key
    modules = {
        p.stem
        for p in (SRC / "techniques").glob("*.py")
        if not p.stem.startswith("_") and p.stem not in ("base", "training_stage")
    }
    registered = {spec.split(":")[0].rsplit(".", 1)[1] for spec in TECHNIQUES.values()}
    assert modules == registered, f"technique modules not in registry.py: {sorted(modules - registered)}"


def test_lazy_api_names_resolve():
    import frugalm

    for name in frugalm._LAZY:
        assert getattr(frugalm, name) is getattr(importlib.import_module(frugalm._LAZY[name]), name)


def test_third_party_imports_sit_at_module_top_unless_marked_deferred():
    unmarked = []
    for module, path in _modules().items():
        if module.startswith(CLI_MAY_DEFER):
            continue
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and DEFERRED_MARK not in lines[node.lineno - 1]:
                        unmarked.append(
                            f"{path.relative_to(SRC.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
                        )
    assert not unmarked, f"imports inside functions without a '# {DEFERRED_MARK} why' comment:\n" + "\n".join(unmarked)
