"""The package's dependencies point one way (STYLE.md section 12).

import-linter checks the layering itself (`lint-imports`, run by scripts/test.sh,
contracts in pyproject.toml); this test pins what a layer contract cannot say:
the package has no import cycle at all, and `import tieredcache` loads no Redis
client (an in-process-only user does not pay for redis-py).
"""

from __future__ import annotations

import subprocess
import sys

import grimp


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in modules:
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_cycle() -> None:
    """No two modules of tieredcache import each other, directly or through others
    (a package's __init__ re-exporting its submodules is not a cycle of code)."""
    graph = grimp.build_graph("tieredcache")
    packages = {m for m in graph.modules if graph.find_children(m)}
    modules = {m for m in graph.modules if m not in packages}
    assert len(modules) > 40
    assert _cycles(graph, modules) == []


def test_importing_tieredcache_loads_no_redis_client() -> None:
    """redis-py is imported when a RedisLayer first needs it, not by `import tieredcache`."""
    code = "import sys, tieredcache; print(sorted(m for m in sys.modules if m.startswith('redis')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
