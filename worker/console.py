"""The data owner's console (``fed-worker --console HOST:PORT``): review and decide plan
requests, watch the privacy ledger, search the audit trail, see the current task and the
dataset's public description.

Pages read an :class:`~.console_view.OwnerView`; the one action that writes (approve or deny)
goes through the request queue's ``decide``, like ``fed-worker requests``. Shared machinery
(sign-in, CSRF, headers, charts, serving) is in :mod:`fedcore.console`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from fedcore.console.app import Action, Console, Page
from fedcore.console.auth import Session, Sessions
from fedcore.console.serve import RunningConsole, serve_console
from fedcore.console.settings import ConsoleSettings, allowed_hosts
from fedcore.console.svg import Point, Series, line_chart
from fedcore.errors import ConfigError

from .console_view import OwnerView, StudyLedger

__all__ = ["owner_console", "start_owner_console"]

_TEMPLATES = Path(__file__).parent / "console_templates"
#: Rows of the mock data shown.
_MOCK_LINES = 40
#: Pages that follow a running federation reload themselves this often (seconds; no script).
_REFRESH_S = 5


def _ledger_chart(ledger: StudyLedger) -> object:
    points = tuple(
        Point(p.index, p.epsilon, f"#{p.index} {p.what}: ε={p.epsilon:.3g}") for p in ledger.points
    )
    return line_chart(
        [Series(f"epsilon spent ({ledger.study})", points, "s0")],
        title=f"Study {ledger.study}: epsilon at delta {ledger.delta:g}",
        x_label="charge",
        y_label="epsilon",
        limit=("budget", ledger.budget) if ledger.budget is not None else None,
        show_labels=len(points) <= 12,
    )


def _float(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


class _OwnerPages:
    def __init__(self, view: OwnerView) -> None:
        self.view = view
        self.console: Console | None = None

    def render(self, request: Request, session: Session, template: str, **ctx: Any) -> Response:
        assert self.console is not None
        return self.console.render(request, session, template, **ctx)

    async def overview(self, request: Request, session: Session) -> Response:
        now, requests, ledgers = await asyncio.gather(
            asyncio.to_thread(self.view.now),
            asyncio.to_thread(self.view.requests),
            asyncio.to_thread(self.view.ledgers),
        )
        return self.render(
            request,
            session,
            "owner_overview.html",
            now=now,
            pending=[r for r in requests if r.status == "pending"],
            ledgers=ledgers,
            dataset=self.view.dataset,
            approvals=self.view.queue is not None,
            refresh=_REFRESH_S,
        )

    async def requests(self, request: Request, session: Session) -> Response:
        records = await asyncio.to_thread(self.view.requests)
        return self.render(
            request,
            session,
            "owner_requests.html",
            records=records,
            approvals=self.view.queue is not None,
            refresh=_REFRESH_S,
        )

    async def request(self, request: Request, session: Session) -> Response:
        review = await asyncio.to_thread(self.view.review, str(request.path_params["rid"]))
        if review is None:
            return PlainTextResponse("no such request", 404)
        return self.render(request, session, "owner_request.html", review=review)

    async def decide(
        self, request: Request, session: Session, form: Mapping[str, str], *, approve: bool
    ) -> Response:
        rid = str(request.path_params["rid"])
        try:
            low, high = _float(form.get("lr_low", "")), _float(form.get("lr_high", ""))
            rounds_text = form.get("rounds", "").strip()
            rounds = int(rounds_text) if rounds_text else None
        except ValueError:
            session.flash.append("not a number: nothing was decided")
            return RedirectResponse(f"/requests/{rid}", 303)
        if (low is None) != (high is None):
            session.flash.append("give both ends of the learning-rate range, or neither")
            return RedirectResponse(f"/requests/{rid}", 303)
        try:
            record = await asyncio.to_thread(
                self.view.decide,
                rid,
                approve=approve,
                reason=form.get("reason", "")[:500] if not approve else "",
                lr_range=(low, high) if approve and low is not None and high is not None else None,
                rounds=rounds if approve else None,
            )
        except ConfigError as exc:
            session.flash.append(f"nothing was decided: {exc}")
            return RedirectResponse(f"/requests/{rid}", 303)
        session.flash.append(
            f"request {record.id[:16]} {record.status}"
            + (f": {record.reason}" if record.reason else "")
        )
        return RedirectResponse(f"/requests/{rid}", 303)

    async def approve(
        self, request: Request, session: Session, form: Mapping[str, str]
    ) -> Response:
        return await self.decide(request, session, form, approve=True)

    async def deny(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        return await self.decide(request, session, form, approve=False)

    async def ledger(self, request: Request, session: Session) -> Response:
        ledgers = await asyncio.to_thread(self.view.ledgers)
        return self.render(
            request,
            session,
            "owner_ledger.html",
            ledgers=[(ledger, _ledger_chart(ledger)) for ledger in ledgers],
            budget=self.view.policy.budget,
            refresh=_REFRESH_S,
        )

    async def audit(self, request: Request, session: Session) -> Response:
        query = request.query_params.get("q", "")[:200]
        chain, events = await asyncio.to_thread(self.view.audit, query)
        return self.render(
            request, session, "owner_audit.html", chain=chain, events=events, query=query
        )

    async def dataset(self, request: Request, session: Session) -> Response:
        d = self.view.dataset
        mock = "\n".join(d.mock_csv.splitlines()[:_MOCK_LINES]) if d is not None else ""
        return self.render(request, session, "owner_dataset.html", dataset=d, mock=mock)


def owner_console(settings: ConsoleSettings, view: OwnerView) -> Console:
    """The data owner's console over ``view``."""
    pages = _OwnerPages(view)
    console = Console(
        title=f"data owner · {view.worker.name}",
        sessions=Sessions(settings.password),
        templates=[_TEMPLATES],
        pages=[
            Page("/", pages.overview, "Overview"),
            Page("/requests", pages.requests, "Requests"),
            Page("/requests/{rid}", pages.request),
            Page("/ledger", pages.ledger, "Privacy ledger"),
            Page("/audit", pages.audit, "Audit log"),
            Page("/dataset", pages.dataset, "Dataset"),
        ],
        actions=[
            Action("/requests/{rid}/approve", pages.approve),
            Action("/requests/{rid}/deny", pages.deny),
        ],
        tls=settings.tls,
        hosts=allowed_hosts(settings),
    )
    pages.console = console
    return console


async def start_owner_console(settings: ConsoleSettings, view: OwnerView) -> RunningConsole:
    """Serve the owner's console on the running loop."""
    return await serve_console(owner_console(settings, view).app(), settings)
