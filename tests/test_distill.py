"""graphopt distill: the student's torch form equals its graph, training lowers the KL, resume, DDP, QAT, refusals."""

from __future__ import annotations

import os
import pathlib
import socket

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.distill import (DistillConfig, _kl_loss, chunked_distill_loss, distill, fake_quantize,
                              fake_quantize_activations, self_sampled_pool, snap_to_grid)
from graphopt.errors import GraphoptError
from graphopt.evaluate import DEFAULT_TEXT
from graphopt.export import export
from graphopt.pruning import prune
from graphopt.student import check_round_trip, load_student, ort_logits
from graphopt.testing import CORPUS, tiny_checkpoint

# Tiny float32 graphs: torch and ONNX Runtime agree to float32 rounding of a few layers.
ROUND_TRIP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama with 4 layers (so pruning can drop one and leave layers of different sizes)."""
    root = tmp_path_factory.mktemp("distill")
    checkpoint = tiny_checkpoint("llama", root / "ckpt", num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128)
    return export(str(checkpoint), root / "teacher").path


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory) -> pathlib.Path:
    """The teacher with a KV group, 30% of MLP channels and one layer removed: heterogeneous layers."""
    output = tmp_path_factory.mktemp("distill-student") / "student"
    return prune(teacher_dir, output, heads=0.25, channels=0.3, layers=1, importance="random", seed=1).path


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("distill-qwen2")
    return export(str(tiny_checkpoint("qwen2", root / "ckpt")), root / "onnx").path


def _prompt_ids(model_dir: pathlib.Path) -> np.ndarray:
    from graphopt.runtime.tokenizer import Tokenizer

    return np.asarray([Tokenizer(model_dir).encode(CORPUS[0])[:40]])


def _weights(model_dir: pathlib.Path) -> dict[str, np.ndarray]:
    model = ir.load(str(model_dir / "model.onnx"))
    return {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()
            if value.const_value is not None and name.endswith((".weight", ".bias"))}


def _config(**overrides) -> DistillConfig:
    # float32: the DDP and QAT tests compare weights closely; bf16 has its own test.
    settings = dict(tokens=8 * 32 * 8, batch_size=8, seq_len=32, lr=3e-3, data_tokens=8 * 32 * 8, eval_windows=0,
                    warmup_steps=2, seed=0, precision="fp32")
    settings.update(overrides)
    return DistillConfig(**settings)


def test_student_layers_follow_the_pruned_graph(student_dir):
    loaded = load_student(student_dir)
    manifest = loaded.manifest
    assert len(loaded.spec.layers) == manifest.layers == 3
    assert [layer.heads for layer in loaded.spec.layers] == manifest.layer_heads
    assert [layer.kv_heads for layer in loaded.spec.layers] == manifest.layer_kv_heads
    assert [layer.intermediate for layer in loaded.spec.layers] == manifest.layer_intermediate_sizes
    assert len({(layer.heads, layer.intermediate) for layer in loaded.spec.layers}) > 1  # heterogeneous
    names = {name for name, _ in loaded.module.named_parameters()}
    assert "model.layers.2.mlp.up_proj.weight" in names and "model.layers.3.mlp.up_proj.weight" not in names


@pytest.mark.parametrize("which", ["student", "teacher", "qwen2"])
def test_round_trip_equals_onnx(which, student_dir, teacher_dir, qwen2_dir):
    model_dir = {"student": student_dir, "teacher": teacher_dir, "qwen2": qwen2_dir}[which]
    loaded = load_student(model_dir)
    random_ids = np.random.default_rng(0).integers(0, loaded.spec.vocab, size=(2, 24))
    assert check_round_trip(loaded, random_ids, ROUND_TRIP_TOLERANCE) <= ROUND_TRIP_TOLERANCE
    assert check_round_trip(loaded, _prompt_ids(model_dir), ROUND_TRIP_TOLERANCE) <= ROUND_TRIP_TOLERANCE


def test_untrained_weights_written_back_unchanged(student_dir, tmp_path):
    from graphopt.modeldir import ModelDir
    from graphopt.student import write_weights

    loaded = load_student(student_dir)
    weights = {name: parameter.detach().numpy() for name, parameter in loaded.module.named_parameters()}
    (tmp_path / "copy").mkdir()
    assert write_weights(ModelDir(student_dir), weights, tmp_path / "copy") == len(weights)
    ids = _prompt_ids(student_dir)
    np.testing.assert_array_equal(ort_logits(tmp_path / "copy" / "model.onnx", ids),
                                  ort_logits(student_dir / "model.onnx", ids))


def _held_out_kl(model_dir, teacher_dir) -> float:
    """Mean KL(teacher || model) on teacher samples of another seed than the training data's."""
    student, teacher = load_student(model_dir).module, load_student(teacher_dir)
    pool = self_sampled_pool(teacher.module, teacher.directory.path, 32, 32, 99, torch.device("cpu"), 0, 1, 16)
    ids = torch.from_numpy(pool.astype(np.int64))
    with torch.no_grad():
        return float(_kl_loss(student(ids)[0], teacher.module(ids)[0], 1.0))


