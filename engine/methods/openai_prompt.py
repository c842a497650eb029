"""Prompting a model behind an OpenAI-compatible chat-completions server: `run(ctx) -> MethodOutput`.

The same prompts as the local `prompt` method (the paper's, from `engine.prompting`): each rendered
`[INST] <<SYS>> ... <</SYS>> ... [/INST]` prompt is split into a system and a user message, and the server's own
chat template does the rest. Two ways to decide (option `decision`):

- ``generate``: free text, parsed by `engine.prompting.parse` (failures counted by reason; ``truncated`` when the
  server stopped at `max_tokens`);
- ``structured``: ``response_format`` with a strict JSON schema whose values are enums of the label set: one field
  (``label``, or ``slots`` for a slot task) for one task, the prompt's own fields (``task1``, ``task2``) for a+b,
  an array of enums for slots. The answer is read with the multi-task JSON parser, so a server that ignores the
  schema still gets counted failures, not a crash.

Requests run on `concurrency` threads, so at most that many are in flight. Our retry policy (not the client's:
it gets `max_retries=0`, so every retry is ours and counted) retries 429, 408, 409, 5xx, timeouts and connection
errors with exponential backoff and jitter, and waits at least what a Retry-After header asks. Any other error
(a bad request, an unknown model, a refused key) ends the run at once with one line.

The API key is read from the environment when the run starts and lives only in the client object. It never
reaches the spec, the store, the log or an error message: every text that leaves this module on the way to the
store or the log is scrubbed of it. This module imports no torch.
"""
from __future__ import annotations

import dataclasses
import email.utils
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from clfbench.engine.context import TESTING, RunContext
from clfbench.engine.prompting.chat import MARKERS, split_inst
from clfbench.engine.prompting.library import Item, PromptBuilder, load_prompt_set
from clfbench.engine.prompting.outputs import FieldSpec, OutputSpec, answer_token_limit
from clfbench.engine.prompting.parse import Parsed, parse_answer, parse_json_answer
from clfbench.engine.types import ClfbenchError, MethodOutput

LOG = "openai:"
OPENAI_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "sk-no-key-set"  # local servers without auth still need the header to be present
REDACTED = "[redacted]"
RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx
STRUCTURED_WRAPPER_TOKENS = 16  # '{"label": "' ... '"}' around the answer
# 429s that waiting does not fix: retrying them only delays the same error.
FATAL_429_CODES = {"insufficient_quota", "billing_hard_limit_reached"}


# ------------------------------------------------------------------------------------------- secret handling


def scrub(text: str, secret: str | None) -> str:
    """`text` without the secret (and without any bearer token, whatever it is)."""
    if secret and len(secret) >= 4:
        text = text.replace(secret, REDACTED)
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1" + REDACTED, text)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- retry policy


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: the n-th retry (n = 0, 1, ...) waits uniform(0.5, 1) x min(cap,
    base x 2^n) seconds, and at least the server's Retry-After (itself capped at `retry_after_cap_s`)."""

    max_retries: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    retry_after_cap_s: float = 120.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        backoff = min(self.cap_s, self.base_s * 2 ** retry) * self.rng.uniform(0.5, 1.0)
        if retry_after is not None:
            return max(backoff, min(retry_after, self.retry_after_cap_s))
        return backoff


def _status(error: BaseException) -> int | None:
    code = getattr(error, "status_code", None)
    return code if isinstance(code, int) else None


def _error_code(error: BaseException) -> str | None:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        code = inner.get("code") or inner.get("type")
        return str(code) if code else None
    return None


def is_connection_error(error: BaseException) -> bool:
    import openai

    return isinstance(error, openai.APIConnectionError)  # APITimeoutError is one too


def is_retryable(error: BaseException) -> bool:
    """429 (unless it says the quota is gone), 408, 409, 5xx, timeouts and connection errors."""
    if is_connection_error(error):
        return True
    status = _status(error)
    if status is None:
        return False
    if status == 429 and _error_code(error) in FATAL_429_CODES:
        return False
    return status in RETRYABLE_STATUS or status >= 500


