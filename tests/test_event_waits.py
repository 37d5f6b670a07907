"""End-to-end tests wait on ``--log-json`` events, not on regexes over log prose (issue 27).

The guard reads every test module's syntax tree for ``Proc.wait_for_line`` /
``wait_for_nth_line`` (called or passed on, as to ``asyncio.to_thread``) and ``proc.count``
with a pattern. Only lines a CLI prints *for scripts* on stdout may be waited on by regex
(docs/development.md): anything else is log prose, and rewording it would break the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent

#: Lines printed for scripts, not log records: the coordinator's port and a console's address
#: (``fed-server``/``fed-worker`` print them on stdout), a benchmark stand-in's own ``print``,
#: and the ``PROG: error: ...`` line a CLI prints on stderr as it exits 2.
SCRIPT_LINES = ("listening on", "console on", "ran ", "error:")
_WAITS = {"wait_for_line", "wait_for_nth_line"}


def _pattern(node: ast.expr | None) -> str | None:
    """The literal text of a pattern argument (an f-string's literal parts); None otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
        )
    return None


def prose_waits(source: str) -> list[tuple[int, str]]:
    """``(line, pattern)`` of each regex wait or count over log output in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _WAITS:
            pattern = _pattern(node.args[0] if node.args else None)
        elif any(isinstance(a, ast.Attribute) and a.attr in _WAITS for a in node.args):
            # Passed on: asyncio.to_thread(proc.wait_for_line, PATTERN, ...).
            at = next(i for i, a in enumerate(node.args) if isinstance(a, ast.Attribute))
            pattern = _pattern(node.args[at + 1] if len(node.args) > at + 1 else None)
        elif (
            isinstance(func, ast.Attribute)
            and func.attr == "count"
            and isinstance(func.value, ast.Name)  # proc.count(...), not text.count or x.y.count
            and len(node.args) == 1  # Proc.count(pattern), not counters.count("job", sent=...)
            and not node.keywords
        ):
            pattern = _pattern(node.args[0] if node.args else None)
            if pattern is None:
                continue
        else:
            continue
        # Every alternative of the pattern must be a script line ("listening on|error:").
        if pattern is None or not all(a.startswith(SCRIPT_LINES) for a in pattern.split("|")):
            found.append((node.lineno, pattern or "<computed pattern>"))
    return sorted(found)


def test_no_test_waits_on_log_prose() -> None:
    offenders = [
        f"{path.name}:{line}: {pattern!r}"
        for path in sorted(TESTS.glob("*.py"))
        if path.name != Path(__file__).name
        for line, pattern in prose_waits(path.read_text())
    ]
    assert offenders == [], (
        "wait on a --log-json event with Proc.wait_for_event (emit one with extra={'event': "
        "...} where the message is logged), not on a regex over log prose:\n" + "\n".join(offenders)
    )


def test_the_guard_sees_prose_waits_and_lets_script_lines_through() -> None:
    """Positive control: each form the guard looks for is caught in a sample module."""
    sample = """
async def t(server, worker, digest):
    port = int(server.wait_for_line(r"listening on [\\d.]+:(\\d+)", 60).group(1))
    url = worker.wait_for_line(r"console on (http://\\S+)").group(1)
    server.wait_for_line(r"worker 'a' joined", 60)
    server.wait_for_nth_line(r"round \\d+ done", 3, 60)
    await asyncio.to_thread(worker.wait_for_line, r"sent key shares", 60)
    assert worker.count(rf"training plan-{digest}") == 2
    server.wait_for_line(r"listening on|error:")
    server.wait_for_line(r"listening on|worker 'a' joined")
    assert server.output.count("prose a person reads") == 1
    assert page.locator("script").count() == 0
"""
    found = dict(prose_waits(sample))
    assert sorted(found) == [5, 6, 7, 8, 10]
    assert found[8] == "training plan-"
