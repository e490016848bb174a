#!/usr/bin/env python3
"""Report every import cycle among kdray's modules, function-level imports included; exit 1 if there is one.

The layers contract (pyproject, import-linter) checks the orchestrator's direction; this checks the whole
package, every module against every other, with grimp's graph (the one import-linter builds: it sees imports
at any depth in a function, not ``TYPE_CHECKING`` blocks). A cycle is a strongly connected component of that
graph with more than one module (Tarjan's algorithm), printed with the edges that close it.

Registries (schemes, methods, datasets) import their built-in plug-in modules by name with ``importlib``,
as they import third-party plug-ins: the registry does not depend on its plug-ins, the plug-ins on it.
"""
from __future__ import annotations

import sys

import grimp


def cycles(package: str = "kdray") -> list[list[str]]:
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(start: str) -> None:  # iterative Tarjan: no recursion limit on long chains
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        order[start] = low[start] = len(order)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if not child.startswith(package):
                    continue
                if child not in order:
                    order[child] = low[child] = len(order)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], order[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == order[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for module in sorted(m for m in graph.modules if m.startswith(package)):
        if module not in order:
            visit(module)
    for component in found:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph.find_modules_directly_imported_by(a))
                 if b in members]
        component.append("; ".join(edges))
    return found


def main() -> int:
    found = cycles(sys.argv[1] if len(sys.argv) > 1 else "kdray")
    for component in found:
        print(f"import cycle among {len(component) - 1} modules: {component[-1]}")
    if not found:
        print("no import cycle among kdray modules (function-level imports included)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
