"""A standing network against a one-shot federation (issue 24), real processes on localhost.

Three figures, printed as JSON:

* **rounds**: the same MNIST training (``mnist-cnn``, 3 IID silos, FedAvg, 1 epoch, batch 32,
  lr 0.05) run one-shot (``fed-server --rounds``) and as a job on a standing network whose
  silos joined beforehand; the sum of the rounds' durations (``duration_s`` of every metrics
  row) and their ratio. Both runs use the same shards, in one invocation (same load).
* **submit_to_first_task_s**: on the standing network with its silos idle, the time from a
  job's submission to its first round's dispatch (the job log's ``submitted`` and ``running
  rounds`` lines, both written by the coordinator, median over ``--latency-jobs`` one-round
  jobs of ``logreg``).
* **queued_memory**: the coordinator's resident memory before and after ``--queued`` jobs
  are submitted that wait (they select a tag no silo carries, one job at a time runs).

    python scripts/bench_network.py                      # the reference: 3 x 20,000, 3 rounds
    python scripts/bench_network.py --examples 2000 --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Proc  # noqa: E402 -- the tests' process helper: lines as they come

import fedcore  # noqa: E402
from fedcore.data import load_mnist, partition, save_shard  # noqa: E402

TRAIN = ["--epochs", "1", "--batch-size", "32", "--lr", "0.05"]


def _shards(root: Path, examples: int) -> list[Path]:
    x, y = load_mnist("train")
    x, y = x[: 3 * examples], y[: 3 * examples]
    paths = []
    for i, idx in enumerate(partition(y, 3, "iid", seed=0)):
        path = root / f"shard-{i}.npz"
        save_shard(path, x[idx], y[idx])
        paths.append(path)
    return paths


def _workers(port: int, shards: list[Path], started: list[Proc]) -> None:
    for i, shard in enumerate(shards):
        args = [str(BIN / "fed-worker"), "--server", f"127.0.0.1:{port}", "--data", str(shard),
                "--name", f"silo-{i}", "--threads", "1"]  # fmt: skip
        started.append(Proc(args, f"silo-{i}"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def one_shot(root: Path, shards: list[Path], rounds: int) -> list[dict[str, Any]]:
    metrics = root / "oneshot.jsonl"
    started: list[Proc] = []
    try:
        server = Proc(
            [str(BIN / "fed-server"), "--listen", "127.0.0.1:0", "--min-workers", "3",
             "--rounds", str(rounds), "--model", "mnist-cnn", *TRAIN, "--fed-eval-every", "0",
             "--metrics-out", str(metrics), "--progress", "plain"],
            "fed-server",
        )  # fmt: skip
        started.append(server)
        port = int(server.wait_for_line(r"listening on [\d.]+:(\d+)", 300).group(1))
        _workers(port, shards, started)
        if server.wait(3600) != 0:
            raise RuntimeError(server.output)
    finally:
        for p in started:
            p.signal(signal.SIGKILL)
            p.kill()
    return [json.loads(line) for line in metrics.read_text().splitlines() if line]


def standing(
    root: Path, shards: list[Path], rounds: int, latency_jobs: int, queued: int
) -> dict[str, Any]:
    certs = root / "certs"
    subprocess.run([str(BIN / "fed-certs"), "add-scientist", "--dir", str(certs), "--study", "bench", "alice"],
                   check=True, capture_output=True)  # fmt: skip
    started: list[Proc] = []
    try:
        server = Proc(
            [str(BIN / "fed-server"), "--listen", "127.0.0.1:0", "--serve", "--state-dir",
             str(root / "state"), "--scientists", str(certs / "scientists.json")],
            "fed-server",
        )  # fmt: skip
        started.append(server)
        port = int(server.wait_for_line(r"listening on [\d.]+:(\d+)", 300).group(1))
        _workers(port, shards, started)
        server.wait_for_nth_line(r"worker '\S+' joined", 3, 600)
        fed = fedcore.connect(f"127.0.0.1:{port}", token_file=certs / "scientists" / "alice.token")
        job = fed.train(
            "bench", model="mnist-cnn", rounds=rounds, min_workers=3, epochs=1, batch_size=32,
            learning_rate=0.05, fed_eval_every=0,
        )  # fmt: skip
        if job.wait(3600).state != "completed":
            raise RuntimeError(job.status().message)
        rows = [json.loads(e.metrics_json) for e in fed.jobs.logs(job.job_id) if e.metrics_json]
        latencies = []
        for _ in range(latency_jobs):
            quick = fed.train("bench", model="logreg", rounds=1, min_workers=3, fed_eval_every=0)
            quick.wait(600)
            events = list(fed.jobs.logs(quick.job_id))
            submitted = next(e.time for e in events if e.text.startswith("submitted"))
            running = next(e.time for e in events if e.text.startswith("running rounds"))
            latencies.append(running - submitted)
        before = _rss_kib(server.popen.pid)
        for _ in range(queued):
            fed.train("bench", model="logreg", rounds=1, min_workers=3, require_tags=["nowhere"])
        fed.jobs.list()  # every submission is stored and the scheduler has looked at them
        after = _rss_kib(server.popen.pid)
        fed.close()
        return {
            "rows": rows,
            "submit_to_first_task_s": statistics.median(latencies) if latencies else None,
            "latencies_s": latencies,
            "queued_memory": {
                "jobs": queued,
                "rss_before_mib": before / 1024,
                "rss_after_mib": after / 1024,
            },
        }
    finally:
        for p in started:
            p.signal(signal.SIGKILL)
            p.kill()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=20_000, help="examples per silo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-jobs", type=int, default=5)
    parser.add_argument("--queued", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = _shards(root, args.examples)
        reference = one_shot(root, shards, args.rounds)
        network = standing(root, shards, args.rounds, args.latency_jobs, args.queued)
    one = sum(r["duration_s"] for r in reference)
    net = sum(r["duration_s"] for r in network["rows"])
    print(
        json.dumps(
            {
                "examples_per_silo": args.examples,
                "rounds": args.rounds,
                "one_shot_rounds_s": round(one, 2),
                "network_rounds_s": round(net, 2),
                "ratio": round(net / one, 3),
                "one_shot_round_s": [round(r["duration_s"], 2) for r in reference],
                "network_round_s": [round(r["duration_s"], 2) for r in network["rows"]],
                "submit_to_first_task_s": network["submit_to_first_task_s"],
                "latencies_s": [round(x, 3) for x in network["latencies_s"]],
                "queued_memory": network["queued_memory"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