def test_short_distillation_lowers_kl(student_dir, teacher_dir, tmp_path):
    result = distill(student_dir, teacher_dir, tmp_path / "out", _config())
    assert result is not None
    before, after = _held_out_kl(student_dir, teacher_dir), _held_out_kl(result.model_dir.path, teacher_dir)
    assert after < 0.75 * before, (before, after)
    step = result.model_dir.manifest.lineage[-1].to_json()
    assert step["pass"] == "distill" and step["figures"]["tokens"] == 8 * 32 * 8
    assert step["figures"]["loss_curve"][-1][2] < step["figures"]["loss_curve"][0][2]
    assert result.model_dir.manifest.layer_heads == load_student(student_dir).manifest.layer_heads
    assert not (tmp_path / "out.ckpt").exists()  # a finished run leaves no checkpoint


def test_bf16_distillation_lowers_kl_too(student_dir, teacher_dir, tmp_path):
    """bf16 autocast over float32 weights (auto on CUDA and on CPUs with native bf16): trains as well."""
    result = distill(student_dir, teacher_dir, tmp_path / "out", _config(precision="bf16"))
    before, after = _held_out_kl(student_dir, teacher_dir), _held_out_kl(result.model_dir.path, teacher_dir)
    assert after < 0.75 * before, (before, after)
    assert result.model_dir.manifest.lineage[-1].to_json()["parameters"]["precision"] == "bf16"
    for array in _weights(result.model_dir.path).values():
        assert array.dtype == np.float32  # the written weights stay float32


def test_defaults_are_the_measured_settings_of_the_device():
    cpu, cuda = DistillConfig(max_minutes=1), DistillConfig(max_minutes=1, device="cuda")
    assert (cpu.lr, cpu.batch_size, cpu.seq_len, cpu.warmup_steps, cpu.micro_batch) == (5e-4, 8, 256, 3, None)
    assert (cuda.lr, cuda.batch_size, cuda.seq_len, cuda.warmup_steps, cuda.micro_batch) == (5e-4, 64, 512, 30, 64)
    assert (cpu.kl_chunk_tokens, cuda.kl_chunk_tokens, cpu.data_tokens, cuda.data_tokens) == (256, 4096, 49152, 1 << 23)
    assert DistillConfig(max_minutes=1, device="cuda", quantize="int4").lr == 5e-5  # QAT starts from a trained model
    assert DistillConfig(max_minutes=1, device="cpu", quantize="int4").lr == 3e-4
    assert DistillConfig(max_minutes=1, device="cuda", lr=1e-3, batch_size=16).describe()["batch_size"] == 16
    assert DistillConfig(max_minutes=1, device="cuda", lr=1e-3).lr == 1e-3
    with pytest.raises(GraphoptError, match="--precision"):
        DistillConfig(max_minutes=1, precision="fp16")
    with pytest.raises(GraphoptError, match="stop_after_minutes"):
        DistillConfig(max_minutes=1, stop_after_minutes=0)


