"""Holding out a dev slice of the training rows when a task has no dev split: one seeded rule for every method.

`held_out_indices(n, dev_fraction, seed)` picks the rows; `split_dev` (a task's examples) and `split_dev_rows`
(any list of rows: paired rows of joint tasks, prompt items) apply it, and `llmembed` applies it to the row
indices of its cached feature tensors. The rows depend only on (n, dev_fraction, seed), so a retried run, and
every task of a joint run, holds out the same rows.
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

from clfbench.engine.types import Example, TaskData

T = TypeVar("T")


def held_out_indices(n: int, dev_fraction: float, seed: int) -> list[int]:
    """The indices (ascending) of the `dev_fraction` of n rows held out with `seed`; at least one from 10 rows
    on when the fraction is not 0."""
    n_dev = int(round(n * dev_fraction))
    if dev_fraction > 0 and n_dev == 0 and n >= 10:
        n_dev = 1
    return sorted(random.Random(seed).sample(range(n), n_dev)) if n_dev else []


def split_held_out(rows: Sequence[T], dev_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(kept, held out) of `rows`, each in the rows' order."""
    held = set(held_out_indices(len(rows), dev_fraction, seed))
    return ([row for i, row in enumerate(rows) if i not in held], [row for i, row in enumerate(rows) if i in held])


def split_dev_rows(train: list[T], dev: list[T], dev_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, dev): `dev` when there is one, else `dev_fraction` of `train` held out (seeded). On paired rows
    the same rows are held out for every task of a joint run."""
    if dev:
        return train, dev
    return split_held_out(train, dev_fraction, seed)


def split_dev(task: TaskData, dev_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, dev): the task's dev split when it has one, else `dev_fraction` of train held out (seeded)."""
    return split_dev_rows(list(task.train), list(task.dev), dev_fraction, seed)
