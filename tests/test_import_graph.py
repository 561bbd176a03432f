"""No import circles in vlp's packages: every `import` counts, also one inside a function (an import
deferred to run time is still a dependency: it only hides the circle from Python's loader), except
those under `if TYPE_CHECKING:`, which never run."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("pipeline", "stages", "cluster")


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    names = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _runtime_nodes(tree: ast.AST):
    """Every node of the module except the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The vlp modules `name` imports (a package's own submodules it names, else the package)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in out if m in modules and m != name}


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph = {name: sorted(imports_of(name, path, modules)) for name, path in modules.items()}
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_vlp_has_no_import_circle():
    modules = module_names(ROOT, PACKAGES)
    assert len(modules) > 50 and "pipeline.runner" in modules and "stages.pretrain.stage" in modules
    assert cycles(modules) == []


def test_a_circle_through_a_deferred_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n")
    (pkg / "d.py").write_text("import pkg.typed\n")
    assert cycles(module_names(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def _external_imports(path: Path) -> set[str]:
    """The top-level names of every module `path` imports (deferred imports too, TYPE_CHECKING excepted)."""
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_ray_has_one_door():
    """Tasks, actors, objects, training gangs and the session go through pipeline/executor.py (cluster/ is
    the Ray Jobs client of `vlp submit`): a stage or engine module that imports Ray is a second door."""
    importers = sorted(name for name, path in module_names(ROOT, ("pipeline", "stages")).items()
                       if "ray" in _external_imports(path))
    assert importers == ["pipeline.executor"]


def stage_names_in(path: Path, names: set[str]) -> list[str]:
    """Where a module names a stage in code: a string that is a stage's name, an attribute named after
    one (`cfg.<stage>`), an import of a stage's folder (docstrings and comments are prose, not counted)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"{path.name}:{node.lineno} import {m}" for m in modules
                      if m.split(".")[:2] in [["stages", n] for n in names]]
    return found


def test_the_engine_names_no_stage():
    """A stage is named in its folder and the registry only (docs/architecture.md, "Adding a stage"): the
    engine (pipeline/) and the cluster client find a stage by what it declares (fetches, trains,
    evaluates, curates_web, provides, report, figures), never by its name."""
    import stages

    names = set(stages.NAMES)
    found = [hit for package in ("pipeline", "cluster") for path in sorted((ROOT / package).rglob("*.py"))
             for hit in stage_names_in(path, names)]
    assert found == []
    probe = ROOT / "pipeline" / "stage.py"
    # the scan sees code (a string, an attribute, an import) and skips prose (web_data is in docstrings only)
    assert stage_names_in(probe, {"fetches"}) and stage_names_in(probe, {"stage"})
    assert stage_names_in(probe, {"web_data"}) == []


def test_no_stage_folder_imports_another():
    """What two stages share lives in pipeline/ (precision, the optimiser's schedule, DeepSpeed's start);
    what one stage gives another travels through the registry (Stage.provides) or the graph's edges."""
    import stages

    for name in stages.NAMES:
        others = set(stages.NAMES) - {name}
        imports = [hit for path in sorted((ROOT / "stages" / name).rglob("*.py"))
                   for hit in stage_names_in(path, others) if " import " in hit]
        assert imports == [], name
