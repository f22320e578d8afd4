"""Shared fixtures: tiny seeded checkpoints and their exported model directories (built once per run)."""

from __future__ import annotations

import os
import pathlib

import pytest

from graphopt.export import export
from graphopt.testing import tiny_checkpoint


@pytest.fixture(scope="session")
def load_tool():
    """A script of tools/ imported as a module (tools/ is not a package): ``load_tool("to_ort_format")``."""
    import importlib.util

    tools = pathlib.Path(__file__).resolve().parent.parent / "tools"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, tools / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: tiny_checkpoint(family, root / family) for family in ("llama", "qwen2", "gpt2")}


def _exported(checkpoints, tmp_path_factory, family: str) -> pathlib.Path:
    output = tmp_path_factory.mktemp("exported") / family
    export(str(checkpoints[family]), output)
    return output


@pytest.fixture(scope="session")
def tiny_llama_dir(checkpoints, tmp_path_factory) -> pathlib.Path:
    """An exported, validated tiny Llama (GQA: 4 heads, 2 KV heads, 2 layers) model directory."""
    return _exported(checkpoints, tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(checkpoints, tmp_path_factory) -> pathlib.Path:
    """An exported tiny Qwen2 (q/k/v biases, 4 heads sharing 1 KV head, untied embeddings)."""
    return _exported(checkpoints, tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(checkpoints, tmp_path_factory) -> pathlib.Path:
    """An exported tiny GPT-2 (fused QKV, LayerNorm, learned positions, 2 layers)."""
    return _exported(checkpoints, tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def graphopt_home(tmp_path_factory) -> pathlib.Path:
    """Where the real model is cached: $GRAPHOPT_HOME if set, else a per-run folder."""
    return pathlib.Path(os.environ.get("GRAPHOPT_HOME") or tmp_path_factory.mktemp("graphopt-home"))


@pytest.fixture(scope="session")
def smollm2_dir(graphopt_home, tmp_path_factory) -> pathlib.Path:
    """The real SmolLM2-135M-Instruct, fetched and exported (validated) once per test run.

    ``$GRAPHOPT_SMOLLM2_DIR`` names an existing export to reuse instead (a developer's shortcut;
    CI exports it here). Tests must not modify it: write outputs to their own tmp_path.
    """
    existing = os.environ.get("GRAPHOPT_SMOLLM2_DIR")
    if existing:
        return pathlib.Path(existing)
    from click.testing import CliRunner

    from graphopt.cli import main

    os.environ["GRAPHOPT_HOME"] = str(graphopt_home)
    output = tmp_path_factory.mktemp("smollm2") / "onnx"
    exported = CliRunner().invoke(main, ["export", "smollm2-135m", "-o", str(output)])
    assert exported.exit_code == 0, exported.output
    return output
