"""LLMEmbed (Liu et al., ACL 2024, seed 001): frozen models as feature extractors, a small classifier on top.

`run(ctx)` classifies the texts of one sequence task in two phases, timed apart:

1. **Extraction.** Every text of train, dev and test goes through the run's model (`ctx.model_path`) and each
   model of `extra_models`, frozen, without gradients. For each chosen layer the hidden states are averaged
   over the text's real tokens (`mean_pool`: padding never counts, and padding is on the right, so a causal
   model's real tokens keep their positions and never see a pad). `layers` index the model's hidden states:
   0 is the embedding output, 1..N the transformer layers, negative indices count from the end (-1 = the last
   layer, after the final norm). Features are cached on disk (`FeatureCache`), one file per model and split,
   keyed by the model's path and a fingerprint of its files, the layers, the pooling, `max_length`, the dtype
   and a hash of the split's texts; a second run on the same data and models extracts nothing.
2. **Classifier.** An MLP (`FusionClassifier`) is trained on the cached features with Adam, a dev split (the
   task's, or a seeded `dev_fraction` of train) choosing the best epoch, early stopping after `patience`
   epochs without a better dev accuracy; the best epoch's weights predict the test set.

Fusion (`fusion`), following the paper's section 3 and its code (github.com/ChunLiu-cs/LLMEmbed-ACL2024,
`DownstreamModel`):

- ``paper``: each pooled vector (one per model and layer) gets its own projection Linear -> ReLU -> Dropout to
  `project_dim`; the V projected vectors are stacked (V x project_dim) and their co-occurrence (Gram) matrix
  X Xᵀ (V x V) is flattened and squashed by the paper's power normalisation 2*sigmoid(sigma*x) - 1; that is
  concatenated with the mean of the main model's layer vectors (the paper's "average" of the LLaMA2 layers).
  Choices where the paper's setting does not carry over: the paper projects only its LLaMA2 layers (4096 ->
  1024) and uses BERT/RoBERTa-large pooler outputs (already 1024) as they are; here the extra models' sizes
  differ from the main model's, so every vector is projected. The extra models contribute the mean-pooled last
  layer (`extra_layers`), not BERT's pooler output (sentence-transformers checkpoints such as MiniLM are trained
  for mean pooling). Features are z-scored with train statistics (`standardize`, not in the paper).
- ``concat``: the pooled vectors concatenated.

Both feed the paper's MLP shape: Linear -> ReLU -> Dropout -> Linear (a quarter as wide) -> ReLU -> Dropout ->
Linear to the labels (the paper: 1024 -> 256). The paper's code applies a softmax before its cross-entropy;
here the loss takes the logits.

Runs on rank 0 only: extraction is inference and the classifier is small (other ranks return None at once).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clfbench.engine.decoding.model import load_placed
from clfbench.engine.dev_split import split_held_out
from clfbench.engine.models import resolve_model
from clfbench.storage.paths import feature_cache_dir
from clfbench.engine.context import CONVERTING, TESTING, TRAINING, RunContext
from clfbench.engine.training import stop_if_loss_not_finite
from clfbench.engine.types import ClfbenchError, Example, MethodOutput, Predicted, TaskData

LOG = "llmembed:"
FEATURE_FORMAT = 1  # part of every cache key: bump when the meaning of a cached file changes
POOLING = "mean"
# Files whose content decides the features (weights, architecture, tokenization). Weights are fingerprinted by
# name, size and modification time (hashing gigabytes on every run would cost more than some extractions);
# the small files by content.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
CONTENT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")


# ------------------------------------------------------------------------------------------------- entry


@dataclass(frozen=True)
class Source:
    """One frozen model and the layers read from it."""

    name: str  # as the user wrote it (the run's model, or an extra model)
    path: str  # local folder or hub id
    layers: tuple[int, ...]  # as given (negative from the end)


def run(ctx: RunContext) -> MethodOutput | None:
    if not ctx.is_main:
        return None
    opts = ctx.options
    (task,) = ctx.tasks  # one sequence task with training examples: checked by the worker against the catalog
    device = torch.device(ctx.device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    sources = [Source(ctx.spec.model, ctx.model_path, opts.layer_indices)]
    for name in opts.extra_model_names:
        sources.append(Source(name, resolve_model(name), opts.extra_layer_indices))
    for source in sources:  # before any extraction: a bad index fails the run at once
        check_layers(source)
    progress = Progress(ctx)
    extraction = extract_features(sources, {"train": task.train, "dev": task.dev, "test": task.test}, opts, device,
                                  dtype, progress, gpus=ctx.gpus)

    started = time.perf_counter()
    train_x, train_y, dev_x, dev_y = labelled_features(task, extraction.features, opts.dev_fraction, ctx.seed)
    torch.manual_seed(ctx.seed)
    model = FusionClassifier([tuple(f.shape[1:]) for f in train_x], len(task.labels), fusion=opts.fusion,
                             project_dim=opts.project_dim, hidden_size=opts.hidden_size, dropout=opts.dropout,
                             sigma=opts.sigma)
    if opts.standardize:
        model.fit_standardizer(train_x)
    model.to(device)
    print(f"{LOG} classifier: fusion={opts.fusion}, {len(train_y)} train / {len(dev_y)} dev examples, "
          f"fused features {model.fused_dim}, {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    history = train_classifier(model, train_x, train_y, dev_x, dev_y, opts, ctx.seed, device, ctx, progress)
    ctx.set_phase(TESTING, 0, len(task.test))
    predict_started = time.perf_counter()
    test_logits = predict_logits(model, extraction.features["test"], device, opts.batch_size * 4) if task.test else None
    predict_time = time.perf_counter() - predict_started
    classifier_time = time.perf_counter() - started
    progress.done()

    # The classifier's softmax: each answer's probability, for calibration (ECE, the reliability diagram).
    top = torch.softmax(test_logits.float(), -1).max(-1) if test_logits is not None else None
    predicted, confidences = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    predictions = {ex.id: Predicted(task.labels[p], confidence=c)
                   for ex, p, c in zip(task.test, predicted, confidences)}
    extra = _test_numbers(extraction, model, history, classifier_time, predict_time, len(task.test))
    if len(dev_y):
        extra["best_dev_accuracy"] = history.best_accuracy
    print(f"{LOG} extraction {extraction.time_s:.1f} s, classifier {classifier_time:.1f} s ({history.epochs} epochs, "
          f"best {history.best_epoch}, dev accuracy {max(history.best_accuracy, 0):.4f})", flush=True)
    return MethodOutput(predictions={task.name: predictions}, extra_results={task.name: extra})


def _test_numbers(extraction, model, history, classifier_time: float, predict_time: float, test_size: int
                  ) -> dict[str, float]:
    """The numbers a run stores besides its scores: times, throughputs, what was extracted and trained."""
    extra = {
        "extraction_time_s": extraction.time_s,
        "classifier_time_s": classifier_time,
        "examples_per_s": extraction.texts / extraction.forward_time_s
        if extraction.texts and extraction.forward_time_s > 0 else 0.0,
        "extracted_texts": float(extraction.texts),
        "cached_feature_files": float(extraction.from_cache),
        "fused_dim": float(model.fused_dim),
        "epochs_trained": float(history.epochs),
        "best_epoch": float(history.best_epoch),
    }
    if extraction.texts and extraction.forward_time_s > 0 and test_size:
        # What one test text costs: its share of the measured forward passes, plus the classifier's prediction (the
        # name every method gives it: the plot's cost axis). Features read from the cache measured no forward pass.
        per_text = extraction.forward_time_s / extraction.texts
        extra["test_examples_per_s"] = test_size / (per_text * test_size + predict_time)
    return extra


def labelled_features(task: TaskData, features: dict[str, list[torch.Tensor]], dev_fraction: float, seed: int
                      ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(train features, train labels, dev features, dev labels): dev is the task's dev split, else a seeded share of
    train chosen by row index, so the cached train features serve every seed."""
    label2id = {label: i for i, label in enumerate(task.labels)}
    train_y = torch.tensor([label2id[ex.label] for ex in task.train])
    train_x = features["train"]
    if task.dev:
        return train_x, train_y, features["dev"], torch.tensor([label2id[ex.label] for ex in task.dev])
    keep, held = split_held_out(range(len(task.train)), dev_fraction, seed)
    return [f[keep] for f in train_x], train_y[keep], [f[held] for f in train_x], train_y[held]


