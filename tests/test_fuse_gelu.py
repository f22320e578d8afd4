"""passes/fuse_gelu.py: the written-out tanh GELU of the tiny GPT-2 becomes one op per target."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt import ir as graph_ir
from graphopt.fusion import ConvertOpset
from graphopt.passes.fuse_gelu import FuseGelu
from graphopt.testing import chunked_logits

IDS = np.random.default_rng(3).integers(0, 300, size=12).tolist()
TOLERANCE = 1e-5  # float32: FastGelu and Gelu(tanh) compute the same formula in another order


def plain(tiny_gpt2_dir, target: str) -> ir.Model:
    model = graph_ir.load(tiny_gpt2_dir / "model.onnx")
    if target == "onnx":
        ConvertOpset(23)(model)  # what the pipeline does first for standard targets
    return model


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(f"{node.domain}.{node.op_type}".lstrip(".") for node in model.graph)


@pytest.mark.parametrize("target, op, attributes", [("cpu", "com.microsoft.FastGelu", {}),
                                                    ("onnx", "Gelu", {"approximate": "tanh"})])
def test_positive_each_gelu_becomes_one_op(tiny_gpt2_dir, target, op, attributes):
    model = plain(tiny_gpt2_dir, target)
    gelu = FuseGelu(target)
    assert gelu(model).modified
    assert ops(model)[op] == 2 and ops(model)["Tanh"] == 0 and ops(model)["Pow"] == 0
    assert sum(gelu.counts.values()) == 2
    fused = [node for node in model.graph if node.op_type == op.split(".")[-1]]
    assert all(node.metadata_props.get("graphopt.rule") for node in fused)
    assert all({name: node.attributes[name].value for name in attributes} == attributes for node in fused)
    assert not FuseGelu(target)(model).modified, "a second run must change nothing"


def test_negative_a_cube_that_is_a_square_does_not_fuse(tiny_gpt2_dir):
    """x + 0.044715 x^2 is not GELU's polynomial: the rule must leave it alone and say why."""
    model = plain(tiny_gpt2_dir, "cpu")
    for node in [node for node in model.graph if node.op_type == "Pow"]:
        square = ir.Value(name=f"{node.name}.two", const_value=ir.tensor(np.array(2.0, dtype=np.float32)))
        model.graph.initializers[square.name] = square
        node.replace_input_with(1, square)
    gelu = FuseGelu("cpu")
    assert not gelu(model).modified and ops(model)["Tanh"] == 2
    assert gelu.explain(model), "explain gives the reason the rule did not match"


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_numerical_matches_the_written_out_graph(tiny_gpt2_dir, tmp_path, target):
    model = plain(tiny_gpt2_dir, target)
    FuseGelu(target)(model)
    graph_ir.save(model, tmp_path / "model.onnx")
    reference = chunked_logits(tiny_gpt2_dir / "model.onnx", "disable", IDS, (8, 9))
    for expected, actual in zip(reference, chunked_logits(tmp_path / "model.onnx", "all", IDS, (8, 9))):
        np.testing.assert_allclose(actual, expected, atol=TOLERANCE * max(1.0, np.abs(expected).max()))
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.onnx")), full_check=True)
