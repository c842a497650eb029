"""The spec's `slurm:` options: where a Slurm engine (engine.slurm) submits a run. Validated at queue time.

    slurm: {partition: gpu, time: "2:00:00", nodes: 2, account: lab42, sbatch_args: ["--qos=short"]}

No torch and no Slurm here: the CLI imports it through engine.spec.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Slurm's time formats (sbatch --time): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; or no limit.
TIME_FORMAT = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|"
                         r"\d+-\d{1,2}:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$")
NAME_FORMAT = re.compile(r"^[A-Za-z0-9_.,+-]+$")

# sbatch options the launcher writes itself (each from a spec key or from the run), so sbatch_args may not: a second
# --output would send the log where `clfbench logs` does not look, a --requeue would let Slurm rerun an attempt that
# clfbench already ended. Each maps to the key to use instead, or to why it is the launcher's.
OWNED = [
    (("--job-name", "-J"), "the launcher names the job clfbench-<run>-<attempt>"),
    (("--output", "-o", "--error", "-e", "--open-mode"), "the log is appended to the run's log file"),
    (("--parsable",), "the launcher reads the job id"),
    (("--partition", "-p"), "use slurm.partition"), (("--time", "-t"), "use slurm.time"),
    (("--nodes", "-N"), "use slurm.nodes"), (("--account", "-A"), "use slurm.account"),
    (("--gres", "--gpus"), "use the spec's gpus (and gpu_type)"), (("--nodelist", "-w"), "use the spec's host"),
    (("--ntasks-per-node",), "one torchrun per node"), (("--requeue", "--no-requeue"), "clfbench requeues attempts"),
    (("--export",), "the worker needs the engine's environment"), (("--comment",), "the launcher finds jobs by it"),
    (("--wrap",), "the launcher writes the job script"),
]
OWNED_OPTIONS = {option: why for options, why in OWNED for option in options}


class SlurmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str | None = Field(None, description="sbatch --partition (empty: the cluster's default)")
    time: str | None = Field(None, description="sbatch --time, e.g. 30, 2:00:00, 1-12 (empty: the partition's)")
    nodes: int = Field(1, ge=1, le=4096, description="nodes for the run (torchrun's rendezvous joins them)")
    account: str | None = Field(None, description="sbatch --account (empty: your default account)")
    sbatch_args: list[str] = Field(default_factory=list, description="more sbatch options, e.g. ['--qos=short']")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not TIME_FORMAT.match(str(value).strip()):
            raise ValueError(f"'{value}' is not a Slurm time (minutes, H:MM:SS, D-HH, D-HH:MM:SS)")
        return None if value is None else str(value).strip()

    @field_validator("partition", "account")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_FORMAT.match(value):
            raise ValueError(f"'{value}' is not a Slurm name (letters, digits, _ . , + -)")
        return value

    @field_validator("sbatch_args")
    @classmethod
    def _sbatch_args(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.startswith("-") or any(c in value for c in "\n\r\0"):
                raise ValueError(f"'{value}' is not one sbatch option (e.g. --qos=short)")
            option = value.split("=", 1)[0]
            if len(option) > 2 and not option.startswith("--"):  # "-pgpu": a short option with its value
                option = option[:2]
            if option in OWNED_OPTIONS:
                raise ValueError(f"{option} is set by clfbench ({OWNED_OPTIONS[option]})")
        return values
