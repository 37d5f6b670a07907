"""Start the suite's ``fed-*`` processes by forking them from a zygote (``tests/zygote.py``).

A fresh ``fed-worker`` or ``fed-server`` spends seconds of CPU importing torch before it does
anything; the suite starts about two hundred of them on two cores. :func:`popen` forks
the ``fed-*`` console scripts that import torch from a process that imported it once
(:class:`Zygote`) and returns a :class:`ForkedProcess`, which behaves like the
``subprocess.Popen`` it replaces (:func:`run` stands for ``subprocess.run``); anything else,
and everything when ``FEDCORE_TEST_EXEC=1``, is started with plain exec.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["ForkedProcess", "Zygote", "popen", "run"]

BIN = Path(sys.executable).parent
ZYGOTE = Path(__file__).with_name("zygote.py")

#: Environment variables read when the preloaded modules are imported (or by the interpreter
#: at start): a child whose value differs from the zygote's is exec'd, not forked.
_IMPORT_TIME = (
    *("PYTHON", "COVERAGE", "LD_", "LANG", "LC_"),  # the interpreter's, stdio's encoding
    *("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "TORCH", "PYTORCH", "CUDA"),  # torch's
)
_PER_CHILD = {"PYTHONPATH", "PYTHONUNBUFFERED"}  # the child applies these itself

#: The console scripts that import torch, worth forking. The others (and the data owner's
#: ``fed-worker requests|ledger|audit``) start in under a second exec'd, faster than a child
#: of the zygote ends: its interpreter still tears down torch's modules at exit.
_TORCH_SCRIPTS = {"fed-server", "fed-worker", "fed-data", "fed-sim", "fed-plan", "fed-audit"}
_OWNER_COMMANDS = {"requests", "ledger", "audit"}


class ForkedProcess:
    """A child of the zygote, with the part of ``subprocess.Popen``'s interface tests use."""

    def __init__(
        self, args: list[str], conn: socket.socket, stdout: IO[str], stderr: IO[str] | None
    ) -> None:
        self.args = args
        self.stdout: IO[str] | None = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._conn = conn
        self._buffer = b""
        message = self._message(60.0)
        if message is None or "pid" not in message:
            conn.close()
            stdout.close()
            if stderr is not None:
                stderr.close()
            raise OSError(f"zygote could not start {args[0]}: {message}")
        self.pid: int = message["pid"]

    def _message(self, timeout: float | None) -> dict[str, Any] | None:
        """The zygote's next message; None when none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                return {"error": "the zygote closed the connection"}
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def _status(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            message = self._message(timeout)
            if message is not None:
                if "returncode" not in message:
                    raise OSError(f"zygote lost {self.args[0]} (pid {self.pid}): {message}")
                self.returncode = int(message["returncode"])
                self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._status(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._status(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        # As Popen: nothing once the return code is known (the pid may be reused by then).
        if self.poll() is None:
            # It may end between the poll and the kill (its status reaches us through the
            # zygote, a moment later): a signal to a process already gone is no error, as
            # with Popen.send_signal.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self) -> None:
        # Quietly, as a Popen whose child ended is dropped (closing the connection of a child
        # still running has the zygote kill it: no test leaves processes behind).
        self._conn.close()


class Zygote:
    """The pytest process's fork server, started on its first use and stopped by :meth:`close`
    (or when this process dies: the zygote then kills the children it still has)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._dir = ""
        self._env: dict[str, str] = {}  # the zygote's environment
        self._lock = threading.Lock()  # a test may start processes from several threads

    def _start(self) -> str:
        with self._lock:
            return self._started()

    def _started(self) -> str:
        if self._proc is None:
            self._dir = tempfile.mkdtemp(prefix="fedcore-zygote-")
            path = os.path.join(self._dir, "socket")
            env = self._env = {k: v for k, v in os.environ.items() if k not in _PER_CHILD}
            self._proc = subprocess.Popen(
                [sys.executable, str(ZYGOTE), path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                start_new_session=True,  # a ^C to the test run's group is not the zygote's
            )
            assert self._proc.stdout is not None
            # Bounded: torch imports in seconds idle, a minute or more on a loaded machine.
            ready, _, _ = select.select([self._proc.stdout], [], [], 300)
            line = self._proc.stdout.readline() if ready else ""
            if line != "ready\n":
                self.close()
                raise OSError(f"the test zygote did not start (said {line!r})")
        return os.path.join(self._dir, "socket")

    def forkable(self, args: list[str], env: dict[str, str]) -> bool:
        """Whether ``args`` is a console script that imports torch, which the zygote can run
        as exec would."""
        if os.environ.get("FEDCORE_TEST_EXEC") == "1":
            return False
        script = Path(args[0])
        if script.parent != BIN or script.name not in _TORCH_SCRIPTS or not script.is_file():
            return False
        if script.name == "fed-worker" and args[1:2] and args[1] in _OWNER_COMMANDS:
            return False
        # Compared with the environment the zygote started (or will start) with.
        zygote = self._env if self._proc is not None else os.environ
        return all(
            env.get(k) == zygote.get(k)
            for k in {*env, *zygote}
            if k.startswith(_IMPORT_TIME) and k not in _PER_CHILD
        )

    def spawn(
        self, args: list[str], env: dict[str, str], cwd: str, *, stderr: bool = False
    ) -> ForkedProcess:
        """Fork ``args`` with ``env`` in ``cwd``, its stdout and stderr on one text pipe (on
        two with ``stderr``)."""
        path = self._start()
        pipes = [os.pipe() for _ in range(1 + stderr)]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            request = json.dumps({"argv": args, "env": env, "cwd": cwd}).encode() + b"\n"
            socket.send_fds(conn, [request], [write for _, write in pipes])
        except OSError:
            conn.close()
            for read, _ in pipes:
                os.close(read)
            raise
        finally:
            for _, write in pipes:
                os.close(write)
        out, *err = (open(read, encoding="utf-8", errors="replace") for read, _ in pipes)  # noqa: SIM115
        return ForkedProcess(args, conn, out, err[0] if err else None)

    def close(self) -> None:
        """Stop the zygote (it kills the children still running) and remove its socket."""
        if self._proc is not None:
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(30)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._dir:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._dir, "socket"))
                os.rmdir(self._dir)
            self._dir = ""


