"""The new-run form: method, model, task(s), shots, seed and the method's options; queues a run or a sweep.

It queues through the CLI's own code path (engine.submit.build_specs, validate_for_queue, new_runs,
storage.queue.enqueue), so a run queued here is exactly the run `clfbench queue` would queue from the same
values. As in the CLI, a value with commas (`1e-5,3e-5`) or a YAML list (`[1e-5, 3e-5]`) is a sweep axis; the
form shows how many runs the sweep makes before anything is queued. An option left empty keeps the default
shown in its placeholder. A rejected spec shows its one-line error under the field it names.
"""
from __future__ import annotations

import math
import re
from typing import Any, get_args

import yaml
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Footer, Input, Label, Select, Static

from clfbench.app.tui.dialogs import ConfirmScreen
from clfbench.app.tui.screen_parts import TitleBar, call_if_open
from clfbench.engine.methods.catalog import METHODS, option_fields
from clfbench.engine.types import ClfbenchError
from clfbench.storage import queue
from clfbench.storage.db import Store

# The spec's own fields, in form order: (field, label, hint).
SPEC_FIELDS = [
    ("model", "model", "alias, hub id or folder"),
    ("task", "task(s)", "name, a+b (multi-task) or a task YAML path"),
    ("shots", "shots", "in-context examples"),
    ("seed", "seed", ""),
    ("data_dir", "data dir", "empty: CLFBENCH_DATA, else the hub"),
    ("name", "name", "label shown in lists"),
    ("gpus", "gpus", "empty: 1 on a GPU box, CPU otherwise"),
    ("nproc", "nproc", "processes on CPU (torchrun)"),
]
NOT_SWEPT = ("data_dir", "name")  # free text where a comma is just a character


def parse_value(raw: str, sweepable: bool = True) -> Any:
    """Form text → spec value: '' → None, '[a, b]' or 'a,b' → a list (a sweep axis), else a YAML scalar."""
    raw = raw.strip()
    if not raw:
        return None
    if not sweepable:
        return raw
    if raw.startswith("["):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ClfbenchError(f"'{raw}' is not a list like [1e-5, 3e-5]") from None
        return value
    if "," in raw:
        return [yaml.safe_load(part.strip()) for part in raw.split(",")]
    return yaml.safe_load(raw)


def default_text(value: Any) -> str:
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def option_hint(field: dict, annotation: Any) -> str:
    choices = [str(c) for c in get_args(annotation) if isinstance(c, str)]
    kind = " | ".join(choices) if choices else field["type"]
    return f"{kind} · {field['description']}"


def sweep_size(values: dict[str, Any], options: dict[str, Any]) -> int:
    """How many runs these values make (the product of the list lengths), without validating anything."""
    lengths = [len(v) for v in list(values.values()) + list(options.values()) if isinstance(v, list)]
    return math.prod(lengths) if lengths else 1


