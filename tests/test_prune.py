"""Structured pruning: heads, MLP channels and layers, against PyTorch models with the same parts removed.

Tolerances: fp32 logits of the pruned ONNX model vs the HF model with the same weights sliced agree
to 1e-4 (what the export itself reaches, ~5e-6 here); an empty plan must be bit-exact.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from graphopt import ir as graph_ir
from graphopt.cli import main
from graphopt.modeldir import ModelDir
from graphopt.passes import _prune_common as common
from graphopt.passes.prune_channels import PruneChannelsPass
from graphopt.passes.prune_heads import PruneHeadsPass
from graphopt.passes.prune_layers import PruneLayersPass
from graphopt.pruning import Plan, apply_plan, prune
from graphopt.runtime import Decoder
from graphopt.testing import tiny_model

TOLERANCE = 1e-4
PROMPT = [1, 5, 9, 33, 100, 7, 2, 45, 17, 3]


# -- the PyTorch reference: the same parts removed from the HF model ------------------------------

def _parameter(tensor):
    return torch.nn.Parameter(tensor.contiguous())


def torch_pruned(family: str, plan: Plan):
    """The seeded HF tiny model with ``plan``'s heads, channels and layers removed in torch."""
    model, _ = tiny_model(family)
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    with torch.no_grad():
        for index, kept in plan.heads.items():
            if family == "gpt2":
                attention = blocks[index].attn
                dim, width = attention.head_dim, attention.split_size
                columns = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in kept])
                qkv = torch.cat([columns + section * width for section in range(3)])
                attention.c_attn.weight = _parameter(attention.c_attn.weight[:, qkv])
                attention.c_attn.bias = _parameter(attention.c_attn.bias[qkv])
                attention.c_attn.nf = len(qkv)
                attention.c_proj.weight = _parameter(attention.c_proj.weight[columns])
                attention.split_size, attention.num_heads = len(columns), len(kept)
            else:
                attention = blocks[index].self_attn
                dim, rep = attention.head_dim, attention.num_key_value_groups
                groups = sorted({h // rep for h in kept})
                columns = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in kept])
                kv_columns = torch.cat([torch.arange(g * dim, (g + 1) * dim) for g in groups])
                for linear, rows in ((attention.q_proj, columns), (attention.k_proj, kv_columns),
                                     (attention.v_proj, kv_columns)):
                    linear.weight = _parameter(linear.weight[rows])
                    if linear.bias is not None:
                        linear.bias = _parameter(linear.bias[rows])
                attention.o_proj.weight = _parameter(attention.o_proj.weight[:, columns])
                attention.num_key_value_groups = len(kept) // len(groups)
        for index, kept in plan.channels.items():
            mlp, kept = blocks[index].mlp, torch.tensor(kept)
            if family == "gpt2":
                mlp.c_fc.weight, mlp.c_fc.bias = _parameter(mlp.c_fc.weight[:, kept]), _parameter(mlp.c_fc.bias[kept])
                mlp.c_fc.nf = len(kept)
                mlp.c_proj.weight = _parameter(mlp.c_proj.weight[kept])
            else:
                for linear in (mlp.gate_proj, mlp.up_proj):
                    linear.weight = _parameter(linear.weight[kept])
                mlp.down_proj.weight = _parameter(mlp.down_proj.weight[:, kept])
        remaining = torch.nn.ModuleList([block for index, block in enumerate(blocks) if index not in plan.drop])
        if family == "gpt2":
            model.transformer.h = remaining
        else:
            model.model.layers = remaining
    return model


def torch_logits(family: str, plan: Plan) -> np.ndarray:
    with torch.no_grad():
        return torch_pruned(family, plan)(torch.tensor([PROMPT]), use_cache=False).logits[0].numpy()


def ort_logits(model_path) -> np.ndarray:
    """Prefill of half the prompt, one decode step, then the rest as a multi-token step on the cache."""
    decoder = Decoder(model_path)
    half = len(PROMPT) // 2
    return np.concatenate([decoder.forward(PROMPT[:half]), decoder.forward(PROMPT[half:half + 1]),
                           decoder.forward(PROMPT[half + 1:])])


