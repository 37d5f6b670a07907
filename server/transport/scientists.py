"""Who is calling a data scientist's service (Analytics, Jobs): the token in the call's
metadata, checked against the scientists' enrolment (re-read at each call, so an added or
revoked scientist takes effect without a restart)."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc

from fedcore.enrollment import TOKEN_METADATA_KEY, Enrollment, EnrollmentEntry
from fedcore.errors import ConfigError

__all__ = ["Context", "abort", "identify_scientist"]

log = logging.getLogger("fedcore.server")

Context = grpc.aio.ServicerContext[Any, Any]


async def abort(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code`` (``context.abort`` raises; this tells the type checker)."""
    await context.abort(code, details)
    raise AssertionError("unreachable: abort raises")


async def identify_scientist(
    context: Context, scientists: Enrollment, how_to_enrol: str
) -> tuple[str, EnrollmentEntry]:
    """The enrolled scientist whose token the call carries, and their entry; the call is
    aborted (UNAUTHENTICATED, or UNAVAILABLE when the enrolment cannot be read) otherwise.
    ``how_to_enrol`` ends the refusal's text."""
    token = next(
        (
            value.decode() if isinstance(value, bytes) else str(value)
            for key, value in context.invocation_metadata() or ()
            if key == TOKEN_METADATA_KEY
        ),
        None,
    )
    try:
        scientists.reload()
    except ConfigError as exc:
        log.error("cannot read the scientists' enrollment: %s", exc)
        await abort(context, grpc.StatusCode.UNAVAILABLE, "cannot check identities now")
    name = scientists.identify(token) if token else None
    entry = scientists.get(name) if name is not None else None
    if name is None or entry is None:
        await abort(
            context,
            grpc.StatusCode.UNAUTHENTICATED,
            f"no valid data scientist token (x-fedcore-token); get one with {how_to_enrol}",
        )
    return name, entry