class Progress:
    """One progress bar over both phases: texts to extract, then classifier epochs."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.total_texts = 0
        self.texts = 0
        self.epochs_total = int(ctx.options.epochs)
        self.epochs = 0
        self.last_log = 0.0
        self.started = time.perf_counter()

    def add_extraction(self, count: int) -> None:
        self.total_texts += count
        self._show()
        self.ctx.set_phase(CONVERTING, self.texts, self.total_texts)  # texts into features

    def extracted(self, count: int) -> None:
        self.texts += count
        self._show()
        self.ctx.set_phase(CONVERTING, self.texts, self.total_texts)
        now = time.perf_counter()
        if now - self.last_log > 10:
            self.last_log = now
            rate = self.texts / max(now - self.started, 1e-9)
            self.ctx.log_metric(self.texts, "extract_examples_per_s", rate)
            print(f"{LOG} {self.texts}/{self.total_texts} texts extracted ({rate:.1f} texts/s)", flush=True)

    def epoch(self, epoch: int) -> None:
        self.epochs = epoch
        self._show()
        self.ctx.set_phase(TRAINING, epoch, self.epochs_total)

    def done(self) -> None:
        self.epochs = self.epochs_total
        self._show()

    def _show(self) -> None:
        self.ctx.set_progress(self.texts + self.epochs, self.total_texts + self.epochs_total)


# ---------------------------------------------------------------------------------------- extraction


def model_config(path: str) -> dict:
    """The model's config.json as a dict (a local folder, or a hub id through transformers' cache)."""
    folder = Path(path)
    if folder.is_dir():
        try:
            return json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise ClfbenchError(f"cannot read {folder / 'config.json'}: {error}") from None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).to_dict()


def layer_count(config: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config") or {}
    if isinstance(text.get("num_hidden_layers"), int):
        return text["num_hidden_layers"]
    raise ClfbenchError("cannot tell how many layers the model has (no num_hidden_layers in its config)")


def absolute_layers(layers: Sequence[int], n_layers: int, model_name: str) -> tuple[int, ...]:
    """Indices into the n_layers + 1 hidden states (0 = embeddings); a ClfbenchError names one out of range."""
    out = []
    for layer in layers:
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ClfbenchError(f"layer {layer} is out of range for {model_name}, which has {n_layers} layers "
                                f"(use 0..{n_layers}, or -{n_layers + 1}..-1 from the end)")
        out.append(layer if layer >= 0 else n_layers + 1 + layer)
    return tuple(out)


def check_layers(source: Source) -> tuple[int, ...]:
    return absolute_layers(source.layers, layer_count(model_config(source.path)), source.name)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: hidden [B, T, H], attention_mask [B, T] (1 = token, 0 = padding) -> [B, H] in
    fp32. A text with no token at all (cannot happen with a tokenizer's special tokens) pools to zeros."""
    real = attention_mask.bool().unsqueeze(-1)
    # masked_fill, not a product with the mask: a padding state that is not finite must not turn the sum into NaN
    total = hidden.to(torch.float32).masked_fill(~real, 0.0).sum(dim=1)
    return total / real.sum(dim=1).clamp(min=1).to(torch.float32)


