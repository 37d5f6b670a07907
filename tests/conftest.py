"""Shared fixtures: tiny MNIST shards, real CLI processes, in-process coordinators."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import forked
import numpy as np
import pytest
from raw_client import RawClient

from fedcore.data import load_mnist, partition, save_shard
from fedcore.server import Coordinator, ServerConfig

BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most ``slow`` tests first, the rest after in their usual order.

    ``make test`` hands whole files to three processes (``--dist loadfile
    --no-loadscope-reorder``) in this order: the long federations start at once and the many
    quick files fill the end, so no process is left with one long file when the others are
    done (xdist's own order, most tests first, started them last).
    """
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    first = {path: i for i, path in enumerate(slow)}
    items.sort(key=lambda item: (-slow[item.path], first[item.path]))


@pytest.fixture(scope="session", autouse=True)
def zygote() -> Iterator[forked.Zygote]:
    """This pytest process's fork server for ``fed-*`` processes (started on first use)."""
    yield forked.ZYGOTE_SERVER
    forked.ZYGOTE_SERVER.close()


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 IID shards of 400 MNIST training examples, and a 1,000-example test set."""
    root = tmp_path_factory.mktemp("shards")
    x, y = load_mnist("train")
    x, y = x[:1200], y[:1200]
    for i, idx in enumerate(partition(y, 3, "iid", seed=0)):
        save_shard(root / f"shard-{i}.npz", x[idx], y[idx])
    tx, ty = load_mnist("test")
    save_shard(root / "test.npz", tx[:1000], ty[:1000])
    return root


class Proc:
    """A CLI process whose output lines are collected as they come."""

    def __init__(self, args: list[str], name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
        # fed-* scripts are forked from the zygote (tests/forked.py), the rest exec'd.
        self.popen = forked.popen(args, env)
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []  # --log-json records, in order
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for line in self.popen.stdout:
                record = _json_record(line)
                with self._cond:
                    if record is None:
                        self.lines.append(line.rstrip("\n"))
                    else:  # --log-json: the event for wait_for_event, the prose for the rest
                        self.events.append(record)
                        self.lines.extend(_prose(record))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first output line matching ``pattern``; fails after ``timeout`` seconds."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r} within {timeout} s; "
                        f"output:\n{self.output}"
                    )
                self._cond.wait(min(left, 0.5))

    def count(self, pattern: str) -> int:
        """How many output lines so far match ``pattern``."""
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def wait_for_nth_line(self, pattern: str, n: int, timeout: float = 60.0) -> re.Match[str]:
        """The ``n``-th output line (1-based) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for line in self.lines if (m := regex.search(line))]
                if len(found) >= n:
                    return found[n - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{self.name}: fewer than {n} lines matching {pattern!r} within "
                        f"{timeout} s; output:\n{self.output}"
                    )
                self._cond.wait(min(left, 0.5))

    def matching(self, event: str, **fields: object) -> list[dict[str, Any]]:
        """The ``--log-json`` records so far of ``event`` whose fields equal ``fields``."""
        with self._cond:
            return [r for r in self.events if _matches(r, event, fields)]

    def wait_for_event(
        self, event: str, *, n: int = 1, timeout: float = 60.0, **fields: object
    ) -> dict[str, Any]:
        """The ``n``-th (1-based) ``--log-json`` record of ``event`` whose fields equal
        ``fields`` (e.g. ``wait_for_event("update_sent", round=2)``; a ``re.compile(...)``
        value searches a free-text field); fails after ``timeout`` seconds, or at once when
        the process has ended without it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [r for r in self.events if _matches(r, event, fields)]
                if len(found) >= n:
                    return found[n - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{self.name}: {len(found)} of {n} {event!r} event(s) with {fields} "
                        f"within {timeout} s; output:\n{self.output}"
                    )
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float = 120.0) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout} s:\n{self.output}"
            ) from None
        self._reader.join(5)
        return code

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        self._reader.join(10)


def _json_record(line: str) -> dict[str, Any] | None:
    """A ``--log-json`` line's record; None for any other output line."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "message" in record else None


def _prose(record: dict[str, Any]) -> list[str]:
    """A JSON record as the text log would print it (time, level, message, traceback)."""
    head = f"{str(record.get('time', ''))[11:]} {record.get('level', '')} {record['message']}"
    return [*head.splitlines(), *str(record.get("exception", "")).splitlines()]


def _matches(record: dict[str, Any], event: str, fields: dict[str, object]) -> bool:
    """``event`` with every field equal, or searched by a compiled pattern (free text)."""
    return record.get("event") == event and all(
        bool(v.search(str(record.get(k, "")))) if isinstance(v, re.Pattern) else record.get(k) == v
        for k, v in fields.items()
    )


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes started by a test; all killed at teardown whatever happened."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.signal(signal.SIGKILL)
    for p in started:
        p.kill()


def start_server(procs: list[Proc], *args: str) -> tuple[Proc, int]:
    """A ``fed-server`` logging ``--log-json`` (see :meth:`Proc.wait_for_event`) and its port
    (read from the line it prints for scripts, not from a log record)."""
    command = [str(BIN / "fed-server"), "--listen", "127.0.0.1:0", "--log-json", *args]
    proc = Proc(command, "fed-server")
    procs.append(proc)
    # Start-up takes seconds idle; a machine shared by many test runs saw more than 60.
    port = int(proc.wait_for_line(r"listening on [\d.]+:(\d+)", 120).group(1))
    return proc, port


def start_worker(procs: list[Proc], port: int, shard: Path, name: str, *args: str) -> Proc:
    """A ``fed-worker`` of the coordinator on ``port``, logging ``--log-json``."""
    proc = Proc(
        [
            str(BIN / "fed-worker"),
            "--server",
            f"127.0.0.1:{port}",
            "--data",
            str(shard),
            "--name",
            name,
            "--threads",
            "1",
            "--log-json",
            *args,
        ],
        name,
    )
    procs.append(proc)
    return proc


@pytest.fixture
async def coordinator_factory() -> AsyncIterator[object]:
    """Start in-process coordinators on a free port; stopped at teardown."""
    running: list[tuple[Coordinator, asyncio.Task[object]]] = []

    async def start(config: ServerConfig, **kw: object) -> tuple[Coordinator, asyncio.Task[object]]:
        coordinator = Coordinator(config, **kw)  # type: ignore[arg-type]
        task: asyncio.Task[object] = asyncio.create_task(coordinator.run())
        ready = asyncio.create_task(coordinator.ready.wait())
        await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert coordinator.port, "coordinator did not start"
        running.append((coordinator, task))
        return coordinator, task

    yield start
    for coordinator, task in running:
        coordinator.stop()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 30)


def make_weights_like(weights: dict[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in weights.items()}


@pytest.fixture
async def raw_clients() -> AsyncIterator[Callable[[int], RawClient]]:
    """Make :class:`RawClient` streams to a coordinator's port; all closed at teardown."""
    made: list[RawClient] = []

    def make(port: int) -> RawClient:
        made.append(RawClient(port))
        return made[-1]

    yield make
    for client in made:
        await client.close()
