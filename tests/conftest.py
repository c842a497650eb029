"""Shared fixtures: an isolated clfbench home per test and a runner for the real CLI."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Where clfbench writes by default on this machine, before the suite points it elsewhere: the suite must leave them
# as they were (a test once wrote 517 MB into the user's real ~/.clfbench).
USER_PLACES = [Path.home() / ".clfbench",
               Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clfbench"]


def _snapshot_user_places() -> dict[str, tuple[int, int]]:
    found = {}
    for place in USER_PLACES:
        for path in [place, *place.rglob("*")] if place.exists() else []:
            stat = path.lstat()
            found[str(path)] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return found


def pytest_configure(config):
    """Every test process and every CLI it starts gets a private clfbench home; the model cache (tiny models, the
    converted SmolLM2) is one folder of this checkout shared by the whole session, so each model builds once."""
    config.clfbench_user_places = _snapshot_user_places()
    os.environ["CLFBENCH_HOME"] = tempfile.mkdtemp(prefix="clfbench-test-home-")
    os.environ["CLFBENCH_MODEL_CACHE"] = str(ROOT / ".pytest_cache" / "clfbench-models")


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if it changed the user's own clfbench folders (what it found there at the start)."""
    before, after = session.config.clfbench_user_places, _snapshot_user_places()
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    if changed:
        print(f"\nthe test run changed the user's clfbench folders ({len(changed)} paths), e.g. {changed[:3]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
SAMPLES = ROOT / "engine" / "sample_data"  # the package data the demo runs on
# The real datasets (20 Newsgroups, MASSIVE): the user's CLFBENCH_DATA where it is set, else ../shared/data beside
# the checkout. Read here, at import, before the fixtures hide CLFBENCH_DATA from every test.
REAL_DATA = Path(os.environ.get("CLFBENCH_DATA") or ROOT.parent / "shared" / "data")


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from more threads, and OpenMP threads thrash on a busy 2-core machine
    (40x slower seen with 2 threads on 2 loaded cores). Modules opt in with an autouse fixture."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def method_context(method: str, model_path: str, tasks, output_dir: Path = Path("."), *, seed: int = 0,
                   shots: int = 0, log_metric=lambda *args: None, set_progress=lambda *args: None, **options):
    """A RunContext as the worker builds it: a real spec (validated with the method's options, which the worker
    then resolves for the tasks) on one CPU process."""
    from clfbench.engine.context import RunContext
    from clfbench.engine.spec import parse_spec

    spec = parse_spec({"method": method, "model": model_path, "task": "+".join(t.name for t in tasks),
                       "seed": seed, "shots": shots, "options": options})
    return RunContext(run_id=1, attempt=1, spec=spec, options=spec.options.resolved(spec.task_names),
                      tasks=list(tasks), model_path=model_path, output_dir=Path(output_dir), rank=0, world_size=1,
                      local_rank=0, device="cpu", log_metric=log_metric, set_progress=set_progress)


def run_method(module, ctx):
    """Run a method module as the worker does and join its answers with the tasks' gold labels and texts
    (`engine.worker.join_predictions`, which also checks that every test example got exactly one answer)."""
    from clfbench.engine.worker import join_predictions

    output = module.run(ctx)
    if output is None:
        return None
    return dataclasses.replace(output, predictions=join_predictions(ctx.tasks, output))


def build_tiny_model(alias: str, tmp_path_factory) -> str:
    """Build a tiny random model (tiny-bert, tiny-llama) into a private home for a test session."""
    from clfbench.engine.models import resolve_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLFBENCH_HOME", str(tmp_path_factory.mktemp("clfbench-home")))
        return resolve_model(alias)


# One tiny random model of each kind per test session, shared by every test file that needs it.
@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_model("tiny-llama", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_model("tiny-bert", tmp_path_factory)


@dataclass
class Cli:
    """Runs `python -m clfbench.app.cli ...` (the real command line) against one isolated home and store."""

    home: Path
    env: dict

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "clfbench.app.cli", *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"clfbench {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--json").stdout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "clfbench.app.cli", *args], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("CLFBENCH_HOME", str(folder))
    monkeypatch.delenv("CLFBENCH_DB", raising=False)
    monkeypatch.delenv("CLFBENCH_DATA", raising=False)
    return folder


@pytest.fixture
def cli(home) -> Iterator[Cli]:
    env = dict(os.environ)
    env["CLFBENCH_HOME"] = str(home)
    # The model cache (tiny models, converted SmolLM2) is shared between tests so each builds once.
    env["CLFBENCH_MODEL_CACHE"] = str(ROOT / ".pytest_cache" / "clfbench-models")
    env.pop("CLFBENCH_DB", None)
    env.pop("CLFBENCH_DATA", None)
    # A pytest-xdist worker has COLUMNS=80 and LINES=24 in its environment; the CLI, piped, is 200 wide unless a
    # test sets COLUMNS itself, as under plain pytest.
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    yield Cli(home=home, env=env)
    kill_processes_of_home(home)


def kill_processes_of_home(home: Path) -> None:
    """SIGKILL every process started with this CLFBENCH_HOME (an engine, torchrun, a worker) that a failed or
    interrupted test left behind: a worker whose store is gone waits for it by design, and would outlive the suite."""
    import signal

    wanted = f"CLFBENCH_HOME={home}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) != os.getpid() and wanted in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """One real PostgreSQL server for a test module (tests/pg_server.py); each test makes its own database."""
    import shutil

    from tests.pg_server import start_pg_server

    server = start_pg_server(tmp_path_factory.mktemp("pg"))
    yield server
    server.ctl("stop", "-m", "immediate")
    if server.user:
        shutil.rmtree(server.folder, ignore_errors=True)