def cache_heads(model_path) -> list[int]:
    model = onnx.load(str(model_path), load_external_data=False)
    dims = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim] for value in model.graph.input}
    layers = len([name for name in dims if name.endswith(".key")])
    for index in range(layers):
        assert dims[f"past_key_values.{index}.key"][1] == dims[f"past_key_values.{index}.value"][1]
    return [dims[f"past_key_values.{index}.key"][1] for index in range(layers)]


PLANS = {
    # llama: 4 heads in 2 KV groups, 128 channels, 2 layers
    "llama-heads-group": ("llama", Plan(heads={0: [2, 3]})),
    "llama-heads-per-group": ("llama", Plan(heads={0: [0, 2], 1: [1, 3]})),
    "llama-channels": ("llama", Plan(channels={0: list(range(0, 128, 2)), 1: list(range(40))})),
    "llama-layer-0": ("llama", Plan(drop=[0])),
    "llama-all-three": ("llama", Plan(heads={1: [0, 1]}, channels={1: list(range(16, 80))}, drop=[0])),
    # qwen2: q/k/v biases, 4 query heads sharing 1 KV head: only the repeat count can shrink
    "qwen2-heads": ("qwen2", Plan(heads={0: [0, 3], 1: [1]})),
    "qwen2-channels": ("qwen2", Plan(channels={1: list(range(0, 96, 3))})),
    "qwen2-layer-1": ("qwen2", Plan(drop=[1])),
    # gpt2: fused c_attn (q|k|v sections), Gemm + Reshape constants around the MLP
    "gpt2-heads": ("gpt2", Plan(heads={0: [1, 2], 1: [3]})),
    "gpt2-channels": ("gpt2", Plan(channels={0: list(range(0, 256, 4))})),
    "gpt2-layer-0": ("gpt2", Plan(drop=[0])),
}


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tiny_qwen2_dir, tiny_gpt2_dir):
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "gpt2": tiny_gpt2_dir}


# -- numerical: the pruned graph computes what the pruned PyTorch model computes --------------------

@pytest.mark.parametrize("case", list(PLANS))
def test_pruned_graph_matches_pruned_pytorch(case, exported, tmp_path):
    family, plan = PLANS[case]
    source = ModelDir.open(exported[family])
    pruned = apply_plan(source, plan, tmp_path / "pruned")
    onnx.checker.check_model(str(pruned.model_path), full_check=True)
    got = ort_logits(pruned.model_path)
    want = torch_logits(family, plan)
    assert np.abs(got - want).max() < TOLERANCE
    manifest = pruned.manifest
    heads = cache_heads(pruned.model_path)
    assert heads == manifest.cache["kv_heads"] == manifest.layer_kv_heads
    assert manifest.layers == len(heads) == len(manifest.layer_heads)
    names = [f"past_key_values.{i}.{kind}" for i in range(len(heads)) for kind in ("key", "value")]
    assert [name for name in manifest.inputs if name.startswith("past")] == names
    assert [name for name in manifest.outputs if name.startswith("present")] == \
        [name.replace("past_key_values", "present") for name in names]
    assert manifest.lineage[-1].name == "prune"


# -- positive: exact counts and shapes -------------------------------------------------------------

def test_heads_pass_counts_and_shapes(tiny_llama_dir):
    model = graph_ir.load(tiny_llama_dir / "model.onnx")
    ops_before = collections.Counter(node.op_type for node in model.graph)
    heads = PruneHeadsPass({0: [2, 3]})
    assert heads(model).modified
    # Layer 0 drops KV group 0 (query heads 0, 1). Rewritten targets: the q, k and v Reshapes, the
    # Expand and the repeat Reshape of k and of v, the output Reshape.
    assert heads.counts == {"heads_removed": 2, "kv_heads_removed": 1, "constants_rewritten": 8}
    assert heads.layout == [(2, 1), (4, 2)]
    graph = model.graph
    assert graph.initializers["model.layers.0.self_attn.q_proj.weight"].shape == ir_shape(64, 32)
    assert graph.initializers["model.layers.0.self_attn.k_proj.weight"].shape == ir_shape(64, 16)
    assert graph.initializers["model.layers.0.self_attn.o_proj.weight"].shape == ir_shape(32, 64)
    cache = {value.name: value.shape[1] for value in graph.inputs if value.name.startswith("past")}
    assert cache == {"past_key_values.0.key": 1, "past_key_values.0.value": 1,
                     "past_key_values.1.key": 2, "past_key_values.1.value": 2}
    ops_after = collections.Counter(node.op_type for node in model.graph)
    # Shape Concats are shared with layer 1, so the pruned layer gets its own copies (one per target).
    assert ops_after - ops_before == collections.Counter({"Concat": 8})
    assert all(node.metadata_props.get("graphopt.rule") == "prune_heads"
               for node in model.graph if node.op_type == "Concat" and "graphopt.rule" in node.metadata_props)


