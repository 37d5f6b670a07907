"""Rounds: the round context, the synchronous and asynchronous (FedBuff) engines, the
collectors that take each round's results, secure aggregation's round driver, centralized
evaluation and the report pipeline.

Imports :mod:`..transport`, :mod:`..reporting` and :mod:`..state`; nothing imports it but the
coordinator.
"""
