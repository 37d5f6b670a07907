"""The network console (``fed-server --console HOST:PORT``): connected workers and their
state, jobs with per-round charts of accuracy, loss, epsilon and bytes, each job's log, and
the process's logs.

Pages read a :class:`~.console_view.NetworkView`. The operator signs in with the console's
password and sees everything. On a standing network (``--serve``) a data scientist signs in
with their ``fed-job`` token (:class:`~.console_view.ScientistAccess`) and sees only their
studies' jobs, their states, charts and logs: another study's job answers 404 like one that
does not exist, and the workers and process-log pages are the operator's only (a scientist
learns which silos a job waits on from its own log, as ``fed-job logs`` tells them). The one
action besides signing out is a scientist stopping their own job, as ``fed-job stop`` does.
Shared machinery (sign-in, CSRF, headers, charts, serving) is in :mod:`fedcore.console`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from fedcore.console.app import Action, Console, Page
from fedcore.console.auth import Session, Sessions
from fedcore.console.serve import RunningConsole, serve_console
from fedcore.console.settings import ConsoleSettings, allowed_hosts
from fedcore.console.svg import Point, Series, line_chart

from .console_view import JobSummary, NetworkView, ScientistAccess
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


#: Lines of a job's own log shown (the newest).
_LOG_LINES = 200


@dataclass(frozen=True)
class _Viewer:
    """Who is looking: the operator (``scientist`` None, every study) or a data scientist."""

    scientist: str | None
    studies: frozenset[str] | None


class _NetworkPages:
    def __init__(self, view: NetworkView, scientists: ScientistAccess | None) -> None:
        self.view = view
        self.scientists = scientists
        self.console: Console | None = None

    def render(self, request: Request, session: Session, template: str, **ctx: Any) -> Response:
        assert self.console is not None
        return self.console.render(request, session, template, **ctx)

    def _viewer(self, session: Session) -> _Viewer | None:
        """Who ``session`` is now; None (and signed out) for a scientist no longer enrolled."""
        if session.user is None:
            return _Viewer(None, None)
        studies = self.scientists.studies(session.user) if self.scientists else None
        if studies is None:
            assert self.console is not None
            self.console.sessions.sign_out(session)
            return None
        return _Viewer(session.user, studies)

    def _job(self, viewer: _Viewer, job_id: str) -> JobSummary | None:
        """Job ``job_id`` if ``viewer`` may see it (another study's is as absent as none)."""
        job = self.view.job(job_id)
        if job is None or (viewer.studies is not None and job.study not in viewer.studies):
            return None
        return job

    async def overview(self, request: Request, session: Session) -> Response:
        viewer = self._viewer(session)
        if viewer is None:
            return RedirectResponse("/login", 303)
        return self.render(
            request,
            session,
            "network_overview.html",
            jobs=self.view.jobs(viewer.studies),
            workers=self.view.workers() if viewer.scientist is None else [],
            connected=len(self.view.workers()),
            viewer=viewer,
            refresh=_REFRESH_S,
        )

    async def job(self, request: Request, session: Session) -> Response:
        viewer = self._viewer(session)
        if viewer is None:
            return RedirectResponse("/login", 303)
        job_id = str(request.path_params["job"])
        job = self._job(viewer, job_id)
        rows = self.view.job_rounds(job_id) if job is not None else None
        if rows is None or job is None:
            return PlainTextResponse("no such job", 404)
        return self.render(
            request,
            session,
            "network_job.html",
            job=job,
            rows=list(reversed(rows[-_TABLE_ROWS:])),
            charts=round_charts(rows),
            log=self.view.job_log(job_id)[-_LOG_LINES:],
            can_stop=viewer.scientist is not None
            and viewer.scientist == job.scientist
            and not job.final,
            refresh=_REFRESH_S,
        )

    async def stop(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        viewer = self._viewer(session)
        if viewer is None:
            return PlainTextResponse("sign in first", 403)
        job_id = str(request.path_params["job"])
        job = self._job(viewer, job_id)
        if job is None:
            return PlainTextResponse("no such job", 404)
        if self.scientists is None or viewer.scientist is None or viewer.scientist != job.scientist:
            # Only the job's own scientist stops it here: the operator holds no scientist's
            # token (fed-job has no stop for them either); colleagues use `fed-job stop`.
            return PlainTextResponse(
                f"refused: only {job.scientist or 'its scientist'}, who submitted job "
                f"{job.id}, stops it from the console",
                403,
            )
        if not job.final:
            self.scientists.stop(job_id, viewer.scientist)
            session.flash.append(f"stop requested: job {job_id} ends at its next round boundary")
        return RedirectResponse(f"/jobs/{job_id}", 303)

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


def network_console(
    settings: ConsoleSettings,
    view: NetworkView,
    *,
    title: str,
    scientists: ScientistAccess | None = None,
) -> Console:
    """The network console over ``view``; with ``scientists``, data scientists sign in too."""
    pages = _NetworkPages(view, scientists)
    console = Console(
        title=f"network · {title}",
        sessions=Sessions(
            settings.password, identify=scientists.identify if scientists is not None else None
        ),
        templates=[_TEMPLATES],
        pages=[
            Page("/", pages.overview, "Overview"),
            Page("/jobs/{job}", pages.job),
            Page("/workers", pages.workers, "Workers", operator_only=True),
            Page("/logs", pages.logs, "Logs", operator_only=True),
        ],
        actions=[Action("/jobs/{job}/stop", pages.stop)] if scientists is not None else [],
        tls=settings.tls,
        hosts=allowed_hosts(settings),
        sign_in_label="Password or data scientist token" if scientists is not None else "Password",
    )
    pages.console = console
    return console


async def start_network_console(
    settings: ConsoleSettings,
    view: NetworkView,
    *,
    title: str,
    scientists: ScientistAccess | None = None,
) -> RunningConsole:
    """Serve the network console on the running loop."""
    console = network_console(settings, view, title=title, scientists=scientists)
    return await serve_console(console.app(), settings)
