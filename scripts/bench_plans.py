"""mnist-cnn trained from the registry and from its plan, in one run: round times and accuracy.

Federations of real processes with the same seed, data and training config: one with
``fed-server --model mnist-cnn`` (workers build the registered model), then with
``--model mnist-cnn --ship-plan`` (workers get the verified torch.export graph and no model
name they know) three times: plans in the worker's sandbox (the default), plans in the
worker's own process (``[plans] sandbox = false``), and, with ``--main-bin DIR``, the
``fed-server``/``fed-worker`` of another checkout (main's code, before the sandbox). Prints
JSON: per-round durations, fit times and accuracies of each, the ratios of the median round
and fit times (rounds after the first, which pays one-time costs: torch's imports, the plan's
verification and deserialization, the sandbox's start), and the largest accuracy gap::

    python scripts/bench_plans.py [--workers 2] [--examples 600] [--rounds 3] \
        [--main-bin /work/main/.venv/bin] [--out F]

Targets: plan rounds within 10% of registry rounds (issue 13) and, with the sandbox on,
within 10% of main's plan rounds (issue 23); the same accuracy curve.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def _make_shards(root: Path, workers: int, examples: int) -> None:
    from fedcore.data import load_mnist, partition, save_shard

    x, y = load_mnist("train")
    x, y = x[: workers * examples], y[: workers * examples]
    for i, idx in enumerate(partition(y, workers, "iid", seed=0)):
        save_shard(root / f"shard-{i}.npz", x[idx], y[idx])
    tx, ty = load_mnist("test")
    save_shard(root / "test.npz", tx[:2000], ty[:2000])


def _federation(
    root: Path,
    label: str,
    extra: list[str],
    args: argparse.Namespace,
    *,
    worker_extra: tuple[str, ...] = (),
    bin_dir: Path = BIN,
) -> list[dict[str, Any]]:
    metrics = root / f"{label}.jsonl"
    log = (root / f"{label}-server.log").open("w")
    server = subprocess.Popen(
        [
            str(bin_dir / "fed-server"), "--listen", "127.0.0.1:0", "--model", "mnist-cnn",
            *extra, "--rounds", str(args.rounds), "--min-workers", str(args.workers),
            "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--seed", "0",
            "--eval-data", str(root / "test.npz"), "--metrics-out", str(metrics),
            "--threads", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    port = None
    deadline = time.monotonic() + 300
    while port is None and time.monotonic() < deadline:
        time.sleep(0.5)
        found = re.search(r"listening on [\d.]+:(\d+)", (root / f"{label}-server.log").read_text())
        port = int(found.group(1)) if found else None
        if server.poll() is not None:
            break
    if port is None:
        raise SystemExit(
            f"{label}: the server did not start:\n{(root / f'{label}-server.log').read_text()}"
        )
    workers = [
        subprocess.Popen(
            [
                str(bin_dir / "fed-worker"),
                "--server",
                f"127.0.0.1:{port}",
                "--data",
                str(root / f"shard-{i}.npz"),
                "--name",
                f"w{i}",
                "--threads",
                "1",
                *worker_extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(args.workers)
    ]
    try:
        server.wait(timeout=args.timeout)
    finally:
        for p in [server, *workers]:
            if p.poll() is None:
                p.kill()
            p.wait()
        log.close()
    if server.returncode != 0:
        raise SystemExit(
            f"{label}: fed-server failed:\n{(root / f'{label}-server.log').read_text()}"
        )
    return [json.loads(line) for line in metrics.read_text().splitlines() if line]


def _interleaved(root: Path, repeats: int) -> dict[str, Any]:
    """Fit times of mnist-cnn's plan on shard 0 in this process: sandbox on and off taken in
    turns, so both see the same load (the federations above run one after the other)."""
    import torch

    from fedcore.codec import make_header
    from fedcore.data.shards import load_shard
    from fedcore.model_catalog import ModelCatalog
    from fedcore.models import build_model
    from fedcore.plan import ModelSpec, TrainConfig
    from fedcore.plans import export_plan
    from fedcore.policy import PlanRules
    from fedcore.v1 import fedcore_pb2 as pb
    from fedcore.worker.gate import Gate
    from fedcore.worker.plans import PlanLibrary
    from fedcore.worker.trainer import TorchTrainer

    torch.set_num_threads(1)
    plan = export_plan(build_model(ModelSpec("mnist-cnn"), seed=0), torch.zeros(2, 1, 28, 28))
    data = load_shard(root / "shard-0.npz")
    config = TrainConfig(epochs=1, batch_size=32, learning_rate=0.05)
    trainers = {}
    for label, sandbox in (("sandbox", True), ("in_process", False)):
        library = PlanLibrary(PlanRules(sandbox=sandbox), max_model_bytes=1 << 30)
        task = pb.Task(
            kind=pb.TASK_KIND_FIT,
            model=pb.ModelSpec(name=plan.model_name),
            train=config.to_proto(),
            weights=make_header(plan.weights, 1 << 20),
            plan=plan.program,
        )
        Gate(ModelCatalog(), max_model_bytes=1 << 30, plans=library).admit(task)
        trainers[label] = TorchTrainer(data, plans=library)
    spec = ModelSpec(plan.model_name)
    times: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(repeats + 1):  # the first of each pays one-time costs
        for label, trainer in trainers.items():
            started = time.perf_counter()
            trainer.fit(spec, plan.weights, config)
            times[label].append(round(time.perf_counter() - started, 3))
    later = {label: statistics.median(t[1:]) for label, t in times.items()}
    return {
        "fit_s": times,
        "sandbox_vs_in_process_fit": later["sandbox"] / later["in_process"],
    }


def _later_median(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows[1:]] or [float(r[key]) for r in rows]
    return statistics.median(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--examples", type=int, default=600, help="training examples per worker")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--main-bin", type=Path, help="bin folder of another checkout's venv (main's code)"
    )
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="N",
        help="also time N fits with the sandbox on and off in turns, in this process",
    )
    args = p.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    started = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-plans-") as tmp:
        root = Path(tmp)
        _make_shards(root, args.workers, args.examples)
        off = root / "no-sandbox.toml"
        off.write_text("[plans]\nsandbox = false\n")
        runs["registry"] = _federation(root, "registry", [], args)
        runs["plan_sandbox"] = _federation(root, "plan", ["--ship-plan"], args)
        runs["plan_in_process"] = _federation(
            root, "plan-in-process", ["--ship-plan"], args, worker_extra=("--policy", str(off))
        )
        if args.main_bin is not None:
            runs["plan_main"] = _federation(
                root, "plan-main", ["--ship-plan"], args, bin_dir=args.main_bin
            )
        interleaved = _interleaved(root, args.interleaved) if args.interleaved else None
    plan = runs["plan_sandbox"]
    registry = runs["registry"]

    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in runs or b not in runs:
            return None
        return _later_median(runs[a], key) / _later_median(runs[b], key)

    result = {
        "model": "mnist-cnn",
        "workers": args.workers,
        "examples_per_worker": args.examples,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "plan_hash": plan[0].get("plan") if plan else None,
        "load_average_before": started,
        "load_average_after": os.getloadavg(),
        **{
            label: {
                "duration_s": [r["duration_s"] for r in rows],
                "fit_s": [r["fit_s"] for r in rows],
                "accuracy": [r["accuracy"] for r in rows],
            }
            for label, rows in runs.items()
        },
        "round_time_ratio": _later_median(plan, "duration_s")
        / _later_median(registry, "duration_s"),
        "fit_time_ratio": _later_median(plan, "fit_s") / _later_median(registry, "fit_s"),
        "sandbox_vs_in_process_round": ratio("plan_sandbox", "plan_in_process", "duration_s"),
        "sandbox_vs_in_process_fit": ratio("plan_sandbox", "plan_in_process", "fit_s"),
        "sandbox_vs_main_round": ratio("plan_sandbox", "plan_main", "duration_s"),
        "sandbox_vs_main_fit": ratio("plan_sandbox", "plan_main", "fit_s"),
        "interleaved": interleaved,
        "max_accuracy_gap": max(
            abs(a["accuracy"] - b["accuracy"])
            for rows in runs.values()
            for a, b in zip(registry, rows, strict=True)
        ),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
