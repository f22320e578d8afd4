"""`graphopt eval`: perplexity equals a PyTorch computation on the tiny model; agreement; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.evaluate import DEFAULT_TEXT, evaluate, text_windows

WINDOW = 64


def torch_perplexity(checkpoint, text: str, window: int, max_windows: int) -> tuple[float, int]:
    """The same protocol written in PyTorch: windows of window+1 tokens every window tokens, no cache carried."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in text_windows(ids, window, max_windows):
            tokens = torch.tensor(chunk)[None]
            logprobs = torch.log_softmax(model(tokens[:, :-1]).logits.double(), dim=-1)[0]
            total -= logprobs[torch.arange(window), tokens[0, 1:]].sum().item()
            count += window
    return float(np.exp(total / count)), count


def test_perplexity_equals_pytorch(tiny_llama_dir, checkpoints):
    result = evaluate(tiny_llama_dir, DEFAULT_TEXT, window=WINDOW, max_windows=3)
    expected, tokens = torch_perplexity(checkpoints["llama"], DEFAULT_TEXT.read_text(), WINDOW, 3)
    assert (result.tokens, result.windows) == (tokens, 3)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)  # float32 ORT vs float32 torch logits


def test_reference_against_itself_agrees(tiny_llama_dir):
    result = evaluate(tiny_llama_dir, DEFAULT_TEXT, window=WINDOW, reference_dir=tiny_llama_dir, max_windows=1)
    assert result.token_agreement == 1.0 and result.mean_kl == pytest.approx(0.0, abs=1e-9)


def test_cli_json_and_bad_input(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(tiny_llama_dir), "--window", str(WINDOW), "--max-windows", "2", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["tokens"] == 2 * WINDOW and figures["perplexity"] > 1
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary")
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    for text, message in ((binary, "binary"), (short, "too short"), (tmp_path / "missing.txt", "no such file")):
        failed = runner.invoke(main, ["eval", str(tiny_llama_dir), "--text", str(text)])
        assert failed.exit_code == 2 and message in failed.output, failed.output
