"""float16 conversion (``passes.convert_fp16``, ``graphopt convert``): kept ops, numerics, float16 cache.

Tolerance: float16 keeps ~3 significant digits and rounding adds up over the layers, so fp16 logits
are compared with fp32 within 2e-2 x max|fp32 logits| (``graphopt.convert.FP16_RELATIVE_TOLERANCE``);
seen here: about 3e-3 x on the tiny models. ONNX Runtime's CPU provider runs the float16 graph,
casting to float32 around ops without a float16 CPU kernel (it inserts the casts itself).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from graphopt import ir as graph_ir
from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.convert import FP16_RELATIVE_TOLERANCE, QUANTIZED_FP16_RELATIVE_TOLERANCE, compare_logits, convert
from graphopt.passes.convert_fp16 import ConvertFloat16Pass, sensitive_nodes
from graphopt.runtime import Generator
from graphopt.runtime.decoder import Decoder


@pytest.fixture(scope="module")
def fp16_llama(tiny_llama_dir, tmp_path_factory):
    return convert(tiny_llama_dir, tmp_path_factory.mktemp("fp16") / "llama")


def dtypes_of(model: ir.Model, names) -> dict[str, ir.DataType]:
    values = {value.name: value for value in [*model.graph.inputs, *model.graph.outputs]}
    return {name: values[name].dtype for name in names}


def test_llama_keeps_rms_variance_softmax_and_logits_in_float32(tiny_llama_dir):
    model = graph_ir.load(tiny_llama_dir / "model.onnx")
    conversion = ConvertFloat16Pass()
    result = conversion(model)
    assert result.modified
    # 2 layers x 2 RMSNorms + the final one; each variance chain is Pow, ReduceMean, Add, Sqrt, Reciprocal.
    assert conversion.counts["kept_float32.rms_variance"] == 5 * 5
    assert conversion.counts["kept_float32.softmax"] == 2
    assert "kept_float32.layer_norm" not in conversion.counts
    # Inside each chain the converter's Cast(float16) -> Cast(float32) pairs are bypassed: 4 per chain.
    assert conversion.counts["cast_round_trips_removed"] == 5 * 4
    converted = result.model
    assert dtypes_of(converted, ["logits", "past_key_values.0.key", "present.1.value"]) == {
        "logits": ir.DataType.FLOAT, "past_key_values.0.key": ir.DataType.FLOAT16, "present.1.value": ir.DataType.FLOAT16}
    ops = {node.name: node for node in converted.graph}
    for name in ("/Pow", "/ReduceMean", "/Softmax"):
        assert ops[name].inputs[0].dtype == ir.DataType.FLOAT, name
    # x**2 reaches 2.5e5 in SmolLM2 (float16 stops at 65504): it must go on to ReduceMean in float32.
    assert ops["/Pow"].outputs[0].dtype == ir.DataType.FLOAT
    assert [user.name for user, _ in ops["/Pow"].outputs[0].uses()] == ["/ReduceMean"]
    matmul_weights = [node.inputs[1] for node in converted.graph
                      if node.op_type == "MatMul" and node.inputs[1].const_value is not None]
    assert matmul_weights and all(weight.dtype == ir.DataType.FLOAT16 for weight in matmul_weights)


def test_gpt2_keeps_layer_norms(tiny_gpt2_dir):
    conversion = ConvertFloat16Pass()
    conversion(graph_ir.load(tiny_gpt2_dir / "model.onnx"))
    assert conversion.counts["kept_float32.layer_norm"] == 5  # 2 x (ln_1, ln_2) + ln_f
    assert conversion.counts["kept_float32.softmax"] == 2


def test_a_pow_outside_a_norm_is_not_kept():
    """Near miss: Pow -> Mul is no variance (no ReduceMean follows), so it converts to float16."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    two = ir.Value(name="two", const_value=ir.tensor(np.array(2.0, dtype=np.float32)))
    power = ir.node("Pow", [x, two], name="square")
    scaled = ir.node("Mul", [power.outputs[0], x], name="scale")
    graph = ir.Graph([x], scaled.outputs, nodes=[power, scaled], initializers=[two], opset_imports={"": 18})
    assert sensitive_nodes(graph) == {"rms_variance": [], "layer_norm": [], "softmax": []}


def test_second_run_changes_nothing(tiny_llama_dir):
    converted = ConvertFloat16Pass()(graph_ir.load(tiny_llama_dir / "model.onnx")).model
    again = ConvertFloat16Pass()
    result = again(converted)
    assert not result.modified and again.counts == {}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fp16_logits_close_to_fp32_and_model_checks(family, request, tmp_path):
    source = request.getfixturevalue(f"tiny_{family}_dir")
    converted = convert(source, tmp_path / "fp16")
    onnx.checker.check_model(str(converted.model_path), full_check=True)
    figures = compare_logits(source / "model.onnx", converted.model_path, vocab_size=converted.manifest.vocab_size)
    assert figures["finite"]
    assert figures["max_abs_logits_diff"] <= FP16_RELATIVE_TOLERANCE * max(1.0, figures["max_abs_logits"])
    assert figures["argmax_agreement"] == 1.0
    assert converted.manifest.dtype == "float16" and converted.manifest.cache["dtype"] == "float16"
    assert converted.size_bytes() < 0.7 * sum(f.stat().st_size for f in source.iterdir() if f.is_file())


