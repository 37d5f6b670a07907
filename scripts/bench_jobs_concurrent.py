"""Two secure-aggregation jobs on the same three silos: taking turns against at once (issue 24,
``[jobs] max-tasks``), real processes on localhost.

For each bound (``--max-tasks``, default ``1 2``) a fresh ``fed-server --serve`` and three
``fed-worker`` processes whose policy sets ``[jobs] max-tasks``; two secure jobs (MNIST,
``--model``, FedAvg, 1 epoch, batch 32, different seeds: a silo masks one update per global
model) are submitted together and the wall time from the first submission to the second
completion is measured, with the workers' peak resident memory. Every bound runs in one
invocation on the same shards (same load); the JSON gives each time and its ratio to the
first bound's.

    python scripts/bench_jobs_concurrent.py --examples 2000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_network import _shards  # noqa: E402 -- the same IID shards
from conftest import Proc  # noqa: E402 -- the tests' process helper: lines as they come

import fedcore  # noqa: E402


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def run(root: Path, shards: list[Path], max_tasks: int, model: str, rounds: int) -> dict[str, Any]:
    here = root / f"max-tasks-{max_tasks}"
    certs = here / "certs"
    subprocess.run([str(BIN / "fed-certs"), "add-scientist", "--dir", str(certs), "--study", "bench", "alice"],
                   check=True, capture_output=True)  # fmt: skip
    policy = here / "policy.toml"
    policy.write_text(f"[jobs]\nmax-tasks = {max_tasks}\n")
    started: list[Proc] = []
    try:
        server = Proc(
            [str(BIN / "fed-server"), "--listen", "127.0.0.1:0", "--serve", "--state-dir",
             str(here / "state"), "--scientists", str(certs / "scientists.json"),
             "--max-running-jobs", "2"],
            "fed-server",
        )  # fmt: skip
        started.append(server)
        port = int(server.wait_for_line(r"listening on [\d.]+:(\d+)", 300).group(1))
        workers = []
        for i, shard in enumerate(shards):
            args = [str(BIN / "fed-worker"), "--server", f"127.0.0.1:{port}", "--data", str(shard),
                    "--name", f"silo-{i}", "--threads", "1", "--policy", str(policy)]  # fmt: skip
            workers.append(Proc(args, f"silo-{i}"))
            started.append(workers[-1])
        server.wait_for_nth_line(r"worker '\S+' joined", 3, 600)
        token = certs / "scientists" / "alice.token"
        with fedcore.connect(f"127.0.0.1:{port}", token_file=token) as fed:
            began = time.perf_counter()
            jobs = [
                fed.train(
                    "bench",
                    model=model,
                    rounds=rounds,
                    min_workers=3,
                    epochs=1,
                    batch_size=32,
                    learning_rate=0.05,
                    fed_eval_every=0,
                    secagg=True,
                    seed=seed,
                )
                for seed in (1, 2)
            ]
            for job in jobs:
                status = job.wait(3600)
                if status.state != "completed":
                    raise RuntimeError(status.message)
            seconds = time.perf_counter() - began
        return {
            "max_tasks": max_tasks,
            "both_jobs_s": round(seconds, 2),
            "worker_peak_rss_mib": [round(_peak_rss_mib(w.popen.pid), 1) for w in workers],
        }
    finally:
        for p in started:
            p.signal(signal.SIGKILL)
            p.kill()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=2000, help="examples per silo")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="mnist-mlp")
    parser.add_argument("--max-tasks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = _shards(root, args.examples)
        runs = [run(root, shards, n, args.model, args.rounds) for n in args.max_tasks]
    first = runs[0]["both_jobs_s"]
    for r in runs:
        r["ratio_to_first"] = round(r["both_jobs_s"] / first, 3)
    print(json.dumps({"examples_per_silo": args.examples, "rounds": args.rounds,
                      "model": args.model, "runs": runs}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
