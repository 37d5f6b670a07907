"""The test zygote (tests/zygote.py, tests/forked.py): a forked child is the process exec
would have started (its own process and session, argv, environment, working directory,
$PYTHONPATH, random seeds, signal handlers, exit codes), and no child outlives the zygote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import forked
import pytest
from conftest import BIN

pytestmark = pytest.mark.slow

# What a child reports about itself (run with ``python -c``, forked like a console script).
_REPORT = """
import json, os, signal, sys, threading
import numpy as np, torch
print(json.dumps({
    "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0), "cwd": os.getcwd(),
    "argv": sys.argv, "path0": sys.path[:2], "env": os.environ.get("ZYGOTE_TEST"),
    "numpy": np.random.get_state()[1][:4].tolist(), "torch": torch.initial_seed(),
    "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "sigchld": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
    "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    "grpc_before": "grpc" in sys.modules, "dynamo": "torch._dynamo" in sys.modules,
    "threads": threading.active_count(), "stdin": sys.stdin.read(),
}))
"""


def _fork(zygote: forked.Zygote, code: str, *args: str, cwd: Path, **env: str) -> Any:
    child = zygote.spawn([sys.executable, "-c", code, *args], dict(os.environ, **env), str(cwd))
    assert child.stdout is not None
    with child.stdout:
        out = child.stdout.read()
    return child.wait(60), out


def test_a_forked_child_is_its_own_fresh_process(zygote: forked.Zygote, tmp_path: Path) -> None:
    code, out = _fork(zygote, _REPORT, "a", cwd=tmp_path, ZYGOTE_TEST="1", PYTHONPATH="/x")
    assert code == 0, out
    first = json.loads(out)
    assert first["pid"] != os.getpid()
    assert first["sid"] == first["pgid"] == first["pid"]  # its own session, as signals expect
    assert first["cwd"] == str(tmp_path)
    assert first["argv"] == ["-c", "a"]
    assert first["path0"] == ["", "/x"]
    assert first["env"] == "1"
    assert first["sigint"]
    assert first["sigchld"]
    assert first["sigterm"]
    assert not first["grpc_before"]  # the zygote never imported it
    assert first["dynamo"]  # ... but did import what takes seconds
    assert first["threads"] == 1
    assert first["stdin"] == ""  # /dev/null, not the test process's stdin
    _, out = _fork(zygote, _REPORT, cwd=tmp_path)
    second = json.loads(out)
    assert second["env"] is None  # the first child's environment did not stick
    # Fresh seeds in every child, as exec'd processes get (not the zygote's, twice).
    assert second["numpy"] != first["numpy"]
    assert second["torch"] != first["torch"]


def test_exit_codes_and_tracebacks_are_the_interpreters(
    zygote: forked.Zygote, tmp_path: Path
) -> None:
    assert _fork(zygote, "print('ok')", cwd=tmp_path) == (0, "ok\n")
    assert _fork(zygote, "import sys; sys.exit(3)", cwd=tmp_path)[0] == 3
    code, out = _fork(zygote, "import sys; sys.exit('bad input')", cwd=tmp_path)
    assert (code, out) == (1, "bad input\n")
    code, out = _fork(zygote, "print('before', end='')\nraise ValueError('boom')", cwd=tmp_path)
    assert code == 1
    assert out.startswith("before")  # flushed before the traceback
    assert "Traceback (most recent call last)" in out
    assert "ValueError: boom" in out
    code, out = _fork(
        zygote, "import os, signal; os.kill(os.getpid(), signal.SIGINT)", cwd=tmp_path
    )
    assert code == -signal.SIGINT  # as exec'd: KeyboardInterrupt ends it by SIGINT
    assert "KeyboardInterrupt" in out


def test_a_forked_console_script_says_what_the_exec_d_one_says(tmp_path: Path) -> None:
    """Positive control for every forked fed-* process: the same output and return code."""
    args = [str(BIN / "fed-server"), "--rounds", "0"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    exec_d = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    child = forked.popen(args, env)
    assert isinstance(child, forked.ForkedProcess)
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.read() == exec_d.stdout + exec_d.stderr
    assert child.wait(60) == exec_d.returncode == 2
    ran = forked.run(args)  # subprocess.run's stand-in: stdout and stderr apart
    assert (ran.returncode, ran.stdout, ran.stderr) == (2, exec_d.stdout, exec_d.stderr)
    assert "--rounds" in ran.stderr


def test_what_the_zygote_cannot_reproduce_is_exec_d(monkeypatch: pytest.MonkeyPatch) -> None:
    server = [str(BIN / "fed-server"), "--help"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH="/x", FEDCORE_X="1")
    assert forked.ZYGOTE_SERVER.forkable(server, env)  # per-child settings and fedcore's own
    # Read while the zygote imported torch, or by the interpreter at start: not the child's.
    for name in ["OMP_NUM_THREADS", "PYTHONHASHSEED", "LC_ALL", "TORCH_LOGS"]:
        other = f"{os.environ.get(name, '')}7"  # not what the zygote has
        assert not forked.ZYGOTE_SERVER.forkable(server, dict(env, **{name: other}))
    assert not forked.ZYGOTE_SERVER.forkable([sys.executable, "-c", "pass"], env)
    # Scripts without torch start faster exec'd than a forked child (with torch) ends.
    assert not forked.ZYGOTE_SERVER.forkable([str(BIN / "fed-job"), "list"], env)
    assert not forked.ZYGOTE_SERVER.forkable([str(BIN / "fed-worker"), "requests", "list"], env)
    assert forked.ZYGOTE_SERVER.forkable([str(BIN / "fed-worker"), "--help"], env)
    assert not forked.ZYGOTE_SERVER.forkable([str(BIN / "python"), "-c", "pass"], env)
    monkeypatch.setenv("FEDCORE_TEST_EXEC", "1")
    assert not forked.ZYGOTE_SERVER.forkable(server, env)
    child = forked.popen(server, env)
    assert isinstance(child, subprocess.Popen)
    assert child.stdout is not None
    with child.stdout:
        assert "usage: fed-server" in child.stdout.read()
    assert child.wait(60) == 0


def test_signals_reach_the_child_and_the_zygote_takes_its_children_with_it(
    tmp_path: Path,
) -> None:
    zygote = forked.Zygote()  # its own, to close it here
    try:
        args = [str(BIN / "fed-server"), "--listen", "127.0.0.1:0"]
        killed = zygote.spawn(args, dict(os.environ), str(tmp_path))
        assert killed.stdout is not None
        killed.stdout.close()
        assert killed.poll() is None
        killed.kill()
        assert killed.wait(60) == -signal.SIGKILL
        orphan = zygote.spawn(args, dict(os.environ), str(tmp_path))
        assert orphan.stdout is not None
        with orphan.stdout:
            assert "fed-server" in orphan.stdout.readline()  # running, past its imports
    finally:
        zygote.close()
    assert orphan.wait(0) == -signal.SIGKILL  # killed and reaped before the zygote ended
    with pytest.raises(ProcessLookupError):
        os.kill(orphan.pid, 0)
