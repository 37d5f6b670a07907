"""The process's recent log lines, kept in memory for the console's log page."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["LogLine", "RecentLogs"]


@dataclass(frozen=True)
class LogLine:
    time: float
    level: str
    logger: str
    message: str

    @property
    def clock(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))


class RecentLogs(logging.Handler):
    """A logging handler keeping the last ``capacity`` records (a bounded deque: appending is
    all a log call costs; nothing is formatted until a page asks)."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__(logging.INFO)
        self._records: deque[logging.LogRecord] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)

    def lines(self, query: str = "", limit: int = 500) -> list[LogLine]:
        """The newest ``limit`` lines containing ``query`` (case-insensitive), newest first."""
        needle = query.lower()
        found: list[LogLine] = []
        for record in reversed(list(self._records)):
            try:
                message = record.getMessage()
            except Exception:  # a malformed record must not break the page
                message = str(record.msg)
            line = LogLine(record.created, record.levelname, record.name, message)
            if needle and needle not in f"{line.level} {line.message}".lower():
                continue
            found.append(line)
            if len(found) >= limit:
                break
        return found

    def attach(self, logger: logging.Logger) -> None:
        logger.addHandler(self)

    def detach(self, logger: logging.Logger) -> None:
        logger.removeHandler(self)
