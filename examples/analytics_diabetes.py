"""The founding example of federated analytics: the mean BMI across three hospitals that
cannot share a record.

scikit-learn's diabetes data (442 patients, 10 numeric columns, shipped inside the package:
no download) is split over 3 silos. Each silo publishes its table with public bounds, a mock
of made-up rows, and its rules (allowed columns, epsilon per query, the silos it shares noise
with, its budget). A data scientist, enrolled with ``fed-certs add-scientist``, then:

1. searches the datasets tagged ``#diabetes``;
2. previews one silo's mock to write the query;
3. asks ``mean(bmi)`` at epsilon 0.5 and 2, and compares with the true value (which only
   this script, playing every role at once, can compute).

Run it (about a minute: one coordinator and three workers start as real processes)::

    pip install -e '.[examples]'      # scikit-learn
    python examples/analytics_diabetes.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedcore

BIN = Path(sys.executable).parent
SILOS = 3
#: Public bounds of the 10 columns: what a data owner knows without looking at the records.
BOUNDS = {
    "age": (18, 90),
    "sex": (1, 2),
    "bmi": (15, 50),
    "bp": (50, 150),
    "s1": (80, 320),
    "s2": (30, 260),
    "s3": (15, 110),
    "s4": (1, 10),
    "s5": (3, 7),
    "s6": (50, 130),
}


def publish(root: Path) -> np.ndarray:
    """Write each silo's table, metadata, mock and policy; return the bmi column (truth)."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False).data
    names = list(BOUNDS)
    rng = np.random.default_rng(2026)
    order = rng.permutation(len(data))
    header = ",".join(names)
    features = "".join(
        f'[[features]]\nname = "{n}"\ndtype = "float64"\nminimum = {lo}\nmaximum = {hi}\n'
        for n, (lo, hi) in BOUNDS.items()
    )
    for i, rows in enumerate(np.array_split(order, SILOS)):
        body = "\n".join(",".join(f"{v:g}" for v in data[r]) for r in rows)
        (root / f"hospital-{i}.csv").write_text(f"{header}\n{body}\n")
        # The mock: made-up rows, uniform within the public bounds (no record behind them).
        fake = [[rng.uniform(lo, hi) for lo, hi in BOUNDS.values()] for _ in range(5)]
        for row in fake:
            row[names.index("sex")] = round(row[names.index("sex")])
        mock = "\n".join(",".join(f"{v:.1f}" for v in row) for row in fake)
        (root / f"hospital-{i}.mock.csv").write_text(f"{header}\n{mock}\n")
        (root / f"hospital-{i}.meta.toml").write_text(
            f'name = "Diabetes cohort, hospital {i}"\ntags = ["#diabetes"]\n'
            f'license = "BSD-3-Clause"\nmock = "hospital-{i}.mock.csv"\n{features}'
        )
        (root / f"policy-{i}.toml").write_text(
            f'[budget]\nstudy = "diabetes-2026"\nepsilon = 6.0\ndelta = 1e-5\n'
            f'ledger = "ledger-{i}.json"\n'
            '[analytics]\nallowed-columns = ["age", "sex", "bmi", "bp"]\n'
            # The three hospitals know each other: each adds a third of the noise variance.
            "max-epsilon = 2.0\nmax-silos = 3\nhonest-silos = 3\n"
        )
    return np.asarray(data[:, names.index("bmi")])


def wait_for(proc: subprocess.Popen[str], pattern: str, timeout: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if pattern in line:
            return line
        if time.monotonic() > deadline:
            break
    raise SystemExit(f"gave up waiting for {pattern!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, help="where to write the silos (default: a temp dir)"
    )
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fedcore-diabetes-"))
    root.mkdir(parents=True, exist_ok=True)
    bmi = publish(root)
    subprocess.run(
        [BIN / "fed-certs", "add-scientist", "--dir", root / "certs", "alice"], check=True
    )
    procs: list[subprocess.Popen[Any]] = []  # the coordinator's output as text, workers' none
    try:
        server = subprocess.Popen(
            [
                BIN / "fed-server",
                "--listen",
                "127.0.0.1:0",
                "--analytics-only",
                "--scientists",
                root / "certs" / "scientists.json",
                "--progress",
                "plain",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(server)
        address = wait_for(server, "listening on").split()[-1]
        for i in range(SILOS):
            procs.append(
                subprocess.Popen(
                    [
                        BIN / "fed-worker",
                        "--server",
                        address,
                        "--name",
                        f"hospital-{i}",
                        "--data",
                        root / f"hospital-{i}.csv",
                        "--policy",
                        root / f"policy-{i}.toml",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for _ in range(SILOS):
            wait_for(server, "joined from")
        with fedcore.connect(address, token_file=root / "certs/scientists/alice.token") as fed:
            print("\n1. datasets tagged #diabetes:")
            for entry in fed.datasets(tag="diabetes"):
                print(f"   {entry.silo}: {entry.dataset.summary()}")
            print("\n2. the mock of hospital-0 (made-up rows, to write the query on):")
            for row in fed.mock("hospital-0").to_pylist()[:3]:
                print("   ", ", ".join(f"{k}={v:g}" for k, v in row.items()))
            print(f"\n3. mean(bmi): true value {np.clip(bmi, *BOUNDS['bmi']).mean():.3f}")
            for epsilon in (0.5, 2.0):
                answer = fed.query("mean(bmi)", epsilon=epsilon, tags=["diabetes"])
                cell = answer.cells[0]
                spent = ", ".join(f"{s.silo} {s.epsilon:.2f}" for s in answer.spent)
                print(
                    f"   epsilon {epsilon}: {cell.value:.3f} ± {cell.std_error:.3f} "
                    f"(noise multiplier {answer.noise_multiplier:.2f}; spent per silo: {spent})"
                )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


if __name__ == "__main__":
    main()
