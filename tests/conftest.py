"""Shared fixtures: tiny MNIST shards, real CLI processes, in-process coordinators."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fedcore.server import Coordinator, ServerConfig
from raw_client import RawClient

from fedcore.data import load_mnist, partition, save_shard

BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most ``slow`` tests first, the rest after in their usual order.

    ``make test`` hands whole files to two processes (``--dist loadfile
    --no-loadscope-reorder``) in this order: the long federations start at once and the many
    quick files fill the end, so neither process is left with one long file when the other
    is done (xdist's own order, most tests first, started them last).
    """
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    first = {path: i for i, path in enumerate(slow)}
    items.sort(key=lambda item: (-slow[item.path], first[item.path]))


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
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for line in self.popen.stdout:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
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
    proc = Proc([str(BIN / "fed-server"), "--listen", "127.0.0.1:0", *args], "fed-server")
    procs.append(proc)
    port = int(proc.wait_for_line(r"listening on [\d.]+:(\d+)", 60).group(1))
    return proc, port


def start_worker(procs: list[Proc], port: int, shard: Path, name: str, *args: str) -> Proc:
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
