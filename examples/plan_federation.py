"""A model in no registry, federated end to end as a plan: the workers never see its code.

1. ``fed-plan export plan_resnet:make_model`` (run with ``examples/`` on ``PYTHONPATH``: the
   data scientist's machine) writes ``resnet.plan``: torch.export graphs and weights.
2. ``fed-server --plan resnet.plan`` ships it with every task.
3. Two ``fed-worker`` processes start from an empty folder, with ``PYTHONPATH`` cleared and
   no ``--model``: they verify the plan against their allow-list and train it.

Run from the repository root (about a minute on an idle laptop)::

    python examples/plan_federation.py [--rounds 3] [--examples 1000]

Prints the server's round table and exits non-zero if the federation fails or the final
accuracy is no better than chance.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=1000, help="training examples per worker")
    p.add_argument("--width", type=int, default=16, help="the ResNet's channels")
    args = p.parse_args()
    from fedcore.data import load_mnist, partition, save_shard

    with tempfile.TemporaryDirectory(prefix="plan-example-") as tmp:
        root = Path(tmp)
        x, y = load_mnist("train")
        x, y = x[: 2 * args.examples], y[: 2 * args.examples]
        for i, idx in enumerate(partition(y, 2, "iid", seed=0)):
            save_shard(root / f"shard-{i}.npz", x[idx], y[idx])
        tx, ty = load_mnist("test")
        save_shard(root / "test.npz", tx[:2000], ty[:2000])

        # 1. The data scientist exports the model (only this step sees its code).
        plan = root / "resnet.plan"
        subprocess.run(
            [str(BIN / "fed-plan"), "export", "plan_resnet:make_model",
             "--params", json.dumps({"width": args.width}), "--out", str(plan)],
            check=True,
            env=dict(os.environ, PYTHONPATH=str(EXAMPLES)),
        )  # fmt: skip

        # 2. The coordinator ships it.
        server_log = root / "server.log"
        with server_log.open("w") as out:
            server = subprocess.Popen(
                [str(BIN / "fed-server"), "--listen", "127.0.0.1:0", "--plan", str(plan),
                 "--rounds", str(args.rounds), "--min-workers", "2", "--epochs", "1",
                 "--batch-size", "32", "--lr", "0.1", "--momentum", "0.9",
                 "--eval-data", str(root / "test.npz"), "--metrics-out", str(root / "m.jsonl")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )  # fmt: skip
            port = None
            while port is None and server.poll() is None:
                time.sleep(0.5)
                found = re.search(r"listening on [\d.]+:(\d+)", server_log.read_text())
                port = found.group(1) if found else None

            # 3. Workers with no code of the model: an empty folder, no PYTHONPATH, no --model.
            bare = root / "worker-home"
            bare.mkdir()
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            workers = [
                subprocess.Popen(
                    [
                        str(BIN / "fed-worker"),
                        "--server",
                        f"127.0.0.1:{port}",
                        "--data",
                        str(root / f"shard-{i}.npz"),
                        "--name",
                        f"silo-{i}",
                    ],
                    cwd=bare,
                    env=env,
                )
                for i in range(2)
            ]
            code = server.wait()
            for w in workers:
                w.wait(timeout=60)
        print(server_log.read_text())
        rows = [json.loads(line) for line in (root / "m.jsonl").read_text().splitlines()]
    if code != 0 or not rows:
        print("the federation failed", file=sys.stderr)
        return 1
    accuracy = rows[-1]["accuracy"]
    print(f"plan {rows[-1]['plan']}: accuracy {accuracy:.2%} after {len(rows)} rounds")
    return 0 if accuracy > 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
