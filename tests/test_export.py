"""Export of tiny seeded models: numerics against PyTorch, the KV-cache contract, the manifest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from graphopt.modeldir import ModelDir
from graphopt.runtime import Decoder
from graphopt.testing import tiny_model

FAMILIES = ["llama", "qwen2", "gpt2"]
# fp32 end to end; observed differences are ~1e-5 on logits of magnitude ~10.
FP32_ATOL = 1e-4


@pytest.fixture(params=FAMILIES)
def exported(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}_dir")


def reference_logits(family: str, ids: list[int]) -> np.ndarray:
    model, _ = tiny_model(family)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_manifest_describes_the_graph(exported):
    family, path = exported
    directory = ModelDir.open(path)
    manifest = directory.manifest
    model = onnx.load(str(directory.model_path), load_external_data=False)
    assert [value.name for value in model.graph.input] == manifest.inputs
    assert [value.name for value in model.graph.output] == manifest.outputs
    assert manifest.family == ("gpt2" if family == "gpt2" else "llama")
    assert len(manifest.inputs) == 3 + 2 * manifest.layers
    key = model.graph.input[3].type.tensor_type.shape.dim
    assert [key[1].dim_value, key[3].dim_value] == [manifest.kv_heads, manifest.head_dim]
    step = manifest.lineage[0]
    assert step.name == "export" and step.figures["greedy_steps_agreeing"] == 32
    assert manifest.source["kind"] == "huggingface" and len(manifest.source["sha256"]) == 64
    tokenizer_text = (directory.path / "tokenizer.json").read_text(encoding="utf-8")
    assert tokenizer_text == json.dumps(json.loads(tokenizer_text), ensure_ascii=False, separators=(",", ":"))  # compact
    onnx.checker.check_model(str(directory.model_path), full_check=True)


def test_prefill_and_decode_match_pytorch(exported):
    family, path = exported
    ids = np.random.default_rng(1).integers(0, 300, size=10).tolist()
    expected = reference_logits(family, ids)
    decoder = Decoder(ModelDir.open(path).model_path)
    prefill = decoder.forward(ids[:6])
    decoded = [decoder.forward([token])[0] for token in ids[6:]]
    np.testing.assert_allclose(prefill, expected[:6], atol=FP32_ATOL)
    np.testing.assert_allclose(np.stack(decoded), expected[6:], atol=FP32_ATOL)


def test_token_by_token_equals_one_forward(exported):
    _, path = exported
    ids = np.random.default_rng(2).integers(0, 300, size=9).tolist()
    decoder = Decoder(ModelDir.open(path).model_path)
    whole = decoder.forward(ids)
    decoder.reset()
    stepwise = np.stack([decoder.forward([token])[0] for token in ids])
    np.testing.assert_allclose(stepwise, whole, atol=FP32_ATOL)


def test_multi_token_forward_and_rollback_on_cache(tiny_llama_dir):
    ids = list(range(5, 17))
    decoder = Decoder(ModelDir.open(tiny_llama_dir).model_path)
    whole = decoder.forward(ids)
    decoder.reset()
    decoder.forward(ids[:4])
    decoder.forward([1, 2, 3])  # tokens later rejected
    decoder.truncate(4)
    assert decoder.length == 4
    np.testing.assert_allclose(decoder.forward(ids[4:]), whole[4:], atol=FP32_ATOL)


def test_dynamic_batch_with_left_padding(tiny_llama_dir):
    """Batch 2, the second row left-padded: each row equals its own batch-1 run."""
    import onnxruntime as ort

    directory = ModelDir.open(tiny_llama_dir)
    session = ort.InferenceSession(str(directory.model_path), providers=["CPUExecutionProvider"])
    manifest = directory.manifest
    rows = [[11, 12, 13, 14, 15], [0, 0, 21, 22, 23]]
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=np.int64)
    positions = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]], dtype=np.int64)
    empty = np.zeros((2, manifest.kv_heads, 0, manifest.head_dim), dtype=np.float32)
    feeds = {"input_ids": np.array(rows), "attention_mask": mask, "position_ids": positions}
    feeds.update({name: empty for name in manifest.inputs[3:]})
    batched = session.run(["logits"], feeds)[0]
    decoder = Decoder(directory.model_path)
    np.testing.assert_allclose(batched[0], decoder.forward(rows[0]), atol=FP32_ATOL)
    decoder.reset()
    np.testing.assert_allclose(batched[1, 2:], decoder.forward(rows[1][2:]), atol=FP32_ATOL)


def test_node_and_weight_names_follow_the_checkpoint(tiny_llama_dir):
    model = onnx.load(str(ModelDir.open(tiny_llama_dir).model_path), load_external_data=False)
    names = {node.name for node in model.graph.node}
    assert "/model/layers.1/self_attn/q_proj/MatMul" in names
    weights = {tensor.name for tensor in model.graph.initializer}
    assert {"model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"} & weights
    assert not any(prop.key.endswith("stack_trace") for node in model.graph.node for prop in node.metadata_props)
    assert json.loads((tiny_llama_dir / "graphopt.json").read_text())["opset"] == 18
