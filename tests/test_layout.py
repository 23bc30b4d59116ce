"""The house rules of the package's layout, read from the source: imports go one way.

The library (every module of clipgram but the CLI) never imports the flows, and no two of its
modules import each other at load time. A break here is a design change, not a detail.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# where each part of the package lives in the checkout (pyproject.toml's package-dir)
SOURCES = {"clipgram": ROOT / "pipeline", "clipgram.flows": ROOT / "flows"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module of ours `import name` loads (a name imported from a package may be a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {_target(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {_target(f"{node.module}.{alias.name}") for alias in node.names}
    return out - {None}


def test_the_library_never_imports_the_flows():
    offenders = {name for name, path in MODULES.items()
                 if not name.startswith("clipgram.flows") and name != "clipgram.cli"
                 and any(t.startswith("clipgram.flows") for t in _imports(path, top_level_only=False))}
    assert not offenders, f"{sorted(offenders)} import clipgram.flows: only the CLI runs flows"


def test_the_cli_imports_prefect_only_when_a_command_runs_a_flow():
    # `clipgram sql` and `status` must not pay Prefect's import time
    assert not {t for t in _imports(MODULES["clipgram.cli"], top_level_only=True)
                if t.startswith("clipgram.flows")}


def test_no_import_cycle_at_load_time():
    graph = {name: _imports(path, top_level_only=True) - {name} for name, path in MODULES.items()}
    assert len(graph) > 40  # the walk found the package
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " → ".join([*trail[trail.index(name):], name]))
        if name in done:
            return
        for target in sorted(graph.get(name, ())):
            visit(target, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
