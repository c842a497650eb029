"""The house rules a newcomer relies on, measured from the source (tests/architecture.py counts them; the rules
and their reasons are in docs/ARCHITECTURE.md)."""
from __future__ import annotations

import re
import tomllib

import pytest

from tests import architecture

pytest.importorskip("radon")


@pytest.fixture(scope="module")
def graph():
    return architecture.import_graph()


def test_no_import_circle_anywhere(graph):
    assert architecture.cycles(graph) == []


def test_no_method_module_imports_another(graph):
    assert architecture.method_modules(graph), "no method module found: the rule would hold vacuously"
    assert architecture.method_cross_imports(graph) == []


def test_only_storage_imports_sqlalchemy():
    assert architecture.sqlalchemy_outside_storage() == []


def test_every_function_is_small_or_has_a_named_reason():
    sizes = architecture.function_sizes()
    assert len(sizes) > 500, "radon found too few functions: the check would hold vacuously"
    offenders = [f"{s.where} {s.name}: {s.lines} lines, complexity {s.complexity}"
                 for s in architecture.undocumented_oversized(sizes)]
    assert offenders == []


def test_every_documented_exception_still_exists_and_is_still_needed():
    sizes = {f"{s.where.split(':')[0]}::{s.name}": s for s in architecture.function_sizes()}
    for name in architecture.documented_exceptions():
        assert name in sizes, f"docs/ARCHITECTURE.md names {name}, which no longer exists"
        size = sizes[name]
        assert size.lines > architecture.MAX_LINES or size.complexity > architecture.MAX_COMPLEXITY, \
            f"{name} is within the rules now: drop its exception from docs/ARCHITECTURE.md"


def test_the_checker_sees_a_circle_and_a_cross_import():
    # The rules above must be able to fail: a made-up graph with both defects.
    graph = {"engine.methods.a": {"engine.methods.b"}, "engine.methods.b": {"engine.x"}, "engine.x": {"engine.methods.a"}}
    assert architecture.cycles(graph) == [["engine.methods.a", "engine.methods.b", "engine.x"]]
    assert architecture.method_cross_imports(graph) == ["engine.methods.a -> engine.methods.b"]


def test_the_distribution_lists_every_package_folder_under_the_clfbench_namespace():
    config = tomllib.loads((architecture.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(("clfbench",) + path.parent.relative_to(architecture.ROOT).parts)
               for package in architecture.PACKAGES for path in (architecture.ROOT / package).rglob("__init__.py")}
    assert set(config["packages"]) == folders
    assert all(re.fullmatch(r"clfbench\.\w+", key) for key in config["package-dir"])
