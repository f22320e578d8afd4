"""Static KV cache: fixed buffers shared by past and present (the CUDA-graph layout), checked on CPU.

The CUDA graph replay itself needs a GPU (tools/gpu_check.py); everything it rests on runs here:
GroupQueryAttention writing in place into shared buffers, the fixed one-token binding updated in
place, growth, rollback, and the choice of decoder.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.convert import convert
from graphopt.errors import GraphoptError
from graphopt.fusion import fuse
from graphopt.modeldir import ModelDir
from graphopt.runtime import Decoder, Generator, resolve_providers
from graphopt.runtime.device import DeviceDecoder, open_decoder
from graphopt.runtime.speculative import SpeculativeGenerator
from graphopt.runtime.static_cache import CAPACITY_STEP, StaticCacheDecoder, runs_whole_on_cuda
from graphopt.testing import tiny_checkpoint

# Same kernels, same summation order: the static cache changes where keys live, not the math.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def fused_llama_dir(tiny_llama_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("static") / "fused"
    fuse(tiny_llama_dir, output, "cpu", require=True)
    return output


@pytest.fixture(scope="module")
def packed_qwen2_dir(tiny_qwen2_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("static") / "packed"
    fuse(tiny_qwen2_dir, output, "cuda", require=True, pack_qkv=True)
    return output


def _close(a, b) -> None:
    np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("directory", ["fused_llama_dir", "packed_qwen2_dir"])
def test_static_cache_matches_the_growing_cache(request, directory):
    """Prefill, steps across a growth of the buffers, multi-token on the cache, rollback, steps again."""
    path = ModelDir.open(request.getfixturevalue(directory)).model_path
    growing, static = Decoder(path), StaticCacheDecoder(path, ep="cpu", capacity=4)
    ids = np.random.default_rng(0).integers(0, 300, size=40).tolist()
    _close(growing.forward(ids[:3]), static.forward(ids[:3]))
    assert static.capacity == 4
    _close(growing.forward(ids[3:5]), static.forward(ids[3:5]))  # grows, keeping the 3 held tokens
    assert static.capacity == CAPACITY_STEP
    for token in ids[5:20]:
        _close(growing.forward([token]), static.forward([token]))
    for decoder in (growing, static):
        decoder.truncate(9)
    assert static.length == 9
    _close(growing.forward(ids[20:24]), static.forward(ids[20:24]))
    for token in ids[24:30]:
        _close(growing.forward([token]), static.forward([token]))
    for decoder in (growing, static):
        decoder.reset()
    _close(growing.forward(ids[30:]), static.forward(ids[30:]))


def test_positions_are_not_fed_where_no_node_reads_them(fused_llama_dir):
    """Fusion records whether the graph reads position_ids (GroupQueryAttention takes positions from the
    mask); the static cache then leaves their buffer alone, with the same logits as one that feeds them."""
    directory = ModelDir.open(fused_llama_dir)
    assert directory.manifest.fusion["reads_position_ids"] is False
    feeding = directory.manifest.replace(fusion={**directory.manifest.fusion, "reads_position_ids": True})
    skipping, fed = (StaticCacheDecoder(directory.model_path, ep="cpu", capacity=16, manifest=manifest)
                     for manifest in (directory.manifest, feeding))
    ids = np.random.default_rng(3).integers(0, 300, size=12).tolist()
    _close(fed.forward(ids[:4]), skipping.forward(ids[:4]))
    for token in ids[4:]:
        _close(fed.forward([token]), skipping.forward([token]))
    assert not skipping._bindings[1]["positions"].numpy().any()
    assert fed._bindings[1]["positions"].numpy()[0, 0] == 11


def test_warm_up_leaves_what_the_cache_holds(fused_llama_dir):
    """The throwaway steps that capture a CUDA graph (run here on CPU) write past the held tokens only."""
    path = ModelDir.open(fused_llama_dir).model_path
    growing, static = Decoder(path), StaticCacheDecoder(path, ep="cpu", capacity=16)
    static.warm_up()  # on an empty cache
    _close(growing.forward([11]), static.forward([11]))  # a one-token prompt takes the step path
    _close(growing.forward([12, 13, 14]), static.forward([12, 13, 14]))
    static.warm_up()  # with 4 tokens held
    assert static.length == 4
    held = [static.forward([token]) for token in (15, 16, 17)]
    # Logits handed out stay the caller's: the next step writes the bound buffer, not them.
    for token, logits in zip((15, 16, 17), held):
        _close(growing.forward([token]), logits)


def test_static_cache_writes_in_place_into_its_own_buffers(fused_llama_dir):
    """The one-token step leaves its keys in the bound buffer: past and present share memory."""
    decoder = StaticCacheDecoder(ModelDir.open(fused_llama_dir).model_path, ep="cpu", capacity=16)
    decoder.forward([5, 6, 7])
    before = decoder._cache[0].numpy().copy()
    decoder.forward([8])
    after = decoder._cache[0].numpy()
    assert not np.any(before[:, :, :3] != after[:, :, :3])
    assert np.any(after[:, :, 3] != 0) and not np.any(after[:, :, 4:])


def test_generator_picks_the_static_cache_and_keeps_greedy_tokens(fused_llama_dir, tiny_llama_dir):
    static, host = Generator(fused_llama_dir), Generator(fused_llama_dir, cache="host")
    assert isinstance(static.decoder, StaticCacheDecoder) and type(host.decoder) is Decoder
    assert type(Generator(tiny_llama_dir).decoder) is Decoder  # unfused: no GroupQueryAttention
    prompt = [3, 17, 42, 99, 7]
    tokens = static.generate(prompt, max_new_tokens=200, stop_on_eos=False).token_ids
    assert tokens == host.generate(prompt, max_new_tokens=200, stop_on_eos=False).token_ids
    assert static.decoder.capacity >= len(prompt) + 200


def test_static_cache_is_refused_without_group_query_attention(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    with pytest.raises(GraphoptError, match="graphopt fuse --target cuda"):
        Generator(tiny_llama_dir, cache="static")
    fused_gpt2 = tmp_path / "gpt2"
    fuse(tiny_gpt2_dir, fused_gpt2, "cpu", require=True)  # MultiHeadAttention: no shared buffer
    assert isinstance(Generator(fused_gpt2).decoder, Decoder)
    assert not isinstance(Generator(fused_gpt2).decoder, StaticCacheDecoder)
    result = CliRunner().invoke(main, ["generate", str(tiny_llama_dir), "--prompt", "hi", "--cache", "static"])
    assert result.exit_code == 2 and "GroupQueryAttention" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_static_cache_stops_at_the_models_positions(fused_llama_dir):
    decoder = StaticCacheDecoder(ModelDir.open(fused_llama_dir).model_path, ep="cpu")
    limit = decoder.max_positions
    decoder.reserve(10 * limit)  # a hint: clamped to what the rotary tables cover
    assert decoder.capacity == limit
    decoder.forward(list(range(limit - 1)))
    decoder.forward([1])
    with pytest.raises(GraphoptError, match=f"exceed the model's {limit}"):
        decoder.forward([2])


def test_cuda_graph_is_a_cuda_provider_option_and_ignored_on_cpu(fused_llama_dir):
    providers = resolve_providers("cuda", available=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                  cuda_graph=True)
    assert providers == [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert resolve_providers("cuda", available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    decoder = open_decoder(ModelDir.open(fused_llama_dir).model_path, ep="cpu", cache="static", cuda_graph=True)
    assert isinstance(decoder, StaticCacheDecoder) and not decoder.cuda_graph
    assert isinstance(open_decoder(ModelDir.open(fused_llama_dir).model_path, cache="device"), DeviceDecoder)


def test_cuda_graphs_are_only_tried_for_float16_graphs(fused_llama_dir, tmp_path):
    """A float32 GroupQueryAttention has no CUDA kernel, so it would sit on the CPU and forbid capture."""
    half = tmp_path / "fp16"
    convert(fused_llama_dir, half, dtype="fp16")
    assert not runs_whole_on_cuda(ModelDir.open(fused_llama_dir).manifest)
    assert runs_whole_on_cuda(ModelDir.open(half).manifest)
    growing, static = Decoder(ModelDir.open(half).model_path), Generator(half).decoder
    assert isinstance(static, StaticCacheDecoder) and static.cache_dtype == np.float16
    ids = [5, 9, 31, 2, 77]
    _close(growing.forward(ids), static.forward(ids))
    _close(growing.forward([4]), static.forward([4]))


def test_speculative_greedy_on_static_caches_is_plain_greedy(fused_llama_dir, tmp_path):
    """Rollback of a static cache is a shorter mask: a draft that rarely agrees exercises it."""
    draft = tmp_path / "draft"
    from graphopt.export import export

    export(str(tiny_checkpoint("llama", tmp_path / "checkpoint", seed=1)), tmp_path / "draft-plain")
    fuse(tmp_path / "draft-plain", draft, "cpu", require=True)
    plain = Generator(fused_llama_dir, cache="host")
    prompt = [3, 17, 42, 99, 7]
    expected = plain.generate(prompt, max_new_tokens=60, stop_on_eos=False).token_ids
    for candidate in (draft, fused_llama_dir):
        speculative = SpeculativeGenerator(fused_llama_dir, candidate, gamma=3, fallback=False)
        assert isinstance(speculative.target.decoder, StaticCacheDecoder)
        assert isinstance(speculative.draft.decoder, StaticCacheDecoder)
        result = speculative.generate(prompt, max_new_tokens=60, stop_on_eos=False)
        assert result.token_ids == expected


def test_pack_qkv_fuses_one_projection_per_layer_and_is_recorded(packed_qwen2_dir, tiny_qwen2_dir, tmp_path):
    model = onnx.load(str(packed_qwen2_dir / "model.onnx"), load_external_data=False)
    histogram = collections.Counter(node.op_type for node in model.graph.node)
    layers = ModelDir.open(packed_qwen2_dir).manifest.layers
    # Per layer: packed qkv, o, gate, up, down; plus the LM head.
    assert histogram["GroupQueryAttention"] == layers and histogram["MatMul"] == 5 * layers + 1
    lineage = json.loads((packed_qwen2_dir / "graphopt.json").read_text())["lineage"][-1]
    assert lineage["parameters"]["pack_qkv"] is True
    with pytest.raises(GraphoptError, match="GroupQueryAttention"):
        fuse(tiny_qwen2_dir, tmp_path / "onnx", "onnx", pack_qkv=True)
    result = CliRunner().invoke(main, ["fuse", str(tiny_qwen2_dir), "-o", str(tmp_path / "cli"), "--target", "cpu",
                                       "--pack-qkv"])
    assert result.exit_code == 0, result.output
    assert "GroupQueryAttention: " in result.output


def test_multi_token_bindings_match_the_eager_forward(fused_llama_dir):
    """Forwards of 2..graph_tokens tokens on a non-empty cache run through fixed bindings (the CUDA-graph
    layout of speculative verify) and give the growing cache's logits, across growth and rollback."""
    path = ModelDir.open(fused_llama_dir).model_path
    growing, static = Decoder(path), StaticCacheDecoder(path, ep="cpu", capacity=8, graph_tokens=4)
    assert static.graphed_lengths == [1, 2, 3, 4]
    ids = np.random.default_rng(1).integers(0, 300, size=40).tolist()
    _close(growing.forward(ids[:3]), static.forward(ids[:3]))  # first prompt: eager path
    for start, stop in ((3, 7), (7, 9), (9, 12), (12, 13), (13, 17)):  # 4 tokens at 13 grows past 8
        _close(growing.forward(ids[start:stop]), static.forward(ids[start:stop]))
    assert static.capacity > 8
    growing.truncate(14)
    static.truncate(14)
    _close(growing.forward(ids[14:17]), static.forward(ids[14:17]))
    _close(growing.forward(ids[17:22]), static.forward(ids[17:22]))  # 5 tokens: eager, past graph_tokens


