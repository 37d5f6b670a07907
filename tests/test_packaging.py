"""The wheel installs one namespace: fedcore, fedcore.server, fedcore.worker — and the data;
the CLIs start without the heavy optional libraries."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel pip builds from this checkout, and what the build printed."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = out.glob("fedcore-*.whl")
    return wheel, build.stdout + build.stderr


def test_7_building_prints_no_warnings_of_ours(built_wheel: tuple[Path, str]) -> None:
    """setuptools warned about the license table and an undeclared fedcore.data.mnist package
    at every `make setup`."""
    _, printed = built_wheel
    assert "Warning" not in printed, printed


def test_wheel_maps_server_and_worker_into_fedcore(built_wheel: tuple[Path, str]) -> None:
    wheel, _ = built_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "fedcore/server/coordinator.py",
        "fedcore/server/engine/sync.py",
        "fedcore/server/reporting/sink.py",
        "fedcore/server/state/registry.py",
        "fedcore/server/transport/service.py",
        "fedcore/server/jobs/job.py",
        "fedcore/jobs/cli.py",
        "fedcore/worker/runtime.py",
        "fedcore/v1/fedcore_pb2.py",
        "fedcore/v1/fedcore_pb2.pyi",
        "fedcore/py.typed",
        "fedcore/data/mnist/train-images-idx3-ubyte.gz",
        "fedcore/data/mnist/SHA256SUMS",
        # The consoles' templates and stylesheet (package data, read at run time).
        "fedcore/console/templates/base.html",
        "fedcore/console/static/console.css",
        "fedcore/worker/console_templates/owner_request.html",
        "fedcore/server/console_templates/network_job.html",
    ):
        assert required in names, f"{required} missing from the wheel"
    top_level = {n.split("/", 1)[0] for n in names}
    assert top_level == {"fedcore", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    entry_points = zipfile.ZipFile(wheel).read("fedcore-0.1.0.dist-info/entry_points.txt").decode()
    for script in (
        "fed-server = fedcore.server.cli:main",
        "fed-worker = fedcore.worker.entry:main",
        "fed-job = fedcore.jobs.cli:main",
    ):
        assert script in entry_points


def test_the_clis_load_differential_privacy_libraries_only_when_used() -> None:
    """dp-accounting (scipy) and Opacus cost about a second per process; a coordinator or a
    worker without DP must not import them at start-up."""
    code = (
        "import sys, fedcore.server.cli, fedcore.worker.cli\n"
        "print(sorted(m for m in ('opacus', 'dp_accounting', 'scipy') if m in sys.modules))\n"
        "from fedcore.privacy import PrivacyAccountant\n"
        "a = PrivacyAccountant()\n"
        "a.step(noise_multiplier=1.0, sample_rate=0.1)\n"
        "print(a.get_epsilon(delta=1e-5) > 0, 'dp_accounting' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True True"  # and they load on first use


def test_fed_query_and_the_worker_entry_start_without_torch() -> None:
    """Issue 27: each fed-query call took ~1.7 s (5 s during training) to import torch, which
    a query never uses. The worker package's names load on first use, the same way."""
    code = (
        "import sys, fedcore.analytics.cli, fedcore.jobs.cli, fedcore.worker.entry\n"
        "import fedcore.worker, fedcore\n"
        "print('torch' in sys.modules)\n"
        "fedcore.worker.Worker, fedcore.build_model, fedcore.data.load_shard\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout.split("\n")
    assert out[0] == "False"
    assert out[1] == "True"  # positive control: the lazy names still load, with torch
