"""A fork server ("zygote") for the test suite's ``fed-*`` processes.

Run as ``python tests/zygote.py SOCKET`` by :class:`forked.Zygote` (one per pytest process).
It imports torch, numpy and ``torch._dynamo`` once (seconds of CPU a fresh ``fed-worker`` or
``fed-server`` pays at every start), then forks a child per request on the unix socket
``SOCKET``: the child becomes what exec'ing the console script would have made, a separate OS
process with its own session, its output on the pipe the request passed, the request's argv,
environment and working directory, fresh random seeds and default signal handlers.

Nothing that imports grpc is imported before the fork (grpc's threads and its fork handlers
are not ours to reason about), so no fedcore module is: ``import fedcore`` imports grpc.

Protocol, one connection per child: the client sends one JSON line ``{"argv", "env",
"cwd"}`` with the child's output pipe (or its stdout's, then its stderr's) as SCM_RIGHTS; it answers ``{"pid": N}`` (or
``{"error": "..."}``), then ``{"returncode": N}`` (negative: killed by that signal) when the
child ends. A connection closed early, or the zygote's stdin closing (the test process went
away), kills the child's process group.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Imported once in the zygote; each must leave grpc (and fedcore, which imports it) out.
PRELOAD = (
    "numpy",
    "torch",
    "torch._dynamo",  # torch's optimizers import it on their first step (about 1.4 s)
    "torch.optim",
    "torch.nn.functional",
    "torch.utils.data",
    "opacus",  # a DP-SGD worker's (scipy with it)
    "dp_accounting",  # a DP coordinator's accountant
    "safetensors.numpy",
    "google.protobuf.message",
    "google.protobuf.json_format",
    "cryptography.hazmat.primitives.asymmetric.x25519",
    "cryptography.x509",
    "rich.console",
    "rich.live",
    "rich.table",
    "asyncio",
    "sqlite3",
    "ssl",
)

#: Most bytes of one request (argv, environment and working directory as JSON).
MAX_REQUEST = 1 << 20


@dataclass
class Request:
    """What one child runs."""

    argv: list[str]
    env: dict[str, str]
    cwd: str


def preload() -> None:
    """Import :data:`PRELOAD`, and check the zygote is still safe to fork from."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "fedcore"))
    assert not leaked, f"imported before fork: {leaked[:5]}"
    # No Python thread may hold a lock at fork. (numpy's OpenBLAS keeps a native pool; it
    # stops it around fork with its own pthread_atfork handler.)
    assert threading.active_count() == 1, threading.enumerate()


def serve(path: str) -> Request | None:
    """Fork a child per request until stdin closes; the request in a child, None in the
    zygote when it is done."""
    children: dict[int, socket.socket] = {}  # pid -> its request's connection, until reaped
    watched: dict[socket.socket, int] = {}  # connections whose client is still there -> pid
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    signal.set_wakeup_fd(wake_w)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    try:
        while True:
            ready, _, _ = select.select([listener, wake_r, sys.stdin, *watched], [], [])
            if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
                return None  # the test process closed our stdin (or died)
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                for conn in _reap(children):
                    watched.pop(conn, None)
            for conn in [c for c in watched if c in ready]:
                if _abandoned(conn):
                    _kill(watched.pop(conn))
            if listener in ready:
                conn, _ = listener.accept()
                request, fds = _receive(conn)
                if request is None:
                    conn.close()
                    continue
                # What the zygote holds (torch's thousands of objects) is left out of every
                # collection: a child's garbage collections, and its exit, skip it (exit took
                # 2.5 s more without) and its pages stay shared (the gc.freeze() docs' recipe).
                gc.freeze()
                pid = os.fork()
                if pid == 0:
                    # The child: none of the zygote's descriptors but the output pipe stay.
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for other in [listener, conn, *children.values()]:
                        other.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    _become(request, fds)
                    return request
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                watched[conn] = pid
                _send(conn, {"pid": pid})
    finally:
        if os.getpid() == _ZYGOTE_PID:  # not in a child on its way out of this function
            for pid in children:
                _kill(pid)
            for pid, conn in children.items():  # reaped before the zygote ends: none left
                with contextlib.suppress(ChildProcessError):
                    _, status = os.waitpid(pid, 0)
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})


_ZYGOTE_PID = os.getpid()


def _receive(conn: socket.socket) -> tuple[Request | None, list[int]]:
    """One request and its output pipes (stdout and stderr, or one for both); ``(None, [])``
    when it is malformed."""
    data = b""
    fds: list[int] = []
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk, got, _, _ = socket.recv_fds(conn, 65536, 2)
        fds += got
        if not chunk:
            break
        data += chunk
    try:
        raw: Any = json.loads(data)
        request = Request(argv=list(raw["argv"]), env=dict(raw["env"]), cwd=str(raw["cwd"]))
    except (ValueError, KeyError, TypeError) as exc:
        _send(conn, {"error": f"bad request: {exc}"})
        request = None
    if request is None or len(fds) not in (1, 2):
        for fd in fds:
            os.close(fd)
        if request is not None:
            _send(conn, {"error": f"expected one or two output pipes, got {len(fds)}"})
        return None, []
    return request, fds


