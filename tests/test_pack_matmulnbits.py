"""Packing sibling MatMulNBits: q/k/v into GroupQueryAttention's packed query, gate/up + Split.

Numerics: packing only concatenates rows of B, scales and zero points, so ONNX Runtime computes the
same numbers; logits are asserted equal to 1e-6 (relative to their scale), the same check for
8 and 4 bits.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt import ir as graph_io
from graphopt.passes.pack_matmulnbits import PackMatMulNBitsPass, merged_name
from graphopt.passes.quantize_weights import WeightOnlyQuantizePass

from graphopt.testing import chunked_logits as _logits
from graphopt.testing import register_ort_onnx_domain_schemas as _register_ort_onnx_domain_ops
from tests.test_quantize import ort_ops


@pytest.fixture(scope="module")
def fused_dir(tiny_llama_dir, tmp_path_factory):
    fusion = pytest.importorskip("graphopt.fusion")
    fused, _ = fusion.fuse(tiny_llama_dir, tmp_path_factory.mktemp("fused") / "fused", "cpu")
    return fused.path


def quantized(fused_dir, bits: int, exclude=()):
    model = graph_io.load(fused_dir / "model.onnx")
    WeightOnlyQuantizePass(bits=bits, block_size=32, head_bits=8, exclude=exclude)(model)
    return model


def counts(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


@pytest.mark.parametrize("bits", [8, 4])
def test_pack_ops_numerics_and_idempotence(fused_dir, tmp_path, bits):
    model = quantized(fused_dir, bits)
    before = counts(model)
    (tmp_path / "before").mkdir()
    graph_io.save(model, tmp_path / "before" / "model.onnx")
    packer = PackMatMulNBitsPass()
    assert packer(model).modified
    layers = before["GroupQueryAttention"]
    assert packer.counts == {"q/k/v into GroupQueryAttention": layers, "2 siblings + Split": layers}
    after = counts(model)
    # Per layer: q, k, v, gate, up (5 nodes) become qkv and gate_up (2); o_proj, down_proj and the head stay.
    assert after["MatMulNBits"] == before["MatMulNBits"] - 3 * layers and after["Split"] == layers
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            producer = node.inputs[0].producer()
            assert producer.op_type == "MatMulNBits" and node.inputs[1] is None and node.inputs[2] is None
            assert producer.name.endswith("/self_attn/qkv_proj/MatMul_Q%d" % bits)
    assert not PackMatMulNBitsPass()(model).modified
    (tmp_path / "after").mkdir()
    graph_io.save(model, tmp_path / "after" / "model.onnx")
    _register_ort_onnx_domain_ops()
    onnx.checker.check_model(str(tmp_path / "after" / "model.onnx"), full_check=True)
    assert ort_ops(tmp_path / "after" / "model.onnx", tmp_path)["MatMulNBits"] == after["MatMulNBits"]
    # Prefill, one-token decode, a multi-token forward on the cache, decode again.
    ids = np.random.default_rng(1).integers(0, 300, size=16).tolist()
    expected = _logits(tmp_path / "before" / "model.onnx", "all", ids, (9, 10, 14))
    packed = _logits(tmp_path / "after" / "model.onnx", "all", ids, (9, 10, 14))
    for reference, result in zip(expected, packed):
        np.testing.assert_allclose(result, reference, atol=1e-6 * np.abs(reference).max(), rtol=0)


def test_no_packing_across_precisions(fused_dir):
    """Negative: with k_proj left in float, q and v still share an input but no longer feed GQA as a trio."""
    model = quantized(fused_dir, 4, exclude=["*k_proj*"])
    packer = PackMatMulNBitsPass()
    packer(model)
    layers = counts(model)["GroupQueryAttention"]
    # q and v pack with a Split (siblings), gate and up too; nothing packs into GroupQueryAttention.
    assert packer.counts == {"2 siblings + Split": 2 * layers}
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            assert [value.producer().op_type for value in node.inputs[:3]] == ["Split", "MatMul", "Split"]


def test_different_block_sizes_do_not_pack(fused_dir):
    """Negative: siblings that disagree on block size (or bits) keep their own kernels."""
    model = quantized(fused_dir, 4)
    for node in model.graph:
        if node.op_type == "MatMulNBits" and "/k_proj/" in node.name:
            node.attributes["block_size"] = ir.AttrInt64("block_size", 64)
    packer = PackMatMulNBitsPass()
    packer(model)
    assert "q/k/v into GroupQueryAttention" not in packer.counts


def test_merged_names():
    assert merged_name(["m.l0.q_proj.w", "m.l0.k_proj.w", "m.l0.v_proj.w"], ".") == "m.l0.qkv_proj.w"
    assert merged_name(["/m/l0/mlp/gate_proj/MatMul", "/m/l0/mlp/up_proj/MatMul"], "/") == "/m/l0/mlp/gate_up_proj/MatMul"
    assert merged_name(["a.x.b", "c.y.d"], ".") == "a.x.b_packed"


@pytest.mark.parametrize("weights,bits", [("int8", 8), ("int4", 4)])
def test_quantize_defaults_pack_and_use_the_kernel_block_size(fused_dir, tmp_path, weights, bits):
    """``graphopt quantize --weights int8|int4 --activations none`` on a fused model: packed, kernel block size."""
    from graphopt.cpu_kernels import DEFAULT_BLOCK_SIZE, DEFAULT_HEAD_BLOCK_SIZE
    from graphopt.quantization import QuantizeConfig, quantize

    result = quantize(fused_dir, tmp_path / "packed", QuantizeConfig(weights=weights, activations="none"))
    step = result.manifest.lineage[-1].to_json()
    assert step["parameters"]["block_size"] == DEFAULT_BLOCK_SIZE[bits] and step["parameters"]["pack"] is True
    assert step["parameters"]["head_block_size"] == DEFAULT_HEAD_BLOCK_SIZE[8]  # the head is int8 by default
    model = graph_io.load(result.model_path)
    layers = counts(model)["GroupQueryAttention"]
    # int4's affine sites share their [x, block sums] input: q/k/v reach attention packed in both.
    assert step["figures"]["packed"] == {"q/k/v into GroupQueryAttention": layers, "2 siblings + Split": layers}
    if bits == 4:  # one block-sum MatMul + Concat per packed MatMulNBits; the int8 LM head has none
        assert counts(model)["Concat"] == counts(model)["MatMulNBits"] - 1 and "Add" not in counts(model)
    blocks = {node.name.rsplit("/", 2)[-2]: node.attributes["block_size"].as_int() for node in model.graph
              if node.op_type == "MatMulNBits"}
    assert blocks.pop("lm_head") == DEFAULT_HEAD_BLOCK_SIZE[8]
    assert set(blocks.values()) == {DEFAULT_BLOCK_SIZE[bits]}
    # 4 per layer (qkv, o, gate_up, down) and the LM head.
    assert counts(model)["MatMulNBits"] == 4 * layers + 1

    unpacked = quantize(fused_dir, tmp_path / "unpacked", QuantizeConfig(weights=weights, activations="none",
                                                                          pack=False, block_size=32))
    step = unpacked.manifest.lineage[-1].to_json()
    assert step["parameters"]["block_size"] == step["parameters"]["head_block_size"] == 32
    assert "packed" not in step["figures"]
    assert counts(graph_io.load(unpacked.model_path))["MatMulNBits"] == 7 * layers + 1
    # The defaults unpacked: the same codes, so the same logits (int8 activations are quantized per
    # block inside the kernel, the same way packed or not).
    plain = quantize(fused_dir, tmp_path / "plain", QuantizeConfig(weights=weights, activations="none", pack=False))
    ids = np.random.default_rng(7).integers(0, 300, size=12).tolist()
    for before, after in zip(_logits(plain.model_path, "all", ids, (8, 9)), _logits(result.model_path, "all", ids, (8, 9))):
        np.testing.assert_allclose(after, before, atol=1e-4)


@pytest.mark.parametrize("pack_qkv", [False, True])
def test_fuse_packs_float_gate_up(tiny_llama_dir, fused_dir, tmp_path, pack_qkv):
    """``graphopt fuse --pack-gate-up``: gate/up of a float graph become one MatMul + Split; q/k/v stay as
    ``--pack-qkv`` left them; logits equal the unpacked fused graph's (float sums, to 1e-6 of their scale)."""
    from graphopt.fusion import fuse

    reference = fuse(tiny_llama_dir, tmp_path / "qkv", "cpu", pack_qkv=True)[0].path if pack_qkv else fused_dir
    packed, fusion_counts = fuse(tiny_llama_dir, tmp_path / "packed", "cpu", pack_qkv=pack_qkv, pack_gate_up=True)
    before, after = counts(graph_io.load(reference / "model.onnx")), counts(graph_io.load(packed.path / "model.onnx"))
    layers = after["GroupQueryAttention"]
    assert fusion_counts["Split"] == layers and after["Split"] == before["Split"] + layers
    assert after["MatMul"] == before["MatMul"] - layers
    model = graph_io.load(packed.path / "model.onnx")
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":  # q/k/v: one packed input, or three MatMuls, never a Split
            assert [value.producer().op_type for value in node.inputs[:3] if value is not None] == \
                ["MatMul"] * (1 if pack_qkv else 3)
        if node.op_type == "Split":
            assert node.inputs[0].producer().name.endswith("/mlp/gate_up_proj/MatMul")
    assert packed.manifest.lineage[-1].parameters["pack_gate_up"] is True
    assert not PackMatMulNBitsPass("MatMul")(model).modified  # idempotent: nothing left to pack
    _register_ort_onnx_domain_ops()
    onnx.checker.check_model(str(packed.path / "model.onnx"), full_check=True)
    ids = np.random.default_rng(2).integers(0, 300, size=16).tolist()
    expected = _logits(reference / "model.onnx", "all", ids, (9, 10, 14))
    result = _logits(packed.path / "model.onnx", "all", ids, (9, 10, 14))
    for want, got in zip(expected, result):
        np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max(), rtol=0)


def test_float_packing_leaves_matmulnbits_and_quantize_leaves_float(fused_dir):
    """Each kind packs only its own op: MatMulNBits siblings for quantize, float MatMuls for fuse."""
    model = graph_io.load(fused_dir / "model.onnx")
    assert not PackMatMulNBitsPass()(model).modified  # float graph: nothing for the MatMulNBits kind
    model = quantized(fused_dir, 4, exclude=["*gate_proj*", "*up_proj*"])
    nbits = counts(model)["MatMulNBits"]
    packer = PackMatMulNBitsPass("MatMul")
    packer(model)  # float gate and up (kept out of quantization) pack; the MatMulNBits q/k/v do not
    assert packer.counts == {"2 siblings + Split": counts(model)["GroupQueryAttention"]}
    assert counts(model)["MatMulNBits"] == nbits
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            assert [value.producer().op_type for value in node.inputs[:3]] == ["MatMulNBits"] * 3
