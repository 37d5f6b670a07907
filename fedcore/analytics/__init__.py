"""Federated analytics: aggregate questions over tables nobody may see (docs/analytics.md).

========================  ===============================================================
``query``                 the query language and its safe parser (never ``eval``)
``layout``                what a query releases: cells, sums, sensitivities
``local``                 a silo's exact local sums (on the worker only)
``mechanism``             the mechanism: calibration and each silo's discrete-Gaussian share
``encoding``              noisy sums <-> fixed-point ring words for secure aggregation
``answer``                statistics and error bars from the noisy totals
``rules``                 the data owner's rules for queries (none reads the data)
``client`` / ``cli``      the data scientist's API (``fedcore.connect``) and ``fed-query``
========================  ===============================================================
"""

from __future__ import annotations