class NewRunScreen(Screen):
    """The form that queues a run or a sweep, empty or filled in from a run to duplicate."""

    HELP_TITLE = "new run"
    BINDINGS = [
        Binding("ctrl+s", "queue", "Queue"),
        Binding("escape", "close", "Back"),
    ]
    DEFAULT_CSS = """
    NewRunScreen VerticalScroll { height: 1fr; padding: 0 1; }
    NewRunScreen .row { height: 1; }
    NewRunScreen .row Label { width: 16; }
    NewRunScreen .row Input, NewRunScreen .row Select { width: 1fr; }
    NewRunScreen .hint { height: 1; color: $text-muted; padding-left: 16; }
    NewRunScreen .field-error { height: auto; color: $error; padding-left: 16; display: none; }
    NewRunScreen .field-error.shown { display: block; }
    NewRunScreen .section { height: 1; margin-top: 1; text-style: bold; }
    NewRunScreen #summary { height: auto; padding: 0 1; background: $panel; }
    NewRunScreen #buttons { height: 1; padding: 0 1; }
    NewRunScreen #buttons Button { margin-right: 2; }
    """

    def __init__(self, store: Store, prefill: dict | None = None) -> None:
        super().__init__()
        self.store = store
        self.prefill = prefill or {}
        method = self.prefill.get("method")
        self.method = method if method in METHODS else next(iter(METHODS))
        self.option_names: list[str] = []

    # ---- building the form --------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        title = "new run" if not self.prefill else "new run (duplicated; edit and queue)"
        yield TitleBar(title)
        with VerticalScroll(id="form"):
            with Horizontal(classes="row"):
                yield Label("method")
                yield Select([(name, name) for name in METHODS], value=self.method, allow_blank=False,
                             id="field-method", compact=True)
            yield Static(METHODS[self.method].summary, classes="hint", id="method-summary")
            yield Static("", classes="field-error", id="error-method")
            for name, label, hint in SPEC_FIELDS:
                with Horizontal(classes="row"):
                    yield Label(label)
                    yield Input(value=self.prefill_text(name), placeholder=hint, id=f"field-{name}", compact=True)
                yield Static("", classes="field-error", id=f"error-{name}")
            yield Static("", classes="section", id="options-title")
            yield Vertical(id="options")
        yield Static("", id="summary")
        with Horizontal(id="buttons"):
            yield Button("Queue (ctrl+s)", variant="primary", id="queue", compact=True)
            yield Button("Back (esc)", id="back", compact=True)
        yield Footer()

    def prefill_text(self, name: str) -> str:
        import os

        value = self.prefill.get(name)
        if name == "data_dir" and value is None and not self.prefill:
            return os.environ.get("CLFBENCH_DATA", "")
        if name in ("shots", "seed") and value is None:
            return "0"
        if name == "nproc" and value is None:
            return "1"
        return default_text(value)

    def on_mount(self) -> None:
        self.build_options(self.prefill.get("options") or {} if self.prefill.get("method") == self.method else {})
        self.query_one("#field-model", Input).focus()
        self.load_suggestions()
        if self.prefill.get("method") and self.prefill["method"] not in METHODS:
            self.notify(f"method {self.prefill['method']} is not in this clfbench; pick one", severity="warning")

    def build_options(self, values: dict[str, Any]) -> None:
        """One input per option of the method; empty means the default (shown as the placeholder)."""
        container = self.query_one("#options", Vertical)
        container.remove_children()
        info = METHODS[self.method]
        self.query_one("#options-title", Static).update(f"options of {info.name} (empty: the default)")
        self.query_one("#method-summary", Static).update(info.summary)
        widgets = []
        self.option_names = []
        for field in option_fields(info.options):
            name = field["name"]
            self.option_names.append(name)
            value = values.get(name, field["default"])
            text = "" if value == field["default"] else default_text(value)  # show only what differs
            annotation = info.options.model_fields[name].annotation
            widgets += [
                Horizontal(Label(name), Input(value=text, placeholder=f"{default_text(field['default']) or '(none)'}",
                                              id=f"option-{name}", compact=True), classes="row"),
                Static(option_hint(field, annotation), classes="hint"),
                Static("", classes="field-error", id=f"error-option-{name}"),
            ]
        container.mount_all(widgets)
        self.call_after_refresh(self.update_summary)

    @work(thread=True, group="suggestions")
    def load_suggestions(self) -> None:
        """Model aliases and task names for completion (reading user task files can take a moment)."""
        from clfbench.engine.models import list_models
        from clfbench.engine.tasks import list_tasks

        models = [m["alias"] for m in list_models()]
        try:
            tasks = [t.name for t in list_tasks()]
        except ClfbenchError:
            tasks = []
        call_if_open(self, self.set_suggestions, models, tasks)

    def set_suggestions(self, models: list[str], tasks: list[str]) -> None:
        self.query_one("#field-model", Input).suggester = SuggestFromList(models, case_sensitive=False)
        self.query_one("#field-task", Input).suggester = SuggestFromList(tasks, case_sensitive=False)

    @on(Select.Changed, "#field-method")
    def method_changed(self, event: Select.Changed) -> None:
        if event.value != self.method and event.value in METHODS:
            self.method = str(event.value)
            self.build_options({})

    # ---- reading the form ---------------------------------------------------------------------
    def form_values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(spec flags, options) as build_specs takes them; raises ClfbenchError naming a bad field."""
        flags: dict[str, Any] = {"method": self.method}
        for name, _, _ in SPEC_FIELDS:
            raw = self.query_one(f"#field-{name}", Input).value
            try:
                flags[name] = parse_value(raw, sweepable=name not in NOT_SWEPT)
            except ClfbenchError as error:
                raise ClfbenchError(f"{name}: {error}") from None
        options: dict[str, Any] = {}
        for name in self.option_names:
            raw = self.query_one(f"#option-{name}", Input).value
            try:
                value = parse_value(raw)
            except ClfbenchError as error:
                raise ClfbenchError(f"{name}: {error}") from None
            if value is not None:
                options[name] = value
        return flags, options

    @on(Input.Changed)
    def update_summary(self) -> None:
        summary = self.query_one("#summary", Static)
        try:
            flags, options = self.form_values()
        except ClfbenchError as error:
            summary.update(f"[b]?[/] {error}")
            return
        count = sweep_size(flags, options)
        axes = [name for name, value in list(flags.items()) + list(options.items()) if isinstance(value, list)]
        text = f"[b]{count} run{'s' if count != 1 else ''}[/] will be queued"
        if axes:
            text += f" (sweep over {' × '.join(axes)})"
        summary.update(text + " · ctrl+s queues")

    # ---- queueing -----------------------------------------------------------------------------
    def action_queue(self) -> None:
        self.clear_errors()
        try:
            flags, options = self.form_values()
        except ClfbenchError as error:
            self.show_error(str(error))
            return
        self.query_one("#summary", Static).update("validating…")
        self.queue_runs(flags, options)

    @work(thread=True, group="queue", exclusive=True)
    def queue_runs(self, flags: dict[str, Any], options: dict[str, Any]) -> None:
        """Validate (tasks, data files, model) and queue in one transaction, like `clfbench queue`. A spec that a
        queued, running or succeeded run already has is queued only when the user says so (the CLI's
        --allow-duplicate): a copy is a second run of the same seed, which the matrix counts once."""
        from clfbench.engine.submit import build_specs, refuse_duplicates

        try:
            specs = build_specs(None, flags, options)
        except ClfbenchError as error:
            call_if_open(self, self.show_error, str(error))
            return
        try:
            refuse_duplicates(self.store, specs)
        except ClfbenchError as error:
            question = str(error).split("; --allow-duplicate")[0] + ". Queue anyway?"
            call_if_open(self, self.ask_duplicate, question, specs)
            return
        self.enqueue_specs(specs)

    def ask_duplicate(self, question: str, specs: list) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.enqueue_specs(specs)
            else:
                self.query_one("#summary", Static).update("not queued (the same spec is queued or done already)")

        self.app.push_screen(ConfirmScreen(question), answered)

    @work(thread=True, group="queue-write")
    def enqueue_specs(self, specs: list) -> None:
        from clfbench.engine.submit import new_runs

        ids = queue.enqueue(self.store, new_runs(specs, priority=0))
        self.app.call_from_thread(self.queued, ids)  # said even when the user has left the form

    def queued(self, ids: list[int]) -> None:
        self.app.notify(f"queued {len(ids)} run(s): {', '.join(map(str, ids))}")
        self.app.reload_screens()
        if self.app.screen is self:  # the user may have left the form while the runs were validated
            self.dismiss()

    def clear_errors(self) -> None:
        for error in self.query(".field-error"):
            error.update("")
            error.remove_class("shown")

    def field_for(self, message: str) -> str:
        """The id of the field an error message names (options first: their names are more specific)."""
        for name in self.option_names:
            if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", message):
                return f"error-option-{name}"
        for name in ("task", "model", "shots", "seed", "data_dir", "gpus", "nproc", "name", "method"):
            if re.search(rf"\b{name}\b", message):
                return f"error-{name}"
        return ""

    def show_error(self, message: str) -> None:
        target = self.field_for(message)
        self.query_one("#summary", Static).update(f"[b red]not queued:[/] {message}")
        if target:
            error = self.query_one(f"#{target}", Static)
            error.update(message)
            error.add_class("shown")
            error.scroll_visible()

    @on(Button.Pressed, "#queue")
    def queue_pressed(self) -> None:
        self.action_queue()

    @on(Button.Pressed, "#back")
    def action_close(self) -> None:
        if self.is_current:  # a second Escape queued behind the first must not pop the screen underneath
            self.dismiss()
