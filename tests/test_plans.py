"""Plans: export, verification, training, and the attacks a verifier must refuse (in process)."""

from __future__ import annotations

import json
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcore.data import ArrayDataset, load_mnist
from fedcore.errors import ConfigError, PlanError, PlanRejectedError
from fedcore.models import build_model, get_weights, set_weights
from fedcore.plan import ModelSpec, TrainConfig
from fedcore.plans import (
    Limits,
    Plan,
    describe_plan,
    export_plan,
    plan_hash,
    read_plan_file,
    verify_program,
    write_plan_file,
)
from fedcore.privacy.dpsgd import DPSGD
from fedcore.training import evaluate, train
from fedcore.v1 import fedcore_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from plan_resnet import make_model as make_resnet

MNIST_INPUT = torch.zeros(2, 1, 28, 28)


@pytest.fixture(scope="module")
def cnn_plan() -> Plan:
    return export_plan(build_model(ModelSpec("mnist-cnn"), seed=0), MNIST_INPUT, name="cnn")


@pytest.fixture(scope="module")
def small_plan() -> Plan:
    return export_plan(build_model(ModelSpec("logreg"), seed=0), MNIST_INPUT, name="logreg")


def _tiny_data(n: int = 70, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", ["logreg", "mnist-mlp", "mnist-cnn", "mnist-dpcnn", "vector"])
@pytest.mark.slow
def test_registered_models_round_trip(name: str) -> None:
    model = build_model(ModelSpec(name), seed=0)
    plan = export_plan(model, MNIST_INPUT, name=name)
    module = verify_program(plan.program).build()
    set_weights(module, plan.weights)
    x = torch.randn(3, 1, 28, 28)  # another batch size than the example's: dynamic
    model.eval()
    module.eval()
    torch.testing.assert_close(module(x), model(x))
    assert list(plan.weights) == list(module.state_dict())


def test_export_is_deterministic_and_the_hash_covers_the_program(small_plan: Plan) -> None:
    again = export_plan(build_model(ModelSpec("logreg"), seed=1), MNIST_INPUT, name="logreg")
    assert again.hash == small_plan.hash  # weights are not part of the program
    renamed = pb.PlanProgram()
    renamed.CopyFrom(small_plan.program)
    renamed.name = "something else"
    assert plan_hash(renamed) != small_plan.hash


@pytest.mark.slow
def test_example_resnet_trains_with_batchnorm_dropout_and_a_short_last_batch() -> None:
    model = make_resnet(width=8)
    plan = export_plan(model, MNIST_INPUT, name="resnet")
    module = verify_program(plan.program).build()
    set_weights(module, plan.weights)
    before = get_weights(module)
    # 70 examples at batch 32: the last batch has 6.
    result = train(module, _tiny_data(), TrainConfig(batch_size=32, learning_rate=0.05))
    after = get_weights(module)
    assert result.num_examples == 70
    assert np.isfinite(result.loss)
    assert int(after["stem.1.num_batches_tracked"]) == 3  # running stats were updated
    assert not np.allclose(before["head.weight"], after["head.weight"])
    # Evaluation uses the eval graph: deterministic (no dropout, running statistics).
    first = evaluate(module, _tiny_data(20, seed=1))
    second = evaluate(module, _tiny_data(20, seed=1))
    assert first == second
    model.load_state_dict({k: torch.from_numpy(v) for k, v in after.items()})
    model.eval()
    module.eval()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(module(x), model(x))


@pytest.mark.slow
def test_mse_loss_plan_trains() -> None:
    plan = export_plan(build_model(ModelSpec("mnist-mlp"), seed=0), MNIST_INPUT, loss="mse")
    module = verify_program(plan.program).build()
    set_weights(module, plan.weights)
    assert module.fedcore_loss == "mse"
    assert np.isfinite(train(module, _tiny_data(), TrainConfig(batch_size=16)).loss)


def test_plan_file_round_trip(tmp_path: Path, small_plan: Plan) -> None:
    path = tmp_path / "logreg.plan"
    write_plan_file(small_plan, path)
    loaded = read_plan_file(path, max_bytes=1 << 30)
    assert loaded.hash == small_plan.hash
    assert all(np.array_equal(loaded.weights[k], v) for k, v in small_plan.weights.items())
    path.write_bytes(pickle.dumps({"not": "a plan"}))
    with pytest.raises(PlanError, match="not a fedcore plan file"):
        read_plan_file(path, max_bytes=1 << 30)


@pytest.mark.slow
def test_describe_names_shapes_ops_parameters_loss_and_terms(cnn_plan: Plan) -> None:
    config = TrainConfig(
        epochs=2, batch_size=16, extra={"dp.clip_norm": 1.0, "dp.noise_multiplier": 0.8}
    )
    text = "\n".join(describe_plan(verify_program(cnn_plan.program), train=config, secagg=True))
    assert "float32[batch, 1, 28, 28]  ->  output float32[batch, 10]" in text
    assert "1,663,370 trainable" in text
    assert "aten.conv2d x2" in text
    assert "aten.linear x2" in text
    assert "cross_entropy" in text
    assert "2 local epoch(s), batch 16" in text
    assert "clipped to L2 norm 1, noise multiplier 0.8" in text
    assert "secagg      on" in text


def test_dpsgd_refuses_a_plan_clearly(small_plan: Plan) -> None:
    module = verify_program(small_plan.program).build()
    with pytest.raises(ConfigError, match="DP-SGD cannot train a plan"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)(
            module, _tiny_data(), TrainConfig(), torch.device("cpu")
        )


@pytest.mark.slow
def test_mnist_cnn_from_its_plan_matches_the_registry(cnn_plan: Plan) -> None:
    x, y = load_mnist("train")
    data = ArrayDataset(torch.from_numpy(x[:256]), torch.from_numpy(y[:256]))
    tx, ty = load_mnist("test")
    test = ArrayDataset(torch.from_numpy(tx[:300]), torch.from_numpy(ty[:300]))
    config = TrainConfig(batch_size=32, learning_rate=0.05, momentum=0.9, seed=3)
    registry = build_model(ModelSpec("mnist-cnn"), seed=0)
    module = verify_program(cnn_plan.program).build()
    set_weights(module, get_weights(registry))
    reg_train = train(registry, data, config)
    plan_train = train(module, data, config)
    reg_eval, plan_eval = evaluate(registry, test), evaluate(module, test)
    assert abs(reg_train.loss - plan_train.loss) < 0.02
    assert abs(reg_eval.accuracy - plan_eval.accuracy) <= 0.02
    assert plan_eval.accuracy > 0.3  # it did learn (chance: 0.1)


# ------------------------------------------------------------------ attacks


def _tamper(plan: Plan, change: Callable[[dict[str, Any]], None]) -> pb.PlanProgram:
    """A copy of ``plan``'s program with its training graph changed (and re-hashed: the
    attacker controls the hash too)."""
    program = pb.PlanProgram()
    program.CopyFrom(plan.program)
    doc = json.loads(program.train_graph)
    change(doc)
    program.train_graph = json.dumps(doc).encode()
    program.hash = plan_hash(program)
    return program


def _nodes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = doc["graph_module"]["graph"]["nodes"]
    return nodes


def _retarget(target: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        _nodes(doc)[0]["target"] = target

    return change


def test_positive_control_untampered_plan_passes(small_plan: Plan) -> None:
    program = _tamper(small_plan, lambda doc: None)
    assert verify_program(program).hash == program.hash


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("torch.ops.aten.index_put_.default", "an ATen operator that is not on the allow-list"),
        ("torch.ops.aten.linear.out", "an ATen operator that is not on the allow-list"),
        ("builtins.eval", "a Python callable"),
        ("torch.load", "a Python callable"),
        ("torch.ops.mylib.steal.default", "a custom operator"),
        ("torch.ops.higher_order.cond", "a higher-order operator"),
    ],
)
def test_refuses_targets_off_the_allow_list(small_plan: Plan, target: str, kind: str) -> None:
    first = _nodes(json.loads(small_plan.program.train_graph))[0]["name"]
    with pytest.raises(
        PlanRejectedError, match=re.escape(f"node {first!r} calls {target}: {kind}")
    ):
        verify_program(_tamper(small_plan, _retarget(target)))