def ir_shape(*dims):
    import onnx_ir as ir

    return ir.Shape(dims)


def test_channels_and_layers_pass_counts(tiny_gpt2_dir):
    model = graph_ir.load(tiny_gpt2_dir / "model.onnx")
    channels = PruneChannelsPass({1: list(range(100))})
    assert channels(model).modified
    # GPT-2 spells the intermediate size in the Reshape after c_fc and the one before c_proj.
    assert channels.counts == {"channels_removed": 156, "constants_rewritten": 2}
    layers = PruneLayersPass([0])
    assert layers(model).modified
    assert layers.counts == {"layers_removed": 1, "cache_tensors_removed": 4}
    assert layers.kept == [1]
    names = set(model.graph.initializers)
    assert "transformer.h.0.mlp.c_fc.weight" in names and not any(name.startswith("transformer.h.1.") for name in names)
    assert model.graph.initializers["transformer.h.0.mlp.c_fc.weight"].shape == ir_shape(64, 100)


# -- identity and idempotence ----------------------------------------------------------------------

def test_pruning_nothing_is_an_exact_identity(tiny_qwen2_dir, tmp_path):
    pruned = prune(tiny_qwen2_dir, tmp_path / "same", heads=0.0, channels=0.0, layers=0)
    assert pruned.manifest.lineage[-1].modified is False
    assert np.array_equal(ort_logits(pruned.model_path), ort_logits(tiny_qwen2_dir / "model.onnx"))
    before = onnx.load(str(tiny_qwen2_dir / "model.onnx"))
    after = onnx.load(str(pruned.model_path))
    assert [node.op_type for node in before.graph.node] == [node.op_type for node in after.graph.node]
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in before.graph.initializer} == \
        {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in after.graph.initializer}


def test_second_run_keeping_everything_is_not_modified(tiny_llama_dir):
    model = graph_ir.load(tiny_llama_dir / "model.onnx")
    assert PruneHeadsPass({0: [0, 1]})(model).modified
    assert PruneChannelsPass({1: list(range(64))})(model).modified
    assert PruneLayersPass([0])(model).modified
    # The plans index the graph they run on: keeping every head, channel and layer changes nothing.
    assert not PruneHeadsPass({0: [0, 1, 2, 3]})(model).modified
    assert not PruneChannelsPass({0: list(range(64))})(model).modified
    assert not PruneLayersPass([])(model).modified


# -- negative: near misses refused with their reason -----------------------------------------------

def test_uneven_gqa_groups_are_refused(tiny_llama_dir):
    model = graph_ir.load(tiny_llama_dir / "model.onnx")
    with pytest.raises(common.PruneError, match="unequal numbers of query heads"):
        PruneHeadsPass({0: [0, 1, 2]})(model)
    with pytest.raises(common.PruneError, match="keep at least one head"):
        PruneHeadsPass({0: []})(model)
    with pytest.raises(common.PruneError, match="cannot drop every decoder layer"):
        PruneLayersPass([0, 1])(model)


