"""The cross-silo MNIST benchmark: a real coordinator and N worker processes on localhost.

For each configuration it splits MNIST into silos (``iid``, ``dirichlet`` with ``alpha``, or
``shards``), starts ``fed-server`` and ``fed-worker`` processes, runs the rounds and records per
round: test accuracy and loss (centralized, on the test set), wall time, bytes each way, and
epsilon when differential privacy is on. It writes ``results.json``, ``results.md`` (Markdown
tables) and ``accuracy.png`` (accuracy versus round and versus wall-clock time), and reports
the rounds and seconds each configuration needed to reach ``--target``.

``--compare`` runs several configurations in one invocation, so that they are measured on the
same machine under the same load -- compare their *ratios*, not absolute seconds across runs::

    # the reference configuration: mnist-cnn, 4 IID silos of 15,000, 5 rounds of FedAvg
    python scripts/bench_mnist.py
    # several configurations, plotted together
    python scripts/bench_mnist.py --compare plain secagg:secagg=1 fp16:compression=float16
    python scripts/bench_mnist.py --compare @partitions --rounds 15
    python scripts/bench_mnist.py --compare @privacy @compression

A configuration is ``LABEL[:key=value,key=value...]``; keys are this script's options with
underscores (``scheme=dirichlet,alpha=0.5``, ``lr=0.1``, ``momentum=0.9``, ``strategy=fedavgm``,
``secagg=1``, ``compression=int8``, ``server=--some-flag 3`` for any other ``fed-server`` flag).
Values not given come from the command line. ``@privacy``, ``@compression``, ``@partitions``
and ``@strategies`` expand to preset lists, limited to what the installed ``fed-server``
supports.

Exit status: 0 when every configuration ran (whether or not it reached the target), 1 when a
run failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunConfig:
    """One benchmark configuration."""

    label: str = "fedavg"
    model: str = "mnist-cnn"
    workers: int = 4
    examples_per_worker: int = 15_000
    test_examples: int = 10_000
    scheme: str = "iid"
    alpha: float = 0.5
    classes_per_shard: int = 2
    rounds: int = 5
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    strategy: str = "fedavg"
    secagg: bool = False
    compression: str = "none"
    seed: int = 0
    threads: int = 1
    server: list[str] = field(default_factory=list)
    worker: list[str] = field(default_factory=list)

    def server_flags(self) -> list[str]:
        flags = [
            "--model", self.model,
            "--min-workers", str(self.workers),
            "--rounds", str(self.rounds),
            "--epochs", str(self.epochs),
            "--batch-size", str(self.batch_size),
            "--optimizer", self.optimizer,
            "--lr", repr(self.lr),
            "--momentum", repr(self.momentum),
            "--seed", str(self.seed),
        ]  # fmt: skip
        if self.strategy != "fedavg":
            flags += ["--strategy", self.strategy]
        if self.secagg:
            flags.append("--secagg")
        if self.compression != "none":
            flags += ["--compression", self.compression]
        return flags + self.server


_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_spec(spec: str, base: RunConfig) -> RunConfig:
    """``LABEL[:key=value,...]`` applied on top of ``base``."""
    label, _, rest = spec.partition(":")
    if not label:
        raise ValueError(f"configuration {spec!r} has no label; write LABEL:key=value,...")
    changes: dict[str, Any] = {"label": label}
    types = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types or key == "label":
            known = ", ".join(sorted(k for k in types if k != "label"))
            raise ValueError(f"configuration {spec!r}: bad setting {item!r}; known keys: {known}")
        kind = str(types[key])
        if kind == "bool":
            if value.lower() not in _BOOL:
                raise ValueError(f"configuration {spec!r}: {key} must be 1/0, got {value!r}")
            changes[key] = _BOOL[value.lower()]
        elif kind == "int":
            changes[key] = int(value)
        elif kind == "float":
            changes[key] = float(value)
        elif kind.startswith("list"):
            changes[key] = getattr(base, key) + shlex.split(value)
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------- capabilities


def server_capabilities() -> dict[str, Any]:
    """What the installed fed-server supports, read from its --help."""
    text = subprocess.run(
        [str(BIN / "fed-server"), "--help"], capture_output=True, text=True, timeout=600, check=True
    ).stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
    strategies: list[str] = []
    m = re.search(r"--strategy \{([^}]*)\}", text)
    if m:
        strategies = [s.strip() for s in m.group(1).split(",")]
    compressions: list[str] = []
    m = re.search(r"--compression \{([^}]*)\}", text)
    if m:
        compressions = [s.strip() for s in m.group(1).split(",")]
    return {
        "flags": flags,
        "strategies": strategies,
        "compressions": compressions,
    }


#: The @privacy preset's DP-SGD silos: Gaussian noise 1.0 x a per-example clip norm of 1.0.
DPSGD_WORKER_FLAGS = ("--dpsgd-noise-multiplier", "1.0", "--dpsgd-clip", "1.0")


def expand_preset(name: str, caps: dict[str, Any]) -> list[str]:
    """Specs for a ``@preset``, limited to what fed-server supports."""
    if name == "partitions":
        return ["iid", "dirichlet-0.5:scheme=dirichlet,alpha=0.5", "shards-2:scheme=shards"]
    if name == "privacy":
        # Record-level DP-SGD inside each silo, not client-level DP (fed-server --dp-*): the
        # latter's noise on the average shrinks only with the number of silos, and at 4 silos
        # even multiplier 0.5 with clip 1 drowns a 1.66M-parameter update (measured: 10%
        # accuracy after round 1, NaN in round 2). It needs tens of silos or more.
        dpsgd = "worker=" + " ".join(DPSGD_WORKER_FLAGS)
        return ["plain", "secagg:secagg=1", f"dpsgd:{dpsgd}", f"secagg+dpsgd:secagg=1,{dpsgd}"]
    if name == "compression":
        return ["none"] + [f"{c}:compression={c}" for c in caps["compressions"] if c != "none"]
    if name == "strategies":
        return [f"{s}:strategy={s}" for s in caps["strategies"]] or ["fedavg"]
    raise ValueError(
        f"unknown preset @{name}; use @partitions, @privacy, @compression, @strategies"
    )


# ---------------------------------------------------------------------------- one run


def make_shards(cfg: RunConfig, root: Path) -> Path:
    """Partition MNIST for ``cfg`` (cached by its data settings); return the directory."""
    from fedcore.data import load_mnist, partition, save_shard

    key = (
        f"{cfg.scheme}-a{cfg.alpha:g}-c{cfg.classes_per_shard}-w{cfg.workers}"
        f"-n{cfg.examples_per_worker}-t{cfg.test_examples}-s{cfg.seed}"
    )
    out = root / "shards" / key
    if (out / "test.npz").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    x, y = load_mnist("train")
    total = min(len(y), cfg.workers * cfg.examples_per_worker)
    x, y = x[:total], y[:total]
    parts = partition(
        y,
        cfg.workers,
        cfg.scheme,  # type: ignore[arg-type]
        seed=cfg.seed,
        alpha=cfg.alpha,
        classes_per_shard=cfg.classes_per_shard,
    )
    for i, idx in enumerate(parts):
        save_shard(out / f"shard-{i}.npz", x[idx], y[idx])
    tx, ty = load_mnist("test")
    save_shard(out / "test.npz", tx[: cfg.test_examples], ty[: cfg.test_examples])
    return out


def _kill_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


def run_one(cfg: RunConfig, out: Path, *, eval_threads: int, timeout: float) -> dict[str, Any]:
    """Run one configuration as real processes; return its results."""
    shards = make_shards(cfg, out)
    run_dir = out / "runs" / re.sub(r"[^A-Za-z0-9._+-]", "_", cfg.label)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    deadline = started + timeout
    server_cmd = [
        str(BIN / "fed-server"),
        "--listen", "127.0.0.1:0",
        *cfg.server_flags(),
        "--eval-data", str(shards / "test.npz"),
        "--metrics-out", str(metrics),
        "--threads", str(eval_threads),
        "--join-timeout", "300",
        "--progress", "plain",
    ]  # fmt: skip
    server_log = (run_dir / "server.log").open("w")
    server = subprocess.Popen(
        server_cmd, stdout=subprocess.PIPE, stderr=server_log, text=True, env=env
    )
    procs: list[subprocess.Popen[str]] = [server]
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        match = re.search(r"listening on ([\w.\[\]:]+:\d+)", first)
        if not match:
            server.wait(30)
            raise RuntimeError(
                f"[{cfg.label}] the coordinator did not start; see {run_dir / 'server.log'}:\n"
                + (run_dir / "server.log").read_text()[-2000:]
            )
        for i in range(cfg.workers):
            log = (run_dir / f"worker-{i}.log").open("w")
            worker_cmd = [
                str(BIN / "fed-worker"),
                "--server", match.group(1),
                "--data", str(shards / f"shard-{i}.npz"),
                "--name", f"silo-{i}",
                "--threads", str(cfg.threads),
                *cfg.worker,
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    worker_cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    text=True,
                )
            )
        console = [first.rstrip()]
        for line in server.stdout:
            console.append(line.rstrip())
            print(f"  [{cfg.label}] {line.rstrip()}", flush=True)
            if time.perf_counter() > deadline:
                raise RuntimeError(f"[{cfg.label}] still running after {timeout:g} s; stopped it")
        code = server.wait(max(1.0, deadline - time.perf_counter()))
        if code != 0:
            raise RuntimeError(
                f"[{cfg.label}] fed-server exited with {code}; see {run_dir / 'server.log'}:\n"
                + (run_dir / "server.log").read_text()[-2000:]
            )
        for i, w in enumerate(procs[1:]):
            if w.wait(max(1.0, deadline - time.perf_counter())) != 0:
                raise RuntimeError(
                    f"[{cfg.label}] worker {i} failed; see {run_dir / f'worker-{i}.log'}"
                )
    finally:
        _kill_all(procs)
        server_log.close()
    total_s = time.perf_counter() - started
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    (run_dir / "console.txt").write_text("\n".join(console) + "\n")
    return {"config": dataclasses.asdict(cfg), "rounds": summarize_rows(rows), "total_s": total_s}


def _epsilon(row: dict[str, Any]) -> float | None:
    """Client-level epsilon if the federation has one, else the largest DP-SGD silo's."""
    privacy = row.get("privacy") or {}
    for holder in (row, privacy, row.get("train") or {}):
        value = holder.get("epsilon") if isinstance(holder, dict) else None
        if isinstance(value, int | float):
            return float(value)
    silos = privacy.get("silos") if isinstance(privacy, dict) else None
    if isinstance(silos, dict) and silos:
        return max(float(s["epsilon"]) for s in silos.values())
    return None


