"""passes/fuse_norm.py: RMSNorm / LayerNorm (with the residual Add) become one op per target."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt import ir as graph_ir
from graphopt.fusion import ConvertOpset
from graphopt.passes.fuse_norm import FuseNormalization
from graphopt.testing import chunked_logits, register_ort_onnx_domain_schemas

IDS = np.random.default_rng(4).integers(0, 300, size=12).tolist()
# float32; the fused kernels sum squares in another order than ReduceMean (tiny models: ~1e-6).
TOLERANCE = 1e-5

EXPECTED = {
    ("llama", "cpu"): {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4},
    ("llama", "onnx"): {"RMSNormalization": 5},
    ("gpt2", "cpu"): {"SkipLayerNormalization": 5},
}


def plain(request, family: str, target: str) -> ir.Model:
    model = graph_ir.load(request.getfixturevalue(f"tiny_{family}_dir") / "model.onnx")
    if target == "onnx":
        ConvertOpset(23)(model)
    return model


@pytest.mark.parametrize("family, target", list(EXPECTED))
def test_positive_every_norm_fuses(request, family, target):
    model = plain(request, family, target)
    norm = FuseNormalization(target)
    assert norm(model).modified
    assert {key: count for key, count in norm.counts.items() if count} == EXPECTED[family, target]
    histogram = collections.Counter(node.op_type for node in model.graph)
    assert all(histogram[op] == count for op, count in EXPECTED[family, target].items())
    assert histogram["ReduceMean"] == 0
    assert not FuseNormalization(target)(model).modified, "a second run must change nothing"


def test_negative_a_max_instead_of_a_mean_does_not_fuse(request):
    """RMSNorm divides by the root *mean* square: a ReduceMax in its place is another function."""
    model = plain(request, "llama", "cpu")
    first = next(node for node in model.graph if node.op_type == "ReduceMean")
    first.op_type = "ReduceMax"
    norm = FuseNormalization("cpu")
    norm(model)
    assert sum(norm.counts.values()) == 4  # the other four of five norms
    assert sum(1 for node in model.graph if node.op_type == "ReduceMax") == 1
    assert norm.explain(model, {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"})


@pytest.mark.parametrize("family, target", list(EXPECTED))
def test_numerical_matches_the_written_out_graph(request, tmp_path, family, target):
    model = plain(request, family, target)
    FuseNormalization(target)(model)
    graph_ir.save(model, tmp_path / "model.onnx")
    source = request.getfixturevalue(f"tiny_{family}_dir") / "model.onnx"
    reference = chunked_logits(source, "disable", IDS, (8, 9))
    for expected, actual in zip(reference, chunked_logits(tmp_path / "model.onnx", "all", IDS, (8, 9))):
        np.testing.assert_allclose(actual, expected, atol=TOLERANCE * max(1.0, np.abs(expected).max()))
    register_ort_onnx_domain_schemas()
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.onnx")), full_check=True)
