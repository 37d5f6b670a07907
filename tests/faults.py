"""A TCP proxy that cuts connections on cue: the network faults of the fault-injection tests."""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class CutAfter:
    """Cut a connection once ``nbytes`` flowed ``direction`` ("up": worker -> coordinator,
    "down": coordinator -> worker)."""

    direction: str
    nbytes: int


class CuttingProxy:
    """Forwards ``127.0.0.1:proxy.port`` to ``127.0.0.1:target_port``.

    Each new connection takes the next rule from ``rules`` (None: never cut by itself);
    :meth:`cut_all` resets every live connection at once. Cuts are TCP resets (SO_LINGER 0),
    like a crashed peer or a broken network path.
    """

    def __init__(self, target_port: int, rules: list[CutAfter | None]) -> None:
        self.target_port = target_port
        self.rules: deque[CutAfter | None] = deque(rules)
        self.cuts: list[str] = []
        self._cut = threading.Condition()  # notified on every cut
        self.connections = 0
        self._live: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                rule = self.rules.popleft() if self.rules else None
                self.connections += 1
                self._live.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, rule), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, rule: CutAfter | None) -> None:
        counts = {"up": 0, "down": 0}
        with selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, ("up", upstream))
            sel.register(upstream, selectors.EVENT_READ, ("down", client))
            while True:
                events = sel.select(timeout=1.0)
                if self._closed or (client.fileno() < 0 or upstream.fileno() < 0):
                    break
                done = False
                for key, _ in events:
                    direction, dest = key.data
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            done = True
                            break
                        dest.sendall(data)
                    except OSError:
                        done = True
                        break
                    counts[direction] += len(data)
                    if rule and direction == rule.direction and counts[direction] >= rule.nbytes:
                        self._record(f"{direction} after {counts[direction]} bytes")
                        done = True
                        break
                if done:
                    break
        self._reset(client, upstream)

    @staticmethod
    def _reset(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                s.close()

    def cut_all(self, why: str) -> None:
        """Reset every live connection now."""
        with self._lock:
            live, self._live = self._live, []
        for pair in live:
            self._reset(*pair)
        self._record(why)

    def _record(self, cut: str) -> None:
        with self._cut:
            self.cuts.append(cut)
            self._cut.notify_all()

    def wait_for_cuts(self, count: int, timeout: float) -> None:
        """Block until ``count`` cuts happened; AssertionError after ``timeout`` seconds."""
        with self._cut:
            if not self._cut.wait_for(lambda: len(self.cuts) >= count, timeout):
                raise AssertionError(f"{len(self.cuts)} of {count} cuts within {timeout} s")

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut_all("proxy closed")
