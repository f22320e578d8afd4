"""gemma3_text and phi3: export vs transformers, fusion, int8, pruning, speculative decoding, distill's refusal.

Tiny random-weight configs (``graphopt.testing.TINY_CONFIGS``): Gemma 3 with 3 layers (sliding,
global, sliding; window 8; local and global RoPE bases; q/k norms; query_pre_attn_scalar 24) and
Phi-4-mini-like Phi-3 (packed qkv and gate_up, rotary on half of each head, LongRoPE switching past
64 positions). Sequences run past the window (prompt 20, 16 one-token decodes, a 5-token chunk)
and, for phi3, across the LongRoPE switch. Real weights are not reachable from CI or this machine.
"""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import transformers

from graphopt import checkpoint as checkpoint_lib
from graphopt import ir as graph_ir
from graphopt.calibration import CalibrationSpec
from graphopt.drafting import build_recipe
from graphopt.errors import UnsupportedModelError
from graphopt.export import export
from graphopt.fusion import fuse
from graphopt.modeldir import ModelDir
from graphopt.models import adapter_for
from graphopt.passes.fuse_attention import store_rotary_tables
from graphopt.pruning import prune
from graphopt.quantization import QuantizeConfig, quantize
from graphopt.runtime import Decoder, Generator
from graphopt.runtime.speculative import SpeculativeGenerator
from graphopt.testing import chunked_logits, tiny_checkpoint

FAMILIES = ("gemma3_text", "phi3")
# Exported graph vs transformers (fp32): the bound; seen ~1e-5.
TOLERANCE = 1e-4
# Fused vs plain export (fp32): GroupQueryAttention / fused norms sum in another order; seen <4e-5.
FUSED_TOLERANCE = 1e-4
WINDOW = 8
# Prefill 20 (past the window), 16 one-token decodes, then a 5-token chunk on the cache.
CHUNKS = (20, *([1] * 16), 5)
# phi3: the same, prefilling 50 so that the decodes cross the LongRoPE switch at 64 positions.
LONGROPE_CHUNKS = (50, *([1] * 16), 5)


def _ids(length: int, seed: int = 0) -> list[int]:
    # Ids 3.. avoid the tiny tokenizer's special tokens.
    return np.random.default_rng(seed).integers(3, 300, size=length).tolist()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """(checkpoint, validated export) per family, built once."""
    built = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        checkpoint = tiny_checkpoint(family, root / "checkpoint")
        built[family] = checkpoint, export(str(checkpoint), root / "model").path
    return built


@pytest.fixture(scope="module")
def references(family_dirs):
    return {family: transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
            for family, (checkpoint, _) in family_dirs.items()}


def _chunks(family: str) -> tuple[int, ...]:
    return LONGROPE_CHUNKS if family == "phi3" else CHUNKS


def _hf_cached_logits(model, ids: list[int], chunks: tuple[int, ...]) -> np.ndarray:
    """transformers' own forward chunk by chunk on its cache (prefill, decode, multi-token)."""
    cache = transformers.DynamicCache(config=model.config)
    outputs, start = [], 0
    with torch.no_grad():
        for size in chunks:
            chunk = torch.tensor([ids[start:start + size]])
            outputs.append(model(input_ids=chunk, cache=cache, use_cache=True).logits[0].numpy())
            start += size
    return np.concatenate(outputs)


