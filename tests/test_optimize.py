"""`graphopt optimize`: recipes as data, a recipe end to end on a tiny checkpoint, bad input, atomic output."""

from __future__ import annotations

import json
import pathlib
import types
import warnings

import pytest
from click.testing import CliRunner

from graphopt import optimize as optimize_lib
from graphopt import recipes
from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.modeldir import ModelDir
from graphopt.recipes import Recipe, Stage

# Four windows of 64 tokens: on one, a tiny random model's perplexity moves by a few percent with
# any change of rounding (the int8 target's rotation), which the recipes' 5% check would read as loss.
FAST = ("--eval-windows", "4", "--window", "64", "--tokens", "8")


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_one_line_error(result, fragment: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output


def leftovers(parent: pathlib.Path) -> list[str]:
    return [path.name for path in parent.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_recipe_is_ordered_and_binds(name):
    recipe = recipes.RECIPES[name]
    recipes.check_order(recipe)
    recipes.check_parameters(recipe)
    assert recipe.stages[0].kind == "export"


def test_order_violation_is_refused_with_its_reason():
    # Near miss of cpu-int8: quantize before fuse (fusion matches float subgraphs only).
    bad = Recipe("bad", "", "cpu", (Stage("export"), Stage("quantize", {"weights": "int8", "activations": "none"}),
                                     Stage("fuse", {"target": "cpu"})))
    with pytest.raises(GraphoptError, match="fuse must come before quantize"):
        recipes.check_order(bad)
    early = Recipe("early", "", "cpu", (Stage("export"), Stage("validate"), Stage("fuse", {"target": "cpu"})))
    with pytest.raises(GraphoptError, match="validate must follow"):
        recipes.check_order(early)


def test_misspelt_stage_parameter_fails_before_any_work(tmp_path, monkeypatch):
    bad = Recipe("typo", "", "cpu", (Stage("export"), Stage("fuse", {"targett": "cpu"})))
    monkeypatch.setitem(recipes.RECIPES, "typo", bad)
    result = run("optimize", tmp_path / "nowhere", "-o", tmp_path / "out", "--recipe", "typo")
    assert_one_line_error(result, "stage fuse(targett=cpu): unknown parameter 'targett'")
    assert not (tmp_path / "out").exists()


def test_bad_recipe_name_and_bad_option_are_one_line_errors(tmp_path):
    assert_one_line_error(run("optimize", "-o", tmp_path / "out", "--recipe", "cpu-int3"), "unknown recipe 'cpu-int3'")
    assert_one_line_error(run("optimize", "-o", tmp_path / "out", "--tokens", "0"), "--tokens")
    assert_one_line_error(run("optimize", "-o", tmp_path / "out", "--bogus"), "--bogus")
    assert not (tmp_path / "out").exists()


def test_list_recipes_names_every_recipe_and_its_stages():
    result = run("optimize", "--list-recipes")
    assert result.exit_code == 0, result.output
    for name in recipes.RECIPES:
        assert name in result.output
    assert "export() -> fuse(target=cpu, require=True, tolerance=0.01) -> quantize(" in result.output


def test_cpu_int8_end_to_end_from_a_tiny_checkpoint(checkpoints, tmp_path):
    """Every stage of cpu-int8 (export, fuse, quantize, validate, draft), the references and the peer."""
    out = tmp_path / "out"
    result = run("optimize", checkpoints["llama"], "-o", out, "--recipe", "cpu-int8", "--with-peers", "--keep-draft",
                 *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == ["draft", "report.json", "report.md", "report.png", "target"]
    assert leftovers(tmp_path) == []
    target, draft = ModelDir.open(out / "target"), ModelDir.open(out / "draft")
    assert [step.name for step in target.manifest.lineage] == ["export", "fuse", "quantize"]
    assert target.manifest.extra["optimize"]["recipe"] == "cpu-int8"
    assert draft.manifest.extra["draft_recipe"] == "int4"
    report = json.loads((out / "report.json").read_text())
    labels = [row["label"] for row in report["rows"]]
    assert labels == ["export", "fuse", "quantize", "draft (int4)", "target + draft (speculative)",
                      "transformers generate (fp32)", "ORT quantize_dynamic (int8)"]
    rows = {row["label"]: row for row in report["rows"]}
    for label in ("export", "fuse", "quantize"):
        assert rows[label]["decode_tokens_per_s"] > 0 and rows[label]["perplexity"] > 1
    assert rows["export"]["token_agreement"] == 1.0
    # Fusion is exact, so the fused model scores the text as the export does.
    assert rows["fuse"]["perplexity"] == pytest.approx(rows["export"]["perplexity"], rel=1e-4)
    # PyTorch on the checkpoint scores the same windows: the export's perplexity within float noise.
    assert rows["transformers generate (fp32)"]["perplexity"] == pytest.approx(rows["export"]["perplexity"], rel=1e-3)
    assert rows["target + draft (speculative)"]["identical_to_target_greedy"] is True
    assert rows["target + draft (speculative)"]["first_divergence"] is None
    assert "packed: q/k/v into GroupQueryAttention" in rows["quantize"]["notes"]  # 211-style counts are pre-packing
    assert rows["quantize"]["size_bytes"] < rows["export"]["size_bytes"]
    assert "| quantize |" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 10_000
    # Answers kept: the target's greedy answers to the validate prompts against the export's, 8 tokens each.
    validate = next(stage for stage in report["stages"] if stage["stage"].startswith("validate"))
    assert 0 <= validate["figures"]["answers_kept"] <= 8


def test_a_draft_slower_than_its_target_is_reported_not_written(checkpoints, tmp_path, monkeypatch):
    measure_pair = optimize_lib.measure_pair

    def slow_pair(*args, **kwargs):
        return {**measure_pair(*args, **kwargs), "decode_tokens_per_s": 0.01}

    monkeypatch.setattr(optimize_lib, "measure_pair", slow_pair)
    out = tmp_path / "out"
    result = run("optimize", checkpoints["llama"], "-o", out, "--recipe", "cpu-int8", "--no-reference", *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == ["report.json", "report.md", "report.png", "target"]
    rows = {row["label"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["target + draft (speculative)"]["draft_shipped"] is False
    assert "draft/ not written" in (out / "report.md").read_text()


def test_interrupted_stage_leaves_no_half_written_output(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "target").mkdir(parents=True)
    (out / "report.json").write_text("{}")  # a previous optimize output: what --force may replace

    class Interrupted(recipes.QuantizeStep):
        def run(self, *arguments):
            raise KeyboardInterrupt

    monkeypatch.setitem(recipes.STEPS, "quantize", Interrupted())
    with pytest.raises(KeyboardInterrupt):
        optimize_lib.optimize(str(tiny_llama_dir), out, "cpu-int8", force=True,
                              settings=optimize_lib.MeasureSettings(tokens=4, eval_windows=1, window=32))
    assert sorted(path.name for path in out.iterdir()) == ["report.json", "target"]
    assert leftovers(tmp_path) == []


def test_failed_validation_exits_2_and_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    # Fusion changes no token, so an int8 target is what must fail a bound of no perplexity increase.
    strict = Recipe("strict", "", "cpu", (Stage("export"), Stage("fuse", {"target": "cpu"}),
                                          Stage("quantize", {"weights": "int4", "activations": "none"}),
                                          Stage("validate", {"min_token_agreement": 0.0, "max_perplexity_increase": -50.0})))
    monkeypatch.setitem(recipes.RECIPES, "strict", strict)
    result = run("optimize", tiny_llama_dir, "-o", tmp_path / "out", "--recipe", "strict", *FAST)
    assert_one_line_error(result, "perplexity increase over the recipe's -50.0%")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_answers_kept_below_the_bound_fails_validation(tiny_llama_dir, tmp_path, monkeypatch):
    """A bound above the answer length (8 tokens with FAST) cannot be met: the answers are measured and checked."""
    strict = Recipe("strict", "", "cpu", (Stage("export"), Stage("fuse", {"target": "cpu"}),
                                          Stage("validate", {"min_token_agreement": 0.0, "min_answers_kept": 9})))
    monkeypatch.setitem(recipes.RECIPES, "strict", strict)
    result = run("optimize", tiny_llama_dir, "-o", tmp_path / "out", "--recipe", "strict", *FAST)
    assert_one_line_error(result, "answers kept 8.0 tokens; answers kept below the recipe's 9 tokens")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_answers_kept_counts_the_first_differing_token(tiny_llama_dir, monkeypatch):
    """Mean over the prompts of the first index where the answers differ; an answer equal to the end counts whole."""
    settings = optimize_lib.MeasureSettings(tokens=6)
    directory = ModelDir.open(tiny_llama_dir)
    assert optimize_lib.answers_kept(directory, directory, settings) == 6
    monkeypatch.setattr(optimize_lib, "ANSWER_PROMPTS", ("a", "b"))
    answers = iter([[1, 2, 3, 4, 5, 6], [1, 9, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])

    class Scripted:
        def __init__(self, path, ep):
            pass

        def encode_prompt(self, prompt, chat):
            return [0]

        def generate(self, ids, max_new_tokens, stop_on_eos):
            return types.SimpleNamespace(token_ids=next(answers))

    monkeypatch.setattr("graphopt.runtime.Generator", Scripted)
    assert optimize_lib.answers_kept(directory, directory, settings) == (6 + 1) / 2


def test_existing_output_needs_force(tiny_llama_dir, tmp_path):
    (tmp_path / "out").mkdir()
    assert_one_line_error(run("optimize", tiny_llama_dir, "-o", tmp_path / "out"), "already exists")


def test_tensorrt_without_its_libraries_is_one_clear_warning(monkeypatch):
    from graphopt.runtime import session

    monkeypatch.setattr(session, "tensorrt_missing_library", lambda: "libnvinfer.so.10")
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        providers = session.resolve_providers("tensorrt", available=available)
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    [warning] = caught
    message = str(warning.message)
    assert "TensorRT libraries not found (libnvinfer.so.10)" in message and "\n" not in message
    # This CPU-only onnxruntime has no TensorRT provider at all: the generic one-line fallback.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert session.resolve_providers("tensorrt", available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not available" in str(caught[0].message)


@pytest.mark.slow
def test_smollm2_cpu_int8_passes_its_validation_and_answers(smollm2_dir, tmp_path):
    from graphopt.runtime import Generator

    out = tmp_path / "out"
    result = run("optimize", smollm2_dir, "-o", out, "--recipe", "cpu-int8", "--no-reference", "--eval-windows", "1",
                 "--tokens", "16")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    validate = next(stage for stage in report["stages"] if stage["stage"].startswith("validate"))
    assert validate["figures"]["token_agreement"] >= 0.9
    answer = Generator(out / "target").generate_text("What is the capital of France?", chat=True, max_new_tokens=24)
    assert answer.token_ids and answer.provider == "CPUExecutionProvider"
    rows = {row["label"]: row for row in report["rows"]}
    # An int8 target's speculative output may leave its greedy output (multi-token verify rounding,
    # README): the report must say where, or that it does not.
    pair = rows["target + draft (speculative)"]
    if pair["identical_to_target_greedy"]:
        assert pair["first_divergence"] is None and "identical to the target's greedy: yes" in pair["notes"]
    else:
        assert 0 <= pair["first_divergence"] < 16 and f"from token {pair['first_divergence']} of 16" in pair["notes"]
    assert (out / "draft").is_dir() == pair["draft_shipped"]
    assert "packed: q/k/v into GroupQueryAttention" in rows["quantize"]["notes"]  # 211-style counts are pre-packing


@pytest.mark.parametrize("stage, message", [
    (Stage("quantize", {"weights": "int4", "activations": "none", "block_size": 7}), "--block-size must be one of"),
    (Stage("fuse", {"target": "gpu"}), "unknown fusion target 'gpu'"),
    (Stage("prune", {"params": 1.5}), "--params must be a fraction"),
    (Stage("validate", {"min_answers_kept": -1}), "min_answers_kept is a number of tokens of at least 0"),
])
def test_bad_value_in_a_recipe_fails_before_any_work(tmp_path, monkeypatch, stage, message):
    """Every parameter is validated by its config type, so a bad value fails in a second, not after export."""
    bad = Recipe("bad", "", "cpu", (Stage("export"), stage))
    monkeypatch.setitem(recipes.RECIPES, "bad", bad)
    result = run("optimize", tmp_path / "nowhere", "-o", tmp_path / "out", "--recipe", "bad")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_first_divergence():
    assert optimize_lib._first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert optimize_lib._first_divergence([1, 2, 4], [1, 2, 3]) == 2
    assert optimize_lib._first_divergence([1, 2], [1, 2, 3]) == 2
    assert optimize_lib.kept_tokens([1, 2, 3], [1, 2, 3]) == 3 and optimize_lib.kept_tokens([1, 2, 4], [1, 2, 3]) == 2


def test_cuda_recipe_ships_no_draft_its_measurement_rejected():
    """The cuda-fp16 draft (int4, no CUDA graph) lost to its own target on an H200: the recipe builds none."""
    from graphopt.recipes import get_recipe

    assert "draft" not in [stage.kind for stage in get_recipe("cuda-fp16").stages]
