"""Speculative decoding: greedy output identical to plain greedy, sampled output distributed like
the target's, caches rolled back exactly, mismatched drafts refused, drafts built by recipe."""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.drafting import build_recipe
from graphopt.pruning import layers_to_drop
from graphopt.errors import GraphoptError
from graphopt.export import export
from graphopt.modeldir import ModelDir
from graphopt.runtime import Decoder, Generator, Sampling
from graphopt.runtime.sampling import probabilities
from graphopt.runtime.speculative import CostCheck, SpeculativeGenerator
from graphopt.testing import tiny_checkpoint

PROMPTS = ["The capital of France is", "Numbers such as 0 1 2", "A small model answers", "attention, cache, token"]
LENGTHS = (1, 2, 3, 7, 40)


@pytest.fixture(scope="module")
def random_draft_dir(tmp_path_factory) -> pathlib.Path:
    """A differently seeded tiny Llama with the same tokenizer: it almost never agrees with the target."""
    root = tmp_path_factory.mktemp("random-draft")
    export(str(tiny_checkpoint("llama", root / "checkpoint", seed=1)), root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def half_draft_dir(tiny_llama_dir, tmp_path_factory) -> pathlib.Path:
    """The target with its second layer dropped (graphopt's PruneLayersPass): agrees some of the time."""
    output = tmp_path_factory.mktemp("half-draft") / "model"
    build_recipe(ModelDir.open(tiny_llama_dir), output, "half-layers")
    return output


@pytest.fixture(scope="module")
def plain(tiny_llama_dir) -> Generator:
    return Generator(tiny_llama_dir)


@pytest.mark.parametrize("draft", ["same", "half", "random"])
@pytest.mark.parametrize("gamma", ["auto", 1, 4])
def test_greedy_is_plain_greedy(plain, tiny_llama_dir, half_draft_dir, random_draft_dir, draft, gamma):
    draft_dir = {"same": tiny_llama_dir, "half": half_draft_dir, "random": random_draft_dir}[draft]
    # fallback=False keeps speculating however badly the draft does, so every path is exercised.
    speculative = SpeculativeGenerator(tiny_llama_dir, draft_dir, gamma=gamma, fallback=False)
    proposed = accepted = 0
    for prompt in PROMPTS:
        prompt_ids = plain.encode_prompt(prompt)
        for length in LENGTHS:
            expected = plain.generate(prompt_ids, max_new_tokens=length)
            result = speculative.generate(prompt_ids, max_new_tokens=length)
            assert result.token_ids == expected.token_ids, (prompt, length)
            assert result.stopped_on_eos == expected.stopped_on_eos
            proposed += result.extra["draft_tokens_proposed"]
            accepted += result.extra["draft_tokens_accepted"]
    rate = accepted / proposed
    if draft == "same":
        assert rate == 1.0
    elif draft == "random":
        assert rate < 0.1
    else:
        assert 0.0 < rate < 1.0


def test_greedy_stops_at_eos_like_plain(plain, tiny_llama_dir, half_draft_dir):
    """EOS inside an accepted run of proposals ends generation there, as plain decoding does."""
    prompt_ids = plain.encode_prompt(PROMPTS[0])
    reference = plain.generate(prompt_ids, max_new_tokens=30).token_ids
    speculative = SpeculativeGenerator(tiny_llama_dir, tiny_llama_dir, gamma=6, fallback=False)
    for position in (0, 1, 5, 12):
        eos = {reference[position]}
        plain.eos_token_ids, speculative.target.eos_token_ids = eos, eos
        try:
            expected = plain.generate(prompt_ids, max_new_tokens=30)
            result = speculative.generate(prompt_ids, max_new_tokens=30)
        finally:
            plain.eos_token_ids = set(plain.manifest.eos_token_ids)
        assert expected.stopped_on_eos and result.stopped_on_eos
        assert result.token_ids == expected.token_ids == reference[:reference.index(reference[position]) + 1]


@pytest.mark.parametrize("length", [3, 9, 24])
def test_rollback_leaves_the_caches_of_a_fresh_prefill(tiny_llama_dir, random_draft_dir, length):
    """After rejections, the target's next logits equal a fresh prefill of the accepted sequence."""
    speculative = SpeculativeGenerator(tiny_llama_dir, random_draft_dir, gamma=3, fallback=False)
    prompt_ids = speculative.encode_prompt(PROMPTS[1])
    result = speculative.generate(prompt_ids, max_new_tokens=length, stop_on_eos=False)
    assert result.extra["draft_tokens_accepted"] < result.extra["draft_tokens_proposed"]  # rejections happened
    sequence = prompt_ids + result.token_ids
    target, draft = speculative.target.decoder, speculative.draft.decoder
    # The target holds everything but the last token; the draft at most that.
    assert target.length == len(sequence) - 1
    assert draft.length <= target.length
    continued = target.forward(sequence[target.length:])[-1]
    fresh = Decoder(ModelDir.open(tiny_llama_dir).model_path).forward(sequence)[-1]
    # fp32: incremental and one-shot attention sum in different orders; 1e-4 absolute on logits of size ~10.
    np.testing.assert_allclose(continued, fresh, atol=1e-4, rtol=0)
    draft_continued = draft.forward(sequence[draft.length:])[-1]
    draft_fresh = Decoder(ModelDir.open(random_draft_dir).model_path).forward(sequence)[-1]
    np.testing.assert_allclose(draft_continued, draft_fresh, atol=1e-4, rtol=0)


def _chi_square_survival(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof), from the series of the lower incomplete gamma."""
    a, x = dof / 2.0, statistic / 2.0
    term = total = 1.0 / a
    n = 0
    while term > 1e-15 * total:
        n += 1
        term *= x / (a + n)
        total += term
    return max(0.0, 1.0 - math.exp(a * math.log(x) - x - math.lgamma(a)) * total)


def _exact_distribution(model_dir, prompt_ids, sampling, depth) -> dict[tuple[int, ...], float]:
    """The target's exact distribution over its first ``depth`` sampled tokens."""
    decoder = Decoder(ModelDir.open(model_dir).model_path)
    exact = {(): 1.0}
    for _ in range(depth):
        extended = {}
        for prefix, mass in exact.items():
            decoder.reset()
            distribution = probabilities(decoder.forward(prompt_ids + list(prefix))[-1], sampling)
            for token in np.flatnonzero(distribution):
                extended[prefix + (int(token),)] = mass * distribution[token]
        exact = extended
    return exact


@pytest.mark.parametrize("draft", ["half", "random"])
def test_sampling_follows_the_target_distribution(tiny_llama_dir, half_draft_dir, random_draft_dir, draft):
    """Chi-square over 1500 seeds: the first three sampled tokens are distributed as the target's.

    Tokens 2 and 3 go through one speculative step (gamma 2 proposals, then the correction or the
    bonus), so acceptance, the residual norm(max(0, p - q)) and the bonus draw are all tested.
    """
    draft_dir = {"half": half_draft_dir, "random": random_draft_dir}[draft]
    speculative = SpeculativeGenerator(tiny_llama_dir, draft_dir, gamma=2, fallback=False)
    prompt_ids = speculative.encode_prompt(PROMPTS[0])
    sampling = Sampling(temperature=1.5, top_k=3)
    exact = _exact_distribution(tiny_llama_dir, prompt_ids, sampling, depth=3)
    samples = 1500
    counts: dict[tuple[int, ...], int] = {}
    proposed = accepted = 0
    for seed in range(samples):
        result = speculative.generate(prompt_ids, max_new_tokens=3, stop_on_eos=False,
                                      sampling=Sampling(temperature=1.5, top_k=3, seed=seed))
        key = tuple(result.token_ids)
        assert key in exact, f"{key} has probability 0 under the target"
        counts[key] = counts.get(key, 0) + 1
        proposed += result.extra["draft_tokens_proposed"]
        accepted += result.extra["draft_tokens_accepted"]
    assert accepted < proposed  # rejections happened: the residual draw is tested
    if draft == "half":
        assert accepted > 0  # and acceptances (the random draft's top 3 never overlap the target's)
    # Cells expected fewer than 5 times are pooled, as the chi-square approximation needs.
    observed, expected, pooled_observed, pooled_expected = [], [], 0, 0.0
    for key, probability in exact.items():
        if probability * samples >= 5:
            observed.append(counts.get(key, 0))
            expected.append(probability * samples)
        else:
            pooled_observed += counts.get(key, 0)
            pooled_expected += probability * samples
    if pooled_expected > 0:
        observed.append(pooled_observed)
        expected.append(pooled_expected)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    p_value = _chi_square_survival(statistic, len(observed) - 1)
    assert len(observed) >= 6
    assert p_value > 1e-3, f"chi-square {statistic:.1f} on {len(observed) - 1} dof, p = {p_value:.2g}"


def test_chi_square_helper_matches_known_values():
    assert _chi_square_survival(3.841, 1) == pytest.approx(0.05, abs=1e-3)
    assert _chi_square_survival(18.307, 10) == pytest.approx(0.05, abs=1e-3)


def test_sampling_with_a_seed_is_reproducible(tiny_llama_dir, half_draft_dir):
    speculative = SpeculativeGenerator(tiny_llama_dir, half_draft_dir, gamma="auto", fallback=False)
    prompt_ids = speculative.encode_prompt(PROMPTS[2])
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=7)
    first = speculative.generate(prompt_ids, max_new_tokens=20, sampling=sampling)
    second = speculative.generate(prompt_ids, max_new_tokens=20, sampling=sampling)
    assert first.token_ids == second.token_ids


