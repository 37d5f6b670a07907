"""Federated LoRA fine-tuning of a small transformer across 3 workers, and what it saves.

Runs two local federations of real ``fed-server`` / ``fed-worker`` processes on a synthetic
sequence-classification task (:func:`lora_model.make_task`):

1. LoRA: the model of :func:`lora_model.tiny_bert_lora`, ``--trainable @requires-grad``: only
   the adapters and the classification head move each round; the frozen base model reaches
   each worker once (and is cached under ``--frozen-cache`` for its next start).
2. Full fine-tuning of the same transformer (one round), to compare the bytes per round.

It prints the loss and accuracy per round and the bytes per round of both. Needs the
``lora`` extra (``pip install -e '.[lora]'``); nothing is downloaded::

    python examples/lora_finetune.py            # about a minute on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

from lora_model import make_task  # noqa: E402

from fedcore.data import save_shard  # noqa: E402

MODEL = "lora_model:tiny_bert_lora"


def federation(
    out: Path, shards: list[Path], test: Path, rounds: int, model_params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Run one federation to the end; its metrics rows."""
    env = dict(os.environ, PYTHONPATH=str(HERE), PYTHONUNBUFFERED="1")
    metrics = out / "metrics.jsonl"
    params = json.dumps(model_params)
    trainable = [] if model_params.get("full") else ["--trainable", "@requires-grad"]
    server = subprocess.Popen(
        [
            str(BIN / "fed-server"),
            "--listen", "127.0.0.1:0", "--model", MODEL, "--model-params", params,
            *trainable,
            "--min-workers", str(len(shards)), "--rounds", str(rounds),
            "--optimizer", "adam", "--lr", "0.01", "--batch-size", "32",
            "--eval-data", str(test), "--metrics-out", str(metrics),
            "--join-timeout", "300", "--threads", "1", "--log-level", "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    workers: list[subprocess.Popen[bytes]] = []
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        match = re.search(r"listening on ([\d.]+:\d+)", first)
        if not match:
            raise SystemExit(f"the coordinator did not start: {first!r}")
        for i, shard in enumerate(shards):
            log = (out / f"worker-{i}.log").open("wb")
            workers.append(
                subprocess.Popen(
                    [
                        str(BIN / "fed-worker"),
                        "--server",
                        match.group(1),
                        "--data",
                        str(shard),
                        "--name",
                        f"silo-{i}",
                        "--model",
                        MODEL,
                        "--model-params",
                        params,
                        "--threads",
                        "1",
                        "--frozen-cache",
                        str(out / f"frozen-cache-{i}"),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        for line in server.stdout:
            print("   ", line, end="", flush=True)
        if server.wait() != 0:
            raise SystemExit(f"the coordinator failed; worker logs are in {out}")
    finally:
        everyone: list[subprocess.Popen[Any]] = [server, *workers]
        for proc in everyone:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=400, help="training examples per worker")
    p.add_argument("--out", type=Path, help="keep shards, logs and metrics here")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedcore-lora-"))
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(args.workers):
        x, y = make_task(args.examples, seed=1 + i)
        shards.append(save_shard(out / f"shard-{i}.npz", x, y))
    test = save_shard(out / "test.npz", *make_task(1000, seed=100))

    print(f"== LoRA fine-tuning, {args.workers} workers, {args.rounds} rounds", flush=True)
    (out / "lora").mkdir(exist_ok=True)
    lora = federation(out / "lora", shards, test, args.rounds, {})
    print("== full fine-tuning of the same transformer, 1 round (for its bytes)", flush=True)
    (out / "full").mkdir(exist_ok=True)
    full = federation(out / "full", shards, test, 1, {"full": True})

    full_bytes = full[0]["bytes_sent"] + full[0]["bytes_received"]
    print("\nround  test loss  test acc  train loss  bytes (sent + received)  vs full")
    for row in lora:
        moved = row["bytes_sent"] + row["bytes_received"]
        print(
            f"{row['round']:>5}  {row['loss']:9.4f}  {100 * row['accuracy']:7.2f}%"
            f"  {row['train'].get('loss', float('nan')):10.4f}  {moved:>23,}"
            f"  {100 * moved / full_bytes:6.2f}%"
        )
    later = [r["bytes_sent"] + r["bytes_received"] for r in lora[1:]] or [0]
    print(
        f"full fine-tuning: {full_bytes:,} bytes per round; LoRA after round 1 (the frozen base "
        f"model travelled once, in round 1): {max(later):,} bytes per round "
        f"({100 * max(later) / full_bytes:.2f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
