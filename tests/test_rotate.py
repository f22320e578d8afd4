"""passes/rotate.py: the residual stream rotated by an orthogonal matrix folded into the weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt import ir as graph_ir
from graphopt.errors import GraphoptError
from graphopt.fusion import fuse
from graphopt.modeldir import ModelDir
from graphopt.passes.rotate import OnlineHadamardPass, RotateResidualPass, hadamard, random_rotation
from graphopt.calibration import CalibrationSpec
from graphopt.quantization import QuantizeConfig, quantize
from graphopt.testing import chunked_logits, register_ort_onnx_domain_schemas

# fp32: each weight is a sum of hidden-size products after rotation; seen ~2e-6 on the tiny models.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    built = {}

    def get(request, family):
        if family not in built:
            built[family] = tmp_path_factory.mktemp("fused") / family
            fuse(request.getfixturevalue(f"tiny_{family}_dir"), built[family], "cpu")
        return built[family]

    return get


@pytest.mark.parametrize("size", [1, 2, 12, 20, 64, 72, 576, 1536])
def test_hadamard_rows_are_orthogonal(size):
    matrix = hadamard(size)
    assert set(np.unique(matrix)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(matrix @ matrix.T, size * np.eye(size))


def test_rotation_is_orthogonal_where_no_hadamard_is_built():
    assert hadamard(9) is None and hadamard(100) is None
    for size, kind in ((576, "randomized Hadamard"), (100, "random orthogonal")):
        rotation, made = random_rotation(size, seed=3)
        assert made == kind
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(size), atol=1e-12)
    np.testing.assert_array_equal(random_rotation(64, seed=1)[0], random_rotation(64, seed=1)[0])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotated_model_computes_the_same_logits(request, fused, tmp_path, family):
    """Lossless in float: prefill, decode and multi-token logits equal the unrotated model's."""
    source = fused(request, family)
    model = graph_ir.load(source / "model.onnx")
    rotate = RotateResidualPass(seed=1)
    assert rotate(model).modified
    tied = family == "llama"  # the tiny Llama ties its head to the embedding; Qwen2 does not
    # 2 layers: 2 norms each + the final one; q/k/v + gate/up read them (+ an untied head); the
    # embedding and o/down write the stream (Qwen2's q/k/v biases stay: they are added after).
    assert rotate.counts == {"norms": 5, "readers": 2 * 5 + 1, "writers": 1 + 2 * 2, "tied_head": int(tied)}
    scales = [node.inputs[-1] for node in model.graph if node.op_type.endswith("SimplifiedLayerNormalization")]
    assert all(np.array_equal(scale.const_value.numpy(), np.ones(64, np.float32)) for scale in scales)
    assert not rotate(model).modified  # idempotent: the model says it is rotated
    graph_ir.save(model, tmp_path / "model.onnx")
    ids = np.random.default_rng(0).integers(0, 300, size=16).tolist()
    reference = chunked_logits(source / "model.onnx", "disable", ids, (9, 10, 14))
    for a, b in zip(reference, chunked_logits(tmp_path / "model.onnx", "all", ids, (9, 10, 14))):
        assert np.abs(a - b).max() < TOLERANCE
    register_ort_onnx_domain_schemas()
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.onnx")), full_check=True)


def test_unfused_or_layer_norm_graphs_are_refused_unchanged(request, fused):
    plain = graph_ir.load(request.getfixturevalue("tiny_llama_dir") / "model.onnx")
    with pytest.raises(GraphoptError, match="graphopt fuse"):
        RotateResidualPass()(plain)
    gpt2 = graph_ir.load(fused(request, "gpt2") / "model.onnx")  # LayerNorm subtracts the mean: no rotation
    with pytest.raises(GraphoptError, match="fuse"):
        RotateResidualPass()(gpt2)


def test_a_stream_value_read_elsewhere_is_refused_before_any_change(request, fused):
    """An Identity of the embedding output exposed as a graph output: the stream is read outside the norms."""
    model = graph_ir.load(fused(request, "llama") / "model.onnx")
    embedding = next(node for node in model.graph if node.op_type == "Gather")
    table = embedding.inputs[0].const_value.numpy().copy()
    peek = ir.node("Identity", [embedding.outputs[0]], name="peek")
    model.graph.append(peek)
    model.graph.outputs.append(peek.outputs[0])
    with pytest.raises(GraphoptError, match="also Identity"):
        RotateResidualPass()(model)
    np.testing.assert_array_equal(embedding.inputs[0].const_value.numpy(), table)
    assert "graphopt.rotation" not in model.metadata_props


def test_quantize_rotate_records_the_rotation_and_stays_close(request, fused, tmp_path):
    source = fused(request, "llama")
    config = QuantizeConfig(weights="int8", rotation="residual")
    result = quantize(source, tmp_path / "int8-rotated", config)
    step = result.manifest.lineage[-1]
    assert step.parameters["rotation"] == "residual"
    assert step.figures["rotated"]["rotation"] == "randomized Hadamard" and step.figures["rotated"]["norms"] == 5
    ids = np.random.default_rng(5).integers(0, 300, size=12).tolist()
    reference = chunked_logits(source / "model.onnx", "disable", ids, (8,))
    quantized = chunked_logits(ModelDir.open(result.path).model_path, "all", ids, (8,))
    for a, b in zip(reference, quantized):  # the bound of the unrotated int8 test (test_families_b)
        assert np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a**2)) < 0.10


def test_online_hadamard_before_down_proj_is_lossless_and_left_float(request, fused, tmp_path):
    """96 = 8 x 12: Reshape, two small MatMuls, Reshape before each down_proj; no quantizer takes them."""
    source = fused(request, "llama")
    model = graph_ir.load(source / "model.onnx")
    online = OnlineHadamardPass()
    assert online(model).modified and online.counts == {"down_proj": 2}
    assert not online(model).modified
    down = [node for node in model.graph if node.op_type == "MatMul" and "down_proj" in node.name and "rotation" not in node.name]
    assert [node.inputs[0].producer().op_type for node in down] == ["Reshape", "Reshape"]
    graph_ir.save(model, tmp_path / "model.onnx")
    ids = np.random.default_rng(1).integers(0, 300, size=16).tolist()
    reference = chunked_logits(source / "model.onnx", "disable", ids, (9, 10))
    for a, b in zip(reference, chunked_logits(tmp_path / "model.onnx", "all", ids, (9, 10))):
        assert np.abs(a - b).max() < TOLERANCE
    result = quantize(source, tmp_path / "w8a8", QuantizeConfig(weights="int8", activations="int8", rotation="online",
                                                                 calib=CalibrationSpec(samples=2, seq_len=16)))
    assert result.manifest.lineage[-1].figures["rotated"]["online"] == 2
    quantized = graph_ir.load(result.model_path)
    rotations = [node for node in quantized.graph if node.op_type == "MatMul" and "/rotation/" in node.name]
    assert len(rotations) == 4  # two per down_proj, kept float: no DequantizeLinear feeds them
    assert not any(value.producer() is not None and value.producer().op_type == "DequantizeLinear"
                   for node in rotations for value in node.inputs)
