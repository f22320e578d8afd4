"""The draft vocabulary: a head cut to the frequent tokens keeps their logits, and speculative output stays the target's."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.modeldir import ModelDir
from graphopt.passes.draft_vocabulary import RestrictHeadVocabulary, coverage, frequent_tokens
from graphopt.quantization import QuantizeConfig, quantize
from graphopt.runtime import Decoder, Generator
from graphopt.runtime.speculative import SpeculativeGenerator
from graphopt.vocabulary import restrict_vocabulary

PROMPTS = ["The capital of France is", "Numbers such as 0 1 2", "attention, cache, token"]


def test_frequent_tokens_by_count_then_id_with_the_special_ones():
    counts = np.array([0, 5, 5, 9, 0, 1])
    assert frequent_tokens(counts, 3).tolist() == [1, 2, 3]
    assert frequent_tokens(counts, 3, always=[0]).tolist() == [0, 1, 3]
    assert frequent_tokens(counts, 2, always=[4]).tolist() == [3, 4]
    assert coverage(counts, np.array([1, 3])) == pytest.approx(14 / 20)
    with pytest.raises(GraphoptError, match="1 to 6"):
        frequent_tokens(counts, 7)


@pytest.fixture(scope="module")
def counts_file(tiny_llama_dir, tmp_path_factory):
    """Counts that favour the tokens the tiny target itself generates, so its draft is accepted often."""
    plain = Generator(tiny_llama_dir)
    vocab = plain.manifest.vocab_size
    counts = np.zeros(vocab, dtype=np.int64)
    for prompt in PROMPTS:
        for token in plain.generate(plain.encode_prompt(prompt), 24, stop_on_eos=False).token_ids:
            counts[token] += 1
    path = tmp_path_factory.mktemp("counts") / "counts.npy"
    np.save(path, counts)
    return path


@pytest.fixture(scope="module")
def cut_dir(tiny_llama_dir, counts_file, tmp_path_factory):
    return restrict_vocabulary(tiny_llama_dir, tmp_path_factory.mktemp("vocab") / "cut",
                               size=ModelDir.open(tiny_llama_dir).manifest.vocab_size // 4, counts=str(counts_file))


def test_the_head_becomes_a_kept_matmul_scattered_into_the_vocabulary(tiny_llama_dir, cut_dir):
    import onnx

    before = ir.load(tiny_llama_dir / "model.onnx")
    after = ir.load(cut_dir.output.model_path)
    added = collections.Counter(node.op_type for node in after.graph) - collections.Counter(
        node.op_type for node in before.graph)
    assert added == {"ScatterElements": 1, "Expand": 2, "Shape": 2, "Concat": 1}
    logits = next(value for value in after.graph.outputs if value.name == "logits")
    assert logits.producer().op_type == "ScatterElements"
    assert logits.producer().metadata_props["graphopt.rule"] == "draft_vocabulary"
    onnx.checker.check_model(str(cut_dir.output.model_path), full_check=True)


def test_a_head_that_is_not_a_float_matmul_is_refused_with_the_reason(tiny_llama_dir):
    model = ir.load(tiny_llama_dir / "model.onnx")
    producer = next(value for value in model.graph.outputs if value.name == "logits").producer()
    producer.op_type, producer.domain = "MatMulNBits", "com.microsoft"  # as a quantized head reads
    with pytest.raises(GraphoptError, match="comes from MatMulNBits, not a float MatMul"):
        RestrictHeadVocabulary([0, 1, 2])(model)


def test_kept_logits_equal_and_the_rest_are_never_chosen(tiny_llama_dir, cut_dir):
    keep = ir.load(cut_dir.output.model_path).graph.initializers["draft_vocabulary.ids"].const_value.numpy()
    vocab = cut_dir.output.manifest.vocab_size
    assert len(keep) == vocab // 4 and cut_dir.step.figures["kept"] == len(keep)
    dropped = np.setdiff1d(np.arange(vocab), keep)
    ids = np.random.default_rng(3).integers(0, vocab, size=10).tolist()
    for reference, candidate in zip(*(Decoder(path).forward(ids) for path in (tiny_llama_dir / "model.onnx",
                                                                                   cut_dir.output.model_path))):
        assert candidate.shape == reference.shape
        np.testing.assert_allclose(candidate[..., keep], reference[..., keep], atol=1e-5, rtol=0)
        assert (candidate[..., dropped] == np.finfo(np.float32).min).all()
        best_kept = keep[np.argmax(reference[..., keep], axis=-1)]
        assert (np.argmax(candidate, axis=-1) == best_kept).all()
    assert cut_dir.step.figures["max_abs_logits_diff_kept"] <= 1e-4
    assert cut_dir.output.manifest.lineage[-1].name == "vocabulary"


@pytest.mark.parametrize("gamma", ["auto", 3])
def test_speculative_output_is_the_target_s_with_a_cut_draft(tiny_llama_dir, cut_dir, gamma):
    plain = Generator(tiny_llama_dir)
    speculative = SpeculativeGenerator(tiny_llama_dir, cut_dir.output.path, gamma=gamma, fallback=False)
    accepted = 0
    for prompt in PROMPTS:
        prompt_ids = plain.encode_prompt(prompt)
        expected = plain.generate(prompt_ids, 24, stop_on_eos=False).token_ids
        result = speculative.generate(prompt_ids, 24, stop_on_eos=False)
        assert list(result.token_ids) == list(expected)
        accepted += result.extra["draft_tokens_accepted"]
    assert accepted > 0  # the target itself, cut to the tokens it generates, is accepted


def test_a_cut_draft_quantizes_and_a_second_cut_or_a_quantized_head_is_refused(tiny_llama_dir, cut_dir, tmp_path):
    quantized = quantize(cut_dir.output.path, tmp_path / "int8", QuantizeConfig(weights="int8", activations="none"))
    assert quantized.manifest.quantization
    with pytest.raises(GraphoptError, match="quantized"):
        restrict_vocabulary(quantized.path, tmp_path / "again", size=8)
    model = ir.load(cut_dir.output.model_path)
    assert not RestrictHeadVocabulary([0, 1])(model).modified  # its logits come from the cut already
    whole = restrict_vocabulary(tiny_llama_dir, tmp_path / "whole", size=10**6)  # as many as there are: no change
    assert whole.step.figures["kept"] == whole.output.manifest.vocab_size and not whole.step.modified


def test_cli_samples_counts_when_none_are_given(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(main, ["vocabulary", str(tiny_llama_dir), "-o", str(tmp_path / "cut"), "--size", "64",
                                       "--sample-tokens", "256"])
    assert result.exit_code == 0, result.output
    step = json.loads((tmp_path / "cut" / "graphopt.json").read_text())["lineage"][-1]
    assert step["pass"] == "vocabulary" and step["figures"]["counted_tokens"] == 256 and step["figures"]["kept"] == 64
    bad = CliRunner().invoke(main, ["vocabulary", str(tiny_llama_dir), "-o", str(tmp_path / "bad"), "--counts",
                                    str(tmp_path / "missing.npy")])
    assert bad.exit_code != 0 and "does not exist" in bad.output and not (tmp_path / "bad").exists()
