"""The command line: generate/inspect on a tiny model, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner

from graphopt.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_user_error(result, fragment: str):
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def no_partial_outputs(parent: pathlib.Path):
    return not [path for path in parent.iterdir() if path.name.endswith(".partial")]


def test_generate_json_greedy_is_deterministic(tiny_llama_dir):
    first = run("generate", tiny_llama_dir, "--prompt", "The capital of France is", "--max-new-tokens", "12", "--json")
    second = run("generate", tiny_llama_dir, "--prompt", "The capital of France is", "--max-new-tokens", "12", "--json")
    assert first.exit_code == 0, first.output
    payload = json.loads(first.output)
    assert set(payload) >= {"prompt", "text", "token_ids", "prefill_ms", "decode_tokens_per_s", "provider"}
    assert payload["token_ids"] == json.loads(second.output)["token_ids"]
    assert 1 <= len(payload["token_ids"]) <= 12
    assert payload["provider"] == "CPUExecutionProvider"


def test_generate_imports_no_graph_rewriting_stack(tiny_llama_dir):
    """Commands load lazily: `graphopt generate` runs without onnx, onnx_ir, torch or transformers
    (onnx's import alone cost 0.6 s of start-up)."""
    import subprocess
    import sys

    code = (f"import runpy, sys\nsys.argv = ['graphopt', 'generate', {str(tiny_llama_dir)!r}, '--prompt', 'hi', "
            "'--max-new-tokens', '2']\ntry:\n    runpy.run_module('graphopt', run_name='__main__')\n"
            "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
            "print(sorted(name for name in ('onnx', 'onnx_ir', 'torch', 'transformers') if name in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "[]", completed.stdout


def test_generate_sampling_follows_the_seed(tiny_llama_dir):
    options = ["--prompt", "Once", "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--max-new-tokens", "16", "--json"]
    same = [json.loads(run("generate", tiny_llama_dir, *options, "--seed", "7").output)["token_ids"] for _ in range(2)]
    other = json.loads(run("generate", tiny_llama_dir, *options, "--seed", "8").output)["token_ids"]
    assert same[0] == same[1]
    assert other != same[0]


def test_generate_streams_text_with_chat_template(tiny_gpt2_dir):
    result = run("generate", tiny_gpt2_dir, "--prompt", "hello", "--chat", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output


def test_unavailable_provider_falls_back_to_cpu(tiny_llama_dir):
    with pytest.warns(UserWarning, match="falling back to CPUExecutionProvider"):
        result = CliRunner().invoke(main, ["generate", str(tiny_llama_dir), "--prompt", "a", "--ep", "tensorrt",
                                           "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["provider"] == "CPUExecutionProvider"


def test_inspect_shows_ops_and_lineage(tiny_llama_dir):
    result = run("inspect", tiny_llama_dir, "--json")
    summary = json.loads(result.output)
    assert summary["ops"]["MatMul"] > 0 and summary["parameters"] > 0
    assert summary["lineage"][0]["pass"] == "export"


def test_missing_source(tmp_path):
    result = run("export", tmp_path / "nothing-here", "-o", tmp_path / "out")
    assert_user_error(result, "no such file or directory")


def test_directory_that_is_not_a_model(tmp_path):
    assert_user_error(run("generate", tmp_path, "--prompt", "hi"), "not a graphopt model directory")
    assert_user_error(run("inspect", tmp_path / "missing"), "no such directory")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert_user_error(run("export", bad, "-o", tmp_path / "out"), "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    assert_user_error(run("export", truncated, "-o", tmp_path / "out"), "truncated.gguf")
    assert not (tmp_path / "out").exists() and no_partial_outputs(tmp_path)


def test_corrupt_safetensors(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoints["llama"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_user_error(run("export", broken, "-o", tmp_path / "out"), "cannot load the weights")
    assert not (tmp_path / "out").exists() and no_partial_outputs(tmp_path)


def test_unsupported_family(tmp_path):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    (model_dir / "model.safetensors").write_bytes(b"")
    result = run("export", model_dir, "-o", tmp_path / "out")
    assert_user_error(result, "unsupported model type 'bert'")
    assert "llama" in result.output and "gpt2" in result.output


def test_existing_output_needs_force(checkpoints, tiny_llama_dir, tmp_path):
    assert_user_error(run("export", checkpoints["llama"], "-o", tiny_llama_dir), "already exists (use --force")


def test_prompt_longer_than_the_context(tiny_llama_dir):
    result = run("generate", tiny_llama_dir, "--prompt", "token " * 400, "--max-new-tokens", "4")
    assert_user_error(result, "exceeds the model's context of 256")


def test_export_force_replaces_atomically(checkpoints, tmp_path):
    output = tmp_path / "model"
    assert run("export", checkpoints["gpt2"], "-o", output, "--no-validate").exit_code == 0
    marker = output / "marker"
    marker.write_text("old")
    result = run("export", checkpoints["gpt2"], "-o", output, "--force", "--no-validate")
    assert result.exit_code == 0, result.output
    assert not marker.exists() and (output / "model.onnx").is_file() and no_partial_outputs(tmp_path)
