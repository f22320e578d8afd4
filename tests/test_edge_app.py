"""Deployment: the ORT-format converter and the example edge app, also in a venv without torch."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from graphopt.runtime import Generator

ROOT = pathlib.Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "edge_app" / "app.py"
PROMPT = "The capital of France is"
# What the app needs at run time, nothing else (markupsafe is jinja2's own dependency).
EDGE_PACKAGES = ("onnxruntime", "numpy", "tokenizers", "jinja2", "markupsafe")


@pytest.fixture(scope="module")
def ort_format_dir(tiny_llama_dir, tmp_path_factory, load_tool):
    output = tmp_path_factory.mktemp("ort") / "llama-ort"
    load_tool("to_ort_format").convert(tiny_llama_dir, output)
    return output


def app_json(python: str, model: pathlib.Path, cwd: pathlib.Path) -> dict:
    completed = subprocess.run([python, str(APP), str(model), "--prompt", PROMPT, "--max-new-tokens", "12", "--json"],
                               capture_output=True, text=True, cwd=cwd, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_ort_format_directory(ort_format_dir):
    manifest = json.loads((ort_format_dir / "graphopt.json").read_text())
    assert manifest["model_file"] == "model.ort"
    assert manifest["lineage"][-1]["pass"] == "to_ort_format"
    assert manifest["lineage"][-1]["figures"]["max_abs_logits_diff"] <= 1e-3
    assert (ort_format_dir / "model.ort").is_file() and (ort_format_dir / "tokenizer.json").is_file()
    assert not list(ort_format_dir.glob("*.data"))  # the ORT format holds its weights itself


def test_app_answers_like_the_generator(tiny_llama_dir, ort_format_dir, tmp_path):
    expected = Generator(tiny_llama_dir).generate_text(PROMPT, chat=True, max_new_tokens=12).text
    assert app_json(sys.executable, tiny_llama_dir, tmp_path)["text"] == expected
    assert app_json(sys.executable, ort_format_dir, tmp_path)["text"] == expected


def test_app_refuses_a_non_model_directory(tmp_path):
    completed = subprocess.run([sys.executable, str(APP), str(tmp_path), "--prompt", "hi"], capture_output=True, text=True)
    assert completed.returncode == 2 and completed.stderr.startswith("error:")


@pytest.mark.slow
def test_app_runs_in_a_venv_without_torch(tiny_llama_dir, ort_format_dir, tmp_path):
    """``python -m venv``, then only the edge packages (same versions as here) and graphopt, all --no-deps.

    Takes 1-2 minutes: pip installs onnxruntime and builds graphopt's wheel.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in EDGE_PACKAGES]
    # Build graphopt from a copy of its sources, so the build leaves nothing in the checkout.
    source = tmp_path / "graphopt-src"
    source.mkdir()
    for name in ("graphopt", "passes", "models"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for packages in (pins, [str(source)]):
        completed = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", *packages],
                                   capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-2000:]
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('transformers'))"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.split() == ["None", "None"]
    expected = Generator(tiny_llama_dir).generate_text(PROMPT, chat=True, max_new_tokens=12).text
    assert app_json(python, tiny_llama_dir, tmp_path)["text"] == expected
    assert app_json(python, ort_format_dir, tmp_path)["text"] == expected
