"""Quantization: range collectors against numpy, int4 packing, the QDQ / MatMulNBits / SmoothQuant passes, the CLI.

Tolerances: the tiny models are random with a wide init (logits of order 10), so quantization
noise moves logits by up to ~1; quality against float is asserted loosely (perplexity within 10%),
exactness is asserted where it holds (same quantized weights in float vs the quantized op,
ORT's fused kernels vs the plain QDQ graph).
"""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from graphopt import ir as graph_io
from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.passes.quantize_common import add_initializer, linear_sites, site_of
from graphopt.passes.quantize_qdq import QDQQuantizePass
from graphopt.passes.quantize_weights import (WeightOnlyQuantizePass, dequantize, pack, pack_zero_points,
                                              quantize_gptq, quantize_rtn, unpack)
from graphopt.passes.smooth_quant import SmoothQuantPass
from graphopt.quantization import QuantizeConfig, channel_absmax, quantize
from graphopt.calibration import CalibrationSpec
from graphopt.ranges import (RangeCollector, entropy_threshold, fake_quantize, mse_range, quantization_parameters)

FAST_CALIBRATION = CalibrationSpec(samples=3, seq_len=24, seed=0)


def op_counts(model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def ort_ops(model_path: pathlib.Path, tmp_path: pathlib.Path) -> collections.Counter:
    """Op types of the graph ONNX Runtime runs after its own optimizations (ORT_ENABLE_ALL, CPU)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx"),
                                                                  load_external_data=False).graph.node)


def logits(model_path, ids, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    from graphopt.capture import empty_cache_feeds

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    ids = np.asarray(ids, dtype=np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **empty_cache_feeds(session)}
    return session.run(["logits"], feeds)[0][0]


IDS = list(range(3, 40))


# --- range collectors against numpy -------------------------------------------------------------

@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    # Growing spread forces the histogram to double its range several times while streaming.
    return [rng.standard_normal((4, 256)).astype(np.float32) * (1 + i) + 0.3 for i in range(6)]


def streamed(batches) -> RangeCollector:
    collector = RangeCollector("x")
    for batch in batches:
        collector.update(batch)
    return collector


def test_minmax_equals_numpy(batches):
    values = np.concatenate([b.ravel() for b in batches])
    collector = streamed(batches)
    assert collector.range("minmax") == (values.min(), values.max())
    params = quantization_parameters(*collector.range("minmax"), symmetric=False)
    scale = np.float32((values.max() - values.min()) / 255)
    assert params.scale == pytest.approx(scale, rel=1e-6)
    assert params.zero_point == int(np.round(-values.min() / scale))
    symmetric = quantization_parameters(*collector.range("minmax"), symmetric=True)
    assert symmetric.zero_point == 0 and symmetric.scale == pytest.approx(np.abs(values).max() / 127, rel=1e-6)


def test_histogram_methods_equal_numpy_reference(batches):
    """Streaming (doubling) histograms give the ranges numpy computes on all values at once, to a bin or two."""
    values = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
    collector = streamed(batches)
    width = 2 * collector.radius / collector.bins
    reference_counts, _ = np.histogram(values, bins=collector.bins, range=(-collector.radius, collector.radius))
    assert np.abs(reference_counts - collector.counts).sum() <= 4  # values on bin edges may round either way
    low, high = collector.range("percentile", percentile=99.9)
    # The order statistics at 0.1% and 99.9% (no interpolation), widened to the edge of their bin.
    ordered = np.sort(values)
    lower_sample = ordered[int(np.ceil(0.001 * values.size)) - 1]
    upper_sample = ordered[int(np.ceil(0.999 * values.size)) - 1]
    assert lower_sample - width - 1e-9 <= low <= lower_sample + 1e-9
    assert upper_sample - 1e-9 <= high <= upper_sample + width + 1e-9
    threshold = entropy_threshold(reference_counts, collector.radius)
    assert collector.range("entropy")[1] == pytest.approx(min(threshold, values.max()), abs=width)
    # mse: brute force over the same clip fractions on the raw values.
    errors = []
    for fraction in np.arange(1, 101) / 100:
        params = quantization_parameters(values.min() * fraction, values.max() * fraction, symmetric=False)
        errors.append(((fake_quantize(values, params) - values) ** 2).sum())
    best = (np.argmin(errors) + 1) / 100
    low, high = collector.range("mse")
    assert high == pytest.approx(values.max() * best, rel=0.03)
    assert mse_range(collector.counts, collector.edges, values.min(), values.max(), False)[1] == high


def test_quantize_dequantize_error_within_one_step(batches):
    values = np.concatenate([b.ravel() for b in batches])
    for symmetric in (False, True):
        params = quantization_parameters(values.min(), values.max(), symmetric)
        assert np.abs(fake_quantize(values, params) - values).max() <= params.scale / 2 + 1e-6


def test_nan_in_calibration_is_refused():
    with pytest.raises(GraphoptError, match="NaN or inf"):
        RangeCollector("x").update(np.array([1.0, np.nan], dtype=np.float32))


# --- int4 / int8 blockwise weights ---------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_packing_round_trips(bits):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((96, 40)).astype(np.float32)  # K=96 is not a multiple of 64: padding
    codes, scales, zero_points = quantize_rtn(weight.T, bits, 64)
    packed = pack(codes, bits)
    assert packed.shape == (40, 2, 64 * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits), codes)
    stored_zero = pack_zero_points(zero_points) if bits == 4 else None
    restored = dequantize(packed, scales, stored_zero, bits, in_features=96)
    step = np.repeat(scales, 64, axis=1)[:, :96].T
    assert np.all(np.abs(restored - weight) <= step / 2 + 1e-6)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    rng = np.random.default_rng(2)
    inputs = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    hessian = inputs.T @ inputs

    def output_error(codes, scales, zero_points):
        restored = dequantize(pack(codes, 4), scales, pack_zero_points(zero_points), 4, 64)
        return np.linalg.norm(inputs @ restored - inputs @ weight)

    rtn = output_error(*quantize_rtn(weight.T, 4, 32))
    gptq = output_error(*quantize_gptq(weight.T, hessian, 4, 32))
    assert gptq < 0.8 * rtn


# --- passes on the tiny Llama ---------------------------------------------------------------------

def test_weight_only_pass_ops_numerics_and_idempotence(tiny_llama_dir, tmp_path):
    model = graph_io.load(tiny_llama_dir / "model.onnx")
    quantizer = WeightOnlyQuantizePass(bits=4, block_size=32, head_bits=8, accuracy_level=0)
    assert quantizer(model).modified
    assert quantizer.counts == {"MatMulNBits(bits=4)": 14, "MatMulNBits(bits=8)": 1}
    ops = op_counts(model)
    assert ops["MatMulNBits"] == 15 and ops["MatMul"] == 4  # the 4 left are attention's (no constant operand)
    assert not WeightOnlyQuantizePass(bits=4, block_size=32)(model).modified
    graph_io.save(model, tmp_path / "model.onnx")
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    assert ort_ops(tmp_path / "model.onnx", tmp_path)["MatMulNBits"] == 15

    # The float graph with the dequantized weights computes what MatMulNBits computes (accuracy_level 0).
    reference = graph_io.load(tiny_llama_dir / "model.onnx")
    by_name = {node.name: node for node in model.graph if node.op_type == "MatMulNBits"}
    for site in linear_sites(reference.graph):
        node = by_name[f"{site.name}_Q{8 if site.transposed else 4}"]
        bits = node.attributes["bits"].as_int()
        zero_points = node.inputs[3].const_value.numpy() if len(node.inputs) > 3 else None
        restored = dequantize(node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy(), zero_points,
                              bits, site.shape[0])
        site.node.replace_input_with(1, add_initializer(reference.graph, f"{site.name}_restored", restored))
    (tmp_path / "restored").mkdir()
    graph_io.save(reference, tmp_path / "restored" / "model.onnx")
    expected = logits(tmp_path / "restored" / "model.onnx", IDS)
    np.testing.assert_allclose(logits(tmp_path / "model.onnx", IDS), expected, atol=2e-3, rtol=1e-3)


def test_attention_matmul_is_not_a_site(tiny_llama_dir):
    """Negative: Q.K^T has no constant operand, so it is no linear site and stays a float MatMul."""
    model = graph_io.load(tiny_llama_dir / "model.onnx")
    attention = [node for node in model.graph if node.op_type == "MatMul" and node.inputs[1].const_value is None
                 and node.inputs[1].producer().op_type != "Transpose"]
    assert attention and all(site_of(node) is None for node in attention)


def test_qdq_pass_runs_integer_kernels_in_ort(tiny_llama_dir, tmp_path):
    result = quantize(tiny_llama_dir, tmp_path / "w8a8", QuantizeConfig(activations="int8", down_proj="w8a8",
                                                                         calib=FAST_CALIBRATION))
    model = graph_io.load(result.model_path)
    ops = op_counts(model)
    # 2 layers x (q/k/v share one input, gate/up one, o, down) + the head = 9 quantized activations.
    assert (ops["QuantizeLinear"], ops["DequantizeLinear"], ops["MatMul"]) == (9, 30, 19)
    weights = [node for node in model.graph if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None]
    assert len(weights) == 15 and all(node.inputs[0].const_value.dtype.name == "INT8" for node in weights)
    onnx.checker.check_model(str(result.model_path), full_check=True)
    optimized = ort_ops(result.model_path, tmp_path)
    assert optimized["MatMulIntegerToFloat"] == 15 and optimized["DequantizeLinear"] == 0
    # ORT's fused integer kernels compute what the QDQ graph means (reference: no optimizations).
    fused = logits(result.model_path, IDS)
    plain = logits(result.model_path, IDS, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(fused, plain, atol=5e-3 * np.abs(plain).max())
    assert not QDQQuantizePass({})(model).modified
    step = result.manifest.lineage[-1]
    assert step.parameters["calibration_data"] == {"source": "self-generated", "path": None, "samples": 3,
                                                      "seq_len": 24, "seed": 0}


def test_quantized_logits_close_to_float(tiny_llama_dir, tmp_path):
    """Quantized vs float logits: relative RMS error below 15% (W8A8: 3 calibration sequences of 24 tokens), 10% (int8) and 50% (int4: Gaussian random weights are the worst case for 4 bits) on the random tiny model."""
    reference = logits(tiny_llama_dir / "model.onnx", IDS)
    cases = {"w8a8": (QuantizeConfig(activations="int8", calib=FAST_CALIBRATION), 0.15),
             "int8": (QuantizeConfig(activations="none"), 0.10),
             "int4": (QuantizeConfig(weights="int4", activations="none"), 0.5)}
    for name, (config, tolerance) in cases.items():
        result = quantize(tiny_llama_dir, tmp_path / name, config)
        error = np.sqrt(np.mean((logits(result.model_path, IDS) - reference) ** 2)) / np.sqrt(np.mean(reference**2))
        assert error < tolerance, name


def test_smooth_quant_preserves_the_function(tiny_llama_dir, tmp_path):
    model = graph_io.load(tiny_llama_dir / "model.onnx")
    names = sorted({site.activation.name for site in linear_sites(model.graph)})
    absmax = channel_absmax(tiny_llama_dir / "model.onnx", names, [IDS])
    smooth = SmoothQuantPass(0.5, absmax)
    assert smooth(model).modified
    assert smooth.counts == {"norm": 4, "up_proj": 2}
    # Negative: the final norm feeds the tied head, whose weight is also the embedding table.
    assert any("not a linear site with its own weight" in reason for reason in smooth.skipped.values())
    assert not SmoothQuantPass(0.5, absmax)(model).modified
    graph_io.save(model, tmp_path / "model.onnx")
    np.testing.assert_allclose(logits(tmp_path / "model.onnx", IDS), logits(tiny_llama_dir / "model.onnx", IDS),
                               atol=1e-4, rtol=1e-4)


def test_same_seed_same_bytes(tiny_llama_dir, tmp_path):
    config = QuantizeConfig(activations="int8", smooth=0.5, calibration="entropy", calib=FAST_CALIBRATION)
    first = quantize(tiny_llama_dir, tmp_path / "a", config)
    second = quantize(tiny_llama_dir, tmp_path / "b", config)
    for name in ("model.onnx", "model.onnx.data"):
        assert (first.path / name).read_bytes() == (second.path / name).read_bytes()


def test_exclude_and_sensitivity(tiny_llama_dir, tmp_path):
    config = QuantizeConfig(exclude=("/model/layers.0/mlp/down_proj/MatMul", "/model/layers.1/self_attn"),
                            calib=FAST_CALIBRATION)
    model = graph_io.load(quantize(tiny_llama_dir, tmp_path / "excluded", config).model_path)
    floats = {node.name.replace(".", "/") for node in model.graph if site_of(node) is not None}
    assert floats == {"/model/layers/0/mlp/down_proj/MatMul", *(f"/model/layers/1/self_attn/{p}_proj/MatMul"
                                                                  for p in "qkvo")}
    result = quantize(tiny_llama_dir, tmp_path / "auto", QuantizeConfig(activations="int8", max_ppl_increase=0.5, calib=FAST_CALIBRATION))
    figures = result.manifest.lineage[-1].figures
    assert figures["calibration_perplexity_quantized"] <= figures["calibration_perplexity_float"] * 1.005
    kept = figures["kept_float"]
    model = graph_io.load(result.model_path)
    assert {node.name for node in model.graph if site_of(node) is not None} == set(kept)


def test_fuse_then_quantize(tiny_llama_dir, tmp_path):
    """The recommended order: fused norms (SkipSimplifiedLayerNormalization) take the SmoothQuant scale."""
    fusion = pytest.importorskip("graphopt.fusion")
    fused, _ = fusion.fuse(tiny_llama_dir, tmp_path / "fused", "cpu")
    sites = len(linear_sites(graph_io.load(fused.model_path).graph))
    config = QuantizeConfig(activations="int8", smooth=0.5, rotation="none", down_proj="w8a8", calib=FAST_CALIBRATION)
    result = quantize(fused.path, tmp_path / "w8a8", config)
    step = result.manifest.lineage[-1]
    assert step.figures["smooth_folded"]["norm"] == 4 and step.counts["MatMul"] == sites
    optimized = ort_ops(result.model_path, tmp_path)
    assert optimized["MatMulIntegerToFloat"] == sites and optimized["DequantizeLinear"] == 0
    assert optimized["GroupQueryAttention"] == 2
    # Relative RMS logits error as in test_quantized_logits_close_to_float, looser (20%): SmoothQuant
    # with 3 calibration sequences of 24 tokens on random weights.
    reference = logits(tiny_llama_dir / "model.onnx", IDS)
    error = np.sqrt(np.mean((logits(result.model_path, IDS) - reference) ** 2)) / np.sqrt(np.mean(reference**2))
    assert error < 0.20


def test_w8a8_defaults_rotate_and_keep_down_proj_weight_only(tiny_llama_dir, tmp_path):
    """The W8A8 defaults on a fused graph: the residual stream rotated, every down projection weight-only
    int8 (MatMulNBits), the rest static QDQ; on the unfused graph no rotation (it needs fused norms)."""
    fusion = pytest.importorskip("graphopt.fusion")
    fused, _ = fusion.fuse(tiny_llama_dir, tmp_path / "fused", "cpu")
    sites = len(linear_sites(graph_io.load(fused.model_path).graph))
    result = quantize(fused.path, tmp_path / "w8a8", QuantizeConfig(activations="int8", calib=FAST_CALIBRATION))
    step = result.manifest.lineage[-1]
    assert step.parameters["rotation"] == "auto" and step.figures["rotated"]["norms"] == 5
    assert step.parameters["down_proj"] == "auto" and step.figures["down_proj"] == {"int8-weights": 2}
    assert step.counts["MatMulNBits(bits=8)"] == 2
    optimized = ort_ops(result.model_path, tmp_path)
    assert optimized["MatMulIntegerToFloat"] == sites - 2 and optimized["MatMulNBits"] == 2
    reference = logits(tiny_llama_dir / "model.onnx", IDS)
    error = np.sqrt(np.mean((logits(result.model_path, IDS) - reference) ** 2)) / np.sqrt(np.mean(reference**2))
    assert error < 0.15  # the bound of the unfused W8A8 in test_quantized_logits_close_to_float
    plain = quantize(tiny_llama_dir, tmp_path / "plain", QuantizeConfig(activations="int8", calib=FAST_CALIBRATION))
    assert "rotated" not in plain.manifest.lineage[-1].figures


def test_w8a8_defaults_stay_standard_onnx_for_a_standard_target(tiny_llama_dir, tmp_path):
    """Fused for the onnx/tensorrt target (no contrib ops): the down projections are static QDQ like the
    rest, and the opset-23 RMSNormalization graph is not rotated."""
    fusion = pytest.importorskip("graphopt.fusion")
    fused, _ = fusion.fuse(tiny_llama_dir, tmp_path / "fused", "onnx")
    result = quantize(fused.path, tmp_path / "w8a8", QuantizeConfig(activations="int8", symmetric=True, calib=FAST_CALIBRATION))
    step = result.manifest.lineage[-1]
    assert step.figures["down_proj"] == {"w8a8": 2} and "rotated" not in step.figures
    assert not [node for node in graph_io.load(result.model_path).graph if node.domain == "com.microsoft"]


def test_awq_scales_are_folded_losslessly_and_recorded(tiny_llama_dir, tmp_path):
    """AWQ: the searched per-channel scales, folded into the norms / up projections, leave the float
    function unchanged; the quantized model records them and stays within the int4 bound."""
    from graphopt.calibration import calibration_sequences
    from graphopt.quantization import awq_factors

    config = QuantizeConfig(weights="int4", method="rtn", awq=True, calib=FAST_CALIBRATION)
    model = graph_io.load(tiny_llama_dir / "model.onnx")
    factors, alphas = awq_factors(tiny_llama_dir / "model.onnx", model, config,
                                  calibration_sequences(tiny_llama_dir, FAST_CALIBRATION))
    assert factors and set(alphas) == set(factors) and all(0 < alpha <= 1 for alpha in alphas.values())
    scaling = SmoothQuantPass(0.0, {}, factors=factors)
    assert scaling(model).modified and not SmoothQuantPass(0.0, {}, factors=factors)(model).modified
    graph_io.save(model, tmp_path / "scaled.onnx")
    np.testing.assert_allclose(logits(tmp_path / "scaled.onnx", IDS), logits(tiny_llama_dir / "model.onnx", IDS),
                               atol=1e-4, rtol=1e-4)
    result = quantize(tiny_llama_dir, tmp_path / "awq", config)
    figures = result.manifest.lineage[-1].figures
    # every searched scale folds except o_proj's (the attention output has no scale before it)
    assert figures["awq_alpha"].items() <= alphas.items() and figures["awq_folded"] == {"norm": 4, "up_proj": 2}
    assert len(figures["awq_alpha"]) == 6
    reference = logits(tiny_llama_dir / "model.onnx", IDS)
    error = np.sqrt(np.mean((logits(result.model_path, IDS) - reference) ** 2)) / np.sqrt(np.mean(reference**2))
    assert error < 0.5  # the int4 bound of test_quantized_logits_close_to_float
    with pytest.raises(GraphoptError, match="--awq applies to weight-only"):
        QuantizeConfig(activations="int8", awq=True)


# --- bad input through the CLI --------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_cli_refuses_bad_input_and_writes_nothing(tiny_llama_dir, tmp_path):
    output = tmp_path / "out"
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    cases = [
        ([f"--calib-text={binary}", "--activations", "int8"], "binary"),
        ([f"--calib-text={short}", "--seq-len", "64", "--method", "gptq"], "too short"),
        (["--exclude", "/model/layers/9/nothing"], "matches no node"),
        (["--weights", "int4", "--activations", "int8"], "needs --weights int8"),
        (["--smooth", "0.5", "--activations", "none"], "--smooth applies to W8A8"),
    ]
    for extra, message in cases:
        result = run("quantize", tiny_llama_dir, "-o", output, "--calib-samples", 2, "--seq-len", 16, *extra) \
            if "--seq-len" not in extra else run("quantize", tiny_llama_dir, "-o", output, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)
        assert not output.exists() and not list(tmp_path.glob(".out.*"))
    quantized = tmp_path / "int8"
    assert run("quantize", tiny_llama_dir, "-o", quantized, "--activations", "none").exit_code == 0
    again = run("quantize", quantized, "-o", output, "--activations", "none")
    assert again.exit_code == 2 and "already quantized" in again.output
    softmax = run("quantize", tiny_llama_dir, "-o", output, "--op-types", "MatMul,Softmax")
    assert softmax.exit_code == 2 and "cannot quantize op type Softmax" in softmax.output
    assert not output.exists()