def test_warm_up_drops_a_multi_token_graph_that_disagrees(fused_llama_dir):
    """A captured graph is checked against the eager forward; a wrong one is dropped, that length runs eagerly."""
    path = ModelDir.open(fused_llama_dir).model_path
    reference = Decoder(path)
    decoder = StaticCacheDecoder(path, ep="cpu", graph_tokens=3)
    honest = decoder._run_fixed

    def broken(fixed, ids, start, greedy=False):
        logits = honest(fixed, ids, start, greedy)
        return logits + 5.0 * (ids.shape[1] == 3) * np.eye(1, logits.shape[-1], 7)

    decoder._run_fixed = broken
    with pytest.warns(UserWarning, match="3-token graph"):
        decoder.warm_up()
    assert decoder.graphed_lengths == [1, 2] and decoder.length == 0
    decoder._run_fixed = honest
    ids = [5, 6, 7, 8, 9, 10]
    _close(reference.forward(ids[:3]), decoder.forward(ids[:3]))
    _close(reference.forward(ids[3:6]), decoder.forward(ids[3:6]))
    decoder.reserve(2 * CAPACITY_STEP)  # the refusal outlives a regrowth
    assert decoder.graphed_lengths == [1, 2]


def test_graph_tokens_must_be_positive(fused_llama_dir):
    with pytest.raises(ValueError, match="graph_tokens"):
        StaticCacheDecoder(ModelDir.open(fused_llama_dir).model_path, ep="cpu", graph_tokens=0)


