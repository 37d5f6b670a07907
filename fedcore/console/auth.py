"""Sign-in, sessions and CSRF tokens, kept in memory (a restart signs everyone out).

Every visitor gets a session (a random id in an ``HttpOnly``, ``SameSite=Strict`` cookie) and a
CSRF token bound to it; every form carries the token and every POST is refused without it, the
sign-in form included (no login CSRF). Signing in checks the owner's secret in constant time
and issues a *new* session id (no session fixation). Failed sign-ins are throttled per client
address, so one guesser (a scientist trying tokens, say) cannot lock the operator out from
another address; a ceiling across all addresses bounds guessing from many.

A console may also let token holders sign in (the network console's data scientists): the
same field takes a token, which ``identify`` checks (in constant time, against every enrolled
token); the session then belongs to that holder (:attr:`Session.user`), and the console's pages
decide what the holder may see.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["SIGN_IN_FAILURES", "SIGN_IN_FAILURES_ALL", "Session", "Sessions"]

#: Failed sign-ins allowed per minute from one client address before that address's attempts
#: are refused for the rest of the minute.
SIGN_IN_FAILURES = 5
#: Failed sign-ins allowed per minute from all addresses together before every attempt is
#: refused: many addresses guessing at once still get few guesses.
SIGN_IN_FAILURES_ALL = 50
_WINDOW_S = 60.0
#: Client addresses whose failures are remembered at most (the least recent is forgotten):
#: a visitor cycling addresses cannot grow the process's memory without bound.
_MAX_ADDRESSES = 4096


class _FailureWindow:
    """Failed attempts in the last minute, overall and per client address."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._all: deque[float] = deque()
        self._by_address: OrderedDict[str, deque[float]] = OrderedDict()

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] < now - _WINDOW_S:
            times.popleft()

    def throttled(self, address: str) -> bool:
        now = self._clock()
        self._expire(self._all, now)
        if len(self._all) >= SIGN_IN_FAILURES_ALL:
            return True
        times = self._by_address.get(address)
        if times is None:
            return False
        self._expire(times, now)
        if not times:
            del self._by_address[address]
            return False
        return len(times) >= SIGN_IN_FAILURES

    def add(self, address: str) -> None:
        now = self._clock()
        self._all.append(now)
        times = self._by_address.setdefault(address, deque())
        times.append(now)
        self._by_address.move_to_end(address)
        while len(self._by_address) > _MAX_ADDRESSES:
            self._by_address.popitem(last=False)


@dataclass
class Session:
    """One browser's session."""

    id: str
    csrf: str
    expires: float
    signed_in: bool = False
    #: the token holder signed in (None: the holder of the console's own secret)
    user: str | None = None
    #: a message shown once on the next page (after an action redirects)
    flash: list[str] = field(default_factory=list)

    def csrf_ok(self, token: str) -> bool:
        return hmac.compare_digest(self.csrf.encode(), token.encode())


class Sessions:
    """The console's sessions.

    Args:
        password: the secret that signs a person in.
        ttl_s: a session's lifetime (signed in or not), from its last use.
        max_sessions: sessions kept at most (the oldest is dropped): anonymous visitors cannot
            grow the process's memory without bound.
        clock: monotonic seconds (injected by tests).
        identify: the name of the holder of a token, or None (None: only ``password`` signs
            in). It must compare in constant time.
    """

    def __init__(
        self,
        password: str,
        *,
        ttl_s: float = 8 * 3600.0,
        max_sessions: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        identify: Callable[[str], str | None] | None = None,
    ) -> None:
        self._password = password.encode()
        self._ttl = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._identify = identify
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._failures = _FailureWindow(clock)

    def get(self, sid: str | None) -> Session | None:
        """The live session ``sid`` (its lifetime renewed), or None."""
        if not sid:
            return None
        session = self._sessions.get(sid)
        now = self._clock()
        if session is None or session.expires < now:
            self._sessions.pop(sid, None)
            return None
        session.expires = now + self._ttl
        self._sessions.move_to_end(sid)
        return session

    def new(self, *, signed_in: bool = False, user: str | None = None) -> Session:
        session = Session(
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            self._clock() + self._ttl,
            signed_in,
            user,
        )
        self._sessions[session.id] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session

    def throttled(self, address: str) -> bool:
        """Too many failed sign-ins in the last minute from ``address`` (the client's), or
        from all addresses: refuse its attempts for now."""
        return self._failures.throttled(address)

    def sign_in(self, session: Session, secret: str, address: str) -> Session | None:
        """A new signed-in session replacing ``session`` if ``secret`` is the console's secret
        or (with ``identify``) a token holder's; ``address`` is the client's (throttling)."""
        if self.throttled(address):
            return None
        owner = hmac.compare_digest(self._password, secret.encode())
        # Both checks run whatever the first says: the time taken tells nothing of which.
        user = self._identify(secret) if self._identify is not None and secret else None
        if not owner and user is None:
            self._failures.add(address)
            return None
        self._sessions.pop(session.id, None)
        return self.new(signed_in=True, user=None if owner else user)

    def sign_out(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
