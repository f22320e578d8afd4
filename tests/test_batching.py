"""Continuous batching: every sequence of a batch decodes exactly what it decodes alone.

The reference is graphopt's single-sequence ``Generator`` (static cache, batch 1). Arrivals are
staged with ``BatchEngine.step`` so that requests join while others decode, take slots freed by
finished ones, sit below running ones (dummy rows) and are cancelled midway.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from graphopt.errors import GraphoptError
from graphopt.convert import convert
from graphopt.fusion import fuse
from graphopt.quantization import QuantizeConfig, quantize
from graphopt.runtime import Generator, Sampling
from graphopt.runtime.batching import (BatchEngine, BatchRequest, EngineClosedError, PromptTooLongError,
                                       QueueFullError, _held_back)


@pytest.fixture(scope="module")
def fused_llama_dir(tiny_llama_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("batching") / "fused"
    fuse(tiny_llama_dir, output, "cpu", require=True)
    return output


@pytest.fixture(scope="module")
def int8_llama_dir(fused_llama_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("batching") / "int8"
    quantize(fused_llama_dir, output, QuantizeConfig(weights="int8", activations="none"))
    return output


@pytest.fixture(scope="module")
def fp16_llama_dir(fused_llama_dir, tmp_path_factory):
    """float16 with float32 logits: the served graph's last-token slice and argmax go before the head's Cast."""
    return convert(fused_llama_dir, tmp_path_factory.mktemp("batching") / "fp16").path


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=int(length)).tolist() for length in rng.integers(2, 40, size=count)]


@pytest.mark.parametrize("fixed", [False, True], ids=["busy-rows", "fixed-step"])
@pytest.mark.parametrize("directory", ["fused_llama_dir", "int8_llama_dir", "fp16_llama_dir"])
def test_batched_greedy_equals_alone_with_staggered_arrivals_and_a_cancellation(request, directory, fixed):
    """fixed-step: every slot every step through fixed buffers, the step a CUDA GPU captures as a graph
    (on the CPU the same bindings run without one)."""
    model_dir = request.getfixturevalue(directory)
    generator = Generator(model_dir)
    prompts = _prompts(7)
    lengths = [24, 9, 30, 16, 5, 20, 12]
    alone = [generator.generate(prompt, max_new_tokens=count).token_ids for prompt, count in zip(prompts, lengths)]
    engine = BatchEngine(model_dir, max_batch=3, context=96)
    assert engine._greedy_output  # the served graph has the argmax (float16 too)
    if fixed:
        engine._fix_step(graph=False)
    sequences = {}

    def submit(index):
        sequences[index] = engine.submit(BatchRequest(tuple(prompts[index]), lengths[index]))

    submit(0)
    engine.step()
    engine.step()
    submit(1)
    submit(2)
    submit(3)  # waits: three slots are taken
    for _ in range(10):  # 1 finishes (9 tokens) and frees slot 1 for 3, while 0 and 2 decode on
        engine.step()
    assert sequences[1].finish_reason == "length" and sequences[3].slot == 1
    assert sequences[0].finish_reason is None and sequences[2].finish_reason is None
    submit(4)
    submit(5)
    engine.step()
    # cancel 2 in the middle of its decoding; 4 takes its slot, 5 waits.
    engine.cancel(sequences[2])
    engine.step()
    assert sequences[2].finish_reason == "cancelled"
    submit(6)
    engine.run_until_idle()
    assert engine.batch_size == 0 and engine.queue_depth == 0
    for index, sequence in sequences.items():
        if index == 2:
            assert 0 < len(sequence.token_ids) < lengths[2]
            assert sequence.token_ids == alone[2][:len(sequence.token_ids)]
            continue
        assert sequence.finish_reason in ("stop", "length")
        assert sequence.token_ids == alone[index], f"sequence {index} in slot {sequence.slot}"
    # Slots were reused and some steps ran with free rows below busy ones.
    assert {sequence.slot for sequence in sequences.values()} == {0, 1, 2}


def test_engine_thread_serves_concurrent_submissions(fused_llama_dir):
    generator = Generator(fused_llama_dir)
    prompts = _prompts(6, seed=1)
    alone = [generator.generate(prompt, max_new_tokens=20).token_ids for prompt in prompts]
    engine = BatchEngine(fused_llama_dir, max_batch=4, context=96).start()
    events = {index: [] for index in range(len(prompts))}
    sequences = [None] * len(prompts)

    def client(index):
        sequences[index] = engine.submit(BatchRequest(tuple(prompts[index]), 20), events[index].append)
        sequences[index].wait(60)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    engine.shutdown(timeout=30)
    for index, sequence in enumerate(sequences):
        assert sequence.token_ids == alone[index]
        assert [event.token_id for event in events[index][:-1]] == alone[index]
        assert events[index][-1].finish_reason in ("stop", "length")
        assert "".join(event.text for event in events[index]) == generator.tokenizer.decode(alone[index])


def test_sampling_is_per_request_and_seeded(fused_llama_dir):
    """A seeded request samples the same tokens alone and beside other requests, like Generator does."""
    generator = Generator(fused_llama_dir)
    prompt = _prompts(1, seed=2)[0]
    sampling = Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=7)
    expected = generator.generate(prompt, max_new_tokens=16, sampling=sampling).token_ids
    engine = BatchEngine(fused_llama_dir, max_batch=3, context=96)
    others = [BatchRequest(tuple(other), 16, Sampling(temperature=1.0, seed=seed))
              for seed, other in enumerate(_prompts(2, seed=3))]
    batch = engine.generate([others[0], BatchRequest(tuple(prompt), 16, sampling), others[1]])
    assert batch[1].token_ids == expected
    assert batch[0].token_ids != batch[2].token_ids


def test_stop_strings_end_the_text_before_them(fused_llama_dir):
    engine = BatchEngine(fused_llama_dir, max_batch=2, context=96)
    prompt = tuple(_prompts(1, seed=4)[0])
    free = engine.generate([BatchRequest(prompt, 24, stop_on_eos=False)])[0]
    text = engine.tokenizer.decode(free.token_ids)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    events = []
    sequence = engine.submit(BatchRequest(prompt, 24, stop=(stop,), stop_on_eos=False), events.append)
    engine.run_until_idle()
    assert sequence.finish_reason == "stop"
    assert sequence.text == text[:text.index(stop)]
    assert "".join(event.text for event in events) == sequence.text
    assert len(sequence.token_ids) < 24


def test_held_back_text_is_a_stop_prefix():
    assert _held_back("hello wor", ("world",)) == 3
    assert _held_back("hello", ("xyz",)) == 0
    assert _held_back("ab", ("abc", "b!")) == 2


def test_limits_are_typed_errors(fused_llama_dir, tiny_llama_dir):
    engine = BatchEngine(fused_llama_dir, max_batch=1, max_queue=1, context=32)
    with pytest.raises(PromptTooLongError, match="context is 32"):
        engine.submit(BatchRequest(tuple(range(3, 30)), 8))
    first = engine.submit(BatchRequest((5, 6, 7), 4))
    engine.submit(BatchRequest((5, 6, 7), 4))  # the one slot is free: not counted as queued
    with pytest.raises(QueueFullError):
        engine.submit(BatchRequest((5, 6, 7), 4))
    engine.shutdown(cancel=True)
    assert first.finish_reason == "cancelled" and engine.idle()
    with pytest.raises(EngineClosedError):
        engine.submit(BatchRequest((5, 6, 7), 4))
    with pytest.raises(GraphoptError, match="GroupQueryAttention"):
        BatchEngine(tiny_llama_dir)


@pytest.mark.parametrize("directory", ["fused_llama_dir", "int8_llama_dir"])
def test_chunked_prefill_and_prefix_reuse_decode_what_alone_decodes(request, directory):
    """Prompts enter in 4-token pieces between decode steps (one of them in a slot below a decoding
    one, so dummies are written into a half-entered prompt), and reuse the previous prompt's positions
    (a shared opening, a repeated prompt): every sequence still decodes what it decodes alone."""
    model_dir = request.getfixturevalue(directory)
    generator = Generator(model_dir)
    rng = np.random.default_rng(5)
    opening = rng.integers(3, 300, size=12).tolist()
    prompts = [opening + rng.integers(3, 300, size=int(size)).tolist() for size in (9, 17, 3, 25)]
    prompts.append(list(prompts[1]))  # the same prompt again
    prompts.append(rng.integers(3, 300, size=30).tolist())  # nothing shared
    lengths = [20, 14, 18, 9, 12, 10]
    alone = [generator.generate(prompt, max_new_tokens=count).token_ids for prompt, count in zip(prompts, lengths)]
    engine = BatchEngine(model_dir, max_batch=3, context=96, prefill_chunk=4, prefix_cache=64)
    sequences = {}

    def submit(index):
        sequences[index] = engine.submit(BatchRequest(tuple(prompts[index]), lengths[index]))

    submit(0)
    engine.step()  # nothing decodes yet: prompt 0 enters whole
    assert engine.stats.prefill_chunks == 1 and sequences[0].token_ids
    submit(1)
    submit(2)
    engine.step()  # 0 decodes; 1 reuses the opening and enters 4 tokens, 2 waits for the budget
    assert engine.stats.prefix_reused_tokens >= 12
    assert not sequences[1].token_ids and sequences[1].prefilled == 12 + 4
    for _ in range(3):
        engine.step()
    engine.cancel(sequences[0])  # frees slot 0 below the prompts still entering
    engine.step()
    submit(3)  # takes slot 0, enters in pieces while 1 and 2 decode above it
    submit(4)
    submit(5)
    engine.run_until_idle()
    assert engine.batch_size == 0 and engine.queue_depth == 0
    assert engine.stats.prefill_chunks > engine.stats.prefills >= 5
    assert sequences[4].finish_reason in ("stop", "length")
    for index, sequence in sequences.items():
        if index == 0:
            assert sequence.token_ids == alone[0][:len(sequence.token_ids)]
            continue
        assert sequence.token_ids == alone[index], f"sequence {index} in slot {sequence.slot}"
    # Right after itself, a prompt reuses everything but its last two tokens (a one-token piece would
    # take GroupQueryAttention's one-token path, which rounds differently from `generate`'s prefill).
    engine.generate([BatchRequest(tuple(prompts[4]), 1)])
    reused = engine.stats.prefix_reused_tokens
    again = engine.generate([BatchRequest(tuple(prompts[4]), lengths[4])])[0]
    assert engine.stats.prefix_reused_tokens - reused == len(prompts[4]) - 2
    assert again.token_ids == alone[4]


def test_whole_prompts_without_chunks_or_reuse_still_agree(fused_llama_dir):
    generator = Generator(fused_llama_dir)
    prompts = _prompts(4, seed=9)
    alone = [generator.generate(prompt, max_new_tokens=12).token_ids for prompt in prompts]
    engine = BatchEngine(fused_llama_dir, max_batch=2, context=96, prefill_chunk=0, prefix_cache=0)
    batch = engine.generate([BatchRequest(tuple(prompt), 12) for prompt in prompts])
    assert [sequence.token_ids for sequence in batch] == alone
    assert engine.stats.prefix_reused_tokens == 0 and engine.stats.prefill_chunks == engine.stats.prefills == 4


@pytest.mark.parametrize("fixed", [False, True], ids=["busy-rows", "fixed-step"])
def test_greedy_steps_take_the_graphs_argmax_and_mixed_steps_the_logits(fused_llama_dir, fixed):
    """The served graph carries ``next_token``: all-greedy steps read it, a step with a sampled row reads
    the logits; a greedy request decodes the same either way, beside a sampled one and after it ends."""
    generator = Generator(fused_llama_dir)
    greedy_prompt, sampled_prompt = _prompts(2, seed=5)
    sampling = Sampling(temperature=0.8, seed=3)
    expected_greedy = generator.generate(greedy_prompt, max_new_tokens=20).token_ids
    expected_sampled = generator.generate(sampled_prompt, max_new_tokens=6, sampling=sampling).token_ids
    engine = BatchEngine(fused_llama_dir, max_batch=3, context=96)
    assert engine._greedy_output
    if fixed:
        engine._fix_step(graph=False)
    greedy, sampled = engine.generate([BatchRequest(tuple(greedy_prompt), 20),
                                       BatchRequest(tuple(sampled_prompt), 6, sampling)])
    assert greedy.token_ids == expected_greedy
    assert sampled.token_ids == expected_sampled
    if not fixed:
        assert {greedy for _, greedy in engine._decode_bindings} == {True, False}


def _llama_style_tokenizer():
    """A SentencePiece-like tokenizer (Metaspace, byte fallback, a leading space stripped), as Llama 2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += ["\u2581", *"abcdefghij .,!", "\u2581a", "\u2581the", "he", "ll", "o\u2581"]
    tokenizer = Tokenizer(models.BPE(vocab={piece: index for index, piece in enumerate(pieces)}, merges=[],
                                     unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return tokenizer


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_text_stream_is_the_decoded_text(fused_llama_dir, style):
    """Token by token, ``TextStream.text`` equals decoding every id so far wherever that decode ends in a
    whole character (it ends in U+FFFD while a character's bytes are still arriving). Byte-level: random ids
    (special tokens, lone and invalid bytes). SentencePiece: valid text (its byte fallback replaces a whole
    run of byte pieces when any of it is invalid, so random bytes decode differently by context for any
    reader) with special tokens between words."""
    from graphopt.runtime.tokenizer import TextStream, Tokenizer

    rng = np.random.default_rng(0)
    if style == "byte-level":
        raw = Tokenizer(fused_llama_dir)._tokenizer
        sequences = [rng.integers(0, raw.get_vocab_size(), size=60).tolist() for _ in range(40)]
    else:
        raw = _llama_style_tokenizer()
        words = ["the", "hello", "café", "naïve", "你好", "世界", "🙂", "abc", "—", "!"]
        sequences = []
        for _ in range(40):
            ids = []
            for word in rng.choice(words, size=12):
                ids += raw.encode(" " + str(word)).ids + ([raw.token_to_id("</s>")] if rng.random() < 0.2 else [])
            sequences.append(ids)
    held = 0
    for ids in sequences:
        stream = TextStream(raw)
        for count, token in enumerate(ids, 1):
            text = stream.push(token)
            decoded = raw.decode(ids[:count], skip_special_tokens=True)
            if decoded.endswith("\ufffd"):
                held += 1
            else:
                assert text == decoded, (ids[:count], text, decoded)
        assert raw.decode(ids, skip_special_tokens=True).startswith(stream.text)
    assert held > 0  # characters were split across ids

