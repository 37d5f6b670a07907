"""The coordinator's side of federated analytics: the data scientists' gRPC service and the
rounds that answer their queries over the workers' streams (docs/analytics.md). Its settings
(``--scientists`` and the other flags) are :mod:`fedcore.server.state.analytics`, beside the
rest of the coordinator's configuration, so that ``state`` imports nothing of this package.

========================  ===============================================================
``rounds``                one query's round over the workers' streams
``frontend``              datasets, mocks and queries, without gRPC
``service``               the ``fedcore.v1.Analytics`` gRPC service and its authentication
``hook``                  :func:`~.hook.serve_analytics`, the coordinator's one call
========================  ===============================================================
"""

from __future__ import annotations