FAULTS_PROBE = """
import resource, sys
import torch
from graphopt.distill import _keep_freed_memory

def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(1 << 25)  # 128 MB, every page written (numpy would ask for huge pages)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

fresh = faults_of_a_fresh_block()
restore = _keep_freed_memory()
for _ in range(3):  # steady state: an aligned block may not fit the hole its predecessor left
    faults_of_a_fresh_block()
kept = faults_of_a_fresh_block()
restore()
print(fresh, kept, faults_of_a_fresh_block())
"""


def test_cpu_training_keeps_freed_memory():
    """In a process like the CLI's, a large block freed by one step comes back to the next without
    page faults (glibc), and malloc gives memory back again afterwards."""
    import ctypes
    import subprocess
    import sys

    if getattr(ctypes.CDLL(None), "mallopt", None) is None:
        pytest.skip("no glibc malloc")
    completed = subprocess.run([sys.executable, "-c", FAULTS_PROBE], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    fresh, kept, after = map(int, completed.stdout.split())
    if fresh < 4096:
        pytest.skip(f"{fresh} page faults for 128 MB: huge pages here, nothing to keep")
    assert kept < fresh / 10, (kept, fresh)
    assert after > fresh / 2  # given back


def test_resume_gives_the_uninterrupted_weights(student_dir, teacher_dir, tmp_path):
    whole = distill(student_dir, teacher_dir, tmp_path / "whole", _config())
    assert distill(student_dir, teacher_dir, tmp_path / "resumed", _config(stop_after_steps=2)) is None
    assert (tmp_path / "resumed.ckpt" / "state.pt").is_file() and not (tmp_path / "resumed").exists()
    with pytest.raises(Exception, match="--resume"):
        distill(student_dir, teacher_dir, tmp_path / "resumed", _config())
    resumed = distill(student_dir, teacher_dir, tmp_path / "resumed", _config(resume=True))
    expected, actual = _weights(whole.model_dir.path), _weights(resumed.model_dir.path)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert not np.array_equal(expected["model.layers.0.mlp.up_proj.weight"],
                              _weights(student_dir)["model.layers.0.mlp.up_proj.weight"])
    # Stopped by the clock (a lease ending) before its first step, then resumed: the same weights.
    assert distill(student_dir, teacher_dir, tmp_path / "leased", _config(stop_after_minutes=1e-9)) is None
    assert torch.load(tmp_path / "leased.ckpt" / "state.pt", weights_only=True)["step"] == 0
    leased = distill(student_dir, teacher_dir, tmp_path / "leased", _config(resume=True))
    actual = _weights(leased.model_dir.path)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, student: str, teacher: str, output: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        distill(student, teacher, output, _config())
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(student_dir, teacher_dir, tmp_path):
    single = distill(student_dir, teacher_dir, tmp_path / "single", _config())
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(student_dir), str(teacher_dir),
                                                   str(tmp_path / "ddp")), nprocs=2, join=True)
    from graphopt.modeldir import ModelDir

    figures = ModelDir(tmp_path / "ddp").manifest.lineage[-1].figures
    assert figures["world_size"] == 2 and figures["tokens"] == single.figures["tokens"]
    expected, actual, initial = _weights(single.model_dir.path), _weights(tmp_path / "ddp"), _weights(student_dir)
    for name in expected:
        # Same data, same steps; only the order of float sums (gradient all-reduce, split batches)
        # differs, which Adam's normalisation can magnify for near-zero gradients: a few 1e-5.
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=2e-4, err_msg=name)
        trained = np.linalg.norm(expected[name] - initial[name])
        assert np.linalg.norm(actual[name] - expected[name]) <= 1e-3 * max(trained, 1e-3), name