def retry_after_seconds(error: BaseException, now: float | None = None) -> float | None:
    """The wait a response asks for: `retry-after-ms` (OpenAI's), else `Retry-After` in seconds or as an HTTP date."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    milliseconds = _number(raw_ms) if raw_ms else None
    if milliseconds is not None:
        return max(0.0, milliseconds / 1000)
    raw = headers.get("retry-after")
    if not raw:
        return None
    seconds = _number(raw)
    if seconds is None:
        seconds = _seconds_until(raw, time.time() if now is None else now)
    return None if seconds is None else max(0.0, seconds)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _seconds_until(http_date: str, now: float) -> float | None:
    """Seconds from `now` to an HTTP date (None when it is not one)."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    return None if when is None else when.timestamp() - now


def call_with_retries(send: Callable[[], object], policy: RetryPolicy, on_retry: Callable[[BaseException, float], None]
                      = lambda error, wait_s: None, sleep: Callable[[float], None] = time.sleep,
                      stop: threading.Event | None = None,
                      retryable: Callable[[BaseException], bool] = is_retryable) -> object:
    """`send()` until it succeeds, a non-retryable error, or `policy.max_retries` retries (then the last error is
    raised). `on_retry(error, wait_s)` is called before each retry; `stop` set by another thread ends the waiting."""
    retry = 0
    while True:
        try:
            return send()
        except Exception as error:
            if not retryable(error) or retry >= policy.max_retries:
                raise
            wait_s = policy.delay(retry, retry_after_seconds(error))
            on_retry(error, wait_s)
            if stop is not None:
                if stop.wait(wait_s):
                    raise
            else:
                sleep(wait_s)
            retry += 1


# ----------------------------------------------------------------------------------------- error messages