def test_refuses_a_torchbind_object(small_plan: Plan) -> None:
    def change(doc: dict[str, Any]) -> None:
        graph = doc["graph_module"]["graph"]
        graph["custom_obj_values"] = {
            "obj0": {
                "name": "obj0",
                "class_fqn": "__torch__.torch.classes._TorchScriptTesting._Foo",
            }
        }

    with pytest.raises(PlanRejectedError, match="'obj0' is a custom \\(torchbind\\) object"):
        verify_program(_tamper(small_plan, change))

    def as_argument(doc: dict[str, Any]) -> None:
        node = _nodes(doc)[0]
        node["inputs"][0]["arg"] = {"as_custom_obj": {"name": "obj0", "class_fqn": "x"}}

    name = _nodes(json.loads(small_plan.program.train_graph))[0]["name"]
    with pytest.raises(PlanRejectedError, match=f"node '{name}' takes a custom \\(torchbind\\)"):
        verify_program(_tamper(small_plan, as_argument))


def test_refuses_a_pickled_constant_and_never_calls_torch_load(
    small_plan: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called on plan bytes")

    monkeypatch.setattr(torch, "load", no_load)
    verify_program(small_plan.program).build()  # positive control: builds without torch.load
    program = pb.PlanProgram()
    program.CopyFrom(small_plan.program)
    program.constants_data = pickle.dumps(print)  # no header: nothing may interpret it
    program.hash = plan_hash(program)
    with pytest.raises(PlanRejectedError, match="constant bytes but declares no constants"):
        verify_program(program)
    program.constants.CopyFrom(
        pb.PayloadHeader(
            tensors=[pb.TensorSpec(name="c", dtype=pb.DTYPE_UINT8, shape=[3])], total_bytes=3
        )
    )
    program.hash = plan_hash(program)
    with pytest.raises(PlanRejectedError, match="constants: payload: chunk 0 has"):
        verify_program(program)

    def constant_input(doc: dict[str, Any]) -> None:
        specs = doc["graph_module"]["signature"]["input_specs"]
        specs.insert(0, {"constant_input": {"name": "c", "value": {"as_string": "pickle"}}})

    with pytest.raises(PlanRejectedError, match="input 'c' of kind 'constant_input' refused"):
        verify_program(_tamper(small_plan, constant_input))


def test_refuses_an_oversized_parameter(small_plan: Plan) -> None:
    def huge(doc: dict[str, Any]) -> None:
        meta = doc["graph_module"]["graph"]["tensor_values"]["p_linear_weight"]
        meta["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]

    with pytest.raises(PlanRejectedError, match="tensor 'p_linear_weight': 1099511627776 elements"):
        verify_program(_tamper(small_plan, huge))
    with pytest.raises(PlanRejectedError, match="parameters and buffers take 31400 bytes"):
        verify_program(small_plan.program, limits=Limits(max_state_bytes=1000))


def test_refuses_malformed_json_and_code_in_shape_expressions(small_plan: Plan) -> None:
    program = pb.PlanProgram()
    program.CopyFrom(small_plan.program)
    program.train_graph = b'{"graph_module": [1, 2'
    program.hash = plan_hash(program)
    with pytest.raises(PlanRejectedError, match="training graph: not valid JSON"):
        verify_program(program)

    def inject(doc: dict[str, Any]) -> None:
        meta = doc["graph_module"]["graph"]["tensor_values"]["x"]
        meta["sizes"][0] = {"as_expr": {"expr_str": "__import__('os').system('id')"}}

    with pytest.raises(PlanRejectedError, match="refused: unexpected '__import__'"):
        verify_program(_tamper(small_plan, inject))

    def guards(doc: dict[str, Any]) -> None:
        doc["guards_code"] = ["import os; os.system('id')"]

    with pytest.raises(PlanRejectedError, match="guard code"):
        verify_program(_tamper(small_plan, guards))


def test_refuses_a_wrong_hash(small_plan: Plan) -> None:
    program = pb.PlanProgram()
    program.CopyFrom(small_plan.program)
    program.hash = "0" * 64
    with pytest.raises(PlanRejectedError, match="does not match its content"):
        verify_program(program)


@pytest.mark.slow
def test_fed_plan_cli_exports_and_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedcore.plans.cli import main

    out = tmp_path / "mlp.plan"
    assert main(["export", "mnist-mlp", "--params", '{"hidden": 32}', "--out", str(out)]) == 0
    exported = capsys.readouterr().out
    digest = re.search(r"plan ([0-9a-f]{64})", exported)
    assert digest is not None
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"hash        {digest.group(1)}" in shown
    assert "26,506 trainable" in shown  # 784*32+32 + 32*32+32 + 32*10+10
    assert "aten.linear x3" in shown
    assert main(["export", "mnist-mlp", "--params", "[1]", "--out", str(out)]) == 2
    assert "--params must be a JSON object" in capsys.readouterr().err
