"""The house rules that a reader can count, measured from the source (no imports of the code itself).

    python tests/architecture.py            # prints every count and each offender
    python tests/architecture.py --summary  # the counts only

tests/test_architecture.py asserts them. The rules and their reasons are in docs/ARCHITECTURE.md:

- no import circle anywhere, imports inside functions included (a lazy import is still a dependency);
- a method module imports libraries and the catalog, never another method module;
- only storage/ imports sqlalchemy (or sqlmodel): storage owns every statement;
- every function is at most MAX_LINES long and at most MAX_COMPLEXITY in cyclomatic complexity (radon),
  unless docs/ARCHITECTURE.md names it with a reason under "Exceptions to the size rules".
"""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "engine", "storage", "prompts")  # the repository's folders; installed as clfbench.<folder>
NAMESPACE = "clfbench"
MAX_LINES = 60
MAX_COMPLEXITY = 20
METHODS_PACKAGE = "engine.methods"
METHOD_LIBRARY_MODULES = {"engine.methods.catalog", "engine.methods"}  # what a method may import from methods/
EXCEPTIONS_HEADING = "### Exceptions to the size rules"


def source_files() -> dict[str, Path]:
    """Module name (without the clfbench. prefix) -> file, for every module of the four packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _local_name(name: str) -> str:
    return name[len(NAMESPACE) + 1:] if name.startswith(NAMESPACE + ".") else name


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its file (module level, functions, TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [_local_name(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = _local_name(node.module or "")
            # `from a import b`: the module a.b when b is one, else (b is a name defined in a) the module a
            names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                     for alias in node.names]
        for name in names:
            # the longest project module that the name starts with (a name may be an attribute of a module)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    known = set(files)
    return {module: imports_of(module, path, known) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted: the import circles.
    A package importing its own submodule and back counts too: `a/__init__` -> `a.b` -> `a` is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def method_modules(graph: dict[str, set[str]]) -> set[str]:
    return {m for m in graph if m.startswith(METHODS_PACKAGE + ".") and m not in METHOD_LIBRARY_MODULES}


def method_cross_imports(graph: dict[str, set[str]]) -> list[str]:
    methods = method_modules(graph)
    return sorted(f"{m} -> {other}" for m in methods for other in graph[m] if other in methods)


def sqlalchemy_outside_storage() -> list[str]:
    pattern = re.compile(r"^\s*(import|from)\s+(sqlalchemy|sqlmodel)\b")
    offenders = []
    for module, path in source_files().items():
        if module.split(".")[0] == "storage":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.match(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    return offenders


@dataclass(frozen=True)
class FunctionSize:
    where: str  # path:line
    name: str  # Class.method or function
    lines: int
    complexity: int


def function_sizes() -> list[FunctionSize]:
    """Every function and method of the four packages with its length (def line to last line, decorators
    excluded) and radon's cyclomatic complexity."""
    from radon.complexity import cc_visit

    sizes = []
    for path in source_files().values():
        code = path.read_text(encoding="utf-8")
        for block in cc_visit(code):
            for item in [block, *getattr(block, "methods", [])]:
                if type(item).__name__ != "Function":
                    continue
                name = f"{item.classname}.{item.name}" if item.classname else item.name
                sizes.append(FunctionSize(f"{path.relative_to(ROOT)}:{item.lineno}", name,
                                          item.endline - item.lineno + 1, item.complexity))
            for closure in _closures(block):
                sizes.append(FunctionSize(f"{path.relative_to(ROOT)}:{closure.lineno}", closure.name,
                                          closure.endline - closure.lineno + 1, closure.complexity))
    return sizes


def _closures(block) -> list:
    out = []
    for inner in getattr(block, "closures", []) or []:
        out.append(inner)
        out.extend(_closures(inner))
    for method in getattr(block, "methods", []) or []:
        out.extend(_closures(method))
    return out


def documented_exceptions() -> dict[str, str]:
    """`name: reason` bullets under EXCEPTIONS_HEADING in docs/ARCHITECTURE.md (name as function_sizes gives it,
    `path::name`)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    _, _, rest = text.partition(EXCEPTIONS_HEADING)
    section = re.split(r"\n#{1,3} ", rest, maxsplit=1)[0]
    found = {}
    for line in section.splitlines():
        match = re.match(r"^- `([^`]+)`(?:\s*[:—-]\s*)(.+)$", line.strip())
        if match and match.group(2).strip():
            found[match.group(1)] = match.group(2).strip()
    return found


def oversized(sizes: list[FunctionSize]) -> list[FunctionSize]:
    return [s for s in sizes if s.lines > MAX_LINES or s.complexity > MAX_COMPLEXITY]


def undocumented_oversized(sizes: list[FunctionSize]) -> list[FunctionSize]:
    allowed = documented_exceptions()
    return [s for s in oversized(sizes) if f"{s.where.split(':')[0]}::{s.name}" not in allowed]


def main(argv: list[str]) -> int:
    summary = "--summary" in argv
    graph = import_graph()
    circles = cycles(graph)
    cross = method_cross_imports(graph)
    sql = sqlalchemy_outside_storage()
    sizes = function_sizes()
    too_long = [s for s in sizes if s.lines > MAX_LINES]
    too_complex = [s for s in sizes if s.complexity > MAX_COMPLEXITY]
    undocumented = undocumented_oversized(sizes)
    print(f"modules: {len(graph)}, functions: {len(sizes)}")
    print(f"import circles: {len(circles)}")
    print(f"method modules importing another method module: {len(cross)}")
    print(f"modules outside storage/ importing sqlalchemy/sqlmodel: {len(sql)}")
    print(f"functions over {MAX_LINES} lines: {len(too_long)}")
    print(f"functions over cyclomatic complexity {MAX_COMPLEXITY}: {len(too_complex)}")
    print(f"of those, without a named reason in docs/ARCHITECTURE.md: {len(undocumented)}")
    if not summary:
        for circle in circles:
            print("  circle: " + " <-> ".join(circle))
        for line in cross:
            print("  method import: " + line)
        for line in sql:
            print("  sqlalchemy: " + line)
        for s in sorted(oversized(sizes), key=lambda s: (-s.complexity, -s.lines)):
            print(f"  {s.where} {s.name}: {s.lines} lines, complexity {s.complexity}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
