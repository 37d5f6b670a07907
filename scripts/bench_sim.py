"""Scale figures of fed-sim: seconds per round and peak memory of every process.

Each configuration is one ``fed-sim`` run in a fresh process (so its peak memory is its own):
logistic regression on MNIST's 60,000 training images split IID over N virtual clients,
C = 0.1, E = 1, B = 10, centralized evaluation on the test set. By default: 100 and 1,000
clients on the local engine, 1,000 on the Ray engine (a private local Ray instance).

    python scripts/bench_sim.py                         # the three default configurations
    python scripts/bench_sim.py --runs local:100 local:1000 ray:1000 --rounds 3
    python scripts/bench_sim.py --quick                 # local:20, local:200, 2 rounds

Writes ``--out`` (JSON) and prints a table. The coordinator's peak is the ``fed-sim`` process,
which also holds the test set and, with Ray, Ray's driver; a host's peak is its process's
(one torch runtime plus the virtual workers' runtimes and the data).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedcore.data import load_mnist, save_shard

BIN = Path(sys.executable).parent


def run(engine: str, clients: int, args: argparse.Namespace, test_set: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            str(BIN / "fed-sim"),
            "--num-clients",
            str(clients),
            "--engine",
            engine,
            "--hosts",
            str(args.hosts),
            "--concurrency",
            "1",
            "--model",
            "logreg",
            "--rounds",
            str(args.rounds),
            "--epochs",
            "1",
            "--batch-size",
            "10",
            "--lr",
            "0.1",
            "--eval-data",
            str(test_set),
            "--strategy-options",
            json.dumps({"fraction-fit": args.fraction}),
            "--threads",
            "1",
            "--quiet",
            "--report",
            str(report),
        ]
        if args.num_examples:
            command += ["--num-examples", str(args.num_examples)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise SystemExit(f"{engine}:{clients} failed:\n{done.stderr[-3000:]}")
        summary: dict[str, Any] = json.loads(report.read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["local:100", "local:1000", "ray:1000"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--hosts", type=int, default=os.cpu_count() or 1)
    p.add_argument("--num-examples", type=int)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=Path("build/bench_sim.json"))
    p.add_argument("--quick", action="store_true", help="local:20 and local:200, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.rounds, args.num_examples = ["local:20", "local:200"], 2, 6000
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tx, ty = load_mnist("test")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        test_set = save_shard(Path(tmp) / "test.npz", tx, ty)
        for spec in args.runs:
            engine, _, clients = spec.partition(":")
            summary = run(engine, int(clients), args, test_set)
            print(json.dumps(summary), file=sys.stderr)
            results.append(summary)
    args.out.write_text(
        json.dumps({"rounds": args.rounds, "hosts": args.hosts, "runs": results}, indent=2) + "\n"
    )
    print(f"{'engine':<7}{'clients':>8}{'s/round':>22}{'coordinator MB':>16}  host MB")
    for r in results:
        per_round = " ".join(f"{s:.1f}" for s in r["seconds_per_round"])
        print(
            f"{r['engine']:<7}{r['clients']:>8}{per_round:>22}"
            f"{r['coordinator_peak_rss_mb']:>16}  {r['host_peak_rss_mb']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
