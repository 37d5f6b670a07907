"""The WAN benchmark's grid (scripts/bench_wan.py): issue 28's preset covers every axis once,
in the order the brief ranks them, picks split it into short runs, the deadline variant's flags,
and the CPU-bound verdict. Pure functions: nothing is started."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_wan
from bench_wan import Net, Point
from benchlib import BenchError

_SIZES = (2_500_000, 10_000_000)


def test_issue28_covers_the_grid_once_then_the_straggler() -> None:
    points = bench_wan.issue28()
    even = [p for p in points if len(set(p.net.rates_mbit)) == 1]
    keys = [(p.workers, p.params, p.net.rtt_ms, p.net.rates_mbit[0]) for p in even]
    assert sorted(keys) == sorted(
        itertools.product((4, 8, 16), _SIZES, (2.0, 50.0, 200.0), (100.0, 1000.0))
    )
    assert all(len(p.net.rates_mbit) == p.workers for p in points)
    # The brief's order: N=16 at 50 ms / 100 Mbit/s first, then 2 and 200 ms at N=8.
    assert keys[:2] == [(16, d, 50.0, 100.0) for d in _SIZES]
    assert {k[2] for k in keys[2:6]} == {2.0, 200.0}
    assert {k[0] for k in keys[2:8]} == {8}
    assert {k[3] for k in keys[6:8]} == {1000.0}
    straggler = points[-1]
    assert sorted(straggler.net.rates_mbit) == [10.0, *[100.0] * 7]
    assert straggler.variants == ("default", "deadline", "fedbuff")


def test_pick_ranges_in_the_order_given_and_out_of_range_refused() -> None:
    assert bench_wan.pick(["3-5", "0", "4"], 10) == [3, 4, 5, 0]
    assert bench_wan.pick(["1,2"], 10) == [1, 2]
    with pytest.raises(BenchError, match="0-9"):
        bench_wan.pick(["9-10"], 10)


def test_deadline_variant_waits_for_the_fast_silos_only() -> None:
    straggler = Point(8, 2_500_000, Net(50.0, (10.0, *(100.0,) * 7)))
    flags = bench_wan._flags(bench_wan.VARIANTS["deadline"][0], straggler, None)
    # Twice the floor of eight 100 Mbit/s links: 2 x (2 x 10 MB x 8 / 1e8 + 0.05 s) = 3.3 s.
    assert flags == ["--round-timeout", "3.3", "--min-results", "7"]
    given = bench_wan._flags(bench_wan.VARIANTS["deadline"][0], straggler, 5.0)
    assert given[:2] == ["--round-timeout", "5.0"]
    # Control: on even links the deadline variant still needs every silo.
    even = Point(8, 2_500_000, Net(50.0, (100.0,) * 8))
    assert bench_wan._flags(bench_wan.VARIANTS["deadline"][0], even, None)[3] == "8"


def test_bound_says_which_points_the_cpu_sets() -> None:
    point = Point(8, 10_000_000, Net(50.0, (1000.0,) * 8))  # transfer floor 0.64 s
    assert bench_wan.bound(point, 2.0, None) == {"transfer_floor_seconds": 0.64}
    cpu = bench_wan.bound(point, 1.95, {"seconds_per_round": 1.9})
    assert cpu["verdict"] == "cpu"
    assert cpu["proxy_share"] == pytest.approx(1.9 / 0.64, rel=1e-3)
    assert cpu["echo_over_ceiling_plus_rtt"] == pytest.approx(1.0)
    assert bench_wan.bound(point, 1.0, {"seconds_per_round": 0.4})["verdict"] == "mixed"
    assert bench_wan.bound(point, 1.0, {"seconds_per_round": 0.1})["verdict"] == "link"


def test_an_unlimited_link_is_written_as_json() -> None:
    net = Net(0.0, (math.inf,) * 2)
    assert net.physical_floor(40_000_000) == 0.0
    # One round trip: half of it down, half up.
    assert Net(200.0, (100.0,)).physical_floor(10_000_000) == pytest.approx(1.6 + 0.2)
    described = json.loads(json.dumps(net.describe(), allow_nan=False))
    assert described == {"rtt_ms": 0.0, "rates_mbit": [None, None], "distinct": []}


def test_table_row_names_links_verdict_ratios_and_late_results() -> None:
    run = {
        "seconds_per_round": 3.5,
        "failures": 2,
        "peak_rss_bytes": 400e6,
        "worker_peak_rss_bytes": [300e6, 310e6],
        "links": {"peak_rss_bytes": 50e6, "cpu_seconds": 4.0},
    }
    entry: dict[str, Any] = {
        "workers": 8,
        "params": 2_500_000,
        "model_bytes": 10_000_000,
        "net": {"rtt_ms": 50.0, "rates_mbit": [10.0, *[100.0] * 7]},
        "physical_floor_seconds": 16.1,
        "bound": {"ceiling_seconds_per_round": 0.5, "verdict": "link"},
        "bare_echo": {
            "seconds_per_round": 16.0,
            "links": {"peak_rss_bytes": 45e6, "cpu_seconds": 1.0},
        },
        "bare_echo_ratio_to_physical_floor": 0.99,
        "fedcore": {"deadline": run},
        "ratios": {
            "deadline": {"to_bare_echo": 0.219, "coordinator_peak_above_baseline_models": 9.5}
        },
        "load_average": {"before": [3.0, 2.0, 1.0], "after": [5.5, 3.0, 1.0]},
    }
    row = bench_wan.table_row(entry)
    assert row.startswith("| 8 | 2.5e+06 (10 MB) | 50 ms | 10+7x100 | 16.05 s | 0.50 s (link) |")
    assert "deadline 3.50 s (0.22x), 2 late" in row
    assert "400 MB (+9.5 models) | 310 MB | 50 MB, 4 s | 3.0-5.5 |" in row
    # --skip-echo: no echo, no ratio to it.
    skipped: dict[str, Any] = {
        **entry,
        "bare_echo": None,
        "ratios": {"deadline": {**entry["ratios"]["deadline"]}},
    }
    skipped["ratios"]["deadline"]["to_bare_echo"] = None
    row = bench_wan.table_row(skipped)
    assert "| 0.50 s (link) | - | deadline 3.50 s, 2 late |" in row
