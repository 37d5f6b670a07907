"""Asynchronous FedBuff against synchronous FedAvg when one silo is much slower.

Runs two federations one after the other on the same MNIST shards, each a real `fed-server`
and real worker processes on localhost: FedAvg, whose every round waits for the slowest
worker, and FedBuff (Nguyen et al. 2022), which updates the global model whenever
``--buffer-size`` results are in. One worker is artificially ``--slowdown`` times slower: after
each local training it sleeps ``(slowdown - 1)`` times the training time. Each federation is
stopped (SIGINT) once its test accuracy reaches ``--target``. Prints one JSON object: for each
strategy the wall-clock seconds from the start of training to the first model at the target
(``elapsed_s`` of that metrics row), the rounds/updates it took, and the speed-up.

    .venv/bin/python scripts/fedbuff_vs_fedavg.py --target 0.90 --out runs/fedbuff
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _worker(args: argparse.Namespace) -> int:
    """Worker mode: a TorchTrainer whose training is ``slowdown`` times slower."""
    import torch

    from fedcore.data import load_shard
    from fedcore.training import train
    from fedcore.worker import TorchTrainer, Worker

    torch.set_num_threads(1)
    slowdown = args.slowdown

    def slow_train(model: Any, data: Any, config: Any, device: Any) -> Any:
        started = time.perf_counter()
        result = train(model, data, config, device=device)
        time.sleep((slowdown - 1.0) * (time.perf_counter() - started))  # simulated slowness
        return result

    # Warm up (thread pools, allocator) before joining, so that the first round measures
    # training, not start-up costs multiplied by the slowdown.
    from fedcore.data import ArrayDataset
    from fedcore.models import build_model
    from fedcore.plan import ModelSpec, TrainConfig

    data = load_shard(args.data)
    train(
        build_model(ModelSpec(args.model)), ArrayDataset(data.x[:512], data.y[:512]), TrainConfig()
    )
    trainer = TorchTrainer(data, train_fn=slow_train)
    asyncio.run(Worker(args.server, args.name, trainer).run())
    return 0


def _federation(args: argparse.Namespace, strategy: str, options: dict[str, Any]) -> dict[str, Any]:
    out: Path = args.out / strategy
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [
            str(BIN / "fed-server"),
            "--listen",
            "127.0.0.1:0",
            "--model",
            args.model,
            "--strategy",
            strategy,
            "--strategy-options",
            json.dumps(options),
            "--min-workers",
            str(args.workers),
            "--rounds",
            str(args.max_rounds),
            "--lr",
            str(args.lr),
            "--eval-data",
            str(args.out / "shards" / "test.npz"),
            "--metrics-out",
            str(metrics),
            "--threads",
            "1",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    workers: list[subprocess.Popen[bytes]] = []
    started = time.perf_counter()
    try:
        assert server.stdout is not None
        match = re.search(r"listening on ([\d.]+:\d+)", server.stdout.readline())
        if not match:
            raise RuntimeError("the coordinator did not start")
        for i in range(args.workers):
            slowdown = args.slowdown if i == 0 else 1.0
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "worker",
                        "--server",
                        match.group(1),
                        "--data",
                        str(args.out / "shards" / f"shard-{i}.npz"),
                        "--name",
                        f"{'slow' if i == 0 else 'fast'}-{i}",
                        "--slowdown",
                        str(slowdown),
                        "--model",
                        args.model,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(out / f"worker-{i}.log").open("w"),
                    env=env,
                )
            )
        reached: dict[str, Any] | None = None
        deadline = time.monotonic() + args.timeout
        while server.poll() is None and time.monotonic() < deadline:
            rows = _rows(metrics)
            reached = next((r for r in rows if (r["accuracy"] or 0) >= args.target), None)
            if reached is not None:
                server.send_signal(signal.SIGINT)
                break
            time.sleep(0.2)  # polling a file another process writes
        server.wait(timeout=120)
        for w in workers:
            # A coordinator stopped before its last round leaves its workers reconnecting.
            w.send_signal(signal.SIGINT)
            w.wait(timeout=60)
    finally:
        everyone: list[subprocess.Popen[Any]] = [server, *workers]
        for proc in everyone:
            if proc.poll() is None:
                proc.kill()
    rows = _rows(metrics)
    staleness = [r["staleness"]["mean"] for r in rows if "staleness" in r]
    return {
        "reached_target": reached is not None,
        "time_to_target_s": reached["elapsed_s"] if reached else None,
        "rounds_to_target": reached["round"] if reached else None,
        "rounds_run": len(rows),
        "best_accuracy": max((r["accuracy"] or 0) for r in rows) if rows else None,
        "mean_round_s": round(rows[-1]["elapsed_s"] / len(rows), 3) if rows else None,
        "mean_staleness": round(sum(staleness) / len(staleness), 2) if staleness else None,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def _split(args: argparse.Namespace) -> None:
    import numpy as np

    from fedcore.data import load_mnist, partition, save_shard

    shards = args.out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    x, y = load_mnist("train")
    n = args.workers * args.examples
    x, y = x[:n], y[:n]
    for i, idx in enumerate(partition(y, args.workers, "iid", seed=0)):
        save_shard(shards / f"shard-{i}.npz", x[idx], y[idx])
    tx, ty = load_mnist("test")
    keep = np.arange(args.test_examples)
    save_shard(shards / "test.npz", tx[keep], ty[keep])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        w = argparse.ArgumentParser()
        w.add_argument("worker")
        w.add_argument("--server", required=True)
        w.add_argument("--data", type=Path, required=True)
        w.add_argument("--name", required=True)
        w.add_argument("--slowdown", type=float, default=1.0)
        w.add_argument("--model", default="mnist-mlp")
        return _worker(w.parse_args())
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=3, help="worker 0 is the slow one")
    p.add_argument("--slowdown", type=float, default=5.0)
    p.add_argument("--examples", type=int, default=2000, help="training examples per worker")
    p.add_argument("--test-examples", type=int, default=2000)
    p.add_argument("--model", default="mnist-mlp")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--target", type=float, default=0.90, help="test accuracy to reach")
    p.add_argument("--buffer-size", type=int, default=2)
    p.add_argument("--max-staleness", type=int, default=20)
    p.add_argument("--max-rounds", type=int, default=200, help="cap on rounds / updates")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per federation")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fedbuff_vs_fedavg")
    args = p.parse_args()
    _split(args)
    fedavg = _federation(args, "fedavg", {})
    fedbuff = _federation(
        args, "fedbuff", {"buffer-size": args.buffer_size, "max-staleness": args.max_staleness}
    )
    speedup = (
        round(fedavg["time_to_target_s"] / fedbuff["time_to_target_s"], 2)
        if fedavg["time_to_target_s"] and fedbuff["time_to_target_s"]
        else None
    )
    report = {
        "setup": {
            "workers": args.workers,
            "slow_worker_slowdown": args.slowdown,
            "examples_per_worker": args.examples,
            "test_examples": args.test_examples,
            "model": args.model,
            "local_epochs": 1,
            "lr": args.lr,
            "target_accuracy": args.target,
            "fedbuff": {"buffer_size": args.buffer_size, "max_staleness": args.max_staleness},
        },
        "fedavg": fedavg,
        "fedbuff": fedbuff,
        "speedup_time_to_target": speedup,
    }
    print(json.dumps(report, indent=2))
    return 0 if speedup is not None else 1


if __name__ == "__main__":
    sys.exit(main())