def _send(conn: socket.socket, message: dict[str, object]) -> None:
    with contextlib.suppress(OSError):  # the client went away: nothing to tell
        conn.sendall(json.dumps(message).encode() + b"\n")


def _reap(children: dict[int, socket.socket]) -> list[socket.socket]:
    """Collect every ended child and tell its client its return code (as ``Popen``'s); the
    connections so closed."""
    closed: list[socket.socket] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return closed
        if pid == 0:
            return closed
        conn = children.pop(pid, None)
        if conn is not None:
            _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
            conn.close()
            closed.append(conn)


def _abandoned(conn: socket.socket) -> bool:
    """Whether the client closed ``conn`` (it sends nothing after its request)."""
    try:
        return not conn.recv(1)
    except OSError:
        return True


def _kill(pid: int) -> None:
    """Kill a child (not reaped yet, so ``pid`` is still its) and its process group."""
    for kill in (os.killpg, os.kill):  # before its setsid() the group is not its own yet
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _become(request: Request, out: list[int]) -> None:
    """Make this forked child the process ``request.argv`` would have started."""
    import numpy as np
    import torch

    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(out[0], 1)
    os.dup2(out[-1], 2)
    for fd in out:
        os.close(fd)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    tempfile.tempdir = None  # from $TMPDIR again, on first use
    # A fresh interpreter's handlers: SIGINT raises KeyboardInterrupt, the rest by default
    # (Python itself ignores SIGPIPE and SIGXFSZ; the zygote changed only SIGCHLD).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # sys.path as the interpreter builds it: the script's directory ('' for -c), $PYTHONPATH,
    # then the zygote's own (stdlib, site-packages and what their .pth files add).
    first = "" if _code(request) else os.path.dirname(os.path.realpath(request.argv[0]))
    extra = [p for p in request.env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *sys.path[1:]]
    import importlib

    importlib.invalidate_caches()
    sys.argv = list(request.argv)
    # A __main__ of its own, as exec'd: multiprocessing's spawn (the worker's plan sandbox)
    # re-runs the script it names, not this file.
    main = types.ModuleType("__main__")
    if not _code(request):
        main.__file__ = request.argv[0]
    sys.modules["__main__"] = main
    # New streams on fds 1 and 2, buffered as in a fresh process ($PYTHONUNBUFFERED: none);
    # sys.stdin already reads fd 0, now /dev/null (the zygote only ever select()ed on it).
    unbuffered = bool(request.env.get("PYTHONUNBUFFERED"))
    encoding = sys.stdout.encoding
    sys.stdout = _stream(1, encoding, "strict", unbuffered, line=False)
    sys.stderr = _stream(2, encoding, "backslashreplace", unbuffered, line=True)
    # Random state: Python's random reseeds itself at fork; numpy's global generator and
    # torch's default generator would otherwise repeat the zygote's in every child (a fresh
    # process seeds both from the OS).
    np.random.seed()
    torch.seed()


def _stream(
    fd: int, encoding: str, errors: str, unbuffered: bool, *, line: bool
) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    binary = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(binary, encoding, errors, line_buffering=line, write_through=unbuffered)


def _code(request: Request) -> str | None:
    """The program of ``python -c CODE ...`` (what tests/test_zygote.py inspects children
    with); None for a console script."""
    argv = request.argv
    return argv[2] if len(argv) >= 3 and argv[1] == "-c" else None


def run(request: Request) -> None:
    """Run the console script ``request.argv[0]`` names, as its wrapper would (or the
    program of ``python -c``)."""
    from importlib.metadata import entry_points

    code = _code(request)
    if code is not None:
        sys.argv = ["-c", *request.argv[3:]]
        exec(compile(code, "<string>", "exec"), vars(sys.modules["__main__"]))
        return
    name = Path(request.argv[0]).name
    found = entry_points(group="console_scripts", name=name)
    if not found:
        print(f"zygote: no console script {name!r}", file=sys.stderr)
        sys.exit(127)
    (entry,) = found
    sys.exit(entry.load()())


def main() -> None:
    """``zygote.py SOCKET``: preload, serve until stdin closes; in a child, run its script."""
    preload()
    request = serve(sys.argv[1])
    if request is not None:
        run(request)  # the interpreter's own exit path: SystemExit, atexit, flushing


if __name__ == "__main__":
    main()
