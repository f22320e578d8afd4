"""LastTokenLogitsPass: the LM head sees only the last position, and that position's logits are unchanged."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphopt.convert import convert
from graphopt.fusion import fuse
from graphopt.modeldir import ModelDir
from graphopt.passes.last_token_logits import LastTokenLogitsPass


@pytest.fixture(scope="module")
def fused_dir(tiny_llama_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("last_token") / "fused"
    fuse(tiny_llama_dir, output, "cpu", require=True)
    return output


@pytest.fixture(scope="module")
def fused_fp16_dir(fused_dir, tmp_path_factory):
    return convert(fused_dir, tmp_path_factory.mktemp("last_token") / "fp16").path


def _feeds(session, length):
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(3, 300, size=(1, length)).astype(np.int64),
             "attention_mask": np.ones((1, length), dtype=np.int64)}
    for meta in session.get_inputs():
        if meta.name == "position_ids":
            feeds[meta.name] = np.arange(length, dtype=np.int64).reshape(1, -1)
        elif meta.name.startswith("past_key_values."):
            feeds[meta.name] = np.zeros((1, meta.shape[1], 0, meta.shape[3]),
                                        dtype=np.float16 if meta.type == "tensor(float16)" else np.float32)
    return feeds


@pytest.mark.parametrize("directory", ["fused_dir", "fused_fp16_dir"])
def test_logits_of_the_last_position_are_unchanged(request, directory):
    """float16: the head is a MatMul, then a Cast to float32 logits (convert_fp16): the slice goes before it;
    same tolerance as float32 (each output row of the MatMul reads only its own input row)."""
    path = ModelDir.open(request.getfixturevalue(directory)).model_path
    model = ir.load(str(path))
    result = LastTokenLogitsPass()(model)
    assert result.modified
    assert not LastTokenLogitsPass()(model).modified  # applied once
    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    sliced = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = _feeds(full, 11)
    expected = full.run(["logits"], feeds)[0]
    got = sliced.run(["logits"], feeds)[0]
    assert expected.shape[1] == 11 and got.shape == (1, 1, expected.shape[2])
    np.testing.assert_allclose(got[0, 0], expected[0, -1], rtol=0, atol=1e-5)


def test_graph_without_a_matmul_head_is_left_alone():
    x = ir.Value(name="x", shape=ir.Shape([1, 2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Relu", [x], outputs=[ir.Value(name="logits")])
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18})
    assert not LastTokenLogitsPass()(ir.Model(graph, ir_version=9)).modified