def summarize_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: accuracy, loss, wall seconds of the round, elapsed seconds, bytes, epsilon."""
    out = []
    previous = 0.0
    for row in rows:
        elapsed = float(row.get("elapsed_s") or 0.0)
        out.append(
            {
                "round": row["round"],
                "accuracy": row.get("accuracy"),
                "loss": row.get("loss"),
                "round_s": round(elapsed - previous, 3),
                "elapsed_s": elapsed,
                "fit_s": row.get("fit_s"),
                "eval_s": row.get("eval_s"),
                "bytes_sent": row.get("bytes_sent"),
                "bytes_received": row.get("bytes_received"),
                "workers": row.get("workers"),
                "epsilon": _epsilon(row),
            }
        )
        previous = elapsed
    return out


def time_to_target(rounds: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The first round whose accuracy reaches ``target``, and the seconds it took."""
    for r in rounds:
        if r["accuracy"] is not None and r["accuracy"] >= target:
            return {"round": r["round"], "seconds": r["elapsed_s"]}
    return {"round": None, "seconds": None}


# ---------------------------------------------------------------------------- reports


def _fmt_pct(v: float | None) -> str:
    return f"{100 * v:.2f}" if v is not None else "-"


def markdown(results: dict[str, Any]) -> str:
    """The summary and per-round tables in Markdown."""
    target = results["target"]
    runs = results["runs"]
    lines = [
        f"# MNIST benchmark ({results['machine']['cpus']} CPUs, {results['started']})",
        "",
        f"target accuracy: {100 * target:.1f}%",
        "",
        "| config | final acc % | best acc % | rounds to target | s to target | s/round "
        "| MB sent/round | MB recv/round | epsilon | vs first |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base_spr: float | None = None
    for run in runs:
        rounds = run["rounds"]
        if not rounds:
            # The first line only: a table cell cannot hold the log excerpt results.json keeps.
            reason = (run.get("error") or "?").splitlines()[0].replace("|", "/")
            lines.append(f"| {run['config']['label']} | failed: {reason} |")
            continue
        accs = [r["accuracy"] for r in rounds if r["accuracy"] is not None]
        spr = rounds[-1]["elapsed_s"] / len(rounds)
        base_spr = base_spr or spr
        hit = run["target"]
        eps = rounds[-1]["epsilon"]
        lines.append(
            "| {label} | {final} | {best} | {rt} | {st} | {spr:.1f} | {sent:.2f} | {recv:.2f} "
            "| {eps} | {ratio:+.1f}% |".format(
                label=run["config"]["label"],
                final=_fmt_pct(accs[-1] if accs else None),
                best=_fmt_pct(max(accs) if accs else None),
                rt=hit["round"] if hit["round"] is not None else "not reached",
                st=f"{hit['seconds']:.1f}" if hit["seconds"] is not None else "-",
                spr=spr,
                sent=sum(r["bytes_sent"] or 0 for r in rounds) / len(rounds) / 1e6,
                recv=sum(r["bytes_received"] or 0 for r in rounds) / len(rounds) / 1e6,
                eps=f"{eps:.3f}" if eps is not None else "-",
                ratio=100 * (spr / base_spr - 1),
            )
        )
    lines += ["", "Per round: test accuracy % (seconds of the round)", ""]
    labels = [run["config"]["label"] for run in runs]
    lines.append("| round | " + " | ".join(labels) + " |")
    lines.append("| ---: |" + " ---: |" * len(labels))
    most = max((len(run["rounds"]) for run in runs), default=0)
    for i in range(most):
        cells = []
        for run in runs:
            if i < len(run["rounds"]):
                r = run["rounds"][i]
                cells.append(f"{_fmt_pct(r['accuracy'])} ({r['round_s']:.1f})")
            else:
                cells.append("")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Configurations:", ""]
    for run in runs:
        c = run["config"]
        lines.append(
            f"- **{c['label']}**: {c['model']}, {c['workers']} {c['scheme']}"
            + (f" (alpha={c['alpha']:g})" if c["scheme"] == "dirichlet" else "")
            + f" silos of <= {c['examples_per_worker']}, {c['rounds']} rounds, "
            f"{c['epochs']} epoch(s), batch {c['batch_size']}, {c['optimizer']} lr {c['lr']:g} "
            f"momentum {c['momentum']:g}, strategy {c['strategy']}, secagg {c['secagg']}, "
            f"compression {c['compression']}"
            + (f", server flags `{' '.join(c['server'])}`" if c["server"] else "")
            + (f", worker flags `{' '.join(c['worker'])}`" if c["worker"] else "")
            + f"; {run.get('total_s', 0):.0f} s in all"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy versus round and versus wall-clock time, every configuration together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in results["runs"]:
        rounds = [r for r in run["rounds"] if r["accuracy"] is not None]
        if not rounds:
            continue
        label = run["config"]["label"]
        acc = [100 * r["accuracy"] for r in rounds]
        by_round.plot([r["round"] for r in rounds], acc, marker="o", label=label)
        by_time.plot([r["elapsed_s"] for r in rounds], acc, marker="o", label=label)
    target = 100 * results["target"]
    for ax, xlabel in ((by_round, "round"), (by_time, "wall-clock seconds")):
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_time.set_xlim(left=0)
    by_round.legend(loc="lower right")
    by_round.set_title("accuracy vs round")
    by_time.set_title("accuracy vs wall-clock")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="bench_mnist.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--label", default=None, help="name of the single configuration")
    p.add_argument("--model", default=d.model, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="silos (default: %(default)s)")
    p.add_argument(
        "--examples-per-worker",
        type=int,
        default=d.examples_per_worker,
        help="the first WORKERS x N training examples are split (default: %(default)s)",
    )
    p.add_argument(
        "--test-examples", type=int, default=d.test_examples, help="(default: %(default)s)"
    )
    p.add_argument("--scheme", choices=["iid", "dirichlet", "shards"], default=d.scheme)
    p.add_argument("--alpha", type=float, default=d.alpha, help="dirichlet concentration")
    p.add_argument("--classes-per-shard", type=int, default=d.classes_per_shard)
    p.add_argument("--rounds", type=int, default=d.rounds, help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr, help="(default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="(default: %(default)s)")
    p.add_argument("--strategy", default=d.strategy, help="(default: %(default)s)")
    p.add_argument("--secagg", action="store_true", help="secure aggregation (fed-server --secagg)")
    p.add_argument(
        "--compression",
        default=d.compression,
        help="update compression: none, float16, bfloat16, int8 (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per worker (default: CPUs / workers, at least 1)",
    )
    p.add_argument(
        "--eval-threads", type=int, default=1, help="coordinator evaluation threads (default: 1)"
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra fed-server flag(s), e.g. --server-arg=--upload-slots=2 (repeatable)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="SPEC",
        help="run these configurations (LABEL[:key=value,...] or @preset) and plot them together",
    )
    p.add_argument(
        "--target", type=float, default=0.99, help="accuracy to reach (default: %(default)s)"
    )
    p.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "bench", help="(default: runs/bench)"
    )
    p.add_argument(
        "--run-timeout",
        type=float,
        default=3600.0,
        help="seconds one configuration may take (default: %(default)s)",
    )
    return p


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through run_one's finally, which stops the federation's processes.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cpus = os.cpu_count() or 1
    base = RunConfig(
        label=args.label or "fedavg",
        model=args.model,
        workers=args.workers,
        examples_per_worker=args.examples_per_worker,
        test_examples=args.test_examples,
        scheme=args.scheme,
        alpha=args.alpha,
        classes_per_shard=args.classes_per_shard,
        rounds=args.rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        strategy=args.strategy,
        secagg=args.secagg,
        compression=args.compression,
        seed=args.seed,
        threads=args.threads or max(1, cpus // args.workers),
        server=list(args.server_arg),
    )
    try:
        caps = server_capabilities()
        specs: list[str] = []
        for spec in args.compare or []:
            specs += expand_preset(spec[1:], caps) if spec.startswith("@") else [spec]
        configs = [parse_spec(s, base) for s in specs] if specs else [base]
    except ValueError as exc:
        print(f"bench_mnist: error: {exc}", file=sys.stderr)
        return 2
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        print(f"bench_mnist: error: labels must be unique, got {labels}", file=sys.stderr)
        return 2
    for c in configs:
        if c.secagg and "--secagg" not in caps["flags"]:
            print(
                f"bench_mnist: error: [{c.label}] asks for secure aggregation, but this fed-server "
                "has no --secagg; install a fedcore with secure aggregation or drop secagg=1",
                file=sys.stderr,
            )
            return 2
        if c.compression != "none" and c.compression not in caps["compressions"]:
            print(
                f"bench_mnist: error: [{c.label}] compression {c.compression!r} is not one of "
                f"this fed-server's {caps['compressions'] or 'none'}",
                file=sys.stderr,
            )
            return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    import torch

    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": cpus,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average": list(os.getloadavg()),
        },
        "target": args.target,
        "runs": [],
    }
    failed = False
    for cfg in configs:
        print(
            f"== [{cfg.label}] {cfg.model}, {cfg.workers} {cfg.scheme} silos, {cfg.rounds} "
            f"rounds ({' '.join(cfg.server_flags())})"
            + (f", workers: {' '.join(cfg.worker)}" if cfg.worker else ""),
            flush=True,
        )
        try:
            run = run_one(cfg, out, eval_threads=args.eval_threads, timeout=args.run_timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"bench_mnist: {exc}", file=sys.stderr)
            run = {"config": dataclasses.asdict(cfg), "rounds": [], "error": str(exc)[:2000]}
            failed = True
        run["target"] = time_to_target(run["rounds"], args.target)
        results["runs"].append(run)
        # Written after every configuration: a long comparison keeps what it measured.
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        table = markdown(results)
        (out / "results.md").write_text(table)
        plot(results, out / "accuracy.png")
    print()
    print(table, end="")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'accuracy.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
