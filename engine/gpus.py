"""Which GPUs this box has: NVML, else nvidia-smi, else torch in a subprocess; `--gpus 0,1` overrides.

No torch import here: the daemon runs inside the CLI process with `--foreground`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from clfbench.engine.types import ClfbenchError


def parse_gpu_list(text: str) -> list[int]:
    """'0,1' → [0, 1]; '' or 'none' → [] (CPU only)."""
    text = text.strip()
    if text.lower() in ("", "none", "cpu"):
        return []
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ClfbenchError(f"--gpus expects indices like 0,1 (got '{text}')") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ClfbenchError(f"--gpus expects distinct non-negative indices (got '{text}')")
    return gpus


def _from_nvml() -> list[int] | None:
    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return list(range(count))
    except Exception:
        return None


def _from_nvidia_smi() -> list[int] | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        return [int(line) for line in out.split() if line.strip().isdigit()]
    except (subprocess.SubprocessError, OSError, ValueError):
        return None


def _from_torch() -> list[int] | None:
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True, text=True, timeout=120,
        ).stdout.strip()
        return list(range(int(out))) if out.isdigit() else None
    except (subprocess.SubprocessError, OSError):
        return None


def discover_gpus(override: str | None = None) -> list[int]:
    if override is not None:
        return parse_gpu_list(override)
    for probe in (_from_nvml, _from_nvidia_smi, _from_torch):
        found = probe()
        if found is not None:
            return found
    return []


def gpu_type(gpus: list[int]) -> str:
    """The name of this engine's GPUs as the driver reports it ("NVIDIA H100 80GB HBM3"), what runs pinned with
    `gpu_type:` are matched against; "" without GPUs. CLFBENCH_GPU_TYPE overrides it (a box whose names are odd, and
    the tests). A box with mixed GPUs reports its first one's: run one engine per type (`--gpus`) to pin by type."""
    override = os.environ.get("CLFBENCH_GPU_TYPE", "").strip()
    if override or not gpus:
        return override if gpus or override else ""
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={gpus[0]}", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return ""
    return out.strip().splitlines()[0].strip() if out.strip() else ""