def _root_reason(error: BaseException) -> str:
    """The innermost cause of a connection error in a few words: '[Errno 111] Connection refused' -> 'connection
    refused'."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return "timed out"
    deepest: BaseException = error
    seen = set()
    while deepest.__cause__ is not None and id(deepest) not in seen:
        seen.add(id(deepest))
        deepest = deepest.__cause__
    text = str(deepest) or type(deepest).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text.strip())
    return (text[:1].lower() + text[1:]) if text else "connection error"


def _server_message(error: BaseException) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        for key in ("message", "detail"):
            if inner.get(key):
                return str(inner[key])
        if body.get("detail"):
            return str(body["detail"])
    return str(getattr(error, "message", "") or error)


def describe_error(error: BaseException, url: str, model: str, key_env: str, retries: int | None = None) -> str:
    """One line for the user (not yet scrubbed: `ApiClient.fail` scrubs)."""
    gave_up = f" (gave up after {retries} retries)" if retries else ""
    if is_connection_error(error):
        return f"cannot reach {url}: {_root_reason(error)}{gave_up}"
    status = _status(error)
    message = one_line(_server_message(error), 200)
    if status in (401, 403):
        return f"{url} refused the API key in ${key_env} ({status}: {message})"
    if status == 404:
        return f"{url} answered 404 for model {model!r}: {message}"
    if status is not None:
        return f"{url} answered {status} for model {model!r}: {message}{gave_up}"
    return f"{type(error).__name__}: {message}"


# -------------------------------------------------------------------------------------------------- client


@dataclass
class Usage:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + int(value or 0))


class ApiClient:
    """The openai client with our retry policy, usage counting, and the key kept out of every message."""

    def __init__(self, opts, model: str):
        import openai

        self.model = model
        self.key_env = opts.api_key_env
        explicit_url = opts.base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.url = (explicit_url or OPENAI_URL).rstrip("/")
        key = os.environ.get(opts.api_key_env) or None
        if key is None:
            if explicit_url is None:
                raise ClfbenchError(f"${opts.api_key_env} is not set: the API key for {OPENAI_URL} comes from the "
                                    f"environment of the engine (or set -o base_url=... for a local server)")
            key = PLACEHOLDER_KEY
        self.key_set = key != PLACEHOLDER_KEY
        self.secret = key
        self.client = openai.OpenAI(api_key=key, base_url=self.url, max_retries=0, timeout=opts.timeout_s)
        self.policy = RetryPolicy(max_retries=opts.max_retries)
        self.usage = Usage()
        # What the model takes, learnt from its first refusal: OpenAI's newer models (o-series, gpt-5) refuse
        # `max_tokens` for `max_completion_tokens`, and reasoning models refuse any temperature but their default.
        self.token_param = "max_tokens"
        self.default_temperature = False
        self._adapt_lock = threading.Lock()
        self.stop = threading.Event()

    def fail(self, error: BaseException, retries: int | None = None, hint: str = "") -> ClfbenchError:
        message = describe_error(error, self.url, self.model, self.key_env, retries)
        if _status(error) in (401, 403) and not self.key_set:
            message = f"{self.url} wants an API key: ${self.key_env} is not set in the engine's environment"
        # llama-cpp-python answers a response_format it does not know with 500, not 400/422
        if hint and _status(error) is not None and (_status(error) in (400, 422)
                                                    or "response_format" in _server_message(error)):
            message += f" ({hint})"
        return ClfbenchError(scrub(message, self.secret))

    def _counted(self, send: Callable[[], object], hint: str = "") -> tuple[object, int]:
        retries = 0

        def attempt():
            self.usage.add(requests=1)
            return send()

        def count(error: BaseException, wait_s: float) -> None:
            nonlocal retries
            retries += 1
            self.usage.add(retries=1)

        try:
            return call_with_retries(attempt, self.policy, count, stop=self.stop), retries
        except Exception as error:
            raise self.fail(error, retries, hint) from None

    def check_model(self) -> list[str]:
        """Fail early, with one line, when the server is unreachable, refuses the key or does not serve the model.
        Returns the served model ids (empty when the server cannot list them). Its requests are not counted in
        `usage`, which is about the examples."""
        try:
            # A server that is not there when the run starts is a wrong URL or a server not started: say so now
            # rather than after a minute of backoff. Overload (429, 5xx) is still waited out.
            listing = call_with_retries(self.client.models.list, self.policy, stop=self.stop,
                                        retryable=lambda error: is_retryable(error) and not is_connection_error(error))
        except Exception as error:
            if _status(error) in (404, 405):  # a server without GET /models: the first request will tell
                return []
            raise self.fail(error) from None
        ids = [m.id for m in getattr(listing, "data", []) or []]
        if ids and self.model not in ids:
            shown = ", ".join(sorted(ids)[:10]) + (", ..." if len(ids) > 10 else "")
            raise ClfbenchError(scrub(f"model {self.model!r} is not served by {self.url} (it serves: {shown})",
                                      self.secret))
        return ids

    def _request(self, messages: list[dict], max_tokens: int, temperature: float, seed: int,
                 response_format: dict | None) -> dict:
        kwargs = dict(model=self.model, messages=messages, seed=seed)
        kwargs[self.token_param] = max_tokens
        if not self.default_temperature:
            kwargs["temperature"] = temperature
        if response_format is not None:
            kwargs["response_format"] = response_format
        return kwargs

    def adapt(self, error: BaseException, sent: dict) -> bool:
        """True when `error` is a 400 that names a parameter of the `sent` request that this model does not take,
        and the next request avoids it: `max_tokens` (sent as `max_completion_tokens` from then on) or
        `temperature` (left to the model's default, logged once: answers are then sampled, not greedy)."""
        if _status(error) != 400:
            return False
        message = _server_message(error)
        with self._adapt_lock:
            if "max_tokens" in sent and "max_completion_tokens" in message and "max_tokens" in message:
                if self.token_param == "max_tokens":
                    self.token_param = "max_completion_tokens"
                    print(f"{LOG} the model takes max_completion_tokens, not max_tokens: switched", flush=True)
                return True
            if "temperature" in sent and "temperature" in message and "support" in message:
                if not self.default_temperature:
                    self.default_temperature = True
                    print(f"{LOG} warning: the model refuses temperature; it now samples at its default "
                          f"temperature, so its answers are not greedy and may vary between runs", flush=True)
                return True
        return False

    def chat(self, messages: list[dict], max_tokens: int, temperature: float, seed: int,
             response_format: dict | None) -> tuple[str, str | None, int]:
        """(content, finish_reason, retries) of one chat completion."""
        hint = ""
        if response_format is not None:
            other = "json_object" if response_format["type"] == "json_schema" else "json_schema"
            hint = f"if the server does not take this response_format, try -o schema_format={other}"

        def send():
            # A model refuses one parameter per answer (max_tokens, then temperature): adapt and send again at
            # once, counted as a request but not as a retry (nothing transient happened).
            for adaptations in range(3):
                request = self._request(messages, max_tokens, temperature, seed, response_format)
                try:
                    return self.client.chat.completions.create(**request)
                except Exception as error:
                    if adaptations == 2 or not self.adapt(error, request):
                        raise
                    self.usage.add(requests=1)

        response, retries = self._counted(send, hint)
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.usage.add(prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0)
        choice = response.choices[0] if response.choices else None
        content = (choice.message.content or "") if choice is not None and choice.message is not None else ""
        return scrub(content, self.secret), (choice.finish_reason if choice is not None else None), retries


# --------------------------------------------------------------------------------------------- the answers


def json_spec(spec: OutputSpec) -> OutputSpec:
    """The answer spec with a JSON field for every task: a single task answers as {"label": ...} or
    {"slots": [...]}, a multi-task prompt keeps its own fields."""
    fields = tuple(f if f.json_field else dataclasses.replace(f, json_field="slots" if f.kind == "token" else "label")
                   for f in spec.fields)
    return OutputSpec(fields=fields)


def _field_schema(f: FieldSpec) -> dict:
    enum = {"type": "string", "enum": list(f.choices)}
    return {"type": "array", "items": enum} if f.kind == "token" else enum


def response_schema(spec: OutputSpec, schema_format: str = "json_schema") -> dict:
    """`response_format` for structured decisions: a strict schema, one enum (or array of enums) per field.
    No minItems/maxItems for slot arrays: not every server supports length keywords in strict mode; the parser
    counts a wrong length instead. `json_object` wraps the same schema the way llama-cpp-python's server reads it."""
    fields = json_spec(spec).fields
    schema = {"type": "object", "properties": {f.json_field: _field_schema(f) for f in fields},
              "required": [f.json_field for f in fields], "additionalProperties": False}
    if schema_format == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": schema}}


def messages_for(prompt: str) -> list[dict]:
    """The paper's [INST] prompt as chat messages (system message when the prompt has a <<SYS>> block)."""
    system, user = split_inst(prompt)
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]