@pytest.mark.parametrize("bits,method", [(4, "affine"), (4, "rtn"), (8, "rtn")])
def test_fake_quantize_is_the_weight_only_grid(bits, method):
    weight = np.random.default_rng(bits).normal(size=(96, 40)).astype(np.float32)
    weight[:, 3] = np.abs(weight[:, 3])  # a block of one sign: zero point at the edge
    weight[32:64, 5] = 0.3  # a constant block (affine: scale 1, the offset in the residual rows)
    ours = fake_quantize(torch.from_numpy(weight), bits, 32, method).numpy()
    snapped = snap_to_grid(weight, bits, 32, method)
    np.testing.assert_allclose(ours, snapped, rtol=0, atol=1e-6)
    assert not np.allclose(snapped, weight, atol=1e-3)  # it did round
    # Snapping is idempotent: snapped weights are on the grid their own blocks give.
    # (to float32 rounding: a few ulps of the block's offset)
    np.testing.assert_allclose(snap_to_grid(snapped, bits, 32, method), snapped, rtol=1e-5, atol=1e-6)
    parameter = torch.from_numpy(weight).requires_grad_()
    fake_quantize(parameter, bits, 32, method).sum().backward()
    np.testing.assert_array_equal(parameter.grad.numpy(), np.ones_like(weight))  # straight through


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantized_inputs_are_what_the_cpu_kernel_computes(bits):
    """QAT's input rounding reproduces MatMulNBits at accuracy_level 4 (int8 inputs per block): the
    ONNX Runtime output is within float rounding of x_rounded @ W, while x @ W is far off."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from graphopt.passes.quantize_weights import dequantize, pack, pack_zero_points, quantize_rtn

    rng = np.random.default_rng(bits)
    in_features, out_features, block = 96, 48, 32
    weight_t = rng.normal(size=(out_features, in_features)).astype(np.float32)
    codes, scales, zero_points = quantize_rtn(weight_t, bits, block)
    packed = pack(codes, bits)
    zero_input = pack_zero_points(zero_points) if bits == 4 else zero_points.astype(np.uint8).reshape(-1)
    weight = dequantize(packed, scales, zero_input, bits, in_features)
    x = rng.normal(size=(3, in_features)).astype(np.float32)
    x[:, 7] *= 40.0  # an outlier: its block's other inputs round coarsely
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zero_points"], ["y"], domain="com.microsoft",
                            K=in_features, N=out_features, bits=bits, block_size=block, accuracy_level=4)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, out_features])],
        [onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(scales.reshape(-1), "scales"),
         onnx.numpy_helper.from_array(zero_input, "zero_points")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    kernel = session.run(None, {"x": x})[0]
    rounded = fake_quantize_activations(torch.from_numpy(x), block).double().numpy() @ weight.astype(np.float64)
    plain = x.astype(np.float64) @ weight.astype(np.float64)
    simulated_error = np.abs(kernel - rounded).max()
    assert simulated_error < 1e-3 * np.abs(plain).max(), simulated_error
    assert simulated_error < 0.05 * np.abs(kernel - plain).max()
    parameter = torch.from_numpy(x).requires_grad_()
    fake_quantize_activations(parameter, block).sum().backward()
    np.testing.assert_array_equal(parameter.grad.numpy(), np.ones_like(x))  # straight through


def _affine_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """Each affine MatMulNBits' weight ``[K, N]`` as the graph computes it (its residual rows folded back)."""
    from graphopt.passes.quantize_weights import integer_affine_weight, unpack

    weights = {}
    for node in model.graph:
        producer = node.inputs[0].producer() if node.op_type == "MatMulNBits" else None
        if producer is None or not producer.name.endswith("_with_block_sums"):
            continue
        packed, scales, zero_points = (value.const_value.numpy() for value in node.inputs[1:4])
        rows, blocks = packed.shape[:2]
        in_features = producer.inputs[0].shape[-1]
        zero = unpack(zero_points.reshape(rows, -1), 4)[:, :blocks].astype(np.float64)
        weight = integer_affine_weight(unpack(packed, 4), scales.reshape(rows, blocks), zero, in_features)
        weights[node.metadata_props["graphopt.weight_source"]] = weight.T
    return weights