def test_speculative_builds_verify_bindings_on_static_caches(fused_llama_dir):
    generator = SpeculativeGenerator(fused_llama_dir, fused_llama_dir, gamma=3, cache="static")
    assert generator.target.decoder.graphed_lengths == [1, 2, 3, 4]
    assert generator.draft.decoder.graphed_lengths == [1, 2]
    plain = Generator(fused_llama_dir).generate([5, 6, 7], max_new_tokens=20, stop_on_eos=False)
    assert generator.generate([5, 6, 7], max_new_tokens=20, stop_on_eos=False).token_ids == plain.token_ids


def test_greedy_head_gives_the_argmax_without_the_logits(fused_llama_dir, tmp_path):
    """next_token = ArgMax(logits) in the graph; the static cache's forward_greedy reads it, on every path."""
    from graphopt.passes.greedy_head import AddGreedyHead, write_with_greedy_head
    import onnx_ir as ir

    headed = tmp_path / "headed"
    write_with_greedy_head(fused_llama_dir, headed)
    model = ir.load(headed / "model.onnx")
    assert [value.name for value in model.graph.outputs][-1] == "next_token"
    assert not AddGreedyHead()(model).modified  # already there
    plain = StaticCacheDecoder(ModelDir.open(fused_llama_dir).model_path, ep="cpu", graph_tokens=3)
    greedy = StaticCacheDecoder(ModelDir.open(headed).model_path, ep="cpu", graph_tokens=3)
    assert greedy.greedy_output and not plain.greedy_output
    ids = np.random.default_rng(2).integers(0, 300, size=12).tolist()
    for start, stop in ((0, 4), (4, 5), (5, 7), (7, 10), (10, 11)):  # eager prompt, step, 2, 3 (bindings), step
        expected = plain.forward(ids[start:stop]).argmax(-1)
        np.testing.assert_array_equal(greedy.forward_greedy(ids[start:stop]), expected)
    # One-token steps write their argmax into their own input buffer: the next greedy step needs no copy.
    step = greedy._bindings[1]
    assert step["tokens"] is step["ids"]
    token = int(greedy.forward_greedy([int(ids[11])])[-1])
    assert step["holds"] == token == int(step["ids"].numpy()[0, 0])
    expected = plain.forward([int(ids[11])]).argmax(-1)[-1]
    assert token == expected and int(greedy.forward_greedy([token])[-1]) == plain.forward([token]).argmax(-1)[-1]
    greedy.forward([3])
    plain.forward([3])
    assert step["holds"] is None  # a logits step's argmax was not read back: the next step copies its token
    reference = Generator(fused_llama_dir).generate([5, 6, 7], max_new_tokens=16, stop_on_eos=False)
    assert Generator(headed).generate([5, 6, 7], max_new_tokens=16, stop_on_eos=False).token_ids == reference.token_ids
    speculative = SpeculativeGenerator(headed, headed, gamma=2, cache="static")
    assert speculative.generate([5, 6, 7], max_new_tokens=16, stop_on_eos=False).token_ids == reference.token_ids
