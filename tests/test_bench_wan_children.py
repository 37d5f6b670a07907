"""Benchmark children run the code they were meant to (scripts/benchlib.py): started from an
empty folder, each reports where its fedcore came from and the harness checks it. A stand-in
tree of three empty packages keeps this fast (no torch import)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib


def _fake_tree(root: Path) -> Path:
    for package in ("fedcore", "fedcore/server", "fedcore/worker"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "fedcore/server/__main__.py").write_text(
        "import sys\nprint('ran', *sys.argv[1:], flush=True)\n"
    )
    return root


def _start(tmp_path: Path, tree: Path, cwd: Path) -> benchlib.Child:
    return benchlib.Child(
        "stand-in server",
        benchlib.python(str(benchlib.LIBRARY), "run-module", "fedcore.server", "--flag"),
        tmp_path / "child.log",
        cwd=cwd,
        env=benchlib.code_env(tree),
    )


def test_a_child_runs_and_reports_the_tree_it_was_given(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path / "tree")
    with benchlib.neutral_folder() as cwd:
        child = _start(tmp_path, tree, cwd)
        try:
            origins = child.check_imports(tree, 60)
            assert child.wait_for_line("ran ", 60) == "--flag"
        finally:
            child.stop()
    assert set(origins) == {"fedcore", "fedcore.server", "fedcore.worker"}
    assert all(Path(p).resolve().is_relative_to(tree.resolve()) for p in origins.values())


def test_a_child_that_imported_another_tree_is_refused(tmp_path: Path) -> None:
    """The harness meant one tree; the child found another first on its path."""
    tree = _fake_tree(tmp_path / "tree")
    other = _fake_tree(tmp_path / "other")
    with benchlib.neutral_folder() as cwd:
        child = _start(tmp_path, other, cwd)
        try:
            with pytest.raises(benchlib.BenchError, match="meant to run the code in"):
                child.check_imports(tree, 60)
        finally:
            child.stop()


def test_children_never_start_in_a_folder_with_code(tmp_path: Path) -> None:
    """``python -m`` puts the current folder first on sys.path: the repository root would
    shadow the tree on PYTHONPATH (how --old-code used to run the working tree)."""
    tree = _fake_tree(tmp_path / "tree")
    with pytest.raises(benchlib.BenchError, match="not empty"):
        _start(tmp_path, tree, benchlib.REPO)
