"""The new-run form asks before queueing a spec that a queued, running or succeeded run already has (the CLI's
--allow-duplicate): a copy is a second run of the same seed, which the results matrix counts once."""
from __future__ import annotations

from textual.widgets import Static

from clfbench.app.tui.dialogs import ConfirmScreen
from clfbench.app.tui.new_run import NewRunScreen
from clfbench.app.tui.runs import RunsScreen
from clfbench.storage import queries
from tests.conftest import SAMPLES
from tests.test_tui import fill, make_app, run_app, until
from tests.tui_seed import seed_store


async def fill_tiny_bert_run(pilot) -> None:
    await pilot.press("n")
    await until(pilot, lambda: isinstance(pilot.app.screen, NewRunScreen), what="the new-run form")
    await fill(pilot, "field-model", "tiny-bert")
    await fill(pilot, "field-task", "massive-intent")
    await fill(pilot, "field-data_dir", str(SAMPLES))
    await fill(pilot, "option-epochs", "1")


def test_the_form_asks_before_queueing_a_spec_that_is_queued_already(home, tmp_path):
    def tiny_bert_runs(app) -> list[dict]:
        return [r for r in queries.list_runs(app.store) if r["model"] == "tiny-bert"]

    async def scenario(pilot):
        app = pilot.app
        await fill_tiny_bert_run(pilot)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen), what="the first run queued")
        assert len(tiny_bert_runs(app)) == 1

        await fill_tiny_bert_run(pilot)  # the same spec again
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the duplicate question")
        question = str(app.screen.query_one("#question", Static).render())
        assert "same spec" in question and f"run {tiny_bert_runs(app)[0]['id']}" in question
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, NewRunScreen), what="the form back after n")
        assert "not queued" in str(app.screen.query_one("#summary", Static).render())
        assert len(tiny_bert_runs(app)) == 1  # n queued nothing

        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the question again")
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen), what="the copy queued after y")
        runs = tiny_bert_runs(app)
        assert len(runs) == 2 and runs[0]["spec_hash"] == runs[1]["spec_hash"]

    run_app(make_app(seed_store(tmp_path / "clfbench.db")), scenario)