def test_runtime_decodes_on_a_float16_cache(tiny_llama_dir, fp16_llama):
    decoder = Decoder(fp16_llama.model_path)
    assert decoder.cache_dtype == np.float16
    logits = decoder.forward([5, 6, 7])
    assert logits.dtype == np.float32 and decoder._cache[0].dtype == np.float16
    fp16 = Generator(fp16_llama.path).generate([5, 6, 7, 8], max_new_tokens=24, stop_on_eos=False)
    fp32 = Generator(tiny_llama_dir).generate([5, 6, 7, 8], max_new_tokens=24, stop_on_eos=False)
    assert fp16.token_ids == fp32.token_ids


def test_fused_then_fp16_runs_on_cpu(tiny_llama_dir, tmp_path):
    """The cuda-fp16 recipe's order and fuse parameters (packed q/k/v and gate/up): fused GroupQueryAttention
    graph, then float16 (ORT CPU runs it)."""
    from graphopt.fusion import fuse
    from graphopt.recipes import get_recipe

    parameters = next(stage.parameters for stage in get_recipe("cuda-fp16").stages if stage.kind == "fuse")
    fused, _counts = fuse(tiny_llama_dir, tmp_path / "fused", **parameters)
    converted = convert(fused.path, tmp_path / "fp16")
    ops = collections.Counter(node.op_type for node in graph_ir.load(converted.model_path).graph)
    assert ops["GroupQueryAttention"] == 2 and ops["Pow"] == 0
    assert ops["Split"] == 2 and ops["MatMul"] == 2 * 4 + 1  # per layer qkv, o, gate_up, down; the head
    figures = converted.manifest.lineage[-1].figures
    assert figures["argmax_agreement"] == 1.0


@pytest.mark.parametrize("weights,method", [("int4", "rtn"), ("int4", "affine"), ("int8", "rtn")])
def test_weight_only_quantized_graph_converts(tiny_llama_dir, tmp_path, weights, method):
    """int4/int8 MatMulNBits take float16 scales (the CUDA kernels' type); static QDQ stays refused.

    Tolerance: QUANTIZED_FP16_RELATIVE_TOLERANCE (the float32 source's CPU kernels round activations to int8)."""
    from graphopt.fusion import fuse
    from graphopt.calibration import CalibrationSpec
    from graphopt.quantization import QuantizeConfig, quantize

    fused, _counts = fuse(tiny_llama_dir, tmp_path / "fused", "cuda", pack_qkv=True)
    quantized = quantize(fused.path, tmp_path / "q", QuantizeConfig(weights=weights, activations="none",
                                                                        method=method))
    converted = convert(quantized.path, tmp_path / "fp16")
    model = graph_ir.load(converted.model_path)
    blocked = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert blocked and all(node.inputs[2].dtype == ir.DataType.FLOAT16 for node in blocked)
    assert converted.manifest.quantization == weights and converted.manifest.dtype == "float16"
    # Measured by convert's own check (it raises past the bound): the lineage holds its figures.
    figures = converted.manifest.lineage[-1].figures
    assert figures["max_abs_logits_diff"] <= QUANTIZED_FP16_RELATIVE_TOLERANCE * max(1.0, figures["max_abs_logits"])
    w8a8 = quantize(fused.path, tmp_path / "w8a8", QuantizeConfig(activations="int8",
                                                                 calib=CalibrationSpec(samples=2, seq_len=16)))
    with pytest.raises(GraphoptError, match="is quantized \\(w8a8\\)"):
        convert(w8a8.path, tmp_path / "refused")


def test_convert_cli(tiny_llama_dir, fp16_llama, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "graphopt.json").read_text())["lineage"][-1]["pass"] == "convert"
    again = CliRunner().invoke(main, ["convert", str(fp16_llama.path), "-o", str(tmp_path / "again"), "--dtype", "fp16"])
    assert again.exit_code == 2 and "already float16" in again.output
    assert not (tmp_path / "again").exists()


@pytest.mark.slow
def test_smollm2_fp16_close_to_fp32(smollm2_dir, tmp_path):
    """Where the round-trip bypass matters: SmolLM2's RMSNorm variance overflows float16 without it."""
    converted = convert(smollm2_dir, tmp_path / "fp16")
    step = converted.manifest.lineage[-1]
    assert step.counts["kept_float32.rms_variance"] == 61 * 5  # 30 layers x 2 norms + the final one
    assert step.counts["kept_float32.softmax"] == 30
    figures = step.figures
    assert figures["finite"] and figures["argmax_agreement"] == 1.0
    assert figures["max_abs_logits_diff"] <= FP16_RELATIVE_TOLERANCE * figures["max_abs_logits"]  # seen: 0.06 of 30.8


def test_duplicate_casts_from_older_converters_are_dropped():
    """onnxruntime 1.31's converter emits one Cast per consumer with the same output name."""
    from onnx import helper

    from graphopt.passes.convert_fp16 import drop_duplicate_casts

    graph = helper.make_graph([helper.make_node("Cast", ["a"], ["a_fp32"], to=1, name="first"),
                               helper.make_node("Cast", ["a"], ["a_fp32"], to=1, name="repeat"),
                               helper.make_node("Cast", ["b"], ["b_fp32"], to=1, name="other")], "g", [], [])
    assert drop_duplicate_casts(graph) == 1
    assert [node.name for node in graph.node] == ["first", "other"]
