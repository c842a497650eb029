"""Draw the small samples shipped in engine/sample_data from the real data (run once; the output is committed).

    python docs/make_samples.py [--source ../shared/data] [--out engine/sample_data]

Every sampled row is copied byte-for-byte (the original JSON line), and the rows of each file keep the order
they have in the source file. With the same source files the output is identical on every run.

MASSIVE (massive_en/):
  train 600: for each intent (sorted), min(5, its count) random rows; then, for each slot type (sorted) that
        is still missing, one random row containing it; then random rows up to 600.
  dev 100, test 200: random rows among those whose intent, scenario and slot types all occur in the sampled
        train (so every sample task's labels are seen in the sample's train split).
20 Newsgroups (20ng/): only posts shorter than 2,000 characters; 20 random train and 5 random test posts per
  newsgroup.
user_task/: a small CSV user task made from the MASSIVE sample (alarm, calendar and weather intents), with
  renamed columns, to exercise the column mapping of user task YAML files.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

SEED = 20240521
MASSIVE_TRAIN, MASSIVE_DEV, MASSIVE_TEST, MASSIVE_PER_INTENT = 600, 100, 200, 5
NG_MAX_CHARS, NG_TRAIN_PER_LABEL, NG_TEST_PER_LABEL = 2000, 20, 5
USER_SCENARIOS = ("alarm", "calendar", "weather")


def read(path: Path) -> list[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        return [(line.rstrip("\n"), json.loads(line)) for line in f if line.strip()]


def write(path: Path, rows: list[tuple[str, dict]], order: list[tuple[str, dict]]) -> None:
    chosen = {id(r) for r in rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in order:  # keep the source file's order
            if id(r) in chosen:
                f.write(r[0] + "\n")


def slot_types(row: dict) -> set[str]:
    return {t[2:] for t in row["slots"] if t != "O"}


def massive(src: Path, out: Path, rng: random.Random) -> tuple[list[dict], list[dict]]:
    train, dev, test = (read(src / "massive_en" / f"{s}.jsonl") for s in ("train", "dev", "test"))
    chosen: list[tuple[str, dict]] = []
    taken: set[int] = set()

    def take(rows: list[tuple[str, dict]]) -> None:
        for r in rows:
            if id(r) not in taken:
                taken.add(id(r))
                chosen.append(r)

    for intent in sorted({r[1]["intent"] for r in train}):
        rows = [r for r in train if r[1]["intent"] == intent]
        take(rng.sample(rows, min(MASSIVE_PER_INTENT, len(rows))))
    for st in sorted({t for r in train for t in slot_types(r[1])}):
        if not any(st in slot_types(r[1]) for r in chosen):
            take([rng.choice([r for r in train if st in slot_types(r[1]) and id(r) not in taken])])
    rest = [r for r in train if id(r) not in taken]
    take(rng.sample(rest, MASSIVE_TRAIN - len(chosen)))
    write(out / "massive_en" / "train.jsonl", chosen, train)

    intents = {r[1]["intent"] for r in chosen}
    scenarios = {r[1]["scenario"] for r in chosen}
    types = {t for r in chosen for t in slot_types(r[1])}

    def covered(r: tuple[str, dict]) -> bool:
        return r[1]["intent"] in intents and r[1]["scenario"] in scenarios and slot_types(r[1]) <= types

    dev_rows = rng.sample([r for r in dev if covered(r)], MASSIVE_DEV)
    test_rows = rng.sample([r for r in test if covered(r)], MASSIVE_TEST)
    write(out / "massive_en" / "dev.jsonl", dev_rows, dev)
    write(out / "massive_en" / "test.jsonl", test_rows, test)
    order = {id(r): i for i, r in enumerate(test)}
    return [r[1] for r in chosen], [r[1] for r in sorted(test_rows, key=lambda r: order[id(r)])]


def newsgroups(src: Path, out: Path, rng: random.Random) -> None:
    for split, per_label in (("train", NG_TRAIN_PER_LABEL), ("test", NG_TEST_PER_LABEL)):
        rows = read(src / "20ng" / f"{split}.jsonl")
        chosen = []
        for label in sorted({r[1]["label"] for r in rows}):
            short = [r for r in rows if r[1]["label"] == label and len(r[1]["text"]) < NG_MAX_CHARS]
            chosen += rng.sample(short, per_label)
        write(out / "20ng" / f"{split}.jsonl", chosen, rows)


def user_task(out: Path, train: list[dict], test: list[dict]) -> None:
    folder = out / "user_task"
    folder.mkdir(parents=True, exist_ok=True)
    train = [r for r in train if r["scenario"] in USER_SCENARIOS]
    seen = {r["intent"] for r in train}
    test = [r for r in test if r["scenario"] in USER_SCENARIOS and r["intent"] in seen]
    for name, rows in (("train", train), ("test", test)):
        with (folder / f"massive_subset_{name}.csv").open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["uid", "utterance", "intent_name", "scenario_name"])
            for r in rows:
                w.writerow([f"massive-{r['id']}", r["text"], r["intent"], r["scenario"]])


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=repo.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=repo / "engine" / "sample_data")
    args = ap.parse_args()
    rng = random.Random(SEED)
    train, test = massive(args.source, args.out, rng)
    newsgroups(args.source, args.out, rng)
    user_task(args.out, train, test)


if __name__ == "__main__":
    main()
