"""A console as a Starlette app: pages behind sign-in, actions behind a CSRF token.

A console declares :class:`Page` s (GET, shown in the navigation when named) and
:class:`Action` s (POST); :class:`Console` wraps each so that

* nothing but the sign-in page and the stylesheet answers without a signed-in session;
* every POST carries the session's CSRF token in its form, or is refused (403) before the
  action runs; forms are read up to :data:`MAX_FORM_BYTES`;
* templates autoescape everything (plan names, worker names and dataset descriptions are
  hostile input);
* every response carries a strict Content-Security-Policy (:mod:`.headers`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from .auth import Session, Sessions
from .headers import SecurityHeaders

__all__ = ["MAX_FORM_BYTES", "Action", "Console", "Page"]

#: The largest form a console reads (a deny reason is the longest field).
MAX_FORM_BYTES = 64 * 1024
_HERE = Path(__file__).parent
_CSS = (_HERE / "static" / "console.css").read_text(encoding="utf-8")

PageHandler = Callable[[Request, Session], Awaitable[Response]]
ActionHandler = Callable[[Request, Session, Mapping[str, str]], Awaitable[Response]]


@dataclass(frozen=True)
class Page:
    """A GET page; ``label``: its entry in the navigation (None: not listed).

    ``operator_only``: only for the holder of the console's own secret; a token holder
    (:attr:`~.auth.Session.user`) neither sees it listed nor reaches it (404, as for a page
    that does not exist).
    """

    path: str
    handler: PageHandler
    label: str | None = None
    operator_only: bool = False


@dataclass(frozen=True)
class Action:
    """A POST action; it answers with a redirect (post/redirect/get)."""

    path: str
    handler: ActionHandler


def _clock(seconds: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS`` (``-`` for None)."""
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


class _FormTooLarge(Exception):
    pass


async def _read_form(request: Request) -> dict[str, str]:
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_FORM_BYTES:
            raise _FormTooLarge
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def _posted_form(request: Request, session: Session) -> dict[str, str] | Response:
    """The posted form when it carries ``session``'s CSRF token; else the refusal to send."""
    try:
        form = await _read_form(request)
    except _FormTooLarge:
        return PlainTextResponse("form too large", 413)
    if not session.csrf_ok(form.get("csrf", "")):
        return PlainTextResponse("refused: missing or wrong CSRF token", 403)
    return form


class Console:
    """One console: its title, pages, actions and templates.

    Args:
        title: shown in every page's header.
        sessions: who is signed in.
        templates: folders of this console's own templates (the shared ``base.html`` and
            ``login.html`` come from this package).
        pages / actions: what it serves.
        tls: served over HTTPS (cookies are then ``Secure``, HSTS is sent).
        hosts: the ``Host`` names accepted (DNS rebinding); None: any.
        sign_in_label: what the sign-in field asks for (a console whose ``sessions`` also
            take tokens says so).
    """

    def __init__(
        self,
        *,
        title: str,
        sessions: Sessions,
        templates: Sequence[Path],
        pages: Sequence[Page],
        actions: Sequence[Action],
        tls: bool,
        hosts: Sequence[str] | None = None,
        sign_in_label: str = "Password",
    ) -> None:
        self.title = title
        self.sign_in_label = sign_in_label
        self.sessions = sessions
        self.tls = tls
        self.hosts = hosts
        # A random cookie name per process: two consoles on one host (cookies ignore the
        # port) never overwrite each other's session.
        self.cookie = f"fedcore_console_{secrets.token_hex(4)}"
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([*map(str, templates), str(_HERE / "templates")]),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["clock"] = _clock
        self.pages = list(pages)
        self.actions = list(actions)

    # ------------------------------------------------------------------ responses

    def render(
        self,
        request: Request,
        session: Session,
        template: str,
        *,
        status_code: int = 200,
        **context: Any,
    ) -> Response:
        """``template`` with the shared context (title, navigation, CSRF token, messages)."""
        flash, session.flash = session.flash, []
        html = self.env.get_template(template).render(
            console_title=self.title,
            nav=[
                (p.path, p.label)
                for p in self.pages
                if p.label and not (p.operator_only and session.user is not None)
            ],
            path=request.url.path,
            csrf=session.csrf,
            signed_in=session.signed_in,
            user=session.user,
            sign_in_label=self.sign_in_label,
            flash=flash,
            **context,
        )
        return self._with_cookie(HTMLResponse(html, status_code=status_code), session)

    def _with_cookie(self, response: Response, session: Session) -> Response:
        response.set_cookie(
            self.cookie,
            session.id,
            httponly=True,
            samesite="strict",
            secure=self.tls,
            path="/",
        )
        return response

    def _session(self, request: Request) -> Session:
        return self.sessions.get(request.cookies.get(self.cookie)) or self.sessions.new()

    # ------------------------------------------------------------------ wrappers

    def _page(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            if not session.signed_in:
                return self._with_cookie(RedirectResponse("/login", 303), session)
            if page.operator_only and session.user is not None:
                return PlainTextResponse("not found", 404)
            return await page.handler(request, session)

        return endpoint

    def _action(self, action: Action) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self.sessions.get(request.cookies.get(self.cookie))
            if session is None or not session.signed_in:
                return PlainTextResponse("sign in first", 403)
            form = await _posted_form(request, session)
            if isinstance(form, Response):
                return form
            return await action.handler(request, session, form)

        return endpoint

    # ------------------------------------------------------------------ sign-in

    async def _login_page(self, request: Request) -> Response:
        session = self._session(request)
        if session.signed_in:
            return RedirectResponse("/", 303)
        return self.render(request, session, "login.html", error="")

    async def _login(self, request: Request) -> Response:
        session = self._session(request)
        form = await _posted_form(request, session)
        if isinstance(form, Response):
            return form
        # Behind a reverse proxy every client has the proxy's address: the throttle is then
        # one for all, as the ceiling is.
        address = request.client.host if request.client is not None else ""
        if self.sessions.throttled(address):
            return self.render(
                request,
                session,
                "login.html",
                status_code=429,
                error="too many failed attempts: wait a minute",
            )
        signed = self.sessions.sign_in(session, form.get("password", ""), address)
        if signed is None:
            return self.render(
                request,
                session,
                "login.html",
                status_code=403,
                error=f"wrong {self.sign_in_label.lower()}",
            )
        return self._with_cookie(RedirectResponse("/", 303), signed)

    async def _logout(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(self.cookie))
        if session is not None:
            form = await _posted_form(request, session)
            if isinstance(form, Response):
                return form
            self.sessions.sign_out(session)
        return RedirectResponse("/login", 303)

    @staticmethod
    async def _css(request: Request) -> Response:
        return Response(_CSS, media_type="text/css")

    # ------------------------------------------------------------------ the app

    def app(self) -> Starlette:
        routes = [
            Route("/login", self._login_page, methods=["GET"]),
            Route("/login", self._login, methods=["POST"]),
            Route("/logout", self._logout, methods=["POST"]),
            Route("/static/console.css", self._css, methods=["GET"]),
        ]
        routes += [Route(p.path, self._page(p), methods=["GET"]) for p in self.pages]
        routes += [Route(a.path, self._action(a), methods=["POST"]) for a in self.actions]
        middleware = [Middleware(SecurityHeaders, tls=self.tls)]
        if self.hosts is not None:
            middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(self.hosts)))
        return Starlette(routes=routes, middleware=middleware)
