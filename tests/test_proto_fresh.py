"""Generated protobuf code must match what `make proto` produces from protos/ today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "fedcore" / "v1").iterdir())
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed; run `make proto`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale; run `make proto` and commit the result"
        )
