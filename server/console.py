"""The network console (``fed-server --console HOST:PORT``): connected workers and their
state, jobs with per-round charts of accuracy, loss, epsilon and bytes, and the logs.

Pages read a :class:`~.console_view.NetworkView` and change nothing: the console has no
actions but signing out. Shared machinery (sign-in, CSRF, headers, charts, serving) is in
:mod:`fedcore.console`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from fedcore.console.app import Console, Page
from fedcore.console.auth import Session, Sessions
from fedcore.console.serve import RunningConsole, serve_console
from fedcore.console.settings import ConsoleSettings, allowed_hosts
from fedcore.console.svg import Point, Series, line_chart

from .console_view import NetworkView
from .reporting.metrics import RoundMetrics

__all__ = ["network_console", "round_charts", "start_network_console"]

_TEMPLATES = Path(__file__).parent / "console_templates"
_REFRESH_S = 5
#: Rounds listed in a job's table (the charts plot them all).
_TABLE_ROWS = 20


def _series(
    name: str, css: str, rows: list[RoundMetrics], value: Callable[[RoundMetrics], float | None]
) -> Series:
    points = ((r.round, value(r)) for r in rows)
    return Series(name, tuple(Point(x, float(y)) for x, y in points if y is not None), css)


def round_charts(rows: list[RoundMetrics]) -> list[Markup]:
    """Accuracy, loss, epsilon and bytes per round, as SVG charts."""
    charts = [
        line_chart(
            [_series("test accuracy", "s0", rows, lambda r: r.test_accuracy)],
            title="Accuracy",
            x_label="round",
            y_label="accuracy",
        ),
        line_chart(
            [
                _series("test loss", "s0", rows, lambda r: r.test_loss),
                _series("train loss", "s1", rows, lambda r: r.train.get("loss")),
            ],
            title="Loss",
            x_label="round",
            y_label="loss",
        ),
        line_chart(
            [
                _series("sent MB", "s0", rows, lambda r: r.bytes_sent / 1e6),
                _series("received MB", "s1", rows, lambda r: r.bytes_received / 1e6),
            ],
            title="Bytes per round",
            x_label="round",
            y_label="MB",
        ),
        line_chart(
            [_series("epsilon", "s3", rows, lambda r: r.epsilon)],
            title="Client-level epsilon spent",
            x_label="round",
            y_label="epsilon",
            empty="no client-level epsilon reported",
        ),
    ]
    return charts


class _NetworkPages:
    def __init__(self, view: NetworkView) -> None:
        self.view = view
        self.console: Console | None = None

    def render(self, request: Request, session: Session, template: str, **ctx: Any) -> Response:
        assert self.console is not None
        return self.console.render(request, session, template, **ctx)

    async def overview(self, request: Request, session: Session) -> Response:
        return self.render(
            request,
            session,
            "network_overview.html",
            jobs=self.view.jobs(),
            workers=self.view.workers(),
            refresh=_REFRESH_S,
        )

    async def job(self, request: Request, session: Session) -> Response:
        job_id = str(request.path_params["job"])
        rows = self.view.job_rounds(job_id)
        job = next((j for j in self.view.jobs() if j.id == job_id), None)
        if rows is None or job is None:
            return PlainTextResponse("no such job", 404)
        return self.render(
            request,
            session,
            "network_job.html",
            job=job,
            rows=list(reversed(rows[-_TABLE_ROWS:])),
            charts=round_charts(rows),
            refresh=_REFRESH_S,
        )

    async def workers(self, request: Request, session: Session) -> Response:
        return self.render(
            request,
            session,
            "network_workers.html",
            workers=self.view.workers(),
            refresh=_REFRESH_S,
        )

    async def logs(self, request: Request, session: Session) -> Response:
        query = request.query_params.get("q", "")[:200]
        return self.render(
            request, session, "network_logs.html", lines=self.view.logs(query), query=query
        )


def network_console(settings: ConsoleSettings, view: NetworkView, *, title: str) -> Console:
    """The network console over ``view``."""
    pages = _NetworkPages(view)
    console = Console(
        title=f"network · {title}",
        sessions=Sessions(settings.password),
        templates=[_TEMPLATES],
        pages=[
            Page("/", pages.overview, "Overview"),
            Page("/jobs/{job}", pages.job),
            Page("/workers", pages.workers, "Workers"),
            Page("/logs", pages.logs, "Logs"),
        ],
        actions=[],
        tls=settings.tls,
        hosts=allowed_hosts(settings),
    )
    pages.console = console
    return console


async def start_network_console(
    settings: ConsoleSettings, view: NetworkView, *, title: str
) -> RunningConsole:
    """Serve the network console on the running loop."""
    return await serve_console(network_console(settings, view, title=title).app(), settings)