class Extractor:
    """A frozen model (`AutoModel`, no LM head) and its tokenizer, padding on the right."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, gpus: Sequence[int] = (),
                 batch_size: int = 32, max_length: int = 128):
        """With several `gpus` (the run's) the model is placed across them for batches of `batch_size` texts of
        `max_length` tokens (the decoding library's placement); `device`, the first GPU, takes the inputs."""
        from transformers import AutoModel, AutoTokenizer

        self.path, self.device = path, device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:  # Llama-style tokenizers: any id will do, the mask hides it
            if self.tokenizer.eos_token is None:
                raise ClfbenchError(f"the tokenizer of {path} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_placed(AutoModel, path, dtype, device, gpus, batch_size, max_length)
        self.model.eval()
        self.n_layers = layer_count(self.model.config.to_dict())

    @torch.no_grad()
    def extract(self, texts: list[str], layers: Sequence[int], max_length: int, batch_size: int,
                on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """[len(texts), len(layers), hidden] fp32: the masked mean of each chosen layer's hidden states.

        Texts are batched by token length (less padding; the order is restored)."""
        indices = absolute_layers(layers, self.n_layers, self.path)
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i], reverse=True)
        hidden_size = None
        out: torch.Tensor | None = None
        for begin in range(0, len(order), batch_size):
            batch = order[begin: begin + batch_size]
            encoding = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                      max_length=max_length, return_tensors="pt").to(self.device)
            outputs = self.model(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"],
                                 output_hidden_states=True)
            states = outputs.hidden_states
            pooled = torch.stack([mean_pool(states[k], encoding["attention_mask"]) for k in indices], dim=1)
            if out is None:
                hidden_size = pooled.shape[-1]
                out = torch.empty(len(texts), len(indices), hidden_size, dtype=torch.float32)
            out[torch.tensor(batch)] = pooled.cpu()
            if on_batch is not None:
                on_batch(len(batch))
        if out is None:
            out = torch.empty(0, len(indices), 0)
        return out


@dataclass
class Extraction:
    features: dict[str, list[torch.Tensor]]  # split -> one [texts, layers, hidden] tensor per source
    texts: int  # texts run through a model (not read from the cache)
    from_cache: int  # feature files read from the cache
    forward_time_s: float  # extraction without model loading: what examples_per_s divides by
    time_s: float  # the whole phase


def _look_up(cache: FeatureCache, sources: list[Source], splits: dict[str, list[Example]], max_length: int,
             dtype: torch.dtype) -> tuple[list[dict[str, str]], list[dict[str, torch.Tensor | None]]]:
    """Per source, the cache key of every non-empty split and its cached features (None: not cached)."""
    keys, found = [], []
    for source in sources:
        keys.append({split: cache.key(source, max_length, dtype, [ex.text for ex in examples])
                     for split, examples in splits.items() if examples})
        found.append({split: cache.load(key, len(splits[split]), len(source.layers))
                      for split, key in keys[-1].items()})
    return keys, found


def _extract_missing(source: Source, keys: dict[str, str], hits: dict[str, torch.Tensor | None],
                     splits: dict[str, list[Example]], opts, device: torch.device, dtype: torch.dtype,
                     cache: FeatureCache, progress: Progress, gpus: Sequence[int] = ()) -> tuple[int, float]:
    """Extract (and cache) the splits `hits` lacks with `source`, filling them in; (texts, seconds of forward)."""
    missing = [split for split, value in hits.items() if value is None]
    if not missing:
        return 0, 0.0
    extractor = Extractor(source.path, device, dtype, gpus, opts.extract_batch_size, opts.max_length)
    extracted, seconds = 0, 0.0
    for split in missing:
        texts = [ex.text for ex in splits[split]]
        print(f"{LOG} extracting {len(texts)} {split} texts with {source.name} (layers "
              f"{','.join(map(str, source.layers))}, max_length {opts.max_length})", flush=True)
        split_started = time.perf_counter()
        hits[split] = extractor.extract(texts, source.layers, opts.max_length, opts.extract_batch_size,
                                        progress.extracted)
        seconds += time.perf_counter() - split_started
        cache.save(keys[split], hits[split], {"model": source.name, "split": split, "n": len(texts)})
        extracted += len(texts)
    return extracted, seconds


def extract_features(sources: list[Source], splits: dict[str, list[Example]], opts, device: torch.device,
                     dtype: torch.dtype, progress: Progress, gpus: Sequence[int] = ()) -> Extraction:
    """Every split's pooled features from every source: from the cache, else extracted and cached."""
    cache = FeatureCache(feature_cache_dir())
    started = time.perf_counter()
    # Look everything up first, so that the progress bar's total is known before the first forward pass.
    keys, found = _look_up(cache, sources, splits, opts.max_length, dtype)
    from_cache = sum(1 for hits in found for value in hits.values() if value is not None)
    progress.add_extraction(sum(len(splits[split]) for hits in found for split, value in hits.items()
                                if value is None))
    features: dict[str, list[torch.Tensor]] = {split: [] for split in splits}
    extracted, forward_time = 0, 0.0
    for source, source_keys, hits in zip(sources, keys, found):
        texts, seconds = _extract_missing(source, source_keys, hits, splits, opts, device, dtype, cache, progress,
                                          gpus)
        extracted, forward_time = extracted + texts, forward_time + seconds
        for split, value in hits.items():
            features[split].append(value)
    elapsed = time.perf_counter() - started
    print(f"{LOG} features ready in {elapsed:.1f} s: {extracted} texts extracted, "
          f"{from_cache} feature file(s) from the cache", flush=True)
    return Extraction(features=features, texts=extracted, from_cache=from_cache, forward_time_s=forward_time,
                      time_s=elapsed)


# ------------------------------------------------------------------------------------- feature cache


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(path: str) -> str:
    """A hash of what decides a model's features: its config and tokenizer files by content, its weight files
    by name, size and modification time. A hub id is fingerprinted through its snapshot in transformers' cache
    (the folder's name is the commit)."""
    folder = Path(path)
    if not folder.is_dir():
        from transformers.utils import cached_file

        config = cached_file(path, "config.json")
        folder = Path(config).parent
    parts = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            continue
        if entry.name in CONTENT_FILES:
            parts.append(f"{entry.name}:{_sha256_file(entry)}")
        elif entry.name.endswith(WEIGHT_SUFFIXES):
            stat = entry.stat()
            parts.append(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    """Order-sensitive hash of a list of texts (length-prefixed, so no two lists collide by concatenation)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class FeatureCache:
    """Pooled features on disk, one file per (model, layers, pooling, max_length, dtype, texts).

    A file is written to a temp file in the same folder and renamed into place (atomic on POSIX), so a killed
    run leaves either no file or a whole one; an unreadable or mismatched file counts as a miss."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fingerprints: dict[str, str] = {}

    def key(self, source: Source, max_length: int, dtype: torch.dtype, texts: Sequence[str]) -> str:
        fingerprint = self._fingerprints.get(source.path)
        if fingerprint is None:
            fingerprint = self._fingerprints[source.path] = model_fingerprint(source.path)
        n_layers = layer_count(model_config(source.path))
        fields = {
            "format": FEATURE_FORMAT,
            "model": str(Path(source.path).resolve()) if Path(source.path).is_dir() else source.path,
            "fingerprint": fingerprint,
            "layers": list(absolute_layers(source.layers, n_layers, source.name)),
            "pooling": POOLING,
            "max_length": max_length,
            "dtype": str(dtype),
            "texts": texts_hash(texts),
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str, n_rows: int, n_layers: int) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            features = stored["features"]
        except Exception as error:  # a file from elsewhere, or a format this code does not read
            print(f"{LOG} ignoring unreadable feature file {path}: {error}", flush=True)
            return None
        if stored.get("key") != key or tuple(features.shape[:2]) != (n_rows, n_layers):
            print(f"{LOG} ignoring feature file {path}: made for other inputs", flush=True)
            return None
        return features

    def save(self, key: str, features: torch.Tensor, info: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as sink:
                torch.save({"key": key, "features": features.contiguous(), "info": info}, sink)
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------------------- classifier


class FusionClassifier(nn.Module):
    """The fused features and the MLP on top. `groups[s] = (layers, hidden)` for source s; group 0 is the run's
    model. Input: one tensor [B, layers, hidden] per source."""

    def __init__(self, groups: list[tuple[int, int]], n_classes: int, fusion: str, project_dim: int,
                 hidden_size: int, dropout: float, sigma: float):
        super().__init__()
        self.groups, self.fusion, self.sigma = [tuple(g) for g in groups], fusion, sigma
        for s, (layers, hidden) in enumerate(self.groups):
            self.register_buffer(f"mean_{s}", torch.zeros(layers, hidden))
            self.register_buffer(f"scale_{s}", torch.ones(layers, hidden))
        if fusion == "paper":
            self.projections = nn.ModuleList(
                nn.Sequential(nn.Linear(hidden, project_dim), nn.ReLU(), nn.Dropout(dropout))
                for layers, hidden in self.groups for _ in range(layers))
            n_vectors = len(self.projections)
            self.fused_dim = n_vectors * n_vectors + self.groups[0][1]
        elif fusion == "concat":
            self.projections = nn.ModuleList()
            self.fused_dim = sum(layers * hidden for layers, hidden in self.groups)
        else:
            raise ClfbenchError(f"unknown fusion {fusion!r} (paper, concat)")
        second = max(1, hidden_size // 4)
        self.head = nn.Sequential(
            nn.Linear(self.fused_dim, hidden_size), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_size, second), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(second, n_classes))

    def fit_standardizer(self, train: list[torch.Tensor]) -> None:
        """Per-dimension z-scores from the training features (a constant dimension keeps scale 1)."""
        for s, features in enumerate(train):
            mean = features.mean(dim=0)
            std = features.std(dim=0, unbiased=False)
            getattr(self, f"mean_{s}").copy_(mean)
            getattr(self, f"scale_{s}").copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def fuse(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, fused_dim] from one [B, layers, hidden] tensor per source."""
        inputs = [(x - getattr(self, f"mean_{s}")) / getattr(self, f"scale_{s}") for s, x in enumerate(inputs)]
        if self.fusion == "concat":
            return torch.cat([x.flatten(1) for x in inputs], dim=1)
        vectors = [x[:, layer] for x in inputs for layer in range(x.shape[1])]
        projected = torch.stack([project(v) for project, v in zip(self.projections, vectors)], dim=1)  # [B, V, P]
        gram = torch.bmm(projected, projected.transpose(1, 2)).flatten(1)  # [B, V*V]
        squashed = 2 * torch.sigmoid(self.sigma * gram) - 1  # the paper's power normalisation
        return torch.cat([squashed, inputs[0].mean(dim=1)], dim=1)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(self.fuse(inputs))


@dataclass
class History:
    epochs: int = 0
    best_epoch: int = 0
    best_accuracy: float = -1.0


def _batch(features: list[torch.Tensor], index: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    return [f[index].to(device) for f in features]


@torch.no_grad()
def predict_logits(model: FusionClassifier, features: list[torch.Tensor], device: torch.device,
                   batch_size: int) -> torch.Tensor:
    model.eval()
    n = features[0].shape[0]
    out = [model(_batch(features, torch.arange(i, min(i + batch_size, n)), device)).float().cpu()
           for i in range(0, n, batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.head[-1].out_features)


def train_classifier(model: FusionClassifier, train_x: list[torch.Tensor], train_y: torch.Tensor,
                     dev_x: list[torch.Tensor], dev_y: torch.Tensor, opts, seed: int, device: torch.device,
                     ctx: RunContext, progress: Progress) -> History:
    """Adam on shuffled mini-batches; after each epoch the dev accuracy, the best epoch's weights are kept
    (the last epoch's when there is no dev set). Logs train_loss, eval_loss and eval_accuracy per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    generator = torch.Generator().manual_seed(seed)
    n = len(train_y)
    history = History()
    best_state = None
    since_best = 0
    step = 0
    for epoch in range(1, opts.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for begin in range(0, n, opts.batch_size):
            index = order[begin: begin + opts.batch_size]
            logits = model(_batch(train_x, index, device))
            loss = F.cross_entropy(logits.float(), train_y[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += float(loss.detach()) * len(index)
            count += len(index)
        ctx.log_metric(step, "train_loss", total / max(count, 1))
        stop_if_loss_not_finite(total / max(count, 1), step)
        history.epochs = epoch
        progress.epoch(epoch)
        shown = f"{LOG} epoch {epoch}/{opts.epochs} train_loss {total / max(count, 1):.4f}"
        if len(dev_y):
            logits = predict_logits(model, dev_x, device, opts.batch_size * 4)
            accuracy = float((logits.argmax(-1) == dev_y).float().mean())
            ctx.log_metric(step, "eval_loss", float(F.cross_entropy(logits, dev_y)))
            ctx.log_metric(step, "eval_accuracy", accuracy)
            shown += f", dev eval_accuracy {accuracy:.4f}"
        print(shown, flush=True)  # what `clfbench logs -f` shows of the classifier's training
        if len(dev_y):
            if accuracy > history.best_accuracy:
                history.best_accuracy, history.best_epoch, since_best = accuracy, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
                if opts.patience and since_best >= opts.patience:
                    print(f"{LOG} early stop after epoch {epoch}: no better dev accuracy for {since_best} epochs",
                          flush=True)
                    break
        else:
            history.best_epoch = epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
