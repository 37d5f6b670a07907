"""Where a loopback round's CPU goes: seconds of CPU per round, per kind of process.

On a machine with fewer cores than processes (two cores, a coordinator and eight workers), a
round costs the CPU every process spends on it, not only the coordinator's. This runs the
federation of ``scripts/bench_overhead.py`` (echo workers, a ``vector`` model) twice, with
``--short`` and ``--long`` timed rounds, and reads every child's user and system time from
``/proc`` until it exits; the difference over the extra rounds is the CPU one round costs:
the coordinator, the workers together, and the same for the bare grpc.aio floor (its server
and clients) moving the same bytes. With ``--old-code REF`` the old commit's federation is
measured in the same run.

    python scripts/bench_round_cpu.py [--workers 8] [--params 1e7] [--old-code main]

Prints JSON: CPU seconds per round (user, system, total) per process kind and code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead
from benchlib import old_code

_TICK = os.sysconf("SC_CLK_TCK")
_KINDS = {
    "floor-server": "floor server",
    "floor-client": "floor clients",
    "fedcore.server": "coordinator",
    "echo-worker": "workers",
}


def _children(root: int) -> list[int]:
    """Every live descendant of ``root``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


@contextlib.contextmanager
def _cpu_of_children() -> Iterator[dict[int, tuple[str, float, float]]]:
    """pid -> (kind, user s, system s) of every child, read until it exits (a zombie's
    times are still there; its command line is not, so the kind is kept from the start)."""
    seen: dict[int, tuple[str, float, float]] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for pid in _children(os.getpid()):
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                kind = next((k for key, k in _KINDS.items() if key.encode() in argv), None)
                kind = seen[pid][0] if pid in seen else kind
                if kind is not None:
                    seen[pid] = (kind, int(fields[11]) / _TICK, int(fields[12]) / _TICK)
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def _per_round(
    run: Callable[[int, Path], Any], short: int, long: int
) -> dict[str, dict[str, float]]:
    totals = []
    for rounds in (short, long):
        with tempfile.TemporaryDirectory() as tmp, _cpu_of_children() as seen:
            run(rounds, Path(tmp))
        by_kind: dict[str, list[float]] = {}
        for kind, user, system in seen.values():
            acc = by_kind.setdefault(kind, [0.0, 0.0])
            acc[0] += user
            acc[1] += system
        totals.append(by_kind)
    extra = long - short
    out = {}
    for kind, (user, system) in totals[1].items():
        user0, system0 = totals[0].get(kind, [0.0, 0.0])
        u, s = (user - user0) / extra, (system - system0) / extra
        out[kind] = {"user": round(u, 3), "system": round(s, 3), "total": round(u + s, 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--params", type=float, default=1e7)
    p.add_argument("--short", type=int, default=1, help="timed rounds of the first run")
    p.add_argument("--long", type=int, default=5, help="timed rounds of the second run")
    p.add_argument("--old-code", help="git ref of the old code, measured in the same run")
    args = p.parse_args()
    n, d = args.workers, int(args.params)
    report: dict[str, Any] = {"workers": n, "params": d, "load_avg_start": os.getloadavg()}
    with contextlib.ExitStack() as stack:
        old = None if args.old_code is None else stack.enter_context(old_code(args.old_code))
        report["floor"] = _per_round(
            lambda r, tmp: bench_overhead.measure_floor(n, d, r, tmp, 2 * 1024 * 1024),
            args.short,
            args.long,
        )
        report["new"] = _per_round(
            lambda r, tmp: bench_overhead.measure_fedcore(n, d, r, tmp), args.short, args.long
        )
        if old is not None:
            report[f"old ({args.old_code})"] = _per_round(
                lambda r, tmp: bench_overhead.measure_fedcore(n, d, r, tmp, code=old, label="old"),
                args.short,
                args.long,
            )
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