def test_quantized_graph_is_refused(tiny_llama_dir, tmp_path):
    quantized = tmp_path / "int8"
    result = CliRunner().invoke(main, ["quantize", str(tiny_llama_dir), "-o", str(quantized), "--activations", "none"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["prune", str(quantized), "-o", str(tmp_path / "out"), "--channels", "0.5"])
    assert result.exit_code == 2
    assert "prune before quantizing" in result.output
    with pytest.raises(common.PruneError, match="prune before quantizing"):
        PruneHeadsPass({0: [0, 1]})(graph_ir.load(quantized / "model.onnx"))


@pytest.fixture(scope="module")
def fused_llama(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama fused for CPU: GroupQueryAttention, (Skip)SimplifiedLayerNormalization."""
    from graphopt.fusion import fuse

    fused, counts = fuse(tiny_llama_dir, tmp_path_factory.mktemp("fused") / "llama", "cpu", validate=False)
    assert counts["GroupQueryAttention"] == 2
    return fused


@pytest.mark.parametrize("plan", [Plan(heads={0: [2, 3]}, channels={1: list(range(0, 128, 2))}), Plan(drop=[0]),
                                  Plan(drop=[1]), Plan(heads={1: [1, 3]}, drop=[0])],
                         ids=["heads-channels", "drop-first", "drop-last", "heads-drop"])
def test_fused_graph_prunes_like_pytorch(fused_llama, tmp_path, plan):
    pruned = apply_plan(fused_llama, plan, tmp_path / "pruned")
    # No onnx.checker here: the fused graph uses ORT's SimplifiedLayerNormalization, which ORT registers in
    # the default domain and onnx.checker does not know (the unpruned fused graph fails it the same way).
    assert np.abs(ort_logits(pruned.model_path) - torch_logits("llama", plan)).max() < TOLERANCE
    model = onnx.load(str(pruned.model_path), load_external_data=False)
    attention = [node for node in model.graph.node if node.op_type == "GroupQueryAttention"]
    attributes = [{a.name: a.i for a in node.attribute if a.name in ("num_heads", "kv_num_heads")} for node in attention]
    layout = [(heads, kv) for heads, kv in zip(pruned.manifest.layer_heads, pruned.manifest.layer_kv_heads)]
    assert [(a["num_heads"], a["kv_num_heads"]) for a in attributes] == layout
    assert cache_heads(pruned.model_path) == pruned.manifest.cache["kv_heads"]


# -- the command -----------------------------------------------------------------------------------

def test_cli_prunes_with_measured_importance(tiny_llama_dir, tmp_path):
    output = tmp_path / "pruned"
    result = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "-o", str(output), "--params", "0.2",
                                       "--calib-samples", "2", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    step = json.loads((output / "graphopt.json").read_text())["lineage"][-1]
    assert step["parameters"]["params"] == 0.2 and step["parameters"]["calib"]["samples"] == 2
    assert 0.15 < step["figures"]["removed_fraction"] < 0.25
    assert Decoder(output / "model.onnx").forward(PROMPT).shape == (len(PROMPT), 320)


@pytest.mark.parametrize("arguments, message", [
    ([], "say what to remove"),
    (["--heads", "1.5"], "fraction in [0, 1)"),
    (["--params", "0.2", "--heads", "0.1"], "give --params alone"),
    (["--layers", "2"], "at least one must stay"),
    (["--channels", "0.5", "--calib-text", "/no/such/file.txt"], "no such file"),
])
def test_cli_refuses_bad_input(tiny_llama_dir, tmp_path, arguments, message):
    result = CliRunner().invoke(main, ["prune", str(tiny_llama_dir), "-o", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_missing_model(tmp_path):
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "nothing"), "-o", str(tmp_path / "out"), "--layers", "1"])
    assert result.exit_code == 2 and "no such directory" in result.output


# -- the real model --------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_pruned_quarter_runs_with_smaller_cache(smollm2_dir, tmp_path):
    pruned = prune(smollm2_dir, tmp_path / "pruned", heads=0.25, channels=0.25, layers=2, importance="random")
    manifest = pruned.manifest
    assert manifest.layers == 28
    assert cache_heads(pruned.model_path) == manifest.cache["kv_heads"]
    assert sum(manifest.layer_heads) == 28 * 9 - 3 * round(0.25 * 28 * 9 / 3)
    decoder = Decoder(pruned.model_path)
    prefill = decoder.forward(PROMPT)
    step = decoder.forward([int(np.argmax(prefill[-1]))])
    assert np.isfinite(step).all()