def test_fallback_keeps_output_and_stops_speculating_with_a_useless_draft(plain, tiny_llama_dir, random_draft_dir):
    speculative = SpeculativeGenerator(tiny_llama_dir, random_draft_dir, gamma=4)
    prompt_ids = plain.encode_prompt(PROMPTS[0])
    result = speculative.generate(prompt_ids, max_new_tokens=60, stop_on_eos=False)
    assert result.token_ids == plain.generate(prompt_ids, max_new_tokens=60, stop_on_eos=False).token_ids
    # Nothing accepted means each speculative step delivers one token for a draft's work: plain wins.
    assert result.extra["plain_steps"] > 30


def _copy_model(source: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, destination)
    return destination


def test_draft_with_another_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    draft = _copy_model(tiny_llama_dir, tmp_path / "swapped")
    tokenizer = json.loads((draft / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (draft / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GraphoptError, match="different tokenizers"):
        SpeculativeGenerator(tiny_llama_dir, draft)


def test_draft_with_another_vocab_size_is_refused(tiny_llama_dir, tmp_path):
    draft = _copy_model(tiny_llama_dir, tmp_path / "bigger")
    manifest = json.loads((draft / "graphopt.json").read_text())
    manifest["vocab_size"] += 64
    (draft / "graphopt.json").write_text(json.dumps(manifest))
    with pytest.raises(GraphoptError, match="vocab_size"):
        SpeculativeGenerator(tiny_llama_dir, draft)


def test_bad_gamma_is_refused(tiny_llama_dir):
    with pytest.raises(GraphoptError, match="gamma"):
        SpeculativeGenerator(tiny_llama_dir, tiny_llama_dir, gamma=0)


def test_layers_to_drop_keeps_the_ends_or_the_bottom():
    assert layers_to_drop(30, 15, "ends") == set(range(8, 23))
    assert layers_to_drop(30, 15, "first") == set(range(15, 30))
    assert layers_to_drop(2, 1, "ends") == {1}
    with pytest.raises(GraphoptError, match="unknown layer choice"):
        layers_to_drop(4, 2, "middle")


def test_half_layer_draft_runs_and_records_its_lineage(half_draft_dir):
    manifest = ModelDir.open(half_draft_dir).manifest
    assert manifest.layers == 1
    assert manifest.lineage[-1].name == "prune"
    assert manifest.extra["draft_recipe"] == "half-layers"
    import onnx

    onnx.checker.check_model(str(ModelDir.open(half_draft_dir).model_path), full_check=True)
    decoder = Decoder(ModelDir.open(half_draft_dir).model_path)
    assert decoder.forward([1, 2, 3]).shape == (3, manifest.vocab_size)


def test_cli_generate_with_draft_json(tiny_llama_dir, half_draft_dir):
    runner = CliRunner()
    arguments = ["generate", str(tiny_llama_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--json"]
    plain_run = runner.invoke(main, arguments)
    speculative_run = runner.invoke(main, [*arguments, "--draft", str(half_draft_dir), "--gamma", "3"])
    assert plain_run.exit_code == 0 and speculative_run.exit_code == 0, speculative_run.output
    plain_json, speculative_json = json.loads(plain_run.stdout), json.loads(speculative_run.stdout)
    assert speculative_json["token_ids"] == plain_json["token_ids"]
    for field in ("acceptance_rate", "tokens_per_target_call", "decode_tokens_per_s"):
        assert isinstance(speculative_json[field], float)
    assert 0.0 <= speculative_json["acceptance_rate"] <= 1.0
    assert speculative_json["tokens_per_target_call"] >= 1.0


def test_cli_refuses_a_mismatched_draft_and_a_bad_gamma(tiny_llama_dir, tmp_path):
    draft = _copy_model(tiny_llama_dir, tmp_path / "bigger")
    manifest = json.loads((draft / "graphopt.json").read_text())
    manifest["vocab_size"] += 1
    (draft / "graphopt.json").write_text(json.dumps(manifest))
    runner = CliRunner()
    run = runner.invoke(main, ["generate", str(tiny_llama_dir), "--prompt", "x", "--draft", str(draft)])
    assert run.exit_code == 2 and "vocab_size" in run.output
    run = runner.invoke(main, ["generate", str(tiny_llama_dir), "--prompt", "x", "--draft", str(tiny_llama_dir),
                               "--gamma", "zero"])
    assert run.exit_code == 2 and "neither a number nor auto" in run.output


def test_cli_draft_builds_a_recipe(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    output = tmp_path / "draft"
    run = runner.invoke(main, ["draft", str(tiny_llama_dir), "-o", str(output), "--recipe", "half-layers", "--json"])
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert report["recipe"] == "half-layers" and report["lineage"][-1] == "prune"
    assert ModelDir.open(output).manifest.layers == 1
    run = runner.invoke(main, ["draft", str(tiny_llama_dir), "-o", str(output), "--recipe", "half-layers"])
    assert run.exit_code == 2 and "already exists" in run.output


def test_cli_draft_auto_keeps_the_fastest_candidate(tiny_llama_dir, tmp_path):
    from graphopt.drafting import AUTO_CANDIDATES

    run = CliRunner().invoke(main, ["draft", str(tiny_llama_dir), "-o", str(tmp_path / "draft"), "--json",
                                    "--distill-minutes", "0.05"])
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert set(report["candidates"]) == set(AUTO_CANDIDATES) and "distilled" in AUTO_CANDIDATES
    fastest = max(report["candidates"], key=lambda name: report["candidates"][name]["decode_tokens_per_s"])
    assert report["recipe"] == fastest
    assert isinstance(report["beats_plain"], bool)
    manifest = ModelDir.open(tmp_path / "draft").manifest
    assert manifest.extra["draft_recipe"] == fastest and "auto" in manifest.lineage[-1].figures
    assert not list(tmp_path.glob(".*"))  # candidates and scratch directories are gone


def test_distilled_draft_recipe_trains_a_quarter_of_the_layers(tiny_llama_dir, tmp_path):
    """The distilled recipe prunes to a quarter of the layers, distills from the target, cuts the
    head to its frequent tokens, quantizes; a fused target (which cannot be trained) is left out of
    auto instead of failing it."""
    from graphopt.drafting import build_draft

    draft, report = build_draft(tiny_llama_dir, tmp_path / "draft", recipe="distilled", distill_minutes=0.05)
    steps = [step.name for step in draft.manifest.lineage]
    assert steps[-4:] == ["prune", "distill", "vocabulary", "quantize"], steps
    assert draft.manifest.layers == max(1, ModelDir.open(tiny_llama_dir).manifest.layers // 4)
    assert draft.manifest.lineage[-3].figures["tokens"] > 0
    fused = tmp_path / "fused"
    assert CliRunner().invoke(main, ["fuse", str(tiny_llama_dir), "-o", str(fused), "--target", "cpu"]).exit_code == 0
    _, report = build_draft(fused, tmp_path / "auto", distill_minutes=0.05)
    assert "distilled" not in report["candidates"] and set(report["candidates"]) == {"int8", "int4"}


@pytest.mark.slow
def test_smollm2_speculative_greedy_is_plain_greedy(smollm2_dir, tmp_path):
    """SmolLM2-135M target with its int8 draft: identical greedy tokens on real prompts."""
    draft = build_recipe(ModelDir.open(smollm2_dir), tmp_path / "draft", "int8")
    plain = Generator(smollm2_dir)
    speculative = SpeculativeGenerator(smollm2_dir, draft.path, gamma="auto", fallback=False)
    for prompt in ("The capital of France is", "Write a haiku about the sea.", "def quicksort(items):"):
        prompt_ids = plain.encode_prompt(prompt, chat=prompt.startswith("Write"))
        expected = plain.generate(prompt_ids, max_new_tokens=48)
        result = speculative.generate(prompt_ids, max_new_tokens=48)
        assert result.token_ids == expected.token_ids, prompt
        assert result.extra["tokens_per_target_call"] > 1.5  # the int8 draft agrees ~85% of the time


def _measured_check(draft_token_s: float) -> CostCheck:
    """A CostCheck after its plain probes (1 ms a step) and one fully accepted speculative step."""
    check = CostCheck()
    for _ in range(check.probe_steps):
        check.record_plain(0.001)
    assert not check.plain_now()
    check.record_costs(4, 4, draft_s=4 * draft_token_s, verify_s=0.0012)
    check.record_speculative(5, 4 * draft_token_s + 0.0012)
    return check


def test_a_draft_slower_than_the_target_is_dropped_after_one_step():
    """Even always right, a draft at 10 ms a token cannot beat 1 ms plain steps: no window of evidence needed."""
    hopeless = _measured_check(0.010)
    assert hopeless.plain_now() and hopeless._plain_left == hopeless.max_backoff
    # A draft at a fifth of a step can win: one step decides nothing.
    assert not _measured_check(0.0002).plain_now()


@pytest.mark.parametrize("threshold, per_call", [(2.0, 1), (0.0, 12)])
def test_greedy_auto_drafts_while_the_draft_is_confident(plain, tiny_llama_dir, monkeypatch, threshold, per_call):
    """gamma "auto", greedy: one proposal when no chance is enough; up to max_gamma when any is (same model as draft)."""
    from graphopt.runtime import speculative

    monkeypatch.setattr(speculative, "DEFAULT_CONFIDENCE", threshold)
    generator = SpeculativeGenerator(tiny_llama_dir, tiny_llama_dir, gamma="auto", fallback=False, max_gamma=12)
    prompt_ids = plain.encode_prompt(PROMPTS[1])
    result = generator.generate(prompt_ids, max_new_tokens=40, stop_on_eos=False)
    assert result.token_ids == plain.generate(prompt_ids, max_new_tokens=40, stop_on_eos=False).token_ids
    assert result.extra["acceptance_rate"] == 1.0
    # Every call but the last proposes per_call tokens (the last is cut by the budget).
    calls = result.extra["target_calls"]
    assert calls == math.ceil(39 / (per_call + 1))
    assert result.extra["draft_tokens_proposed"] == 39 - calls


def test_keep_drafting_weighs_the_chance_against_measured_costs():
    """After measurement: continue while chance x acceptance x plain step >= draft step + verify slope."""
    check = _measured_check(0.0002)  # plain 1 ms, draft 0.2 ms a token, verify slope 0.05 ms, all accepted
    assert check.keep_drafting(0.3) and not check.keep_drafting(0.2)
    assert CostCheck().keep_drafting(0.3) and not CostCheck().keep_drafting(0.29)  # unmeasured: the default
