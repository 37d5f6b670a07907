"""The coordinator's one call into analytics (kept narrow so the server can be reorganized)."""

from __future__ import annotations

from fedcore.enrollment import Enrollment

from ..state.analytics import AnalyticsSettings
from ..state.registry import WorkerRegistry
from ..transport.service import CoordinatorService
from .frontend import AnalyticsFrontend
from .refusals import RefusalLimiter
from .service import AnalyticsService

__all__ = ["serve_analytics"]


def serve_analytics(
    settings: AnalyticsSettings | None, registry: WorkerRegistry, service: CoordinatorService
) -> AnalyticsService | None:
    """The Analytics service over ``registry``'s silos (None when not configured); the
    workers' analytics messages are routed to it through ``service``."""
    if settings is None:
        return None
    frontend = AnalyticsFrontend(settings, registry)
    service.analytics_handler = frontend.route
    refusals = RefusalLimiter(limit=settings.refusal_limit, window=settings.refusal_window)
    return AnalyticsService(
        frontend, Enrollment(settings.scientists, section="scientists"), refusals
    )