def token_limit(opts, spec: OutputSpec, item: Item) -> int:
    """`max_tokens`, else the prompting library's default for the answer (plus the JSON around a structured one)."""
    if opts.max_tokens:
        return opts.max_tokens
    return answer_token_limit(spec, item.n_words) + (STRUCTURED_WRAPPER_TOKENS if opts.decision == "structured" else 0)


# ------------------------------------------------------------------------------------------------- entry


def run(ctx: RunContext) -> MethodOutput | None:
    if not ctx.is_main:
        return None
    client = ApiClient(ctx.options, ctx.model_path)
    try:
        return _run(ctx, client)
    except ClfbenchError as error:
        raise ClfbenchError(scrub(str(error), client.secret)) from None
    except Exception as error:  # nothing unscrubbed reaches the worker's log or the store
        raise ClfbenchError(scrub(f"{type(error).__name__}: {one_line(str(error))}", client.secret)) from None


def _run(ctx: RunContext, client: ApiClient) -> MethodOutput:
    opts = ctx.options
    prompt = load_prompt_set(opts.prompt_set).select(ctx.tasks, ctx.shots)
    builder = PromptBuilder.create(prompt, ctx.tasks, ctx.shots, ctx.seed, opts.max_text_chars, MARKERS)
    answer = _answerer(client, builder, opts, ctx.seed)
    items = builder.items

    served = client.check_model()
    print(f"{LOG} {prompt.describe()}, {len(items)} examples, {ctx.shots} shots, decision={opts.decision}, model "
          f"{client.model!r} at {client.url}" + (f" (serves {len(served)} models)" if served else "")
          + f", {opts.concurrency} requests in flight at most", flush=True)
    started = time.perf_counter()
    results = _answer_all(ctx, client, answer, len(items), opts.concurrency)
    decide_time = time.perf_counter() - started

    usage = client.usage
    extra = _run_numbers(client, opts, len(items), decide_time) | {"shots": float(ctx.shots)}
    print(f"{LOG} {len(items)} examples in {decide_time:.1f} s ({extra['examples_per_s']:.2f} ex/s), "
          f"{usage.requests} requests, {usage.retries} retries, {usage.prompt_tokens} prompt + "
          f"{usage.completion_tokens} completion tokens, ${extra['cost_usd']:.4f}", flush=True)
    return MethodOutput(predictions=builder.predicted(results),
                        extra_results={t.name: dict(extra) for t in builder.tasks})


