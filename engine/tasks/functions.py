"""The functions that task and dataset YAML files name: derived columns (``derive: [{function: ...}]``) and label
transforms (``label_transform: ...``). Python only where data cannot say it; a YAML file can name nothing else."""
from __future__ import annotations

import re
from typing import Any, Callable

_SPAN = re.compile(r"\[\s*([^\[\]:\s]+)\s*:([^\[\]]*)\]")


def massive_annot_to_bio(annot_utt: str) -> tuple[list[str], list[str]]:
    """Turn a MASSIVE annotated utterance into whitespace tokens and BIO tags.

    ``"wake me up at [time : five am]"`` -> ``(["wake", "me", "up", "at", "five", "am"],
    ["O", "O", "O", "O", "B-time", "I-time"])``. Raises ValueError on a malformed annotation.
    """
    if not isinstance(annot_utt, str):
        raise ValueError(f"annotation is not a string: {annot_utt!r}")
    tokens: list[str] = []
    tags: list[str] = []

    def plain(chunk: str) -> None:
        if "[" in chunk or "]" in chunk:
            raise ValueError(f"unbalanced brackets in annotation {annot_utt!r}")
        for word in chunk.split():
            tokens.append(word)
            tags.append("O")

    pos = 0
    for m in _SPAN.finditer(annot_utt):
        plain(annot_utt[pos : m.start()])
        words = m.group(2).split()
        if not words:
            raise ValueError(f"empty slot span [{m.group(1)} : ] in annotation {annot_utt!r}")
        for i, word in enumerate(words):
            tokens.append(word)
            tags.append(("B-" if i == 0 else "I-") + m.group(1))
        pos = m.end()
    plain(annot_utt[pos:])
    return tokens, tags


def label_root(label: str) -> str:
    """``talk.religion.misc`` -> ``talk`` (the 20 Newsgroups 7-class task)."""
    return label.split(".", 1)[0]


# name -> function(*input values) -> tuple of output values (one per output column)
DERIVE_FUNCTIONS: dict[str, Callable[..., tuple[Any, ...]]] = {"massive_annot_to_bio": massive_annot_to_bio}
# name -> function(label) -> label (sequence tasks)
LABEL_TRANSFORMS: dict[str, Callable[[str], str]] = {"root": label_root}
