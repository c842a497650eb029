"""Import boundaries the product depends on (checked in fresh interpreters, not hoped for).

- app/ (CLI and TUI) never imports torch, transformers or datasets: commands and the TUI must start fast.
- engine/ never imports textual: it runs on GPU boxes without a terminal UI.
- storage/ imports neither torch nor textual: it is the contract every side shares.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "datasets", "accelerate", "peft"]


def modules_after_import(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_app_cli_never_imports_ml_packages():
    loaded = modules_after_import("import clfbench.app.cli")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_tui_never_imports_ml_packages():
    # The TUI's screens, and the queue-time module the new-run form validates and queues runs through.
    loaded = modules_after_import("import clfbench.app.tui.app, clfbench.app.tui.runs, clfbench.app.tui.new_run, "
                                  "clfbench.app.tui.detail, clfbench.app.tui.results, clfbench.app.tui.errors, "
                                  "clfbench.app.tui.compare, clfbench.app.tui.plot, "
                                  "clfbench.engine.submit, clfbench.app.cli")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_queue_time_validation_stays_light():
    # What `clfbench queue` runs before a run exists: spec, tasks, models, methods catalog, metrics.
    loaded = modules_after_import(
        "import clfbench.app.cli, clfbench.engine.spec, clfbench.engine.tasks, clfbench.engine.models, "
        "clfbench.engine.metrics, clfbench.engine.daemon, clfbench.engine.gpus, clfbench.engine.methods.catalog"
    )
    assert not loaded & set(HEAVY + ["textual"]), sorted(loaded & set(HEAVY + ["textual"]))


def test_storage_imports_neither_torch_nor_textual():
    loaded = modules_after_import(
        "import clfbench.storage.db, clfbench.storage.queue, clfbench.storage.queries, clfbench.storage.models")
    assert not loaded & {"torch", "transformers", "textual", "clfbench.engine", "clfbench.app"}


@pytest.mark.parametrize("package, forbidden", [
    ("engine", r"textual"),
    ("storage", r"torch|transformers|textual|clfbench\.engine|clfbench\.app"),
    ("app", r"torch|transformers|datasets|accelerate|peft"),
])
def test_no_module_level_import_crosses_a_boundary(package, forbidden):
    # Catches imports in modules that the subprocess checks above do not load.
    pattern = re.compile(rf"^\s*(import|from)\s+({forbidden})\b")  # imports inside functions too
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in (ROOT / package).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.match(line)
    ]
    assert offenders == []
