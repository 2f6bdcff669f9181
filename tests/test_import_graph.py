"""The package's import graph: no cycle, and no library module imports a mode's command module
(the modules named in cli.MODES) or the entry layer (cli, config_validation). Every import
counts, also those inside functions."""
import ast
import os

from tiny_config import ROOT

from jax_diffusion import cli

PACKAGE = os.path.join(ROOT, "jax_diffusion")
ENTRY_LAYER = {"jax_diffusion.cli", "jax_diffusion.config_validation"}


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The package modules that the file at `path` imports (`from pkg import module` counts as
    importing that module)."""
    found = set()
    with open(path) as file:
        tree = ast.parse(file.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 20
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["jax_diffusion.schedules"] |= {"jax_diffusion.diffusion"}
    assert _cycle(graph) is not None  # diffusion imports schedules: now a cycle


def test_no_library_module_imports_a_command_module():
    commands = {target.split(":")[0] for target in cli.MODES.values()}
    graph = _graph()
    assert commands <= set(graph)
    offenders = {module: sorted(imported & (commands | ENTRY_LAYER))
                 for module, imported in graph.items()
                 if module not in commands | ENTRY_LAYER and imported & (commands | ENTRY_LAYER)}
    assert offenders == {}


def test_the_package_runs_from_any_directory(tmp_path):
    """Installed (make installs it editable into .venv), the package's command-line tools run
    from outside the repository."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "jax_diffusion.evaluation.convert_weights",
                             "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
