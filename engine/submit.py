"""Queue time: from what a user typed (a spec file, CLI flags, the TUI's form) to validated specs and store rows.

`clfbench queue` and the TUI's new-run form both call `build_specs` and `new_runs`, so a form run and a command
line run are identical, data paths frozen into the spec included. Everything that can be known before a run
starts is checked here (the spec and its options, the tasks and whether they fit the method, the data files,
the model alias); what only the worker can find out is checked again there.

No torch here (the CLI and the TUI import this module): tasks and models are looked up in their torch-free
registries.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from clfbench.engine.methods.catalog import check_task_fit
from clfbench.engine.models import aliases, check_model, find_alias, model_kind
from clfbench.engine.prompting.library import load_prompt_set
from clfbench.engine.spec import RunSpec, expand_sweep, parse_spec
from clfbench.engine.tasks import TaskDef, check_task, get_task
from clfbench.engine.tasks.identity import freeze_tasks
from clfbench.engine.types import ClfbenchError, TaskData
from clfbench.storage import queries
from clfbench.storage.db import Store
from clfbench.storage.models import RunStatus
from clfbench.storage.queue import NewRun

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the repository in a checkout; site-packages/clfbench installed


def code_version() -> str:
    """clfbench's version plus the git commit when running from a checkout (stored with every run)."""
    from importlib.metadata import PackageNotFoundError, version as installed_version

    try:
        version = installed_version("clfbench")
    except PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def parse_option_pairs(pairs: list[str]) -> dict[str, Any]:
    """`-o lr=1e-4 -o epochs=3,5` → {"lr": 1e-4, "epochs": [3, 5]} (a comma list sweeps)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ClfbenchError(f"option '{pair}' is not KEY=VALUE")
        key, raw = pair.split("=", 1)
        values = [yaml.safe_load(part) for part in raw.split(",")] if "," in raw else yaml.safe_load(raw)
        options[key.strip()] = values
    return options


def load_spec_file(path: Path) -> dict:
    if not path.exists():
        raise ClfbenchError(f"spec file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ClfbenchError(f"spec file {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ClfbenchError(f"spec file {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ClfbenchError(f"spec file {path} must hold a mapping (method:, model:, task:, ...)")
    return data


def validate_for_queue(spec: RunSpec) -> None:
    """Everything that can be known before a run starts: tasks exist and fit the method, data, model."""
    if not spec.task_names:
        raise ClfbenchError("invalid spec: task is empty")
    if spec.data_dir and not Path(spec.data_dir).is_dir():
        raise ClfbenchError(f"data_dir {spec.data_dir} does not exist")
    tasks = [get_task(name) for name in spec.task_names]
    check_tasks_together(spec, tasks)
    check_task_fit(spec.method_info, [(task.name, task.kind) for task in tasks])
    example_ids = [check_task(task, spec.data_dir) for task in tasks]
    check_joint_ids(tasks, example_ids)
    try:  # options that depend on the tasks (a preset, label scoring on slots)
        spec.options.resolved(spec.task_names)
        spec.options.check_task_kinds([task.kind for task in tasks])
    except ValueError as error:
        raise ClfbenchError(f"invalid options for {spec.method}: {error}") from None
    if spec.method_info.local_model:  # otherwise the model is a name (on an API server, or only a label)
        check_model(spec.model)
        check_model_kind(spec.method, spec.model)


# The model kinds (engine.models.ModelKind) each method with local weights can run. `prompt` and `llm-finetune`
# generate from a causal LM and `ls-llama`/`ls-unllama` put LoRA on one: an encoder fails there only after the
# worker has loaded it, with advice that does not help. encoder-finetune pools a causal LM's last token and
# llmembed mean-pools any model, so both take either kind. tests/test_queue_checks.py checks that every method
# with local weights is listed (a new method says what it runs on).
MODEL_KINDS: dict[str, tuple[str, ...]] = {
    "encoder-finetune": ("encoder", "decoder"),
    "llmembed": ("encoder", "decoder"),
    "prompt": ("decoder",),
    "llm-finetune": ("decoder",),
    "ls-llama": ("decoder",),
    "ls-unllama": ("decoder",),
}
KIND_WORDS = {"encoder": "an encoder", "decoder": "a decoder LLM"}


def check_model_kind(method: str, model: str) -> None:
    """Refuse a model whose kind the method cannot run, in one line that says what would work. The kind is the
    alias's (model_defs/aliases.yaml) or a local folder's (its config.json); a hub id that is not an alias is
    accepted, since nothing is downloaded at queue time to look."""
    needed = MODEL_KINDS.get(method)
    kind = model_kind(model)
    if not needed or kind is None or kind in needed:
        return
    examples = [alias.name for alias in aliases().values() if alias.kind in needed]
    # "model ..." first: the TUI's form shows an error under the field it names
    what = f"model {model}" if find_alias(model) else f"model {model} (by its config.json)"
    wanted = " or ".join(KIND_WORDS.get(k, k) for k in needed)
    hint = f" (e.g. {' or '.join(examples[:2])})" if examples else ""
    raise ClfbenchError(f"{what} is {KIND_WORDS.get(kind, kind)}; {method} needs {wanted}{hint}")


def check_tasks_together(spec: RunSpec, tasks: list[TaskDef]) -> None:
    """What the run's tasks must satisfy together, known from their definitions alone (no data, no model), so
    the queue says it rather than the worker half a minute later: no task named twice (a built-in name and a
    YAML path whose `name:` is the same count as one task), and a method that prompts (its options have
    `prompt_set`) finds a prompt for these tasks in its set, as `PromptSet.select` will when the run starts
    (it needs the tasks' names and kinds only)."""
    given_as: dict[str, str] = {}
    for given, task in zip(spec.task_names, tasks):
        if task.name in given_as:
            first = given_as[task.name]
            how = f"'{given}' is given twice" if given == first else f"'{first}' and '{given}' both define it"
            raise ClfbenchError(f"task '{task.name}' is named twice in one run ({how}); a run's tasks must differ")
        given_as[task.name] = given
    prompt_set = getattr(spec.options, "prompt_set", None)
    if prompt_set is not None:
        names_and_kinds = [TaskData(name=t.name, kind=t.kind, labels=[], train=[], test=[]) for t in tasks]
        load_prompt_set(prompt_set).select(names_and_kinds, spec.shots)


def check_joint_ids(tasks: list[TaskDef], example_ids: list[dict[str, list[str]] | None]) -> None:
    """A joint run (one sequence and one token task) pairs the two tasks' examples by id, split by split
    (engine.codec.align_rows): ids that disagree are refused here, from the ids `check_task` read, rather than
    by the worker 20-30 s later. Skipped when either task's data is on the hub (nothing is downloaded here)."""
    if sorted(task.kind for task in tasks) != ["sequence", "token"] or None in example_ids:
        return
    (first, first_ids), (second, second_ids) = zip(tasks, example_ids)
    for split in sorted(set(first_ids) | set(second_ids)):
        a, b = set(first_ids.get(split, [])), set(second_ids.get(split, []))
        if a != b:
            only = sorted(a - b) or sorted(b - a)
            owner = first.name if a - b else second.name
            raise ClfbenchError(
                f"joint tasks {first.name} and {second.name} must have the same examples: their {split} splits hold "
                f"{len(a)} and {len(b)} ids, {len(a & b)} shared ({len(a ^ b)} in one only, e.g. '{only[0]}' only "
                f"in {owner})")


def _absolute_task_path(name: str) -> str:
    """A task given as a YAML path is stored absolute, so the engine finds it from any folder."""
    name = name.strip()
    if name.endswith((".yaml", ".yml")):
        return str(Path(name).expanduser().resolve())
    return name


def _absolute_tasks(value: Any) -> Any:
    """`task` (one "a+b" string, or a list of them to sweep) with every YAML path made absolute."""
    if isinstance(value, list):
        return [_absolute_tasks(one) for one in value]
    if isinstance(value, str):
        return "+".join(_absolute_task_path(part) for part in value.split("+"))
    return value


def _merged_spec_data(spec_file: Path | None, flags: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The spec file's mapping with the flags and options laid over it, and the places of data and task files
    frozen in: a detached engine started earlier may have another environment and working folder."""
    data = load_spec_file(spec_file) if spec_file else {}
    for key, value in flags.items():
        if value is not None and value != []:
            data[key] = value[0] if isinstance(value, list) and len(value) == 1 else value
    if not data.get("data_dir") and os.environ.get("CLFBENCH_DATA"):
        data["data_dir"] = os.environ["CLFBENCH_DATA"]
    if isinstance(data.get("data_dir"), str):
        data["data_dir"] = str(Path(data["data_dir"]).expanduser().resolve())
    if data.get("task") is not None:
        data["task"] = _absolute_tasks(data["task"])
    if options:
        data["options"] = {**(data.get("options") or {}), **options}
    return data


def build_specs(spec_file: Path | None, flags: dict[str, Any], options: dict[str, Any]) -> list[RunSpec]:
    """Validated specs, one per sweep item; the first bad item is a ClfbenchError that names it."""
    items = expand_sweep(_merged_spec_data(spec_file, flags, options))
    specs = []
    for index, one in enumerate(items):
        try:
            spec = parse_spec(one)
            validate_for_queue(spec)
        except ClfbenchError as error:
            prefix = f"sweep item {index + 1}: " if index else ""
            raise ClfbenchError(f"{prefix}{error}") from None
        specs.append(spec)
    return specs


def new_runs(specs: list[RunSpec], priority: int) -> list[NewRun]:
    """The store rows for validated specs (queued together, in one transaction, by `queue.enqueue`), each with
    its tasks frozen (engine.tasks.identity): what was validated is what the run trains on."""
    version = code_version()
    return [
        NewRun(
            method=s.method, model=s.model, task=s.task, shots=s.shots, seed=s.seed,
            spec_json=s.canonical_json(), spec_hash=s.spec_hash(), launch=s.method_info.launch,
            gpus_requested=s.gpus_needed(), nproc=s.nproc, code_version=version, name=s.name, priority=priority,
            tasks_json=json.dumps(freeze_tasks(s.task_names, s.data_dir)), pin_host=s.host, pin_gpu_type=s.gpu_type,
        )
        for s in specs
    ]


# A run with one of these statuses already stands for its spec: queued or running it will produce the result,
# succeeded it has. A failed, cancelled or interrupted run does not, so queueing its spec again is a retry.
STANDING = (RunStatus.queued.value, RunStatus.running.value, RunStatus.succeeded.value)


def refuse_duplicates(store: Store, specs: list[RunSpec]) -> None:
    """Refuse specs identical (spec_hash) to each other or to a queued, running or succeeded run, in one line that
    names the runs and the way to force it. A copy of a spec is a second run of the same seed: the results
    matrix counts it once, so queueing it silently only costs compute (`clfbench queue --allow-duplicate`
    queues it anyway, e.g. to measure run-to-run noise)."""
    first_item: dict[str, int] = {}
    for index, spec in enumerate(specs, start=1):
        earlier = first_item.setdefault(spec.spec_hash(), index)
        if earlier != index:
            raise ClfbenchError(f"sweep items {earlier} and {index} are the same spec (a list names one value "
                                f"twice?); --allow-duplicate queues both")
    standing = queries.runs_with_spec_hashes(store, list(first_item), STANDING)
    if not standing:
        return
    runs = ", ".join(f"{run['id']} ({run['status']})" for run in sorted(standing, key=lambda run: run["id"]))
    who = f"runs {runs} have" if len(standing) > 1 else f"run {runs} has"
    if len(specs) == 1:
        raise ClfbenchError(f"{who} the same spec already; --allow-duplicate queues it again")
    repeated = len({run["spec_hash"] for run in standing})
    raise ClfbenchError(f"{who} the same spec as {repeated} of these {len(specs)} runs already; nothing queued; "
                        f"--allow-duplicate queues them all")
