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
from graphopt.distill import DistillConfig, _kl_loss, distill, fake_quantize, self_sampled_pool, snap_to_grid
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
    settings = dict(tokens=8 * 32 * 8, batch_size=8, seq_len=32, lr=3e-3, data_tokens=8 * 32 * 8, eval_windows=0,
                    warmup_steps=2, seed=0)
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


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_is_the_weight_only_grid(bits):
    weight = np.random.default_rng(bits).normal(size=(96, 40)).astype(np.float32)
    weight[:, 3] = np.abs(weight[:, 3])  # a block of one sign: zero point at the edge
    ours = fake_quantize(torch.from_numpy(weight), bits, 32).numpy()
    np.testing.assert_allclose(ours, snap_to_grid(weight, bits, 32), rtol=0, atol=1e-6)
    parameter = torch.from_numpy(weight).requires_grad_()
    fake_quantize(parameter, bits, 32).sum().backward()
    np.testing.assert_array_equal(parameter.grad.numpy(), np.ones_like(weight))  # straight through


def test_qat_weights_quantize_exactly_onto_the_trained_grid(student_dir, teacher_dir, tmp_path):
    from graphopt.passes.quantize_weights import dequantize
    from graphopt.quantization import QuantizeConfig, quantize

    trained = distill(student_dir, teacher_dir, tmp_path / "qat", _config(quantize="int4", block_size=16))
    float_weights = _weights(trained.model_dir.path)
    # QAT's grid is round-to-nearest's (integer zero points); unpacked, to find each weight by name.
    quantize(trained.model_dir.path, tmp_path / "int4", QuantizeConfig(weights="int4", activations="none", method="rtn",
                                                                         block_size=16, head="int4", pack=False))
    model = ir.load(str(tmp_path / "int4" / "model.onnx"))
    checked = 0
    for node in model.graph:
        if node.op_type != "MatMulNBits" or node.inputs[1].name.startswith("lm_head"):
            continue
        packed, scales, zeros = (value.const_value.numpy() for value in node.inputs[1:4])
        attributes = node.attributes
        weight = dequantize(packed, scales, zeros, 4, attributes["K"].as_int())
        source = node.inputs[1].name.removesuffix("_q4")  # model.layers.0.mlp.up_proj.weight_q4
        np.testing.assert_allclose(weight, float_weights[source], rtol=1e-6, atol=1e-7, err_msg=source)
        checked += 1
    assert checked == 7 * 3


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
    assert "budget" in refused(student_dir, "--teacher", teacher_dir, "-o", tmp_path / "a")
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
