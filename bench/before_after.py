"""One benchmark script, run from two checkouts in turn in one run: did a change move the numbers?

    git worktree add /tmp/before <commit>
    python bench/before_after.py --before /tmp/before --rounds 2 decision_modes -- --n 200 --threads 2 --peer-modes ''
    python bench/before_after.py --before /tmp/before --rounds 2 tui_speed -- --runs 10000 --points 1000000

The shared 2-core machines are noisy, so the two sides alternate (before, after, before, after, ...) and every
number is printed for each round and as the median over rounds, with after / before. A checkout older than the
`clfbench` namespace (top-level `app`, `engine` packages) runs with its own folder first on PYTHONPATH; a newer one
imports the installed (editable) `clfbench`. Accuracy and parse-failure rates must be equal; speeds within noise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def decision_modes_numbers(checkout: Path, extra: list[str], env: dict) -> dict[str, float]:
    """examples/s, accuracy and parse-failure rate per mode, from the script's --json file."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "numbers.json"
        subprocess.run([sys.executable, str(checkout / "bench" / "decision_modes.py"), *extra, "--json", str(out)],
                       cwd=checkout, env=env, check=True)
        data = json.loads(out.read_text())
    numbers = {}
    for mode, values in data["results"].items():
        for key in ("examples_per_s", "accuracy", "parse_failure_rate"):
            if isinstance(values, dict) and key in values:
                numbers[f"{mode} {key}"] = float(values[key])
    return numbers


TUI_LINES = {  # label in bench/tui_speed.py's table -> our name
    r"cold start to first paint \(median of \d+\)\s+([\d.]+) s": "first paint s",
    r"cold start to the newest run painted \(median\)\s+([\d.]+) s": "newest run painted s",
    r"results matrix load \(\d+ rows, thread worker\)\s+([\d.]+) s": "matrix load s",
    r"filter keystroke to repaint, \d+ rows \(median\)\s+([\d.]+) ms": "keystroke ms",
    r"UI-thread CPU per key \(median; load-independent\)\s+([\d.]+) ms": "UI CPU per key ms",
}


def tui_speed_numbers(checkout: Path, extra: list[str], env: dict) -> dict[str, float]:
    """The timings bench/tui_speed.py prints, read from its table."""
    result = subprocess.run([sys.executable, str(checkout / "bench" / "tui_speed.py"), *extra], cwd=checkout,
                            env=env, check=True, capture_output=True, text=True)
    print(result.stdout, flush=True)
    numbers = {}
    for pattern, name in TUI_LINES.items():
        match = re.search(pattern, result.stdout)
        if match:
            numbers[name] = float(match.group(1))
    return numbers


BENCHES = {"decision_modes": decision_modes_numbers, "tui_speed": tui_speed_numbers}


def environment(checkout: Path) -> dict:
    """A checkout from before the `clfbench` namespace imports its top-level `app`, `engine` from its own folder;
    a newer one imports `clfbench`, which must be the installed (editable) checkout."""
    env = dict(os.environ)
    if "package-dir" not in (checkout / "pyproject.toml").read_text():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(checkout), env.get("PYTHONPATH", "")) if p)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--after", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="after --: the bench script's own arguments")
    args = parser.parse_args()
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    measure = BENCHES[args.bench]
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for number in range(args.rounds):
        for side, checkout in sides.items():
            print(f"== round {number + 1}, {side}: {checkout} (load {os.getloadavg()[0]:.2f})", flush=True)
            rounds[side].append(measure(checkout, extra, environment(checkout)))
    names = sorted(set().union(*(r.keys() for side in rounds.values() for r in side)))
    print(f"\n{args.bench} {' '.join(extra)}: {args.rounds} rounds each, alternating\n")
    print("| number | before (each round) | after (each round) | before median | after median | after / before |")
    print("|---|---|---|---|---|---|")
    for name in names:
        before = [r[name] for r in rounds["before"] if name in r]
        after = [r[name] for r in rounds["after"] if name in r]
        if not before or not after:
            continue
        b, a = statistics.median(before), statistics.median(after)
        ratio = f"{a / b:.3f}" if b else ("=" if a == b else "–")
        print(f"| {name} | {' '.join(f'{v:.4g}' for v in before)} | {' '.join(f'{v:.4g}' for v in after)} | "
              f"{b:.4g} | {a:.4g} | {ratio} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
