"""The package's layers, from its own imports: one way only, and no import circle.

Read with ``ast`` from the source, so the test sees every import, at module
level, inside a function (a lazy import is still a dependency) or under
``if TYPE_CHECKING:`` (a type is one too).
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qbitmap"

# Who may import whom, by top-level part of the package.  A part may always import
# itself and the base modules (errors, units, parallel, lockbytes).
# imagefile: what may be opened as an image, known before opening; the commands and the
# Python API refuse the same files with it (standard library only).
BASE = {"errors", "units", "parallel", "lockbytes", "interrupt", "imagefile", "__init__"}
ALLOWED = {
    "format": set(),
    "levels": {"format"},
    "check": {"format", "levels"},
    "store": {"format"},
    "recover": {"format", "levels", "check", "store"},
    "track": {"format", "levels", "store"},
    "libvirt": {"format", "levels", "check", "store", "recover"},
    "inspect": {"format"},
    "inspect_chain": {"format", "inspect", "check"},
    "render": {"format", "check", "recover", "inspect", "inspect_chain", "levels", "libvirt"},
    "ui": {"render"},
    "commands": {
        "format", "levels", "check", "store", "recover", "track", "libvirt", "inspect",
        "inspect_chain", "render", "ui",
    },
    "cli": {"commands", "ui", "render"},
    # The Python API, beside the CLI: a facade over the layers the commands call.  From
    # render only the JSON documents (render.check, render.recover), which load no rich
    # (tests/api/test_surface.py proves it), so that a report is the one --json prints.
    "api": {"format", "levels", "check", "recover", "libvirt", "inspect", "render"},
    # qbitmap/__init__.py names the API's types for type checkers; at run time it loads
    # qbitmap.api only when one of its names is first used.
    "__init__": {"api"},
    # entry reads a recover --reference command line before click loads, to start the pulls
    # of both files (recover.prefetch: standard library only).
    "entry": {"cli", "recover"},
    "__main__": {"entry"},
}  # fmt: skip
# Third-party packages for people, only at the top.
TOP_ONLY = {"click": {"commands", "cli"}, "rich": {"render", "ui", "commands", "cli"}}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, name: str, modules: Collection[str] = ()) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = {f"{base}.{alias.name}" for alias in node.names}
            found.update(names)
            # ``from qbitmap import levels`` depends on the module qbitmap.levels, not on
            # what qbitmap/__init__.py imports; a name that is no module is the package's own.
            if not all(n in modules for n in names):
                found.add(base)
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m in _imports(path, name, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_imports_run_one_way():
    wrong = []
    for name, deps in _graph().items():
        mine = _part(name)
        for dep in deps:
            theirs = _part(dep)
            if theirs == mine or theirs in BASE or dep == "qbitmap":
                continue
            if theirs not in ALLOWED.get(mine, set()):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_click_and_rich_only_at_the_top():
    wrong = []
    for name, path in _modules().items():
        for dep in _imports(path, name):
            top = dep.split(".")[0]
            if top in TOP_ONLY and _part(name) not in TOP_ONLY[top]:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    # Only modules, not their packages' __init__ re-exports, form circles that matter:
    # an edge to a package means "its __init__", which imports its modules.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == node.rpartition(".")[0]:
                continue  # a module importing its own package's __init__: Python resolves it
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if state.get(dep, 0) == 0:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node, 0) == 0:
            circle = visit(node)
            assert circle is None, " -> ".join(circle)


def test_the_layers_cover_every_part():
    parts = {_part(name) for name in _modules()}
    assert parts <= set(ALLOWED) | BASE, parts - set(ALLOWED) - BASE
