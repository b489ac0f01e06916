"""The plan of the house, read from the source with ``ast``: the wings stack in one order and no import reaches up
it, other wings see only a wing's public face, no module-level import circle, no module over 500 lines or function over
80, stage folders and metrics files named only by their stage, and no dates in comments."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib" / "transfuse"

# bottom to top: each wing may import its own modules and the wings below it, never one above
CORE = {"transfuse", "transfuse.errors", "transfuse.storage", "transfuse.metrics", "transfuse.images",
        "transfuse.class_weights", "transfuse.environment", "transfuse.stage", "transfuse.wing"}
WINGS = ["core", "transfuse.inference", "transfuse.data", "transfuse.finetune", "transfuse.ensemble",
         "transfuse.distill", "transfuse.compress", "transfuse.report", "top", "serve", "transfuse.cli", "jobs"]
TOP = {"transfuse.pipeline", "transfuse.console", "transfuse.plan", "transfuse.predict", "transfuse.runs"}


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT / "lib") if LIB in path.parents or path.parent == LIB else path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_name(p): p for base in (LIB, ROOT / "serve", ROOT / "jobs") for p in sorted(base.rglob("*.py"))}


MODULES = _modules()


def wing(module: str) -> str:
    if module in CORE or module == "transfuse.config" or module.startswith("transfuse.config."):
        return "core"
    if module in TOP:
        return "top"
    for w in WINGS:
        if module == w or module.startswith(w + "."):
            return w
    raise AssertionError(f"{module} belongs to no wing: add it to WINGS, CORE or TOP")


def _lazy_nodes(tree: ast.Module) -> set[int]:
    """A package's ``__getattr__`` (its public face, imported on first use) is not an import of the package."""
    return {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}


def face(package: str) -> dict[str, str]:
    """A package's public face: name -> the module that defines it (its ``_FACE``)."""
    for n in ast.parse(MODULES[package].read_text()).body:
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_FACE":
            return ast.literal_eval(n.value)
    return {}


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The repository's modules that ``module`` imports: a package's submodule when a name is one, and the module
    behind a name of a package's public face (importing the name imports it)."""
    tree = ast.parse(MODULES[module].read_text())
    lazy = _lazy_nodes(tree)
    nodes = tree.body if top_level_only else [n for n in ast.walk(tree) if id(n) not in lazy]
    found: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            for a in n.names:
                sub = f"{n.module}.{a.name}"
                behind = face(n.module).get(a.name) if n.module in MODULES else None
                found.add(sub if sub in MODULES else behind or n.module)
        elif isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
    return {m for m in found if m in MODULES and m != module}


def test_every_module_has_a_wing_and_no_import_reaches_up():
    upward = [f"{m} ({wing(m)}) imports {t} ({wing(t)})" for m in MODULES for t in imports(m)
              if WINGS.index(wing(t)) > WINGS.index(wing(m))]
    assert not upward, "\n".join(upward)


def test_other_wings_import_only_a_wings_public_face():
    """Outside a wing, its names come from the package (``from transfuse.finetune import FINETUNE, load_member``),
    never from one of its modules; tests may reach in, the library, serve/ and jobs/ may not."""
    reach = []
    for m, p in MODULES.items():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module in MODULES and n.level == 0:
                target = n.module
                if any(f"{n.module}.{a.name}" in MODULES for a in n.names):
                    target = f"{n.module}.{n.names[0].name}"
                w = wing(target)
                if w not in ("core", "top", "serve", wing(m)) and target != w:
                    reach.append(f"{m}: from {n.module} import {', '.join(a.name for a in n.names)}")
    assert not reach, "\n".join(reach)


def _package_names(package: str) -> set[str]:
    """What ``from package import X`` finds without the face: the names its ``__init__`` binds, its submodules."""
    tree = ast.parse(MODULES[package].read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    return names | {m.rsplit(".", 1)[1] for m in MODULES if m.rsplit(".", 1)[0] == package}


def test_every_name_imported_from_a_wing_is_there():
    """``from transfuse.finetune import X`` anywhere (nested imports, tests and benchmarks too) names a face entry,
    a name the package binds or a submodule: a missing face entry fails when the import runs, maybe mid-run."""
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py" and m.startswith("transfuse.")}
    missing = []
    for path in sorted({*MODULES.values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")}):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module in packages and n.level == 0:
                known = set(face(n.module)) | _package_names(n.module)
                missing += [f"{path.relative_to(ROOT)}:{n.lineno}: {n.module}.{a.name}" for a in n.names
                            if a.name not in known]
    assert not missing, "\n".join(missing)


def test_every_public_face_name_exists():
    import importlib

    missing = []
    for w in WINGS:
        if w in MODULES and w.startswith("transfuse."):
            pkg = importlib.import_module(w)
            missing += [f"{w}.{name} -> {mod}" for name, mod in getattr(pkg, "_FACE", {}).items()
                        if not hasattr(importlib.import_module(mod), name)]
    assert not missing, "\n".join(missing)


def test_no_import_circle_at_module_level():
    graph = {m: imports(m, top_level_only=True) for m in MODULES}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(path[path.index(t):] + [m, t] if t in path else [m, t])
            elif t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_import_graph_has_at_most_10_levels():
    """A module sits above everything it imports at load time: errors at 1, the deepest module at most at 10."""
    graph = {m: imports(m, top_level_only=True) for m in MODULES}
    level: dict[str, int] = {}

    def lv(m: str) -> int:
        if m not in level:
            level[m] = 0  # a circle is test_no_import_circle_at_module_level's to report
            level[m] = 1 + max((lv(t) for t in graph[m]), default=0)
        return level[m]

    deepest = max(MODULES, key=lv)
    assert lv(deepest) <= 10, f"{deepest} is at level {lv(deepest)}"


def _code_files() -> list[Path]:
    return [p for p in MODULES.values() if "jobs" not in p.relative_to(ROOT).parts[:1]]


def test_no_module_over_500_lines_and_no_function_over_80():
    long_modules = [f"{p.relative_to(ROOT)}: {n} lines" for p in _code_files()
                    if (n := len(p.read_text().splitlines())) > 500]
    long_functions = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name}: {f.end_lineno - f.lineno + 1} lines"
                      for p in _code_files() for f in ast.walk(ast.parse(p.read_text()))
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 80]
    assert not long_modules + long_functions, "\n".join(long_modules + long_functions)


def test_stage_folders_and_metrics_files_are_named_by_their_stage():
    """``Stage.dir`` / ``Stage.metrics`` everywhere: no ``stage_dir(cfg, "literal")`` and no "metrics.json" outside
    ``transfuse.stage``."""
    found = []
    for p in MODULES.values():
        text = p.read_text()
        if p != LIB / "stage.py":
            found += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r'"metrics\.json"', text)]
        found += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r"stage_dir\(", text)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", ["lib", "serve", "jobs", "configs"])
def test_no_dates_in_comments(folder):
    """Comments say why, not when: dated measurements belong in docs/RESULTS.md with their command."""
    date = re.compile(r"#.*\b20\d\d-\d\d-\d\d\b")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((ROOT / folder).rglob("*"))
             if p.suffix in (".py", ".yaml") for i, line in enumerate(p.read_text().splitlines(), 1)
             if date.search(line)]
    assert not found, "\n".join(found)
