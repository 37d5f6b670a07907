"""Run ``fed-data`` as ``python -m fedcore.data``."""

from __future__ import annotations

from fedcore.data.cli import main

raise SystemExit(main())