def _answerer(client: ApiClient, builder: PromptBuilder, opts, seed: int
              ) -> Callable[[int], tuple[str, dict[str, Parsed]]]:
    """answer(i) -> (the server's text, parsed per task) for the builder's i-th test item: one request (retried
    as the policy says), read with the multi-task JSON parser when the decision is structured."""
    spec = builder.spec
    structured = opts.decision == "structured"
    response_format = response_schema(spec, opts.schema_format) if structured else None
    answer_spec = json_spec(spec)

    def answer(index: int) -> tuple[str, dict[str, Parsed]]:
        item = builder.items[index]
        content, finish, _ = client.chat(messages_for(builder.render(item.text)), token_limit(opts, spec, item),
                                         opts.temperature, seed, response_format)
        truncated = finish == "length"
        if structured:
            return content, parse_json_answer(content, answer_spec, item.n_words, truncated=truncated)
        return content, parse_answer(content, spec, item.n_words, truncated=truncated)

    return answer


def _answer_all(ctx: RunContext, client: ApiClient, answer: Callable[[int], tuple], total: int,
                concurrency: int) -> list:
    """answer(i) for every i < total on `concurrency` threads, in order; progress is reported as answers come.
    The first failed request ends the run: requests waiting to retry give up, queued ones never start."""
    started = time.perf_counter()
    results: list = [None] * total
    done, last_log = 0, 0.0
    ctx.set_progress(0, total)
    ctx.set_phase(TESTING, 0, total)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="clfbench-api") as pool:
        pending = {pool.submit(answer, i): i for i in range(total)}
        try:
            while pending:
                finished, _ = wait(pending, timeout=5, return_when=FIRST_EXCEPTION)
                for future in finished:
                    results[pending.pop(future)] = future.result()  # a failed request raises here and ends the run
                done += len(finished)
                ctx.set_progress(done, total)
                ctx.set_phase(TESTING, done, total)
                now = time.perf_counter()
                if finished and (now - last_log > 10 or done == total):
                    last_log = now
                    rate = done / max(now - started, 1e-9)
                    ctx.log_metric(done, "examples_per_s", rate)
                    print(f"{LOG} {done}/{total} examples ({rate:.2f} ex/s, {client.usage.retries} retries)",
                          flush=True)
        except BaseException:
            client.stop.set()
            for future in pending:
                future.cancel()
            raise
    return results


def _run_numbers(client: ApiClient, opts, count: int, seconds: float) -> dict[str, float]:
    """Throughput, requests, retries, tokens and their cost at the run's prices: the run's extra results."""
    usage = client.usage
    cost = (usage.prompt_tokens * opts.price_input_per_1m + usage.completion_tokens * opts.price_output_per_1m) / 1e6
    return {
        "examples_per_s": count / seconds if seconds > 0 else 0.0,
        "test_examples_per_s": count / seconds if seconds > 0 else 0.0,  # the name every method gives it
        "requests": float(usage.requests),
        "retries": float(usage.retries),
        "prompt_tokens": float(usage.prompt_tokens),
        "completion_tokens": float(usage.completion_tokens),
        "cost_usd": cost,
        "default_temperature": float(client.default_temperature),  # 1: the model refused temperature, sampled
        "decision_time_s": seconds,
    }


__all__ = ["ApiClient", "RetryPolicy", "call_with_retries", "is_retryable", "json_spec", "messages_for",
           "response_schema", "retry_after_seconds", "run", "scrub"]
