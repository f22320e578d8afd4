"""passes/fuse_rotary.py: rotate-half RoPE on query and key becomes opset-23 RotaryEmbedding."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import ir as graph_ir
from graphopt.fusion import ConvertOpset
from graphopt.passes.fuse_rotary import FuseRotaryEmbedding
from graphopt.testing import chunked_logits

IDS = np.random.default_rng(5).integers(0, 300, size=12).tolist()
TOLERANCE = 1e-5  # float32, same products summed in the same order


def plain(tiny_llama_dir) -> ir.Model:
    model = graph_ir.load(tiny_llama_dir / "model.onnx")
    ConvertOpset(23)(model)  # RotaryEmbedding exists from opset 23
    return model


def test_positive_query_and_key_of_every_layer(tiny_llama_dir):
    model = plain(tiny_llama_dir)
    rotary = FuseRotaryEmbedding()
    assert rotary(model).modified and rotary.counts == {"RotaryEmbedding": 4}  # 2 layers x (q, k)
    histogram = collections.Counter(node.op_type for node in model.graph)
    assert histogram["RotaryEmbedding"] == 4 and histogram["Neg"] == 0
    # Common-subexpression elimination keeps one Cos/Sin pair for all layers.
    assert histogram["Cos"] == 1 and histogram["Sin"] == 1
    assert not FuseRotaryEmbedding()(model).modified, "a second run must change nothing"


def test_negative_halves_swapped_without_the_sign_do_not_fuse(tiny_llama_dir):
    """Concat(x2, x1) without negating x2 is a permutation, not a rotation."""
    model = plain(tiny_llama_dir)
    for node in [node for node in model.graph if node.op_type == "Neg"]:
        node.outputs[0].replace_all_uses_with(node.inputs[0])
    rotary = FuseRotaryEmbedding()
    assert not rotary(model).modified and rotary.counts == {"RotaryEmbedding": 0}
    assert rotary.explain(model)


def test_numerical_matches_the_written_out_graph(tiny_llama_dir, tmp_path):
    model = plain(tiny_llama_dir)
    FuseRotaryEmbedding()(model)
    graph_ir.save(model, tmp_path / "model.onnx")
    reference = chunked_logits(tiny_llama_dir / "model.onnx", "disable", IDS, (8, 9))
    for expected, actual in zip(reference, chunked_logits(tmp_path / "model.onnx", "all", IDS, (8, 9))):
        np.testing.assert_allclose(actual, expected, atol=TOLERANCE * max(1.0, np.abs(expected).max()))
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.onnx")), full_check=True)
