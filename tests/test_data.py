"""Tests of fedcore.data: IDX files, bundled MNIST, partitioning, shards and fed-data."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.data import (
    BUNDLED_MNIST_DIR,
    ArrayDataset,
    format_summary,
    load_mnist,
    load_shard,
    partition,
    read_idx,
    save_shard,
    summarize,
    verify_checksums,
    write_idx,
)
from fedcore.data.cli import main
from fedcore.errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


# --- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path: Path, dtype: str, compress: bool) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, array, compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") is compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian(tmp_path: Path) -> None:
    path = tmp_path / "a"
    write_idx(path, np.array([1, 258], dtype=np.int16))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0, 1, 1, 2])


def test_idx_gzip_detected_by_content_not_extension(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "plain.gz", array, compress=False)
    write_idx(tmp_path / "packed.idx", array, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed.idx"), array)


def test_idx_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "a"
    write_idx(path, np.zeros((4, 4), dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated IDX data"):
        read_idx(path)


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a"
    write_idx(path, np.zeros(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "bad IDX magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX dtype code 0x07"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated IDX header"),
        (b"\x00\x00", "too short"),
    ],
)
def test_idx_bad_header(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_idx(path)


def test_idx_corrupt_gzip_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")[:-6])
    with pytest.raises(DataError, match="gzip"):
        read_idx(path)
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "missing")


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="uint16"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.uint16))


# --- bundled MNIST -------------------------------------------------------------------------


def test_bundled_checksums_verify() -> None:
    verify_checksums()
    verify_checksums(BUNDLED_MNIST_DIR)


def test_load_bundled_mnist() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_mnist(split)  # type: ignore[arg-type]
        assert x.shape == (n, 28, 28)
        assert x.dtype == np.uint8
        assert y.shape == (n,)
        assert y.dtype == np.uint8
        assert set(np.unique(y).tolist()) == set(range(10))
        assert 0 < x.mean() < 255


def test_load_mnist_rejects_unknown_split() -> None:
    with pytest.raises(ConfigError, match="unknown MNIST split"):
        load_mnist("validation")  # type: ignore[arg-type]


def test_corrupted_copy_fails_verification(tmp_path: Path) -> None:
    for name in [*MNIST_FILES, "SHA256SUMS"]:
        shutil.copyfile(BUNDLED_MNIST_DIR / name, tmp_path / name)
    verify_checksums(tmp_path)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: checksum mismatch") as info:
        verify_checksums(tmp_path)
    assert "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920" in str(info.value)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_mnist("test", root=tmp_path)


def test_missing_listed_file_fails_verification(tmp_path: Path) -> None:
    shutil.copyfile(BUNDLED_MNIST_DIR / "SHA256SUMS", tmp_path / "SHA256SUMS")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: listed in .* but missing"):
        verify_checksums(tmp_path)


def test_load_mnist_from_uncompressed_user_root(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 7, dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y)
    x2, y2 = load_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist("train", root=tmp_path)


# --- partition -----------------------------------------------------------------------------

labels_strategy = st.lists(st.integers(0, 9), min_size=1, max_size=300).map(
    lambda v: np.array(v, dtype=np.int64)
)


def _check_disjoint_cover(parts: list[npt.NDArray[np.int64]], n: int) -> None:
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_strategy,
    num_shards=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    scheme=st.sampled_from(["iid", "dirichlet"]),
)
def test_partition_disjoint_cover_deterministic(
    labels: npt.NDArray[np.int64], num_shards: int, seed: int, scheme: Any
) -> None:
    if num_shards > len(labels):
        with pytest.raises(ConfigError, match="non-empty shards"):
            partition(labels, num_shards, scheme, seed=seed)
        return
    try:
        parts = partition(labels, num_shards, scheme, seed=seed, alpha=1.0)
    except ConfigError as exc:  # dirichlet on a handful of examples can leave a shard empty
        assert scheme == "dirichlet"
        assert "left a shard empty" in str(exc)  # noqa: PT017
        assert len(labels) < 4 * num_shards
        return
    assert len(parts) == num_shards
    _check_disjoint_cover(parts, len(labels))
    again = partition(labels, num_shards, scheme, seed=seed, alpha=1.0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    labels=labels_strategy,
    num_shards=st.integers(1, 8),
    cps=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_shards_scheme_limits_classes(
    labels: npt.NDArray[np.int64], num_shards: int, cps: int, seed: int
) -> None:
    num_classes = len(np.unique(labels))
    pieces = num_shards * cps
    if pieces < num_classes or pieces > len(labels):
        with pytest.raises(ConfigError):
            partition(labels, num_shards, "shards", seed=seed, classes_per_shard=cps)
        return
    parts = partition(labels, num_shards, "shards", seed=seed, classes_per_shard=cps)
    _check_disjoint_cover(parts, len(labels))
    assert all(len(np.unique(labels[p])) <= cps for p in parts)
    again = partition(labels, num_shards, "shards", seed=seed, classes_per_shard=cps)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_partition_seed_changes_split() -> None:
    labels = np.repeat(np.arange(10), 50)
    a = partition(labels, 5, "iid", seed=1)
    b = partition(labels, 5, "iid", seed=2)
    assert not all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


def _mean_max_class_share(labels: npt.NDArray[np.int64], parts: list[Any]) -> float:
    shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    return float(np.mean(shares))


def test_dirichlet_small_alpha_is_skewed() -> None:
    labels = np.repeat(np.arange(10), 200)
    iid = _mean_max_class_share(labels, partition(labels, 10, "iid", seed=0))
    skewed = _mean_max_class_share(labels, partition(labels, 10, "dirichlet", seed=0, alpha=0.05))
    assert iid < 0.2
    assert skewed > 0.5


def test_dirichlet_gives_up_with_clear_error() -> None:
    with pytest.raises(ConfigError, match="raise alpha"):
        partition(np.zeros(5, dtype=np.int64), 5, "dirichlet", seed=0, alpha=0.001)


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.array([0.0, 1.0]), {}, "integer"),
        (np.array([0, -1]), {}, ">= 0"),
        (np.array([0, 1]), {"num_shards": 0}, "at least 1"),
        (np.array([0, 1]), {"scheme": "zipf"}, "unknown partition scheme"),
        (np.array([0, 1]), {"scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
        (np.arange(10), {"num_shards": 2, "scheme": "shards"}, "must be at least the number"),
    ],
)
def test_partition_rejects_bad_arguments(
    labels: npt.NDArray[Any], kwargs: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = {"num_shards": 1, "scheme": "iid", "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        partition(labels, **args)


def test_summarize_and_format_summary() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    summaries = summarize(labels, parts)
    assert [s.num_examples for s in summaries] == [3, 3]
    assert summaries[0].class_counts == [2, 1, 0]
    assert summaries[1].class_counts == [0, 0, 3]
    lines = format_summary(summaries).splitlines()
    assert lines[0].split() == ["shard", "examples", "0", "1", "2"]
    assert lines[2].split() == ["0", "3", "2", "1", "0"]
    assert lines[-1].split() == ["total", "6", "2", "1", "3"]
    assert len({len(line) for line in lines}) == 1  # fixed width


# --- shards --------------------------------------------------------------------------------


def test_array_dataset_normalizes_mnist_images() -> None:
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    x[1] = 255
    ds = ArrayDataset(x, np.array([3, 7], dtype=np.uint8))
    assert ds.x.shape == (2, 1, 28, 28)
    assert ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64
    assert ds.y.tolist() == [3, 7]
    assert ds.x[0].flatten()[0].item() == pytest.approx(-0.1307 / 0.3081, rel=1e-6)
    assert ds.x[1].flatten()[0].item() == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)
    assert len(ds) == 2
    xi, yi = ds[1]
    assert xi.shape == (1, 28, 28)
    assert yi.item() == 7


def test_array_dataset_other_inputs() -> None:
    small = ArrayDataset(np.full((3, 8, 8), 255, dtype=np.uint8), np.zeros(3, dtype=np.int64))
    assert small.x.shape == (3, 8, 8)
    assert torch.all(small.x == 1.0)
    floats = np.array([[0.5, -2.0]], dtype=np.float64)
    ds = ArrayDataset(floats, np.array([1]))
    assert ds.x.dtype == torch.float32
    assert ds.x.tolist() == [[0.5, -2.0]]


def test_save_and_load_npz_shard(tmp_path: Path) -> None:
    x = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    y = np.array([0, 5, 9], dtype=np.uint8)
    path = save_shard(tmp_path / "sub" / "shard-0", x, y)
    assert path == tmp_path / "sub" / "shard-0.npz"
    assert path.is_file()
    ds = load_shard(path)
    expected = ArrayDataset(x, y)
    assert torch.equal(ds.x, expected.x)
    assert ds.y.tolist() == [0, 5, 9]


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_directory_prefers_train(tmp_path: Path, compress: bool) -> None:
    ext = ".gz" if compress else ""
    x = np.ones((4, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", x, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", np.arange(4, dtype=np.uint8), compress)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", x[:2], compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", np.arange(2, dtype=np.uint8), compress)
    ds = load_shard(tmp_path)
    assert len(ds) == 4
    assert ds.y.tolist() == [0, 1, 2, 3]
    assert ds.x.shape == (4, 1, 28, 28)


def test_load_idx_directory_only_t10k_and_ambiguous(tmp_path: Path) -> None:
    x = np.ones((2, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([4, 2], dtype=np.uint8))
    assert load_shard(tmp_path).y.tolist() == [4, 2]
    write_idx(tmp_path / "extra-images", x)
    write_idx(tmp_path / "extra-labels", np.array([1, 1], dtype=np.uint8))
    with pytest.raises(DataError, match="several IDX pairs"):
        load_shard(tmp_path)


def test_load_idx_directory_without_pair(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.ones((2, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="no IDX pair"):
        load_shard(tmp_path)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((3, 2), np.float32), np.zeros(2, np.int64), "3 examples but y has 2"),
        (np.array([[0.0, np.nan]]), np.zeros(1, np.int64), "NaN"),
        (np.array([[np.inf]]), np.zeros(1, np.int64), "NaN or infinite"),
        (np.zeros((0, 2), np.float32), np.zeros(0, np.int64), "no examples"),
        (np.zeros((1, 2), np.float32), np.array([0.5]), "labels must be integers"),
        (np.zeros((1, 2), np.float32), np.array([-1]), "labels must be >= 0"),
    ],
)
def test_bad_shards_rejected(
    tmp_path: Path, x: npt.NDArray[Any], y: npt.NDArray[Any], match: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(DataError, match=match) as info:
        load_shard(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match=match):
        save_shard(tmp_path / "never.npz", x, y)
    assert not (tmp_path / "never.npz").exists()


def test_bad_shard_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such shard"):
        load_shard(tmp_path / "missing.npz")
    np.savez(tmp_path / "nox.npz", y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="missing array"):
        load_shard(tmp_path / "nox.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match=r"obj.npz"):
        load_shard(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk.npz"):
        load_shard(tmp_path / "junk.npz")


# --- fed-data ------------------------------------------------------------------------------


def test_cli_split_writes_shards_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    code = main(
        [
            "split",
            "--out",
            str(out),
            "--num-shards",
            "3",
            "--max-examples",
            "600",
            "--scheme",
            "dirichlet",
            "--alpha",
            "1.0",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    shards = [load_shard(out / f"shard-{i}.npz") for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == [
        "shard-0.npz",
        "shard-1.npz",
        "shard-2.npz",
        "test.npz",
    ]
    assert sum(len(s) for s in shards) == 600
    assert len(load_shard(out / "test.npz")) == 10000
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["shard", "examples", *map(str, range(10))]
    assert any(line.split()[:2] == ["total", "600"] for line in printed.splitlines())
    assert str(out / "test.npz") in printed
    _, y = load_mnist("train")
    expected = np.sort(y[:600])
    np.testing.assert_array_equal(np.sort(np.concatenate([s.y.numpy() for s in shards])), expected)


def test_cli_errors_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["split", "--out", str(tmp_path), "--num-shards", "3", "--scheme", "shards"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fed-data: error: the 'shards' scheme")
    assert "Traceback" not in err
    assert (
        main(
            [
                "split",
                "--out",
                str(tmp_path),
                "--num-shards",
                "2",
                "--source",
                str(tmp_path / "nowhere"),
            ]
        )
        == 2
    )
    assert "fed-data: error:" in capsys.readouterr().err


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify"]) == 0
    assert capsys.readouterr().out.startswith("OK")
    (tmp_path / "a.gz").write_bytes(b"tampered")
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  a.gz\n")
    assert main(["verify", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fed-data: error:")
    assert "a.gz: checksum mismatch" in err


@pytest.mark.slow
def test_python_dash_m_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedcore.data", "verify"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK")
