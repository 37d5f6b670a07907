"""Differential privacy benchmark: MNIST test accuracy versus epsilon (delta = 1e-5).

Two parts, both simulated in one process with fedcore's own DP code paths (the worker-side
clipping of :func:`fedcore.privacy.privatize_update`, the coordinator-side
:class:`fedcore.privacy.DifferentialPrivacy` wrapper and its accountant, and the Opacus
DP-SGD loop :class:`fedcore.privacy.dpsgd.DPSGD`):

* client-level DP-FedAvg (McMahan et al. 2018) with ``--clients`` simulated workers (IID
  shards of the 60,000 training images), a fraction sampled per round, for several noise
  multipliers;
* record-level DP-SGD (Abadi et al. 2016) in ``--silos`` silos averaged with FedAvg, for
  several per-silo epsilon targets (noise calibrated with the silo's accountant), once per
  accountant in ``--silo-accountants`` (``rdp`` is how fedcore calibrated before issue 22,
  ``best`` the tighter of RDP and PLD it uses now).

Client-level runs report the epsilon fedcore reports now (each worker at q = 1 over the
rounds it was sampled in, the largest) beside the one it reported before issue 22 (RDP at
q = sampled / workers, which assumed secret Poisson sampling the sampler never did).

Writes ``results.json`` and ``accuracy_vs_epsilon.png`` to ``--out``. ``--quick`` runs a
tiny version (seconds) to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from fedcore.data import load_mnist, partition
from fedcore.data.shards import ArrayDataset
from fedcore.models import build_model, get_weights, set_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.privacy import DifferentialPrivacy, privatize_update
from fedcore.privacy.accountant import Mechanism, calibrate_noise_multiplier, epsilon_of_history
from fedcore.privacy.client import ClientDP
from fedcore.privacy.dpsgd import DPSGD
from fedcore.privacy.dpsgd import RELATION as DPSGD_RELATION
from fedcore.strategy import FedAvg, FitResult, WeightedMeanAggregator, WorkerInfo
from fedcore.training import evaluate, train
from fedcore.weights import Weights

ROOT = Path(__file__).resolve().parent.parent
DELTA = 1e-5


def _shards(num: int, limit: int | None, seed: int = 0) -> list[ArrayDataset]:
    x, y = load_mnist("train")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return [ArrayDataset(x[idx], y[idx]) for idx in partition(y, num, "iid", seed=seed)]


def _test(limit: int | None) -> ArrayDataset:
    tx, ty = load_mnist("test")
    return ArrayDataset(tx[:limit], ty[:limit]) if limit else ArrayDataset(tx, ty)


def client_level(
    args: argparse.Namespace, shards: Sequence[ArrayDataset], test: ArrayDataset
) -> list[dict[str, Any]]:
    """DP-FedAvg over many simulated workers, one run per noise multiplier."""
    spec = ModelSpec(args.client_model)
    workers = [WorkerInfo(f"w{i}", f"w{i}", len(s)) for i, s in enumerate(shards)]
    per_round = max(1, round(args.client_fraction * len(workers)))
    runs = []
    for z in args.client_noise:
        rng = np.random.default_rng(0)
        model = build_model(spec, seed=0)
        weights = get_weights(model)
        private = z > 0
        dp = (
            DifferentialPrivacy(
                FedAvg(),
                noise_multiplier=z,
                clipping_norm=args.client_clip,
                delta=DELTA,
            )
            if private
            else None
        )
        config = TrainConfig(epochs=1, batch_size=args.client_batch, learning_rate=args.client_lr)
        started = time.perf_counter()
        history = []
        for r in range(1, args.client_rounds + 1):
            chosen = sorted(rng.choice(len(workers), per_round, replace=False).tolist())
            sampled = [workers[i] for i in chosen]
            if dp is not None:
                instructions = dp.configure_fit(r, sampled, config)
                aggregator = dp.start_aggregation(r, weights)
            else:
                aggregator = WeightedMeanAggregator()
            results = []
            for i in chosen:
                set_weights(model, weights)
                local = train(model, shards[i], config)
                updated = get_weights(model)
                if dp is not None:
                    request = ClientDP.from_extra(instructions[0].config.extra)
                    assert request is not None
                    p = privatize_update(weights, updated, request, rng=rng)
                    aggregator.add({k: np.add(weights[k], p.delta[k]) for k in weights}, 1)
                else:
                    aggregator.add(updated, local.num_examples)
                results.append(FitResult(workers[i], local.num_examples, {}))
            aggregate = aggregator.result()
            weights = dp.aggregate_fit(r, weights, aggregate, results, []) if dp else aggregate
            if r % args.eval_every == 0 or r == args.client_rounds:
                set_weights(model, weights)
                acc = evaluate(model, test).accuracy
                eps = dp.privacy_metrics()["epsilon"] if dp else math.inf
                before = (
                    epsilon_of_history(
                        [(z, per_round / len(workers), r)], delta=DELTA, mechanism="rdp"
                    )
                    if dp
                    else math.inf
                )
                history.append(
                    {"round": r, "accuracy": acc, "epsilon": eps, "epsilon_before": before}
                )
                print(
                    f"  client-level z={z:g} round {r}: accuracy {acc:.4f} epsilon {eps:.3f} "
                    f"(reported before issue 22: {before:.3f})"
                )
        runs.append(
            {
                "kind": "client-level DP-FedAvg",
                "noise_multiplier": z,
                "clip_norm": args.client_clip,
                "workers": len(workers),
                "sampled_per_round": per_round,
                "rounds": args.client_rounds,
                "epsilon": history[-1]["epsilon"],
                "epsilon_before": history[-1]["epsilon_before"],
                "accountant": "per-worker, best" if private else None,
                "accuracy": history[-1]["accuracy"],
                "history": history,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    return runs


def _fedavg(updates: Sequence[tuple[Weights, int]]) -> Weights:
    agg = WeightedMeanAggregator()
    for w, n in updates:
        agg.add(w, n)
    return agg.result()


def record_level(
    args: argparse.Namespace, shards: Sequence[ArrayDataset], test: ArrayDataset
) -> list[dict[str, Any]]:
    """DP-SGD in each silo (Opacus), FedAvg across silos, one run per epsilon target."""
    spec = ModelSpec(args.silo_model)
    config = TrainConfig(
        epochs=args.silo_epochs,
        batch_size=args.silo_batch,
        learning_rate=args.silo_lr,
        momentum=args.silo_momentum,
    )
    runs = []
    # "-": no accountant (a silo without DP-SGD); only ever read when the target is positive.
    settings: list[tuple[float, str]] = [
        (target, mechanism)
        for target in args.silo_epsilon
        for mechanism in (args.silo_accountants if target > 0 else ["-"])
    ]
    for target, name in settings:
        mechanism = cast(Mechanism, name)
        size = min(len(s) for s in shards)
        q = 1 / math.ceil(size / args.silo_batch)
        steps = args.silo_rounds * args.silo_epochs * round(1 / q)
        private = target > 0
        z = (
            calibrate_noise_multiplier(
                target_epsilon=target,
                delta=DELTA,
                sample_rate=q,
                steps=steps,
                mechanism=mechanism,
                relation=DPSGD_RELATION,
            )
            if private
            else 0.0
        )
        loops = [
            DPSGD(
                noise_multiplier=z, max_grad_norm=args.silo_clip, delta=DELTA, mechanism=mechanism
            )
            if private
            else None
            for _ in shards
        ]
        model = build_model(spec, seed=0)
        weights = get_weights(model)
        started = time.perf_counter()
        history = []
        for r in range(1, args.silo_rounds + 1):
            updates = []
            for i, (shard, loop) in enumerate(zip(shards, loops, strict=True)):
                set_weights(model, weights)
                local = replace_seed(config, 1000 * r + i)
                if loop is not None:
                    loop(model, shard, local, torch.device("cpu"))
                else:
                    train(model, shard, local)
                updates.append((get_weights(model), len(shard)))
            weights = _fedavg(updates)
            set_weights(model, weights)
            acc = evaluate(model, test).accuracy
            eps = max(loop.epsilon for loop in loops) if private else math.inf  # type: ignore[union-attr]
            history.append({"round": r, "accuracy": acc, "epsilon": eps})
            print(
                f"  record-level target {target:g} ({mechanism}, z={z:.3f}) round {r}: "
                f"accuracy {acc:.4f} epsilon {eps:.3f}"
            )
        runs.append(
            {
                "kind": "record-level DP-SGD",
                "target_epsilon": target if private else None,
                "accountant": mechanism if private else None,
                "noise_multiplier": z,
                "clip_norm": args.silo_clip,
                "silos": len(shards),
                "rounds": args.silo_rounds,
                "batch_size": args.silo_batch,
                "epsilon": history[-1]["epsilon"],
                "accuracy": history[-1]["accuracy"],
                "history": history,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    return runs


def replace_seed(config: TrainConfig, seed: int) -> TrainConfig:
    from dataclasses import replace

    return replace(config, seed=seed)


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("client-level DP-FedAvg", "o"), ("record-level DP-SGD", "s")):
        points = [(r["epsilon"], r["accuracy"]) for r in runs if r["kind"] == kind]
        finite = sorted(p for p in points if math.isfinite(p[0]))
        if finite:
            ax.plot(*zip(*finite, strict=True), marker=marker, label=kind)
        for eps, acc in points:
            if not math.isfinite(eps):
                ax.axhline(acc, linestyle=":", color="grey")
                ax.annotate(
                    f"{kind.split()[0]} no DP", (0.02, acc), xycoords=("axes fraction", "data")
                )
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta = {DELTA:g})")
    ax.set_ylabel("MNIST test accuracy")
    ax.set_title("fedcore: accuracy vs privacy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_dp")
    p.add_argument("--quick", action="store_true", help="a tiny run to check the script")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", choices=["client", "record"], help="skip one part")
    p.add_argument(
        "--append", action="store_true", help="add to the runs already in --out/results.json"
    )
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--client-fraction", type=float, default=0.5)
    p.add_argument("--client-rounds", type=int, default=30)
    p.add_argument("--client-model", default="logreg")
    p.add_argument("--client-clip", type=float, default=0.5)
    p.add_argument("--client-lr", type=float, default=0.05)
    p.add_argument("--client-batch", type=int, default=20)
    p.add_argument("--client-noise", type=float, nargs="+", default=[0.0, 0.3, 0.5, 1.0, 2.0])
    p.add_argument("--silos", type=int, default=4)
    p.add_argument("--silo-rounds", type=int, default=10)
    p.add_argument("--silo-epochs", type=int, default=1)
    p.add_argument("--silo-model", default="mnist-dpcnn")
    p.add_argument("--silo-batch", type=int, default=1024)
    p.add_argument("--silo-lr", type=float, default=2.0)
    p.add_argument("--silo-momentum", type=float, default=0.5)
    p.add_argument("--silo-clip", type=float, default=1.0)
    p.add_argument("--silo-epsilon", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    p.add_argument("--silo-accountants", nargs="+", default=["rdp", "best"])
    p.add_argument(
        "--limit", type=int, help="use only the first N training images (a small setting)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    limit = args.limit
    if args.quick:
        limit, args.clients, args.client_rounds, args.silo_rounds = 4000, 10, 2, 1
        args.client_noise, args.silo_epsilon, args.eval_every = [0.0, 1.0], [2.0], 1
        args.silo_batch = 256
    args.out.mkdir(parents=True, exist_ok=True)
    test = _test(2000 if args.quick else None)
    runs: list[dict[str, Any]] = []
    previous = args.out / "results.json"
    if args.append and previous.exists():
        runs = json.loads(previous.read_text())["runs"]
    started = time.perf_counter()
    if args.skip != "client":
        print(f"== client-level DP-FedAvg, {args.clients} workers")
        runs += client_level(args, _shards(args.clients, limit), test)
    if args.skip != "record":
        print(f"== record-level DP-SGD, {args.silos} silos")
        runs += record_level(args, _shards(args.silos, limit), test)
    report = {
        "delta": DELTA,
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "machine": {"platform": platform.platform(), "torch_threads": args.threads},
        "seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    _plot(runs, args.out / "accuracy_vs_epsilon.png")
    print(
        f"{'kind':<24}{'accountant':>18}{'noise z':>9}{'epsilon':>10}{'before':>10}{'accuracy':>10}"
    )
    for r in runs:
        print(
            f"{r['kind']:<24}{r.get('accountant') or '-':>18}{r['noise_multiplier']:>9.3f}"
            f"{r['epsilon']:>10.3f}{r.get('epsilon_before', math.nan):>10.3f}{r['accuracy']:>10.4f}"
        )
    print(f"wrote {args.out / 'results.json'} and {args.out / 'accuracy_vs_epsilon.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
