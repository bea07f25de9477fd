"""The package layering: the core imports neither the harness nor the product nor Redis/Ray; the product never
imports the harness (the harness adds its commands through worker.plugins); no modules import each other in a
circle (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "evaluation", "worker")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _all_imports() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def test_the_core_imports_neither_the_harness_nor_the_product_nor_redis_nor_ray():
    for module, names in _all_imports().items():
        if module.startswith("pipeline"):
            bad = {n for n in names if n.split(".")[0] in ("evaluation", "worker", "redis", "ray")}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_the_product_never_imports_the_harness():
    for module, names in _all_imports().items():
        if module.startswith("worker"):
            bad = {n for n in names if n.split(".")[0] == "evaluation"}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_the_harness_adds_its_commands_and_attacks_through_the_plugin_entry_point():
    """Installed metadata, not an import from the product: `explainer --help` lists what the harness adds."""
    from typer.testing import CliRunner

    from worker.cli import full_app
    from worker.plugins import load_plugins

    assert {"pgd", "bim", "adaptive"} <= set(load_plugins().attacks)
    assert load_plugins().reference_images is not None
    listed = CliRunner().invoke(full_app(), ["--help"]).output
    for command in ("detect", "calibrate", "digest", "serve", "feed", "watch", "evaluate", "bench", "demo"):
        assert command in listed, command


def test_the_product_reaches_the_core_only_through_its_public_api():
    core_modules = {m for m in _graph() if m.startswith("pipeline.")}
    for module, names in _all_imports().items():
        if module.startswith("worker"):
            bad = names & core_modules
            assert not bad, f"{module} imports {sorted(bad)}: use the names `pipeline` exports"


def test_no_modules_import_each_other_in_a_circle():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a circle between modules
    edges = {m: {d for d in deps if not (m.endswith(d.split(".")[0]) and d.startswith(m + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in edges.get(node, ()):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                raise AssertionError(f"import circle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
