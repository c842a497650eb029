"""Write an SVG of each TUI screen for the docs: `python docs/screenshots.py --db URL_OR_PATH [--run ID]`.

Runs the real app headless (Textual's run_test) on the given store, without starting an engine, and saves
docs/screenshots/<screen>.svg for: runs, run detail (curves, eval, results, config, log, calibration), new run,
help, results matrix, the cost plot of its first column, errors, and with `--compare A,B` the compare screen.
The detail and errors screens show `--run` (default: the newest succeeded run).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clfbench.app.tui.app import ClfbenchApp  # noqa: E402
from clfbench.app.tui.messages import OpenCompare, OpenNewRun  # noqa: E402
from clfbench.storage import queries  # noqa: E402

OUT = ROOT / "docs" / "screenshots"


async def settle(pilot) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause(0.3)


async def shoot(db: str, run_id: int | None, size: tuple[int, int], out: Path,
                compare: tuple[int, int] | None = None) -> list[Path]:
    app = ClfbenchApp(db=db, start_engine=False)
    written = []

    def save(name: str) -> None:
        app.save_screenshot(f"{name}.svg", path=str(out))
        written.append(out / f"{name}.svg")

    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        save("runs")
        if run_id is None:
            done = queries.list_runs(app.store, status="succeeded", limit=1)
            run_id = done[0]["id"] if done else None
        if run_id is not None:
            from clfbench.app.tui.detail import DetailScreen

            await app.push_screen(DetailScreen(app.store, run_id))
            await settle(pilot)
            for key, tab in (("1", "curves"), ("2", "eval"), ("3", "results"), ("4", "config"), ("5", "log"),
                             ("6", "calibration")):
                await pilot.press(key)
                await settle(pilot)
                save(f"detail-{tab}")
            await pilot.press("escape")
            await settle(pilot)
        await pilot.press("question_mark")
        await settle(pilot)
        save("help")
        await pilot.press("escape")
        app.post_message(OpenNewRun())
        await settle(pilot)
        save("new-run")
        await pilot.press("escape")
        await settle(pilot)
        try:
            from clfbench.app.tui.results import ResultsScreen

            await app.push_screen(ResultsScreen(app.store))
            await settle(pilot)
            save("results")
            await pilot.press("f")
            await settle(pilot)
            save("plot")
            await pilot.press("escape")
            app.pop_screen()
        except ImportError:
            print("results screen not installed: skipped", file=sys.stderr)
        if run_id is not None:
            try:
                from clfbench.app.tui.errors import ErrorsScreen

                await app.push_screen(ErrorsScreen(app.store, run_id))
                await settle(pilot)
                save("errors")
            except ImportError:
                print("errors screen not installed: skipped", file=sys.stderr)
        if compare is not None:
            runs = [queries.get_run(app.store, run) for run in compare]
            task = next(t for t in runs[0]["task"].split("+") if t in runs[1]["task"].split("+"))
            app.post_message(OpenCompare(compare[0], compare[1], task))
            await settle(pilot)
            await settle(pilot)
            save("compare")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="store URL, or the path of a SQLite store file")
    parser.add_argument("--run", type=int, default=None, help="run shown in the detail and errors screenshots")
    parser.add_argument("--size", default="100x30", help="terminal size, COLUMNSxROWS")
    parser.add_argument("--compare", default=None, help="two run ids, A,B, for the compare screen")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the SVGs (default docs/screenshots)")
    args = parser.parse_args()
    db = args.db if "://" in args.db else f"sqlite:///{Path(args.db).resolve()}"
    columns, rows = (int(part) for part in args.size.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    compare = tuple(int(part) for part in args.compare.split(",")) if args.compare else None
    for path in asyncio.run(shoot(db, args.run, (columns, rows), args.out.resolve(), compare)):
        print(path)


if __name__ == "__main__":
    main()
