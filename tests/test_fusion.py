"""Attention / norm / GELU fusion: exact ops, near misses with reasons, numerics vs the plain export."""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphopt import ir as graph_ir
from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.fusion import fuse, fuse_model
from graphopt.modeldir import ModelDir
from graphopt.passes.fuse_attention import FuseAttention
from graphopt.runtime.decoder import Decoder
from graphopt.testing import chunked_logits, register_ort_onnx_domain_schemas

FAMILIES = ("llama", "qwen2", "gpt2")
# fp32: the fused kernels sum in a different order than MatMul/Softmax/MatMul; seen ~1e-5 at most.
TOLERANCE = 1e-4
# SmolLM2 (30 layers, |logits| up to ~30): ORT's SimplifiedLayerNormalization kernels sum squares
# sequentially in fp32 where ReduceMean sums pairwise, which alone moves prefill logits by ~1.4e-4
# (GQA adds ~8e-5; ORT's own level-all rewrites of the plain graph move them by ~4e-5), so the
# bound there is 5e-4, about 2e-5 relative; 128 identical greedy tokens are the stronger check.
SMOLLM2_TOLERANCE = 5e-4

EXPECTED_COUNTS = {
    ("llama", "cpu"): {"GroupQueryAttention": 2, "SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4},
    ("qwen2", "cpu"): {"GroupQueryAttention": 2, "SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4},
    ("gpt2", "cpu"): {"MultiHeadAttention": 2, "SkipLayerNormalization": 5, "FastGelu": 2},
    ("llama", "onnx"): {"Attention": 2, "RotaryEmbedding": 4, "RMSNormalization": 5},
    ("qwen2", "onnx"): {"Attention": 2, "RotaryEmbedding": 4, "RMSNormalization": 5},
    ("gpt2", "onnx"): {"Attention": 2, "Gelu": 2},
}
# Ops of the whole fused graph that say what was fused (domain-qualified for contrib ops).
EXPECTED_OPS = {
    ("llama", "cpu"): {"com.microsoft.GroupQueryAttention": 2, "SimplifiedLayerNormalization": 1,
                       "com.microsoft.SkipSimplifiedLayerNormalization": 4, "Softmax": 0, "Neg": 0, "Expand": 0,
                       # per layer: q, k, v, o, gate, up, down; plus lm_head
                       "MatMul": 2 * 7 + 1, "Reshape": 0},
    ("gpt2", "cpu"): {"com.microsoft.MultiHeadAttention": 2, "com.microsoft.SkipLayerNormalization": 5,
                      "com.microsoft.FastGelu": 2, "LayerNormalization": 0, "Softmax": 0, "Tanh": 0},
    ("llama", "onnx"): {"Attention": 2, "RotaryEmbedding": 4, "Cos": 1, "Sin": 1, "RMSNormalization": 5,
                        "Softmax": 0, "Expand": 0, "Neg": 0, "ReduceMean": 0},
    ("gpt2", "onnx"): {"Attention": 2, "Gelu": 2, "LayerNormalization": 5, "Softmax": 0, "Tanh": 0},
}


def _model_dir(request, family: str) -> pathlib.Path:
    return request.getfixturevalue(f"tiny_{family}_dir")


@pytest.fixture(scope="module")
def fused_dirs(tmp_path_factory):
    """Fused model directories, built once per (family, target) on first use."""
    built = {}

    def get(request, family: str, target: str) -> pathlib.Path:
        if (family, target) not in built:
            output = tmp_path_factory.mktemp("fused") / f"{family}-{target}"
            fuse(_model_dir(request, family), output, target, require=True)
            built[family, target] = output
        return built[family, target]

    return get


def _op_histogram(path) -> collections.Counter:
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(f"{node.domain}.{node.op_type}" if node.domain else node.op_type for node in model.graph.node)


# -- positive: exact counts and ops ---------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_every_layer_fuses_with_exact_counts(request, fused_dirs, family, target):
    output = fused_dirs(request, family, target)
    manifest = ModelDir.open(output).manifest
    step = manifest.lineage[-1]
    assert step.name == "fuse" and step.counts == EXPECTED_COUNTS[family, target]
    assert step.figures["attention_layers"] == manifest.layers == 2
    histogram = _op_histogram(output / "model.onnx")
    for op, count in EXPECTED_OPS.get((family, target), {}).items():
        assert histogram[op] == count, op
    model = onnx.load(str(output / "model.onnx"), load_external_data=False)
    opsets = {opset.domain: opset.version for opset in model.opset_import}
    if target == "onnx":
        assert opsets[""] == 23 and manifest.opset == 23
        assert not any(node.domain for node in model.graph.node), "standard ops only"
    else:
        assert opsets[""] == 18 and opsets["com.microsoft"] == 1
    tagged = [node for node in model.graph.node if node.op_type in ("GroupQueryAttention", "MultiHeadAttention", "Attention")]
    assert all({p.key: p.value for p in node.metadata_props}.get("graphopt.rule") for node in tagged)


def test_gqa_derives_lengths_from_the_attention_mask(request, fused_dirs):
    """The runtime contract is unchanged: same inputs, seqlens_k/total length computed in the graph."""
    output = fused_dirs(request, "llama", "cpu")
    model = onnx.load(str(output / "model.onnx"), load_external_data=False)
    plain = onnx.load(str(request.getfixturevalue("tiny_llama_dir") / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == [i.name for i in plain.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in plain.graph.output]
    gqa = next(node for node in model.graph.node if node.op_type == "GroupQueryAttention")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attributes["num_heads"] == 4 and attributes["kv_num_heads"] == 2 and attributes["do_rotary"] == 1
    producers = {out: node for node in model.graph.node for out in node.output}
    assert producers[gqa.input[5]].op_type == "Cast" and producers[gqa.input[6]].op_type == "Cast"
    # The cos/sin tables are computed from the 8 frequencies (ONNX Runtime folds them at session start).
    assert producers[gqa.input[7]].op_type == "Cos" and producers[gqa.input[8]].op_type == "Sin"
    assert [t.dims for t in model.graph.initializer if t.name == "rotary.inv_freq"] == [[1, 8]]
    assert not [t for t in model.graph.initializer if "cache" in t.name]
    manifest = ModelDir.open(output).manifest
    assert manifest.fusion["attention_mask"] == "right padding only"


def test_computed_rotary_tables_equal_the_stored_ones(request, fused_dirs, tmp_path):
    """The CPU target's computed tables give the logits of stored ones, and turn back into initializers
    (as a float16 conversion needs them) holding the same numbers the cuda target stores."""
    from graphopt.passes.fuse_attention import store_rotary_tables

    output = fused_dirs(request, "llama", "cpu")
    model = graph_ir.load(output / "model.onnx")
    assert store_rotary_tables(model) == 2
    assert not any(node.op_type in ("Cos", "Sin", "Range") for node in model.graph)
    stored = model.graph.initializers
    cuda_model = _plain(request, "llama")
    fuse_model(cuda_model, "cuda", layers=2, max_positions=256)
    cuda = cuda_model.graph.initializers
    for table, name in (("rotary.table_0", "rotary.cos_cache"), ("rotary.table_1", "rotary.sin_cache")):
        np.testing.assert_allclose(stored[table].const_value.numpy(), cuda[name].const_value.numpy(), atol=1e-6)
    graph_ir.save(model, tmp_path / "model.onnx")
    ids = np.random.default_rng(3).integers(0, 300, size=12).tolist()
    for level in ("disable", "all"):  # computed on every run, or folded once
        for a, b in zip(chunked_logits(output / "model.onnx", level, ids, (8, 9)),
                        chunked_logits(tmp_path / "model.onnx", level, ids, (8, 9))):
            assert np.abs(a - b).max() < 1e-5


# -- numerical: fused vs plain export, then onnx.checker ------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_fused_logits_match_prefill_decode_and_multi_token(request, fused_dirs, family, target):
    output = fused_dirs(request, family, target)
    ids = np.random.default_rng(1).integers(0, 300, size=16).tolist()
    splits = (9, 10, 14)  # prefill 9, decode 1, 4 tokens on the cache, decode 2 more
    reference = chunked_logits(_model_dir(request, family) / "model.onnx", "disable", ids, splits)
    fused = chunked_logits(output / "model.onnx", "all", ids, splits)
    for label, a, b in zip(("prefill", "decode", "multi-token", "decode after multi-token"), reference, fused):
        assert np.abs(a - b).max() < TOLERANCE, label
    register_ort_onnx_domain_schemas()
    onnx.checker.check_model(onnx.load(str(output / "model.onnx")), full_check=True)


def test_packed_qkv_option_matches(request, tmp_path):
    """``pack_qkv``: one MatMul (+ bias, Qwen2) feeds GroupQueryAttention's packed query input."""
    model = _plain(request, "qwen2")
    attention = FuseAttention("cpu", max_positions=256, pack_qkv=True)
    assert attention(model).modified and attention.counts["GroupQueryAttention"] == 2
    RemoveUnusedNodesPass()(model)
    histogram = collections.Counter(node.op_type for node in model.graph)
    gqa = _first(model, "GroupQueryAttention")
    assert gqa.inputs[1] is None and gqa.inputs[2] is None and gqa.inputs[0].producer().op_type == "Add"
    assert histogram["MatMul"] == 2 * 5 + 1 and "qkv_proj.0.weight" in model.graph.initializers
    graph_ir.save(model, tmp_path / "model.onnx")
    ids = np.random.default_rng(2).integers(0, 300, size=12).tolist()
    reference = chunked_logits(_model_dir(request, "qwen2") / "model.onnx", "disable", ids, (8, 9))
    for a, b in zip(reference, chunked_logits(tmp_path / "model.onnx", "all", ids, (8, 9))):
        assert np.abs(a - b).max() < TOLERANCE


# -- idempotence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_fusing_twice_changes_nothing(request, fused_dirs, tmp_path, target):
    output = fused_dirs(request, "llama", target)
    model = graph_ir.load(output / "model.onnx")
    assert not FuseAttention(target, max_positions=256)(model).modified
    result = fuse_model(model, target, layers=2, max_positions=256)
    assert not result.modified and result.counts == {} and result.attention_layers == 2
    again, counts = fuse(output, tmp_path / "again", target, require=True)
    assert counts == {} and again.manifest.lineage[-1].modified is False


def test_contrib_fused_model_is_refused_for_a_standard_target(request, fused_dirs, tmp_path):
    with pytest.raises(GraphoptError, match="fused for cpu .*fuse the plain export for onnx"):
        fuse(fused_dirs(request, "llama", "cpu"), tmp_path / "out", "onnx")
    assert not (tmp_path / "out").exists()


# -- negative: near misses, with the reason -------------------------------------------------------

def _plain(request, family="llama") -> ir.Model:
    return graph_ir.load(_model_dir(request, family) / "model.onnx")


def _first(model: ir.Model, op_type: str) -> ir.Node:
    return next(node for node in model.graph if node.op_type == op_type)


def _explained(model, target="cpu") -> str:
    attention = FuseAttention(target, max_positions=256)
    attention(model)
    assert attention.counts["GroupQueryAttention" if target == "cpu" else "Attention"] < 2
    return "\n".join(attention.explain(model))


def test_near_miss_rotary_not_from_position_ids(request):
    """Rotary angles from arbitrary positions: GQA computes positions itself, so it must not fuse."""
    model = _plain(request)
    cast = next(node for node in model.graph if node.op_type == "Cast" and node.outputs[0].uses()
                and next(iter(node.outputs[0].uses())).node.op_type == "Mul")
    other_positions = ir.Value(name="other_positions", shape=ir.Shape(["batch", "sequence"]),
                               type=ir.TensorType(ir.DataType.INT64))
    model.graph.inputs.append(other_positions)
    unsqueeze = cast.inputs[0].producer()
    unsqueeze.replace_input_with(0, other_positions)
    assert "rotary positions do not come from the position_ids input" in _explained(model)


def test_near_miss_mask_is_not_the_causal_mask(request):
    """GQA masks causally by length: an arbitrary additive mask (a bias, a window) must not fuse into it."""
    model = _plain(request)
    bias = ir.Value(name="attention_bias", shape=ir.Shape(["batch", 1, "sequence", "total_sequence"]),
                    type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.inputs.append(bias)
    for softmax in [node for node in model.graph if node.op_type == "Softmax"]:
        softmax.inputs[0].producer().replace_input_with(1, bias)
    assert "mask is not Where(condition, 0, lowest) as the export builds it" in _explained(model)
    attention = FuseAttention("onnx", max_positions=256)
    from graphopt.fusion import ConvertOpset

    ConvertOpset(23)(model)
    assert attention(model).modified and attention.counts["Attention"] == 2, "standard Attention takes any mask"


def test_near_miss_partial_rotary_slice(request):
    """rotate_half over a different split point (partial/odd rotary) is not GQA's rotary."""
    model = _plain(request)
    neg = _first(model, "Neg")
    slice_node = neg.inputs[0].producer()
    odd_start = ir.Value(name="odd_start", const_value=ir.tensor(np.array([4], dtype=np.int64)))
    model.graph.register_initializer(odd_start)
    slice_node.replace_input_with(1, odd_start)
    assert "is not rotate_half of head_dim 16" in _explained(model)


def test_near_miss_runtime_scale(request):
    """A scale that is not a constant cannot become the op's attribute."""
    model = _plain(request, "gpt2")
    scale = ir.Value(name="runtime_scale", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.inputs.append(scale)
    for softmax in [node for node in model.graph if node.op_type == "Softmax"]:
        softmax.inputs[0].producer().inputs[0].producer().replace_input_with(1, scale)
    attention = FuseAttention("cpu", max_positions=256)
    assert not attention(model).modified
    assert "attention scale is not a constant scalar" in "\n".join(attention.explain(model))


def test_near_miss_standard_attention_needs_opset_23(request):
    model = _plain(request)
    assert "standard Attention needs opset 23, the model has 18" in _explained(model, target="onnx")


def test_near_miss_softmax_axis(request):
    """Softmax over another axis is not attention; the matcher says where it stopped."""
    model = _plain(request, "gpt2")
    for node in model.graph:
        if node.op_type == "Softmax":
            node.attributes["axis"] = ir.AttrInt64("axis", 2)
    attention = FuseAttention("cpu", max_positions=256)
    assert not attention(model).modified
    assert "MultiHeadAttention: no match" in "\n".join(attention.explain(model))


def test_require_fails_when_a_layer_does_not_fuse(request, tmp_path):
    model = _plain(request)
    _first(model, "Softmax").attributes["axis"] = ir.AttrInt64("axis", 2)
    near_miss = tmp_path / "near-miss"
    near_miss.mkdir()
    graph_ir.save(model, near_miss / "model.onnx")
    (near_miss / "graphopt.json").write_text((_model_dir(request, "llama") / "graphopt.json").read_text())
    with pytest.raises(GraphoptError, match="only 1 of 2 attention layers fused"):
        fuse(near_miss, tmp_path / "out", "cpu", require=True)
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["fuse", str(near_miss), "-o", str(tmp_path / "out"), "--target", "cpu",
                                       "--require", "--explain"])
    assert result.exit_code == 2, result.output
    assert "GroupQueryAttention: no match" in result.output
    assert not (tmp_path / "out").exists()


# -- command line ---------------------------------------------------------------------------------

def test_cli_fuse_prints_counts(tiny_gpt2_dir, tmp_path):
    result = CliRunner().invoke(main, ["fuse", str(tiny_gpt2_dir), "-o", str(tmp_path / "fused"), "--target", "cuda"])
    assert result.exit_code == 0, result.output
    assert "MultiHeadAttention: 2" in result.output and "SkipLayerNormalization: 5" in result.output
    manifest = ModelDir.open(tmp_path / "fused").manifest
    assert [step.name for step in manifest.lineage] == ["export", "fuse"]
    assert manifest.fusion["target"] == "cuda"


def test_export_with_fuse_is_one_atomic_step(checkpoints, tmp_path):
    output = tmp_path / "exported-fused"
    result = CliRunner().invoke(main, ["export", str(checkpoints["qwen2"]), "-o", str(output), "--fuse", "onnx",
                                       "--no-validate"])
    assert result.exit_code == 0, result.output
    manifest = ModelDir.open(output).manifest
    assert [step.name for step in manifest.lineage] == ["export", "fuse"]
    assert manifest.lineage[-1].counts == EXPECTED_COUNTS["qwen2", "onnx"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["exported-fused"], "no scratch left behind"


# -- the real model -------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_every_layer_fuses_and_greedy_tokens_match(smollm2_dir, tmp_path):
    fused, counts = fuse(smollm2_dir, tmp_path / "fused", "cpu", require=True)
    layers = fused.manifest.layers
    assert counts["GroupQueryAttention"] == layers == 30
    assert counts["SkipSimplifiedLayerNormalization"] == 2 * layers
    figures = fused.manifest.lineage[-1].figures
    assert max(value for key, value in figures.items() if key.startswith("max_abs")) < SMOLLM2_TOLERANCE
    prompt = [1, 504, 3458, 282, 4649, 314]
    streams = []
    for path in (smollm2_dir / "model.onnx", fused.model_path):
        decoder = Decoder(path)
        logits = decoder.forward(prompt)[-1]
        tokens = []
        for _ in range(128):
            tokens.append(int(np.argmax(logits)))
            logits = decoder.forward(tokens[-1:])[-1]
        streams.append(tokens)
    assert streams[0] == streams[1]
