#!/usr/bin/env python3
"""Report every use of another kdray module's ``_private`` names; exit 1 if there is one.

A leading underscore says "only this module relies on me": its owner may rename or change it without
looking further. An import of it from elsewhere (``from kdray.orchestrator.job import _helper``, at module
level or inside a function) or an attribute use through a module (``job._helper``,
``kdray.orchestrator.job._helper``) breaks that promise silently, so CI refuses it. A name that another
module needs gets a public name where it belongs.

Usage: ``python tools/check_private_imports.py [ROOT ...]`` (default: ``kdray``, ``tests`` and ``bench``; ROOTs
are directories or files). Lines: ``file:line: what``. Tests use public seams too.
Only kdray's own modules count; private names of other libraries are another check's business.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "kdray"
REPO = Path(__file__).resolve().parent.parent


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(path: Path) -> str:
    """``kdray/orchestrator/job.py`` -> ``kdray.orchestrator.job``; a package's ``__init__`` is the package.
    Files outside the package (tests, bench) are named by their path, which no kdray import can match."""
    parts = list(shown(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def shown(path: Path) -> Path:
    """The path as reported: relative to the repository when inside it."""
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a kdray module or package (so an attribute on it is a module's name)."""
    if dotted != PACKAGE and not dotted.startswith(PACKAGE + "."):
        return False
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def resolve_from(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <module> import ...`` (relative imports resolved against ``current``)."""
    if not node.level:
        return node.module or ""
    parts = current.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join(parts + ([node.module] if node.module else []))


def check_file(path: Path) -> list[str]:
    current = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    where = shown(path)
    problems: list[tuple[int, int, str]] = []  # (line, column, report); a module may use its own private names

    def report(node: ast.AST, what: str) -> None:
        problems.append((node.lineno, node.col_offset, f"{where}:{node.lineno}: {what}"))

    modules: dict[str, str] = {}  # local name -> the kdray module it is bound to (any scope: names rarely clash)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != PACKAGE:
                    continue
                private = [p for p in alias.name.split(".") if is_private(p)]
                if private and alias.name != current:
                    report(node, f"import {alias.name} (private module {private[0]})")
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    modules[PACKAGE] = PACKAGE
        elif isinstance(node, ast.ImportFrom):
            target = resolve_from(current, is_package, node)
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                if is_private(alias.name) and target != current:
                    report(node, f"from {target} import {alias.name}")
                if is_module(f"{target}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{target}.{alias.name}"

    def module_of(expr: ast.expr) -> str | None:
        """The kdray module an expression names (``job``, ``kdray.orchestrator.job``), else None."""
        if isinstance(expr, ast.Name):
            return modules.get(expr.id)
        if isinstance(expr, ast.Attribute):
            outer = module_of(expr.value)
            if outer and is_module(f"{outer}.{expr.attr}"):
                return f"{outer}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            module = module_of(node.value)
            if module and module != current:
                report(node, f"{ast.unparse(node)} (private name of {module})")
    return [text for *_, text in sorted(problems)]


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [REPO / PACKAGE, REPO / "tests", REPO / "bench"]
    files = sorted({f for r in roots for f in ([r] if r.is_file() else r.rglob("*.py"))})
    problems = []
    for f in files:
        problems += check_file(f)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} use(s) of another module's private names: give each a public name where it "
              f"belongs", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