def _ort_logits(model_path: pathlib.Path, ids: list[int], chunks: tuple[int, ...]) -> np.ndarray:
    decoder, outputs, start = Decoder(model_path), [], 0
    for size in chunks:
        outputs.append(decoder.forward(ids[start:start + size]))
        start += size
    return np.concatenate(outputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_prefill_decode_and_chunk_on_cache(family_dirs, references, family):
    chunks = _chunks(family)
    ids = _ids(sum(chunks))
    ours = _ort_logits(family_dirs[family][1] / "model.onnx", ids, chunks)
    reference = _hf_cached_logits(references[family], ids, chunks)
    prefill = chunks[0]
    assert np.abs(ours[:prefill] - reference[:prefill]).max() < TOLERANCE
    assert np.abs(ours[prefill:-5] - reference[prefill:-5]).max() < TOLERANCE
    assert np.abs(ours[-5:] - reference[-5:]).max() < TOLERANCE


def test_gemma3_sliding_window_is_applied_past_the_window(family_dirs, references):
    """Past the window the sliding layers see only the last 8 keys: full attention would give other logits."""
    ids = _ids(sum(CHUNKS))
    with torch.no_grad():
        full_forward = references["gemma3_text"](torch.tensor([ids])).logits[0].numpy()
    ours = _ort_logits(family_dirs["gemma3_text"][1] / "model.onnx", ids, CHUNKS)
    assert np.abs(ours - full_forward).max() < TOLERANCE
    wide = transformers.AutoModelForCausalLM.from_pretrained(family_dirs["gemma3_text"][0], sliding_window=64).eval()
    with torch.no_grad():
        unwindowed = wide(torch.tensor([ids])).logits[0].numpy()
    # Identical while the context fits the window, different beyond it.
    assert np.abs(unwindowed[:WINDOW] - full_forward[:WINDOW]).max() < TOLERANCE
    assert np.abs(unwindowed[WINDOW:] - full_forward[WINDOW:]).max() > 1e-2


def test_phi3_longrope_switches_to_the_long_factors(family_dirs, references):
    """A 70-token prefill (past original_max_position_embeddings 64) uses the long factors, as transformers."""
    ids = _ids(70, seed=1)
    with torch.no_grad():
        reference = references["phi3"](torch.tensor([ids])).logits[0].numpy()
    decoder = Decoder(family_dirs["phi3"][1] / "model.onnx")
    ours = decoder.forward(ids)
    assert np.abs(ours - reference).max() < TOLERANCE
    decoder.reset()
    # The first 64 positions alone stay on the short factors, so they differ from the long prefill.
    assert np.abs(decoder.forward(ids[:64]) - reference[:64]).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_32_greedy_tokens_equal_transformers(family_dirs, references, family):
    # phi3: 50 + 32 tokens cross the LongRoPE switch, where transformers' generate recomputes the cache.
    prompt = _ids(50 if family == "phi3" else 20, seed=7)
    expected = checkpoint_lib.greedy_tokens(references[family], prompt, 32)
    assert len(set(expected)) >= 8  # a varied sequence, not one token repeated
    result = Generator(family_dirs[family][1]).generate(prompt, max_new_tokens=32, stop_on_eos=False)
    assert result.token_ids == expected
    figures = ModelDir.open(family_dirs[family][1]).manifest.lineage[-1].figures
    assert figures["greedy_steps_agreeing"] == 32 and figures["greedy_numerical_ties"] == 0


@pytest.fixture(scope="module")
def fused_dirs(family_dirs, tmp_path_factory):
    built = {}

    def get(family: str, target: str) -> pathlib.Path:
        if (family, target) not in built:
            output = tmp_path_factory.mktemp("fused") / f"{family}-{target}"
            fuse(family_dirs[family][1], output, target, require=True, tolerance=FUSED_TOLERANCE)
            built[family, target] = output
        return built[family, target]

    return get


def _ops(path: pathlib.Path) -> collections.Counter:
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


EXPECTED_OPS = {
    # 3 layers; q/k norms are SimplifiedLayerNormalization on the heads. RoPE is gone (no Neg); the
    # Cos ops left compute GroupQueryAttention's tables: local and global bases (Gemma 3), short and
    # long factors (Phi-3's LongRoPE).
    ("gemma3_text", "cpu"): {"GroupQueryAttention": 3, "FastGelu": 3, "Softmax": 0, "Tanh": 0, "Cos": 2, "Neg": 0},
    ("gemma3_text", "onnx"): {"Attention": 3, "RotaryEmbedding": 6, "Gelu": 3, "Softmax": 0, "Neg": 0},
    ("phi3", "cpu"): {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4, "Softmax": 0, "Cos": 2,
                      "Neg": 0, "Expand": 0},
    # The LongRoPE attention factor scales cos/sin, which onnxscript's RotaryEmbedding rule does not
    # take: RoPE stays written out for the onnx target (attention is fused).
    ("phi3", "onnx"): {"Attention": 2, "RMSNormalization": 5, "Softmax": 0, "RotaryEmbedding": 0},
}


@pytest.mark.parametrize("target", ["cpu", "onnx"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_fused_and_agrees_with_the_plain_export(family_dirs, fused_dirs, family, target):
    path = fused_dirs(family, target)
    ops = _ops(path)
    for op, count in EXPECTED_OPS[family, target].items():
        assert ops[op] == count, (op, ops)
    chunks = _chunks(family)
    ids = _ids(sum(chunks), seed=3)
    splits = tuple(np.cumsum(chunks)[:-1])
    plain = chunked_logits(family_dirs[family][1] / "model.onnx", "disable", ids, splits)
    fused = chunked_logits(path / "model.onnx", "all", ids, splits)
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, fused)) < FUSED_TOLERANCE


def test_gemma3_gqa_carries_each_layers_window_and_rope_base(fused_dirs):
    model = onnx.load(str(fused_dirs("gemma3_text", "cpu") / "model.onnx"), load_external_data=False)
    nodes = [node for node in model.graph.node if node.op_type == "GroupQueryAttention"]
    windows = [next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "local_window_size"), None)
               for node in nodes]
    assert sorted(windows, key=str) == sorted([WINDOW, None, WINDOW], key=str)
    local = {node.input[7] for node, window in zip(nodes, windows) if window}
    global_ = {node.input[7] for node, window in zip(nodes, windows) if not window}
    assert len(local) == len(global_) == 1 and local != global_  # two cos caches: local and global bases


