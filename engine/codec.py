"""The model inputs of the head-training methods (`encoder-finetune`, `ls-llama`, `ls-unllama`): rows that pair
the examples of joint tasks, and the codec that tokenises them.

- `align_rows`: the examples of one split of every task paired by id (joint tasks come from one dataset), with
  the model input: the text, or the words of the token task when there is one;
- `Codec`: tokenises texts, or word lists (`is_split_into_words=True`) when a head labels words; batches are
  padded to their longest input and cut at `max_length`;
- first sub-word alignment: only a word's first sub-word carries its tag (`align_labels`), a word's predicted
  tag is read there (`word_tags`), and words that `max_length` cuts off entirely are predicted "O" and counted
  (`cut_words`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from clfbench.engine.types import ClfbenchError, Example, TaskData

IGNORE_INDEX = -100  # cross-entropy skips these positions (special tokens, non-first sub-words, padding)
OUTSIDE = "O"


@dataclass(frozen=True)
class Row:
    """One utterance with its example of every task (same order as the run's tasks) and the model input:
    the text, or the words (a tuple) when the run has a token head."""

    id: str
    inputs: str | tuple[str, ...]
    examples: tuple[Example, ...]


def _words(example: Example) -> list[str]:
    return list(example.tokens) if example.tokens is not None else example.text.split()


def _not_paired(method: str, split: str, example_id: str, task: str, other: str) -> ClfbenchError:
    return ClfbenchError(f"{method}: {split} example id {example_id!r} of {task} is not in {other}; "
                         f"joint tasks must have the same examples (one dataset)")


def _partners(tasks: list[TaskData], split: str, first: Example, others: list[dict[str, Example]],
              method: str) -> list[Example]:
    """`first` and its example in every other task; a ClfbenchError when one is missing or has other words."""
    group = [first]
    for task, by_id in zip(tasks[1:], others):
        partner = by_id.get(first.id)
        if partner is None:
            raise _not_paired(method, split, first.id, tasks[0].name, task.name)
        if _words(partner) != _words(first):
            raise ClfbenchError(f"{method}: {split} example id {first.id!r} has different text in "
                                f"{tasks[0].name} and {task.name}")
        group.append(partner)
    return group


def align_rows(tasks: list[TaskData], split: str, word_source: int | None = None, *,
               method: str = "encoder-finetune") -> list[Row]:
    """The examples of `split` of every task paired by id, in the first task's order.

    Joint tasks come from one dataset, so every id is in every task and the utterances agree word for word;
    otherwise a ClfbenchError (prefixed with `method`, the only joint method by default) names the first id
    without a partner (or whose words differ). `word_source`: the index of the task whose words are the model
    input (a token task), None for the text.
    """
    lists = [list(getattr(task, split)) for task in tasks]
    others = [{ex.id: ex for ex in examples} for examples in lists[1:]]
    rows = []
    for first in lists[0]:
        group = _partners(tasks, split, first, others, method)
        inputs = first.text if word_source is None else tuple(_words(group[word_source]))
        rows.append(Row(id=first.id, inputs=inputs, examples=tuple(group)))
    known = {ex.id for ex in lists[0]}
    for task, examples in zip(tasks[1:], lists[1:]):
        for ex in examples:
            if ex.id not in known:
                raise _not_paired(method, split, ex.id, task.name, tasks[0].name)
    return rows


class Codec:
    """Tokenises model inputs: texts, or word lists (`is_split_into_words=True`) when the run has a token
    head. Batches are padded to their longest input (dynamic padding) and cut at `max_length`."""

    def __init__(self, tokenizer, words: bool, max_length: int):
        self.tokenizer, self.words, self.max_length = tokenizer, words, max_length

    def encode(self, inputs: Sequence[str | tuple[str, ...]], padding: bool = True, tensors: bool = True):
        batch = [list(item) for item in inputs] if self.words else list(inputs)
        return self.tokenizer(batch, is_split_into_words=self.words, padding=padding, truncation=True,
                              max_length=self.max_length, return_tensors="pt" if tensors else None)

    def length_sorted_batches(self, rows: list[Row], batch_size: int) -> list[list[int]]:
        """Indices of `rows` in batches of similar length (less padding); order restored by the caller."""
        if not rows:
            return []
        lengths = [len(ids) for ids in self.encode([r.inputs for r in rows], padding=False, tensors=False)["input_ids"]]
        order = sorted(range(len(rows)), key=lambda i: lengths[i])
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def truncated_words(self, rows: list[Row]) -> list[int]:
        """Per row, how many of its words `max_length` cuts off entirely (0 without a token head)."""
        if not self.words or not rows:
            return [0] * len(rows)
        encoding = self.encode([r.inputs for r in rows], padding=False, tensors=False)
        return [cut_words(encoding.word_ids(b), len(row.inputs), len(encoding["input_ids"][b]), self.max_length)
                for b, row in enumerate(rows)]


def first_subword_positions(word_ids: Sequence[int | None]) -> dict[int, int]:
    """{word index: position of its first sub-word} from a fast tokenizer's `word_ids()`."""
    first: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is not None and word not in first:
            first[word] = position
    return first


def align_labels(word_ids: Sequence[int | None], tags: Sequence[str], label2id: dict[str, int]) -> list[int]:
    """Token-level targets: the word's tag id on its first sub-word, IGNORE_INDEX everywhere else (special
    tokens, later sub-words, padding, and nothing for words cut off by truncation)."""
    labels = [IGNORE_INDEX] * len(word_ids)
    for word, position in first_subword_positions(word_ids).items():
        labels[position] = label2id[tags[word]]
    return labels


def word_tags(word_ids: Sequence[int | None], n_words: int, position_tags: Sequence[str]) -> list[str]:
    """One tag per word, read at its first sub-word; a word with no sub-word left (cut off) gets "O"."""
    first = first_subword_positions(word_ids)
    return [position_tags[first[w]] if w in first else OUTSIDE for w in range(n_words)]


def cut_words(word_ids: Sequence[int | None], n_words: int, length: int, max_length: int) -> int:
    """Words after the last one that kept a sub-word, when the encoding was cut at max_length."""
    if length < max_length:
        return 0
    present = [w for w in word_ids if w is not None]
    return n_words - (max(present) + 1 if present else 0)