#: This pytest process's zygote (``tests/conftest.py`` closes it at the session's end).
ZYGOTE_SERVER = Zygote()


def popen(args: list[str], env: dict[str, str]) -> subprocess.Popen[str] | ForkedProcess:
    """``args`` started with its stdout and stderr on one text pipe: forked from the zygote
    when it is a ``fed-*`` console script, else (and with ``FEDCORE_TEST_EXEC=1``) exec'd."""
    if ZYGOTE_SERVER.forkable(args, env):
        return ZYGOTE_SERVER.spawn(args, env, os.getcwd())
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def run(
    args: list[str], *, check: bool = False, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(args, capture_output=True, text=True)``, forking ``fed-*`` console
    scripts from the zygote as :func:`popen` does."""
    env = dict(os.environ)
    if not ZYGOTE_SERVER.forkable(args, env):
        return subprocess.run(
            args, capture_output=True, text=True, check=check, timeout=timeout, env=env
        )
    child = ZYGOTE_SERVER.spawn(args, env, os.getcwd(), stderr=True)
    streams = [child.stdout, child.stderr]
    texts = ["", ""]

    def read(i: int) -> None:
        stream = streams[i]
        assert stream is not None
        with stream:
            texts[i] = stream.read()

    # Both pipes drained on threads, as Popen.communicate does: neither may fill and block.
    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in (0, 1)]
    for reader in readers:
        reader.start()
    try:
        code = child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise
    for reader in readers:
        reader.join(30)  # a grandchild could hold a pipe open: not forever
    done = subprocess.CompletedProcess(args, code, texts[0], texts[1])
    if check:
        done.check_returncode()
    return done