def test_phi3_gqa_switches_longrope_caches(fused_dirs):
    model = onnx.load(str(fused_dirs("phi3", "cpu") / "model.onnx"), load_external_data=False)
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in (node for node in model.graph.node if node.op_type == "GroupQueryAttention"):
        where = producers[node.input[7]]
        assert where.op_type == "Where"
        assert producers[where.input[1]].op_type == producers[where.input[2]].op_type == "Mul"  # cos x factor
    stored = graph_ir.load(fused_dirs("phi3", "cpu") / "model.onnx")
    assert store_rotary_tables(stored) == 4  # cos and sin, short and long
    where = next(node for node in stored.graph if node.op_type == "Where" and node.inputs[1].const_value is not None)
    assert where.inputs[1].shape == where.inputs[2].shape == ir.Shape([256, 8])  # partial: rotary_dim 16 of 32
    # The switch reads position_ids, so the static cache keeps feeding them (gemma3_text's graph does not).
    assert ModelDir.open(fused_dirs("phi3", "cpu")).manifest.fusion["reads_position_ids"] is True
    assert ModelDir.open(fused_dirs("gemma3_text", "cpu")).manifest.fusion["reads_position_ids"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_weight_only_runs_close_to_float(family_dirs, family, tmp_path):
    ids = _ids(24, seed=4)
    reference = Decoder(family_dirs[family][1] / "model.onnx").forward(ids)
    result = quantize(family_dirs[family][1], tmp_path / "int8", QuantizeConfig(activations="none"))
    ops = _ops(result.path)
    assert ops["MatMulNBits"] + ops["MatMulInteger"] + ops["DequantizeLinear"] > 0
    quantized = Decoder(result.model_path).forward(ids)
    error = np.sqrt(np.mean((quantized - reference) ** 2)) / np.sqrt(np.mean(reference**2))
    assert error < 0.10


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_defaults_on_fused_families(fused_dirs, family_dirs, family, tmp_path):
    """W8A8's defaults on each fused family: rotated where the pass takes the graph (Phi-3), left
    unrotated with the reason where it does not (Gemma 3's norms on q/k heads and around each block)."""
    ids = _ids(24, seed=5)
    reference = Decoder(family_dirs[family][1] / "model.onnx").forward(ids)
    config = QuantizeConfig(activations="int8", calib=CalibrationSpec(samples=3, seq_len=24))
    result = quantize(fused_dirs(family, "cpu"), tmp_path / "w8a8", config)
    figures = result.manifest.lineage[-1].figures
    assert ("rotated" in figures) == (family == "phi3") and ("rotation_skipped" in figures) == (family == "gemma3_text")
    quantized = Decoder(result.model_path).forward(ids)
    error = np.sqrt(np.mean((quantized - reference) ** 2)) / np.sqrt(np.mean(reference**2))
    assert error < 0.15  # the W8A8 bound of tests/test_quantize.py


@pytest.fixture(scope="module")
def pruned_dirs(family_dirs, tmp_path_factory):
    """A quarter of the heads (gemma3_text: through the per-head q/k norms; phi3: from the packed qkv_proj)
    and of the MLP channels (phi3: from the packed gate_up_proj), and one layer removed. Random importance."""
    return {family: prune(path, tmp_path_factory.mktemp("pruned") / family, heads=0.25, channels=0.25, layers=1,
                          importance="random").path
            for family, (_, path) in family_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_variant_runs(family_dirs, pruned_dirs, family):
    source, pruned = ModelDir.open(family_dirs[family][1]).manifest, ModelDir.open(pruned_dirs[family]).manifest
    assert pruned.layers == source.layers - 1
    assert sum(pruned.heads_per_layer()) < sum(source.heads_per_layer()[:-1])
    assert sum(pruned.intermediate_per_layer()) < sum(source.intermediate_per_layer()[:-1])
    ids = _ids(sum(CHUNKS), seed=5)
    logits = _ort_logits(pruned_dirs[family] / "model.onnx", ids, CHUNKS)
    assert logits.shape == (len(ids), source.vocab_size) and np.isfinite(logits).all()
    result = Generator(pruned_dirs[family]).generate(_ids(20, seed=6), max_new_tokens=8, stop_on_eos=False)
    assert len(result.token_ids) == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_equals_plain(family_dirs, tmp_path, family):
    target = family_dirs[family][1]
    draft = build_recipe(ModelDir.open(target), tmp_path / "draft", "half-layers").path
    # phi3's 50-token prompt crosses the LongRoPE switch within 24 tokens (the target's cache is recomputed).
    for prompt in (_ids(20, seed=7), _ids(50, seed=7)):
        expected = Generator(target).generate(prompt, max_new_tokens=24, stop_on_eos=False).token_ids
        for gamma in (1, 4):
            speculative = SpeculativeGenerator(target, draft, gamma=gamma, fallback=False)
            assert speculative.generate(prompt, max_new_tokens=24, stop_on_eos=False).token_ids == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_distill_refuses_these_families(family_dirs, family):
    from graphopt.student import StudentError, load_student

    recorded = ModelDir.open(family_dirs[family][1]).manifest.family  # "gemma3" / "phi3"
    # The message lists the supported families (Llama and others), then names this one.
    with pytest.raises(StudentError, match=rf"distill supports the llama.* not '{recorded}'"):
        load_student(family_dirs[family][1])


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as raised:
        adapter_for("gemma2")
    message = str(raised.value)
    assert "'gemma2'" in message and "gemma3_text" in message and "phi3" in message and "\n" not in message


@pytest.mark.parametrize("family", FAMILIES)
def test_channel_pruning_equals_silencing_those_channels(family_dirs, family, tmp_path):
    """Removing MLP channels (phi3: from both halves of the packed gate_up_proj, then its Split) computes
    what the source computes with those channels' rows of down_proj zeroed."""
    import onnx_ir as ir

    from graphopt import ir as graph_io
    from graphopt.pruning import Plan, apply_plan

    source = ModelDir.open(family_dirs[family][1])
    size = source.manifest.intermediate_size
    kept = {0: list(range(0, size, 3)), 1: list(range(size // 2))}
    pruned = apply_plan(source, Plan(channels=kept), tmp_path / "pruned")
    assert pruned.manifest.intermediate_per_layer()[:2] == [len(kept[0]), len(kept[1])]
    model = graph_io.load(source.model_path)
    for layer, channels in kept.items():
        weight = model.graph.initializers[f"model.layers.{layer}.mlp.down_proj.weight"]
        array = weight.const_value.numpy().copy()
        array[sorted(set(range(size)) - set(channels))] = 0.0
        weight.const_value = ir.tensor(array, name=weight.name)
    graph_io.save(model, tmp_path / "silenced.onnx")
    ids = _ids(sum(CHUNKS), seed=9)
    expected = _ort_logits(tmp_path / "silenced.onnx", ids, CHUNKS)
    assert np.abs(_ort_logits(pruned.model_path, ids, CHUNKS) - expected).max() < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_head_pruning_equals_silencing_those_heads(family_dirs, family, tmp_path):
    """Removing heads (phi3: from the packed qkv_proj and its three Slices) computes exactly what the
    source computes with those heads' rows of o_proj zeroed. Layer 0 keeps one head per KV group
    (both KV heads stay), layer 1 keeps one group (a KV head goes)."""
    import onnx_ir as ir

    from graphopt import ir as graph_io
    from graphopt.pruning import Plan, apply_plan

    source = ModelDir.open(family_dirs[family][1])
    kept = {0: [0, 2], 1: [0, 1]}  # 4 heads in 2 KV groups of 2
    pruned = apply_plan(source, Plan(heads=kept), tmp_path / "pruned")
    assert pruned.manifest.heads_per_layer()[:2] == [2, 2] and pruned.manifest.kv_heads_per_layer()[:2] == [2, 1]
    model = graph_io.load(source.model_path)
    head_dim = source.manifest.head_dim
    for layer, heads in kept.items():
        weight = model.graph.initializers[f"model.layers.{layer}.self_attn.o_proj.weight"]
        array = weight.const_value.numpy().copy()
        for head in set(range(4)) - set(heads):
            array[head * head_dim:(head + 1) * head_dim] = 0.0
        weight.const_value = ir.tensor(array, name=weight.name)
    graph_io.save(model, tmp_path / "silenced.onnx")
    ids = _ids(sum(CHUNKS), seed=8)
    expected = _ort_logits(tmp_path / "silenced.onnx", ids, CHUNKS)
    assert np.abs(_ort_logits(pruned.model_path, ids, CHUNKS) - expected).max() < TOLERANCE
