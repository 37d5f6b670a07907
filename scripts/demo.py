"""The main job: a local federation on real MNIST (`make demo`).

Splits the bundled MNIST into IID silo shards, starts a coordinator and the workers as
separate processes on localhost, and trains the McMahan et al. CNN with FedAvg. The
coordinator prints a table row per round; the run ends with the final test accuracy.
Exit status: 0 when the target accuracy is reached, 1 when not, 2 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="mnist-cnn")
    p.add_argument("--scheme", default="iid", choices=["iid", "dirichlet", "shards"])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--target", type=float, default=0.975, help="test accuracy to reach")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = p.parse_args()

    started = time.perf_counter()
    out: Path = args.out
    shards = out / "shards"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    print(f"== splitting MNIST into {args.workers} {args.scheme} shards", flush=True)
    subprocess.run(
        [
            str(BIN / "fed-data"),
            "split",
            "--out",
            str(shards),
            "--num-shards",
            str(args.workers),
            "--scheme",
            args.scheme,
            "--seed",
            "0",
        ],
        check=True,
    )
    metrics = out / "metrics.jsonl"
    print(
        f"== starting a coordinator and {args.workers} workers ({args.model}, {args.rounds} rounds)",
        flush=True,
    )
    server = subprocess.Popen(
        [
            str(BIN / "fed-server"),
            "--listen",
            "127.0.0.1:0",
            "--model",
            args.model,
            "--min-workers",
            str(args.workers),
            "--rounds",
            str(args.rounds),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--lr",
            "0.05",
            "--eval-data",
            str(shards / "test.npz"),
            "--metrics-out",
            str(metrics),
            "--save-model",
            str(out / "model.safetensors"),
            "--threads",
            "1",
            "--join-timeout",
            "120",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    workers: list[subprocess.Popen[bytes]] = []
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        match = re.search(r"listening on ([\d.]+:\d+)", first)
        if not match:
            print(f"demo: the coordinator did not start: {first!r}", file=sys.stderr)
            return 2
        print(first, end="", flush=True)
        for i in range(args.workers):
            log = (out / f"worker-{i}.log").open("w")
            workers.append(
                subprocess.Popen(
                    [
                        str(BIN / "fed-worker"),
                        "--server",
                        match.group(1),
                        "--data",
                        str(shards / f"shard-{i}.npz"),
                        "--name",
                        f"silo-{i}",
                        "--threads",
                        str(args.threads),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        for line in server.stdout:
            print(line, end="", flush=True)
        if server.wait(timeout=60) != 0:
            print("demo: the coordinator failed; see the messages above", file=sys.stderr)
            return 2
        for w in workers:
            if w.wait(timeout=60) != 0:
                print(f"demo: a worker failed; see {out}/worker-*.log", file=sys.stderr)
                return 2
    finally:
        everyone: list[subprocess.Popen[Any]] = [server, *workers]
        for proc in everyone:
            if proc.poll() is None:
                proc.kill()

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    accuracy = rows[-1]["accuracy"]
    elapsed = time.perf_counter() - started
    print(
        f"\nfinal test accuracy {100 * accuracy:.2f}% after {len(rows)} rounds; "
        f"{elapsed:.0f} s in all; metrics in {metrics}, model in {out / 'model.safetensors'}"
    )
    if accuracy < args.target:
        print(f"demo: below the target of {100 * args.target:.1f}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
