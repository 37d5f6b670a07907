"""The coordinator's side of federated analytics: the data scientists' gRPC service and the
rounds that answer their queries over the workers' streams (docs/analytics.md)."""

from __future__ import annotations
