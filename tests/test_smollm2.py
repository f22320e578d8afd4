"""End to end on the real SmolLM2-135M-Instruct: fetch, export (validated), chat, match transformers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.modeldir import ModelDir

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


def test_fetch_is_cached_and_verified(graphopt_home, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_HOME", str(graphopt_home))
    runner = CliRunner()
    fetched = runner.invoke(main, ["fetch", "smollm2-135m"])
    assert fetched.exit_code == 0, fetched.output
    path = fetched.output.strip().splitlines()[-1]
    assert path.endswith(".gguf") and path.startswith(str(graphopt_home))

    def no_download(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr("graphopt.sources.subprocess.run", no_download)
    again = runner.invoke(main, ["fetch", "smollm2-135m"])
    assert again.exit_code == 0 and again.output.strip().splitlines()[-1] == path


def test_export_validated_against_pytorch(smollm2_dir):
    manifest = ModelDir.open(smollm2_dir).manifest
    assert (manifest.layers, manifest.heads, manifest.kv_heads, manifest.head_dim) == (30, 9, 3, 64)
    figures = manifest.lineage[0].figures
    assert figures["greedy_steps_agreeing"] == 32
    assert max(value for key, value in figures.items() if key.startswith("max_abs")) < figures["tolerance"]


def test_chat_answer_names_paris(smollm2_dir):
    result = CliRunner().invoke(main, ["generate", str(smollm2_dir), "--prompt", QUESTION, "--chat",
                                       "--max-new-tokens", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert "Paris" in json.loads(result.output)["text"]


def test_greedy_tokens_match_transformers_generate(smollm2_dir):
    from graphopt.checkpoint import greedy_tokens, load
    from graphopt.runtime import Generator

    generator = Generator(smollm2_dir)
    prompt_ids = generator.encode_prompt(QUESTION, chat=True)
    ours = generator.generate(prompt_ids, max_new_tokens=32, stop_on_eos=False).token_ids
    theirs = greedy_tokens(load("smollm2-135m").model, prompt_ids, 32)
    assert ours == theirs
