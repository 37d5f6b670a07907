"""Where a federation's progress goes: the one sink interface (:mod:`.sink`), the per-round
record (:mod:`.metrics`), and its sinks: the JSONL file, the live panel or plain progress,
Prometheus, MLflow and TensorBoard; and the roster of connected workers.

Imports only :mod:`..state`.
"""
