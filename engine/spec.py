"""The experiment spec: what one run is, validated and frozen, plus sweep expansion.

Imported by the CLI at queue time, so no torch here. A spec is stored with its run as canonical JSON
together with its hash; the worker re-validates it from that JSON.

Spec file (YAML) example:

    method: encoder-finetune
    model: minilm
    task: massive-intent            # "a+b" = one multi-task run over tasks a and b
    seed: [0, 1, 2]                 # any list expands to a sweep: 3 runs
    options: {epochs: 3, lr: [5e-5, 1e-4]}   # lists inside options sweep too: 3 x 2 = 6 runs

Lists sweep everywhere; a multi-task run is written with "+" so that a list never means two things.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo, field_validator

from clfbench.engine.slurm_spec import SlurmOptions

from clfbench.engine.methods.catalog import METHODS, MethodInfo, MethodOptions
from clfbench.engine.types import ClfbenchError, check_known

SPEC_VERSION = 1


class RunSpec(BaseModel):
    """One experiment. Unknown keys are errors; every field is documented."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(description="method name (see `clfbench methods`)")
    model: str = Field(description="model alias (see `clfbench models`), hub id, or local folder")
    task: str = Field(description="task name (see `clfbench tasks`), a task YAML path, or 'a+b' for multi-task")
    shots: int = Field(0, ge=0, description="in-context examples per prompt (LLM methods)")
    seed: int = Field(0, description="seed for shuffling, initialisation and few-shot draws")
    gpus: int | None = Field(
        None, ge=0, description="GPUs to use; empty: 1 on a GPU box, CPU otherwise; 0: CPU"
    )
    nproc: int = Field(1, ge=1, description="processes when running on CPU (torchrun --nproc-per-node)")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for the run, shared by its nproc processes; empty: chosen by the "
        "engine from the cores free at launch (an execution setting: it never splits results)")
    slurm: SlurmOptions | None = Field(
        None, description="where a Slurm engine submits the run: partition, time, nodes, account, sbatch_args "
        "(docs/slurm.md); ignored by a local engine")
    data_dir: str | None = Field(None, description="folder with the dataset files (else CLFBENCH_DATA, else the hub)")
    # Pins: execution settings like threads (left out of the stored spec when empty, so they never split results).
    host: str | None = Field(
        None, min_length=1, description="run only on this host (an engine's host name as `clfbench engine status` "
        "lists it; on Slurm: the node); empty: any host")
    gpu_type: str | None = Field(
        None, min_length=1, description="run only on GPUs whose name contains this, case-insensitive (e.g. A100, "
        "H100); empty: any GPU")
    name: str | None = Field(None, description="a label for this run shown in lists")
    # The method's own options model (validated against it: an unknown option is an error), not a dict: a method
    # reads typed options, and nothing validates them a second time. SerializeAsAny: dumped with every field of
    # the method's options class, not only the base class's (none).
    options: SerializeAsAny[MethodOptions] = Field(
        default_factory=MethodOptions, description="method options (see `clfbench methods`)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return check_known(value, METHODS, "method")

    @field_validator("options", mode="before")
    @classmethod
    def _method_options(cls, value: Any, info: ValidationInfo) -> Any:
        method = METHODS.get(info.data.get("method", ""))
        if method is None:  # the method's own error says what is wrong
            return MethodOptions()
        if value is None:
            value = {}
        if isinstance(value, dict):
            return method.options(**value)
        if type(value) is not method.options:
            raise ValueError(f"options for {method.name} must be a mapping")
        return value

    @property
    def task_names(self) -> list[str]:
        return [part.strip() for part in self.task.split("+") if part.strip()]

    @property
    def method_info(self) -> MethodInfo:
        return METHODS[self.method]

    def gpus_needed(self) -> int | None:
        """GPUs the run asks for; API-only and CPU-only methods never need one (a CPU-only run takes a CPU slot)."""
        if self.method_info.launch == "process" or self.method_info.cpu_only:
            return 0
        return self.gpus

    def canonical_json(self) -> str:
        """The resolved spec (option defaults filled in) as stable JSON: what is stored and hashed."""
        data = self.model_dump()
        for unset in ("threads", "host", "gpu_type", "slurm"):  # a spec that leaves these to the engine keeps
            if data[unset] is None:                               # the JSON and hash it had before they existed
                del data[unset]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


def _one_line(items: list[dict]) -> str:
    """Pydantic's multi-line report as one line that names the field."""
    parts = []
    for item in items:
        where = ".".join(str(p) for p in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def parse_spec(data: dict[str, Any]) -> RunSpec:
    """Validate one (already expanded) spec dict, including the method options. Raises ClfbenchError: the spec's
    own fields first ("invalid spec: ..."), then the options ("invalid options for <method>: ...")."""
    try:
        return RunSpec(**data)
    except ValidationError as error:
        errors = error.errors()
    spec_errors = [e for e in errors if e["loc"][:1] != ("options",)]
    if spec_errors:
        raise ClfbenchError(f"invalid spec: {_one_line(spec_errors)}") from None
    options_errors = [{**e, "loc": e["loc"][1:]} for e in errors]
    raise ClfbenchError(f"invalid options for {data.get('method')}: {_one_line(options_errors)}") from None


def expand_sweep(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every list value (top level or in `options`) becomes a sweep axis; returns the cartesian product."""
    if not isinstance(data, dict):
        raise ClfbenchError("invalid spec: the spec must be a mapping of keys to values")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ClfbenchError("invalid spec: options must be a mapping")
    axes: list[tuple[tuple[str, ...], list[Any]]] = []
    for key, value in data.items():
        if key != "options" and isinstance(value, list):
            axes.append(((key,), value))
    for key, value in options.items():
        if isinstance(value, list):
            axes.append((("options", key), value))
    for path, values in axes:
        if not values:
            raise ClfbenchError(f"invalid spec: {'.'.join(path)} is an empty list (nothing to sweep)")
    combos = itertools.product(*(values for _, values in axes)) if axes else [()]
    expanded = []
    for combo in combos:
        one = {k: v for k, v in data.items() if k != "options"}
        one["options"] = dict(options)
        for (path, _), value in zip(axes, combo):
            if path[0] == "options":
                one["options"][path[1]] = value
            else:
                one[path[0]] = value
        expanded.append(one)
    return expanded


def spec_from_json(text: str) -> RunSpec:
    return parse_spec(json.loads(text))