def test_qat_weights_quantize_exactly_onto_the_default_grid(teacher_dir, tmp_path):
    """QAT with graphopt quantize's defaults (int4: affine, block 32) leaves weights the default
    weight-only pass reproduces exactly (float32 rounding), so what was trained is what runs."""
    from graphopt.quantization import QuantizeConfig, quantize

    config = _config(quantize="int4")
    assert config.qat_grids(["model.layers.0.mlp.up_proj.weight"], "lm_head.weight") == {
        "model.layers.0.mlp.up_proj.weight": (4, 32, "affine"), "lm_head.weight": (8, 64, "rtn")}
    trained = distill(teacher_dir, teacher_dir, tmp_path / "qat", config)
    float_weights = _weights(trained.model_dir.path)
    original = _weights(teacher_dir)
    assert not np.array_equal(float_weights["model.layers.0.mlp.up_proj.weight"],
                              original["model.layers.0.mlp.up_proj.weight"])
    quantize(trained.model_dir.path, tmp_path / "int4", QuantizeConfig(weights="int4", pack=False))
    quantized = _affine_weights(ir.load(str(tmp_path / "int4" / "model.onnx")))
    layer_names = [name for name in float_weights if name.startswith("model.layers.") and name.endswith("proj.weight")]
    assert sorted(quantized) == sorted(layer_names) and len(layer_names) == 7 * 4
    for name in layer_names:
        np.testing.assert_allclose(quantized[name], float_weights[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The tied table is the int8 head: trained, and on the head's grid, blocks along the hidden axis.
    table = float_weights["lm_head.weight"]  # the exporter's name for the tied table
    assert not np.array_equal(table, original["lm_head.weight"])
    np.testing.assert_allclose(snap_to_grid(table.T, 8, 64, "rtn"), table.T, rtol=1e-5, atol=1e-6)
    # The same weights before QAT are not on that grid (the check above can fail).
    quantize(teacher_dir, tmp_path / "ptq", QuantizeConfig(weights="int4", pack=False))
    untrained = _affine_weights(ir.load(str(tmp_path / "ptq" / "model.onnx")))
    name = "model.layers.0.mlp.up_proj.weight"
    assert np.abs(untrained[name] - original[name]).max() > 1e-3


def test_qat_rtn_grid_stays_selectable(student_dir, teacher_dir, tmp_path):
    from graphopt.passes.quantize_weights import dequantize
    from graphopt.quantization import QuantizeConfig, quantize

    trained = distill(student_dir, teacher_dir, tmp_path / "qat", _config(quantize="int4", quantize_method="rtn",
                                                                          block_size=16, head="float"))
    float_weights = _weights(trained.model_dir.path)
    quantize(trained.model_dir.path, tmp_path / "int4", QuantizeConfig(weights="int4", method="rtn", block_size=16,
                                                                         head="float", pack=False))
    checked = 0
    for node in ir.load(str(tmp_path / "int4" / "model.onnx")).graph:
        if node.op_type != "MatMulNBits":
            continue
        packed, scales, zeros = (value.const_value.numpy() for value in node.inputs[1:4])
        weight = dequantize(packed, scales, zeros, 4, node.attributes["K"].as_int())
        source = node.metadata_props["graphopt.weight_source"]
        np.testing.assert_allclose(weight, float_weights[source], rtol=1e-6, atol=1e-7, err_msg=source)
        checked += 1
    assert checked == 7 * 3


def test_int8_qat_weights_are_not_rotated_off_their_grid(teacher_dir, tmp_path):
    """int8 on a fused graph rotates by default, except weights QAT trained on int8's own grid:
    after distill --quantize int8 -> fuse -> quantize int8 every linear runs the trained weights."""
    from graphopt.fusion import fuse
    from graphopt.passes.quantize_weights import dequantize
    from graphopt.quantization import QuantizeConfig, quantize

    trained = distill(teacher_dir, teacher_dir, tmp_path / "qat", _config(quantize="int8"))
    float_weights = _weights(trained.model_dir.path)
    rotated = quantize(fuse(teacher_dir, tmp_path / "fused-ptq")[0].path, tmp_path / "ptq",
                       QuantizeConfig(weights="int8", pack=False))
    assert "rotated" in rotated.manifest.lineage[-1].figures  # the control: PTQ weights rotate
    written = quantize(fuse(trained.model_dir.path, tmp_path / "fused")[0].path, tmp_path / "int8",
                       QuantizeConfig(weights="int8", pack=False))
    assert "rotation_skipped" in written.manifest.lineage[-1].figures
    checked = 0
    for node in ir.load(str(tmp_path / "int8" / "model.onnx")).graph:
        if node.op_type != "MatMulNBits":
            continue
        packed, scales = (value.const_value.numpy() for value in node.inputs[1:3])
        weight = dequantize(packed, scales, None, 8, node.attributes["K"].as_int())
        source = node.metadata_props["graphopt.weight_source"]
        if source.startswith("model.layers."):  # (the tied head is checked by the int4 test above)
            np.testing.assert_allclose(weight, float_weights[source], rtol=1e-5, atol=1e-6, err_msg=source)
            checked += 1
    assert checked == 7 * 4


def test_affine_qat_refuses_partial_blocks(student_dir, teacher_dir, tmp_path):
    with pytest.raises(GraphoptError, match="whole blocks"):
        distill(student_dir, teacher_dir, tmp_path / "qat", _config(quantize="int4", block_size=16))


def test_chunked_loss_equals_the_full_logits_loss():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=generator, requires_grad=True)
    head = torch.randn(16, 50, generator=generator, requires_grad=True)
    teacher_hidden, teacher_head = torch.randn(2, 7, 16, generator=generator), torch.randn(16, 50, generator=generator)
    ids = torch.randint(0, 50, (2, 7), generator=generator)
    for ce_weight in (0.0, 0.3):
        full = _kl_loss(hidden @ head, teacher_hidden @ teacher_head, 2.0)
        if ce_weight:
            ce = torch.nn.functional.cross_entropy((hidden @ head)[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
            full = (1 - ce_weight) * full + ce_weight * ce
        expected = torch.autograd.grad(full, (hidden, head))
        chunked = chunked_distill_loss(hidden, head, teacher_hidden, teacher_head, 2.0, 3, ids, ce_weight)
        actual = torch.autograd.grad(chunked, (hidden, head))
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
        for got, want in zip(actual, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sampling_mixes_prompts_in_a_chunk(teacher_dir):
    """Rows of one chunk start with different prompts (forced), the rest is sampled; same seed, same pool."""
    from graphopt.distill import sample_chunk

    teacher = load_student(teacher_dir).module.eval()
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    first = sample_chunk(teacher, prompts, 12, 3, torch.device("cpu"))
    assert first.shape == (3, 12)
    for row, prompt in enumerate(prompts):
        assert first[row, :len(prompt)].tolist() == prompt
    np.testing.assert_array_equal(first, sample_chunk(teacher, prompts, 12, 3, torch.device("cpu")))
    assert not np.array_equal(first, sample_chunk(teacher, prompts, 12, 4, torch.device("cpu")))
    # Near zero temperature every seed follows the teacher's greedy path.
    cold = sample_chunk(teacher, prompts, 12, 3, torch.device("cpu"), temperature=1e-4)
    np.testing.assert_array_equal(cold, sample_chunk(teacher, prompts, 12, 4, torch.device("cpu"), temperature=1e-4))


def test_teacher_module_from_transformers_matches_its_export(teacher_dir, tmp_path):
    """The module built from a transformers model (no export) computes what the exported graph computes."""
    from transformers import AutoModelForCausalLM

    from graphopt.student import module_from_transformers

    checkpoint = tiny_checkpoint("llama", tmp_path / "ckpt", num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128)
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    module = module_from_transformers(hf_model)
    ids = np.random.default_rng(0).integers(0, module.spec.vocab, size=(2, 16))
    with torch.no_grad():
        ours = module(torch.from_numpy(ids))[0].numpy()
        theirs = hf_model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_refusals_are_one_line(student_dir, teacher_dir, tmp_path):
    runner = CliRunner()

    def refused(*args) -> str:
        result = runner.invoke(main, ["distill", *map(str, args)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        return lines[0]

    assert "evaluation text" in refused(student_dir, "--teacher", teacher_dir, "-o", tmp_path / "a", "--tokens", 64,
                                        "--data", DEFAULT_TEXT)
    copy = tmp_path / "copy.txt"
    copy.write_bytes(DEFAULT_TEXT.read_bytes())
    assert "evaluation text" in refused(student_dir, "--teacher", teacher_dir, "-o", tmp_path / "a", "--tokens", 64,
                                        "--data", copy)
    fused = tmp_path / "fused"
    assert runner.invoke(main, ["fuse", str(student_dir), "-o", str(fused), "--target", "cpu"]).exit_code == 0
    assert "fuse" in refused(fused, "--teacher", teacher_dir, "-o", tmp_path / "a", "--tokens", 64)
    quantized = tmp_path / "int8"
    assert runner.invoke(main, ["quantize", str(student_dir), "-o", str(quantized), "--weights", "int8"]).exit_code == 0
    assert "quantize" in refused(quantized, "--teacher", teacher_dir, "-o", tmp_path / "a", "--tokens", 64)
    assert not (tmp_path / "a").exists()


def test_cli_distills_with_a_data_file(student_dir, teacher_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join('{"text": "%s"}' % line.replace('"', "") for line in CORPUS * 8))
    result = CliRunner().invoke(main, ["distill", str(student_dir), "--teacher", str(teacher_dir), "-o",
                                       str(tmp_path / "out"), "--tokens", "512", "--batch-size", "4", "--seq-len",
                                       "32", "--ce-weight", "0.5", "--data", str(data), "--eval-windows", "0",
                                       "--plot", str(tmp_path / "loss.png")])
    assert result.exit_code == 0, result.output
    assert "loss" in result.output and (tmp_path / "loss.png").is_file()
    assert load_student(tmp_path / "out").spec.layers == load_student(student_dir).spec.layers


@pytest.mark.slow
def test_smollm2_round_trip(smollm2_dir):
    """The real model: 30 layers of float32; ONNX Runtime itself is 5e-4 from float64 here (logits up to 35)."""
    from graphopt.runtime.tokenizer import Tokenizer

    loaded = load_student(smollm2_dir)
    random_ids = np.random.default_rng(0).integers(0, loaded.spec.vocab, size=(2, 16))
    prompt = np.asarray([Tokenizer(smollm2_dir).encode("The capital of France is Paris, and the capital of Italy is")])
    assert check_round_trip(loaded, random_ids) <= 1e-4
    assert check_round_trip(loaded, prompt) <= 1e-4


def test_cli_budget_defaults_to_ten_minutes(student_dir, teacher_dir, tmp_path, monkeypatch):
    import graphopt.distill as distill_module

    seen = {}

    def fake_distill(student, teacher, output, config, force=False):
        seen["config"] = config

    monkeypatch.setattr(distill_module, "distill", fake_distill)
    runner = CliRunner()
    result = runner.invoke(main, ["distill", str(student_dir), "--teacher", str(teacher_dir), "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert seen["config"].max_minutes == 10.0 and seen["config"].tokens is None
    assert "budget: 10 minutes" in result.output
    result = runner.invoke(main, ["distill", str(student_dir), "--teacher", str(teacher_dir), "-o", str(tmp_path / "a"),
                                  "--tokens", "64"])
    assert seen["config"].max_minutes is None and seen["config"].tokens == 64
    assert "10 minutes" in " ".join(runner.invoke(main, ["distill", "--help"]).output.split())


def test_weights_shipped_from_a_gpu_run_land_here(teacher_dir, tmp_path, monkeypatch, load_tool):
    """tools/distill_gpu.py: ``--ship`` packs what distillation changed into small float16 pieces;
    ``land`` cuts the local export by the same plan and writes them back (to float16 rounding)."""
    import json

    from graphopt.modeldir import ModelDir
    from graphopt.student import write_weights

    tool = load_tool("distill_gpu")
    monkeypatch.setattr(tool, "SHIP_PIECE_BYTES", 4096)  # several pieces even for a tiny model
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"heads": {}, "channels": {}, "drop": [1, 2]}))
    tool._cut(teacher_dir, str(plan), tmp_path / "cut")
    cut = ModelDir(tmp_path / "cut")
    trained = {name: array + 0.01 for name, array in _weights(cut.path).items() if "layers.1." in name}
    (tmp_path / "healed").mkdir()
    write_weights(cut, trained, tmp_path / "healed")
    out = tmp_path / "out"
    out.mkdir()
    shipped = tool.ship(cut.path, tmp_path / "healed", out)
    assert sorted(name for name, _, _ in shipped["tensors"]) == sorted(trained)
    assert len(shipped["pieces"]) > 1
    figures = out / "heal.json"
    figures.write_text(json.dumps({"distill": {"tokens": 123, "loss_curve": [[1, 2, 3.0, 4]]}, "shipped": shipped}))
    args = lambda output: type("Args", (), {"source": str(teacher_dir), "plan": str(plan), "figures": str(figures),
                                            "output": str(output), "force": False})
    tool.land(args(tmp_path / "landed"))
    landed = _weights(tmp_path / "landed")
    for name, array in _weights(cut.path).items():
        expected = trained.get(name, array)
        np.testing.assert_allclose(landed[name], expected, rtol=1e-3, atol=1e-4, err_msg=name)
    step = ModelDir(tmp_path / "landed").manifest.lineage[-1]
    assert step.name == "distill" and step.figures["tokens"] == 123 and "loss_curve" not in step.figures
    # A later GPU run starts from the shipped weights (all --init): WORK/LABEL-init beside the cut.
    start = tool._warm_start(tmp_path, "cut", figures)
    assert start == tmp_path / "cut-init" and ModelDir.open(start).manifest == cut.manifest
    for name, array in _weights(start).items():
        np.testing.assert_array_equal(array, landed[name], err_msg=name)
    piece = out / shipped["pieces"][0][0]
    piece.write_bytes(piece.read_bytes()[:-2] + b"xx")
    with pytest.raises(SystemExit, match="checksum"):
        tool.land(args(tmp_path / "tampered"))
    assert not (tmp_path / "tampered").exists()


def test_same_tokenizer_compares_the_json_not_its_layout(teacher_dir, tmp_path):
    """A directory exported before tokenizer.json was written compact (indented) is the same tokenizer;
    a different vocabulary is refused."""
    import json
    import shutil

    from graphopt.distill import _same_tokenizer
    from graphopt.modeldir import ModelDir

    indented = tmp_path / "indented"
    shutil.copytree(teacher_dir, indented)
    tokenizer = json.loads((indented / "tokenizer.json").read_text())
    (indented / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2))
    _same_tokenizer(ModelDir.open(indented), ModelDir.open(teacher_dir))
    token = next(iter(tokenizer["model"]["vocab"]))
    tokenizer["model"]["vocab"][token + "x"] = tokenizer["model"]["vocab"].pop(token)
    (indented / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GraphoptError, match="tokenize differently"):
        _same_tokenizer(ModelDir.open(indented), ModelDir.open(teacher_dir))
