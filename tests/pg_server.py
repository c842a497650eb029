"""A real PostgreSQL server for tests: `initdb` and `pg_ctl` on a free port and a private unix socket folder.

    from tests.pg_server import pg_server  # noqa: F401  (the fixture)

    def test_something(pg_server):
        url = pg_server.url                 # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres (trust auth)
        pg_server.restart()                 # pg_ctl restart -m fast
        pg_server.stop(); pg_server.start()

The server's binaries are found under /usr/lib/postgresql/<version>/bin (Debian/Ubuntu) or on PATH; where there
are none, or no psycopg driver, the test is skipped and says which is missing. PostgreSQL refuses to run as root:
run as root, the server runs as the `postgres` system user, in a folder of the system's temp dir it owns (pytest's
tmp_path is private to root); otherwise under tmp_path. fsync is off: the server is thrown away with the test.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


def postgres_bin() -> Path | None:
    """The folder of pg_ctl/initdb: the newest /usr/lib/postgresql/*/bin, else pg_ctl on PATH, else None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PgServer:
    bin: Path
    folder: Path  # data/, sockets/, server.log
    port: int
    user: str | None  # the system user that runs the server (root cannot); None: this process's user

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, *command: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        # Not a test's clfbench environment: the cli fixture kills every process of the test's CLFBENCH_HOME, and
        # a server started inside a test (a module's, shared by later tests) must outlive it.
        env = {key: value for key, value in os.environ.items() if not key.startswith("CLFBENCH_")}
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=timeout, env=env)
        if result.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}\n{tail}")

    def ctl(self, *args: str) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *args)

    def start(self) -> None:
        options = (f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self.ctl("start", "-o", options)

    def stop(self) -> None:
        self.ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self.ctl("restart", "-m", "fast")  # the options of the last start are kept (postmaster.opts)

    def create_database(self, name: str) -> str:
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.database_url(name)


def start_pg_server(tmp_path: Path) -> PgServer:
    """initdb + start; skips the test where PostgreSQL or psycopg is missing."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (pg_ctl, initdb) on this machine")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    user = None
    folder = tmp_path / "pg"
    if os.geteuid() == 0:
        user = "postgres"
        try:
            owner = pwd.getpwnam(user)
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        folder = Path(tempfile.mkdtemp(prefix="clfbench-pg-"))
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    folder.mkdir(exist_ok=True)
    server = PgServer(bin=binaries, folder=folder, port=free_port(), user=user)
    server._run(str(binaries / "initdb"), "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                "--no-sync")
    server.start()
    return server


@pytest.fixture
def pg_server(tmp_path):
    server = start_pg_server(tmp_path)
    yield server
    try:
        server.ctl("stop", "-m", "immediate")
    except RuntimeError:
        pass  # already stopped by the test
    if server.user:
        shutil.rmtree(server.folder, ignore_errors=True)
