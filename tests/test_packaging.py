"""What `pip install .` (not editable) puts into site-packages, and that it works from outside the repository:
one `clfbench` namespace (no top-level `app` or `engine` to collide with other projects), with the task
definitions, prompts and the demo's sample data inside the package."""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "engine", "storage", "prompts")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a clean copy: setuptools reuses the source tree's build/ folder, where a module deleted since an
    # earlier build would still lie and be packaged.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", *PACKAGES):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=600)
    (built,) = out.glob("clfbench-*.whl")
    return built


def test_the_wheel_holds_one_namespace_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"clfbench"}
    for needed in ("clfbench/app/cli.py", "clfbench/engine/worker.py", "clfbench/storage/queue.py",
                   "clfbench/engine/task_defs/massive-intent.yaml", "clfbench/engine/model_defs/aliases.yaml",
                   "clfbench/prompts/paper/prompts.yaml", "clfbench/engine/sample_data/massive_en/train.jsonl",
                   "clfbench/engine/sample_data/20ng/test.jsonl",
                   "clfbench/engine/sample_data/user_task/massive-subset.yaml"):
        assert needed in names, needed
    assert not any(name.startswith("clfbench/__init__") for name in names)  # a namespace package


def test_installed_from_the_wheel_it_works_outside_the_repository(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # The dependencies (torch, transformers, ...) come from this interpreter's site-packages; clfbench itself only
    # from the wheel.
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=600)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "CLFBENCH_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=outside, env=env, capture_output=True, text=True, timeout=300)

    where = run(str(python), "-c", "import clfbench.app.cli as m, clfbench.engine.tasks as t; "
                                   "print(m.__file__); print(t.sample_data_dir())")
    assert where.returncode == 0, where.stderr
    module_file, samples = where.stdout.split()
    assert Path(module_file).is_relative_to(env_dir) and Path(samples).is_relative_to(env_dir)
    assert run(str(python), "-c", "import app").returncode != 0  # no top-level `app` installed
    assert run(str(python), "-c", "import engine").returncode != 0
    queued = run(str(env_dir / "bin" / "clfbench"), "queue", "--method", "encoder-finetune", "--model", "tiny-bert",
                 "--task", "massive-intent", "--data-dir", samples, "--dry-run")
    assert queued.returncode == 0 and "would queue: encoder-finetune tiny-bert massive-intent" in queued.stdout, \
        queued.stderr
