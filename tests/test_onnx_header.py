"""graphopt.onnx_header reads what onnx.load reads (names, logits width, external tensors), and refuses garbage."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import onnx_header
from graphopt.fusion import fuse
from graphopt.quantization import QuantizeConfig, quantize


def _expected(proto: onnx.ModelProto) -> tuple:
    """The same facts through the onnx package (what modeldir.check_graph read before)."""
    tensors = list(proto.graph.initializer) + [attribute.t for node in proto.graph.node
                                               for attribute in node.attribute if attribute.HasField("t")]
    external = {tensor.name: {entry.key: entry.value for entry in tensor.external_data}
                for tensor in tensors if tensor.data_location == TensorProto.EXTERNAL}
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return ([value.name for value in proto.graph.input], [value.name for value in proto.graph.output],
            dims[-1].dim_value if dims else 0, external)


def _read(data: bytes) -> tuple:
    header = onnx_header.read(data)
    return header.inputs, header.outputs, header.logits_width, {tensor.name: tensor.entries for tensor in header.external}


def test_header_matches_onnx_on_exported_fused_and_quantized_models(tiny_llama_dir, tmp_path):
    fused = fuse(tiny_llama_dir, tmp_path / "fused", "cpu")[0].path
    quantized = quantize(fused, tmp_path / "int4", QuantizeConfig(weights="int4")).path
    for directory in (tiny_llama_dir, fused, quantized):
        data = (directory / "model.onnx").read_bytes()
        expected = _expected(onnx.load_from_string(data))
        assert _read(data) == expected
        assert expected[3], "the tiny models keep their weights in model.onnx.data"


def test_external_tensor_inside_a_constant_node_and_symbolic_logits():
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [0.0, 0.0])
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", "8")):
        weight.external_data.add(key=key, value=value)
    constant = helper.make_node("Constant", [], ["c"], value=weight)
    add = helper.make_node("Add", ["x", "c"], ["logits"])
    graph = helper.make_graph([constant, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "vocab"])])
    data = helper.make_model(graph).SerializeToString()
    assert _read(data) == (["x"], ["logits"], 0, {"w": {"location": "w.bin", "offset": "0", "length": "8"}})


def test_garbage_and_truncations_raise_value_error_only(tiny_llama_dir):
    data = (tiny_llama_dir / "model.onnx").read_bytes()
    rng = np.random.default_rng(0)
    cuts = sorted(set(rng.integers(1, len(data) - 1, size=200).tolist()))
    samples = [data[:cut] for cut in cuts] + [rng.bytes(int(size)) for size in rng.integers(1, 4096, size=200)]
    samples += [b"\x08\x96\x01garbage" * 10, b"\x3a\xff\xff\xff\xff\x0f"]
    refused = 0
    for sample in samples:
        try:
            onnx_header.read(sample)
        except ValueError:
            refused += 1
    # Most cuts end inside a field and most random bytes are no message; none may escape as another error.
    assert refused > len(samples) // 2
    with pytest.raises(ValueError):
        onnx_header.read(data[: len(data) // 2])
