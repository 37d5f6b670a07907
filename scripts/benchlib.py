"""Process plumbing shared by the benchmarks: children started from a neutral folder, each
telling the harness which fedcore it imported, and another commit's fedcore to run.

Why a neutral folder: ``python -m fedcore.server`` puts the current folder first on
``sys.path``; started from the repository root, an "old code" coordinator whose ``PYTHONPATH``
names an extracted commit imports the working tree's ``fedcore`` instead. Every child here runs
in an empty folder, and every fedcore child prints an ``IMPORTED`` line (the files its
``fedcore`` packages came from) that :meth:`Child.check_imports` holds against the tree it was
meant to run.

Roles::

    benchlib.py run-module MODULE [ARG ...]   # print IMPORTED, then run MODULE as __main__
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import queue
import runpy
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "IMPORTED",
    "LIBRARY",
    "REPO",
    "BenchError",
    "Child",
    "neutral_folder",
    "old_code",
    "proc_status",
    "python",
    "report_imports",
    "run_module",
    "wait_all",
]

LIBRARY = Path(__file__).resolve()
REPO = LIBRARY.parent.parent
IMPORTED = "imported "
# The packages whose origin a fedcore child reports: fedcore itself and the two folders the
# installed package maps into it (pyproject's package-dir).
_PACKAGES = ("fedcore", "fedcore.server", "fedcore.worker")

log = logging.getLogger("benchlib")


class BenchError(Exception):
    """A measurement could not be made (a process failed, a wait timed out, or a child ran
    other code than the harness meant it to)."""


def python(*args: str) -> list[str]:
    """The argv of a Python child running this interpreter."""
    return [sys.executable, *args]


def report_imports(packages: Sequence[str] = _PACKAGES) -> None:
    """Print the ``IMPORTED`` line: where each package of ``packages`` was imported from."""
    origins = {name: importlib.import_module(name).__file__ for name in packages}
    print(IMPORTED + json.dumps(origins), flush=True)


def run_module(module: str, args: Sequence[str]) -> None:
    """Report the imports, then run ``module`` as ``python -m module args`` would."""
    report_imports()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (and the other Vm* fields) of ``pid`` in bytes; empty once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


@contextlib.contextmanager
def neutral_folder() -> Iterator[Path]:
    """An empty temporary folder to start children in (nothing there for Python to import)."""
    with tempfile.TemporaryDirectory(prefix="bench-cwd-") as folder:
        yield Path(folder)


class Child:
    """A subprocess started in ``cwd``: stdout lines collected by a thread, stderr kept in a log
    file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        if any(cwd.iterdir()):
            raise BenchError(f"{cwd} is not empty: a child started there could import from it")
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with ``prefix`` (without it); BenchError otherwise.
        Lines before it are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise BenchError(
                    f"no {prefix!r} line within {timeout:g} s from {self.describe()}"
                ) from None
            if line is None:
                self.proc.wait(timeout=10)
                raise BenchError(f"{self.describe()} exited before printing {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix) :]

    def check_imports(self, tree: Path, timeout: float) -> dict[str, str]:
        """Wait for the child's ``IMPORTED`` line; BenchError unless every package it names
        came from ``tree`` (symbolic links resolved)."""
        origins: dict[str, str] = json.loads(self.wait_for_line(IMPORTED, timeout))
        root = tree.resolve()
        strays = {
            name: path
            for name, path in origins.items()
            if not Path(path).resolve().is_relative_to(root)
        }
        if strays or not origins:
            raise BenchError(f"{self.name} was meant to run the code in {root}, imported {strays}")
        return origins

    def describe(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exit status {rc}"
        return f"{self.name} (pid {self.proc.pid}, {state}){self.log_tail()}"

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""
        return ("; stderr:\n  " + "\n  ".join(text.splitlines()[-lines:])) if text else ""

    def stop(self) -> None:
        """Kill the process if it still runs, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("process %d did not die", self.proc.pid)
        self._pumping.join(timeout=10)  # the pipe ends with the process
        if self.proc.stdout is not None and not self._pumping.is_alive():
            self.proc.stdout.close()
        self._log.close()


def wait_all(
    main: Child, helpers: Sequence[Child], timeout: float, poll: float = 0.2
) -> dict[str, int]:
    """Wait for ``main`` to exit while the helpers live; return ``main``'s largest Vm* values.

    A helper that fails (non-zero exit) or ``main`` outliving ``timeout`` is a BenchError.
    """
    deadline = time.monotonic() + timeout
    peak: dict[str, int] = {}
    while main.proc.poll() is None:
        for key, value in proc_status(main.pid).items():
            peak[key] = max(peak.get(key, 0), value)
        for helper in helpers:
            rc = helper.proc.poll()
            if rc not in (None, 0):
                raise BenchError(f"{helper.describe()} failed while {main.describe()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{main.describe()} did not finish within {timeout:g} s")
        time.sleep(poll)
    if main.proc.returncode != 0:
        raise BenchError(f"{main.describe()} failed")
    for helper in helpers:
        try:
            rc = helper.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{helper.describe()} did not exit after {main.name}") from None
        if rc != 0:
            raise BenchError(f"{helper.describe()} failed")
    return peak


def code_env(tree: Path | None) -> dict[str, str] | None:
    """The environment of a child that runs the fedcore in ``tree`` (None: the installed one)."""
    if tree is None:
        return None
    return {**os.environ, "PYTHONPATH": str(tree)}


@contextlib.contextmanager
def old_code(ref: str) -> Iterator[Path]:
    """This repository's fedcore at git ``ref``, extracted to a temporary folder that a child
    runs by putting it first on ``PYTHONPATH`` (:func:`code_env`)."""
    with tempfile.TemporaryDirectory(prefix="bench-old-code-") as tmp:
        tree = Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", ref],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        # The installed package maps fedcore.server and fedcore.worker to top-level folders
        # (pyproject's package-dir); found through PYTHONPATH they must sit inside fedcore/.
        for sub in ("server", "worker"):
            (tree / "fedcore" / sub).symlink_to(tree / sub, target_is_directory=True)
        yield tree


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] != "run-module":
        print("usage: benchlib.py run-module MODULE [ARG ...]", file=sys.stderr)
        return 2
    run_module(argv[1], argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
