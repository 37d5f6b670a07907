"""Two secure-aggregation jobs on the same three silos, through real processes (issue 24):
one ``fed-server --serve``, six ``fed-worker`` processes that join once.

``pair-*`` silos allow two tasks at once (``[jobs] max-tasks = 2``); ``single-*`` silos keep
the default (one). Two jobs run on each trio at the same time. On the pairs their tasks
overlap on a worker: one job's training starts while the other job's task is still held
there (from its ``training`` event to its ``update_sent``); on the singles they never do,
and both jobs still complete (the control). The jobs start from different initial models
(seeds): a silo sends one masked update per global model, whichever job asks.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import forked
import pytest
from conftest import BIN, Proc

import fedcore
from fedcore.jobs import JobHandle

pytestmark = pytest.mark.slow

TRIOS = ("pair", "single")
JOB: dict[str, Any] = {
    "model": "logreg",
    "rounds": 2,
    "min_workers": 3,
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": 0.05,
    "secagg": True,
}


@pytest.fixture(scope="module")
def network(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("concurrent")
    forked.run(
        [str(BIN / "fed-certs"), "add-scientist", "--dir", str(root / "certs"), "--study", "s", "alice"],
        check=True,
    )  # fmt: skip
    started: list[Proc] = []
    try:
        server = Proc(
            [
                str(BIN / "fed-server"), "--listen", "127.0.0.1:0", "--serve",
                "--state-dir", str(root / "state"),
                "--scientists", str(root / "certs" / "scientists.json"),
                "--max-running-jobs", "4", "--round-timeout", "60", "--log-json",
            ],
            "fed-server",
        )  # fmt: skip
        started.append(server)
        port = int(server.wait_for_line(r"listening on [\d.]+:(\d+)", 300).group(1))
        (root / "pair.toml").write_text("[jobs]\nmax-tasks = 2\n")
        workers: dict[str, Proc] = {}
        for trio in TRIOS:
            for i in range(3):
                name = f"{trio}-{i}"
                (root / f"{name}.meta.toml").write_text(f'name = "{name}"\ntags = ["#{trio}"]\n')
                policy = ["--policy", str(root / "pair.toml")] if trio == "pair" else []
                args = [
                    str(BIN / "fed-worker"), "--server", f"127.0.0.1:{port}",
                    "--data", str(shards / f"shard-{i}.npz"), "--name", name,
                    "--threads", "1", "--metadata", str(root / f"{name}.meta.toml"),
                    "--give-up-after", "300", "--log-json", *policy,
                ]  # fmt: skip
                workers[name] = Proc(args, name)
                started.append(workers[name])
        server.wait_for_event("worker_joined", n=6, timeout=400)
        yield {"root": root, "port": port, "server": server, "workers": workers}
    finally:
        for p in started:
            p.signal(signal.SIGKILL)
        for p in started:
            p.kill()


def _held(worker: Proc, job: str) -> list[tuple[int, int]]:
    """The spans (event indexes, training to update_sent) in which ``worker`` held a task
    of ``job``, in order."""
    events = [(i, e) for i, e in enumerate(worker.events) if e.get("job") == job]
    starts = [i for i, e in events if e["event"] == "training"]
    ends = [i for i, e in events if e["event"] == "update_sent"]
    assert len(starts) == len(ends) == JOB["rounds"], worker.output
    return list(zip(starts, ends, strict=True))


def _overlaps(worker: Proc, a: str, b: str) -> bool:
    """Whether a task of job ``b`` started training on ``worker`` while it held one of ``a``,
    or the other way round."""
    return any(
        s1 < s2 < e1 or s2 < s1 < e2 for s1, e1 in _held(worker, a) for s2, e2 in _held(worker, b)
    )


def test_two_secure_jobs_share_silos_at_once_only_where_the_owners_allow_it(
    network: dict[str, Any],
) -> None:
    token = network["root"] / "certs" / "scientists" / "alice.token"
    with fedcore.connect(f"127.0.0.1:{network['port']}", token_file=token) as alice:
        jobs: dict[str, list[JobHandle]] = {
            trio: [alice.train("s", require_tags=[trio], seed=10 * t + k, **JOB) for k in range(2)]
            for t, trio in enumerate(TRIOS)
        }
        for handles in jobs.values():
            for handle in handles:
                status = handle.wait(timeout=300)
                assert status.state == "completed", status.message
                assert status.rounds_done == JOB["rounds"]
    server: Proc = network["server"]
    # Every secure round of the four jobs summed all three of its silos' masked inputs.
    sums = server.matching("secagg_aggregated")
    assert len(sums) == 4 * JOB["rounds"], server.output
    assert all(e["inputs"] == 3 and not e["dropped"] for e in sums), sums
    workers: dict[str, Proc] = network["workers"]
    for trio, (a, b) in jobs.items():
        overlapping = [
            name
            for name, worker in workers.items()
            if name.startswith(trio) and _overlaps(worker, a.job_id, b.job_id)
        ]
        if trio == "pair":
            assert overlapping, {n: w.output for n, w in workers.items() if n.startswith(trio)}
        else:  # the control: one task at a time, the jobs took turns
            assert overlapping == []
    # Nothing was refused: the coordinator kept to each silo's announced bound.
    assert not any(w.matching("task_refused") for w in workers.values())
