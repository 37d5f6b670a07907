"""Where hosts run: OS processes on this machine (local) or Ray actors (a laptop or a cluster).

Both engines run the same :func:`~.host.host_main` on the same JSON :class:`~.clients.HostSpec`;
they differ only in how a host process is started, placed and stopped. Ray is imported only
when the Ray engine is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedcore.errors import ConfigError, FedcoreError

from .clients import HostSpec
from .host import HostReport

__all__ = ["Engine", "HostFailed", "LocalEngine", "RayEngine"]


class HostFailed(FedcoreError):
    """A host process (or actor) ended without a report."""


class Engine(Protocol):
    """Runs hosts; ``run`` returns their reports once every host has finished."""

    name: str

    async def run(self, hosts: Sequence[HostSpec]) -> list[HostReport]: ...


@dataclass
class LocalEngine:
    """Each host is a Python process on this machine running :func:`~.host.main`."""

    name: str = "local"

    async def run(self, hosts: Sequence[HostSpec]) -> list[HostReport]:
        procs: list[asyncio.subprocess.Process] = []
        try:
            for _ in hosts:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        # Not ``-m fedcore.simulation.host``: the package imports that module
                        # first, which runpy warns about.
                        "-c",
                        "from fedcore.simulation.host import main; raise SystemExit(main())",
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        env=dict(os.environ, PYTHONUNBUFFERED="1"),
                    )
                )
            outputs = await asyncio.gather(
                *(
                    p.communicate(spec.to_json().encode())
                    for p, spec in zip(procs, hosts, strict=True)
                )
            )
        finally:
            # Cancelled (the coordinator failed) or failed: no host outlives the simulation.
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    await p.wait()
        reports = []
        for p, (stdout, _) in zip(procs, outputs, strict=True):
            lines = stdout.decode().strip().splitlines()
            if p.returncode != 0 or not lines:
                raise HostFailed(
                    f"host process {p.pid} exited with status {p.returncode} "
                    "without a report; see its errors above"
                )
            reports.append(HostReport.from_json(lines[-1]))
        return reports


class _HostActor:
    """The Ray actor class (wrapped with ``ray.remote`` at run time, with its resources)."""

    def run(self, spec_json: str) -> str:
        from .host import host_main

        return host_main(spec_json)


@dataclass
class RayEngine:
    """Each host is a Ray actor holding ``num_cpus`` CPUs and ``num_gpus`` GPUs (fractions
    allowed), placed by Ray on a local instance or on the cluster at ``address``.

    Args:
        address: a running cluster (``ray start --head``; ``"auto"`` finds it), or None to
            start a private local instance with ``local_cpus`` CPUs, shut down afterwards.
        init_options: more ``ray.init`` keywords.
    """

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    local_cpus: int | None = None
    init_options: dict[str, Any] | None = None
    name: str = "ray"

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("--ray-cpus-per-host and --ray-gpus-per-host cannot be negative")

    def _ray(self) -> Any:
        try:
            return importlib.import_module("ray")
        except ImportError:
            raise ConfigError(
                "--engine ray needs Ray: pip install 'fedcore[sim]' (or ray==2.60.0)"
            ) from None

    async def run(self, hosts: Sequence[HostSpec]) -> list[HostReport]:
        ray = self._ray()
        started_here = not ray.is_initialized()
        if started_here:
            options: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": True,
                "configure_logging": False,
                **(self.init_options or {}),
            }
            if self.address is not None:
                options["address"] = self.address
            elif self.local_cpus is not None:
                options["num_cpus"] = self.local_cpus
            await asyncio.to_thread(ray.init, **options)
        actor_class = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_HostActor)
        actors = [actor_class.remote() for _ in hosts]
        try:
            refs = [a.run.remote(spec.to_json()) for a, spec in zip(actors, hosts, strict=True)]
            try:
                outputs = await asyncio.gather(*refs)
            except ray.exceptions.RayError as exc:
                raise HostFailed(f"a Ray host actor failed: {exc}") from None
            return [HostReport.from_json(text) for text in outputs]
        finally:
            for actor in actors:
                ray.kill(actor)
            if started_here:
                await asyncio.to_thread(ray.shutdown)
