"""The store failing or fed bad numbers: NaN/inf metric points, a diverged loss, refused option values (issue 16)."""
from __future__ import annotations

import math

from clfbench.app.tui.detail import DetailScreen
from clfbench.storage import queries, queue
from clfbench.storage.db import open_store
from tests.test_tui import SUCCEEDED_ENCODER, make_app, run_app, seeded, select_run, settle  # noqa: F401


def test_the_detail_charts_a_loss_that_became_nan_without_crashing(seeded):  # noqa: F811
    store = open_store(seeded)
    attempt = queries.get_run(store, SUCCEEDED_ENCODER)["attempt"]
    queue.add_metric_points(store, SUCCEEDED_ENCODER, attempt, [(1000, "train_loss", float("nan"), 1.0),
                                                                (1001, "train_loss", float("inf"), 2.0)])

    async def scenario(pilot):
        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("enter")
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, DetailScreen)
        assert math.isnan(screen.points["train_loss"][-2][1])
        assert "train_loss (not finite at step 1000)" in screen.query_one("#loss-plot").render().plain

    run_app(make_app(seeded), scenario)
