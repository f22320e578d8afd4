"""Hostile and careless inputs, in one place: each must end in one line on stderr and exit 2 (or the
signal's code), run no code from the model directory, and leave no half-written output.

The table below is what a stranger's model directory or a careless command line can hold; the
tests after it cover what needs more than one command (signals, --force, concurrent writers).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.cli import main
from graphopt.errors import GraphoptError
from graphopt.modeldir import ModelDir, atomic_output
from graphopt.runtime.tokenizer import render_chat_template

EXPLOITS = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ joiner.__init__.__globals__['os'].system('touch MARKER') }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ messages }}",
]


def copy_model(source: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, destination)
    return destination


def one_line_error(result) -> str:
    """The CLI's error output: exactly one line starting with 'error:'."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def run(*args: str, cwd: pathlib.Path | None = None):
    if cwd is None:
        return CliRunner().invoke(main, list(args))
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(previous)


# -- 1. chat templates run in the sandbox -----------------------------------------------------------

@pytest.mark.parametrize("template", EXPLOITS)
@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_exploit_runs_nothing(tiny_llama_dir, tmp_path, template, where):
    model = copy_model(tiny_llama_dir, tmp_path / "model")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    if where == "chat_template.jinja":
        (model / where).write_text(template)
    else:
        config = json.loads((model / where).read_text())
        config["chat_template"] = template
        (model / where).write_text(json.dumps(config))
    result = run("generate", str(model), "--prompt", "hi", "--chat", "--max-new-tokens", "2", cwd=tmp_path)
    assert result.exit_code == 2
    assert "chat template refused" in one_line_error(result)
    assert not (tmp_path / "MARKER").exists()


def test_sandbox_keeps_the_helpers_templates_use():
    rendered = render_chat_template(
        "{% for m in messages %}{{ m['role'] | tojson }}:{{ m['content'] }}{% endfor %}{{ strftime_now('%Y')[:2] }}",
        messages=[{"role": "user", "content": "<b>"}])
    assert rendered.startswith('"user":<b>') and rendered[-2:].isdigit()
    with pytest.raises(GraphoptError, match="chat template: no system role"):
        render_chat_template("{{ raise_exception('no system role') }}", messages=[])


# -- 2. --force replaces only what graphopt wrote -------------------------------------------------

def test_force_refuses_a_directory_graphopt_did_not_write(tiny_llama_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep me")
    result = run("fuse", str(tiny_llama_dir), "-o", str(victim), "--target", "cpu", "--force")
    assert result.exit_code == 2 and "not a graphopt output" in one_line_error(result)
    assert (victim / "important.txt").read_text() == "keep me"


def test_force_refuses_an_output_that_holds_the_source(checkpoints, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(checkpoints["llama"], victim / "ck")
    (victim / "graphopt.json").write_text("{}")  # even one that looks like graphopt's
    result = run("export", str(victim / "ck"), "-o", str(victim), "--force", "--no-validate")
    assert result.exit_code == 2 and "holds the input" in one_line_error(result)
    assert (victim / "ck" / "config.json").is_file()


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_output_dot_is_refused(tiny_llama_dir, tmp_path, force):
    result = run("fuse", str(tiny_llama_dir), "-o", ".", "--target", "cpu", *force, cwd=tmp_path)
    assert result.exit_code == 2 and "current directory" in one_line_error(result)


def test_force_replaces_a_model_directory(tiny_llama_dir, tmp_path):
    output = tmp_path / "fused"
    assert run("fuse", str(tiny_llama_dir), "-o", str(output), "--target", "cpu").exit_code == 0
    assert run("fuse", str(tiny_llama_dir), "-o", str(output), "--target", "onnx", "--force").exit_code == 0
    assert ModelDir.open(output).manifest.fusion["target"] == "onnx"


# -- 3. SIGTERM / SIGHUP clean up like Ctrl-C -------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signal_leaves_no_partial_output(tiny_llama_dir, tmp_path, signum):
    output = tmp_path / "out"
    assert run("fuse", str(tiny_llama_dir), "-o", str(output), "--target", "cpu").exit_code == 0
    before = sorted(path.name for path in output.iterdir())
    # W8A8 calibrates on sequences the model samples: long enough to be caught half-way.
    process = subprocess.Popen([sys.executable, "-m", "graphopt", "quantize", str(tiny_llama_dir), "-o", str(output),
                                "--force", "--activations", "int8", "--calib-samples", "64", "--seq-len", "96"],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.partial")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "quantize finished before it could be interrupted"
    time.sleep(0.3)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "no output was left half written" in stderr
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
    assert sorted(path.name for path in output.iterdir()) == before
    assert ModelDir.open(output).manifest.lineage[-1].name == "fuse"


# -- 4-6. damaged model directories and manifests ----------------------------------------------------

def _drop_weights(model):
    (model / "model.onnx.data").unlink()


def _truncate_weights(model):
    data = model / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _garbage(name):
    return lambda model: (model / name).write_bytes(b"\x08\x96\x01garbage" * 10)


def _manifest(edit):
    def apply(model):
        manifest = json.loads((model / "graphopt.json").read_text())
        (model / "graphopt.json").write_text(json.dumps(edit(manifest)))
    return apply


def _without(key):
    def edit(manifest):
        manifest.pop(key)
        return manifest
    return edit


def _secret_link(model):
    secret = model.parent / "secret.txt"
    secret.write_text("password=hunter2")
    (model / "merges.txt").unlink(missing_ok=True)
    (model / "merges.txt").symlink_to(secret)


def _weights_outside(model):
    import onnx

    proto = onnx.load(str(model / "model.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(proto, str(model / "model.onnx"))


DAMAGES = {
    "weights missing": (_drop_weights, "are missing"),
    "weights truncated": (_truncate_weights, "truncated"),
    "weights outside the folder": (_weights_outside, "outside the model directory"),
    "model.onnx corrupt": (_garbage("model.onnx"), "not a readable ONNX model"),
    "tokenizer.json corrupt": (_garbage("tokenizer.json"), "tokenizer.json: damaged"),
    "tokenizer_config.json corrupt": (_garbage("tokenizer_config.json"), "tokenizer_config.json: damaged"),
    "tokenizer file links outside": (_secret_link, "links outside the model directory"),
    "manifest empty": (_manifest(lambda manifest: {}), "missing 'family'"),
    "manifest not an object": (_manifest(lambda manifest: [1, 2]), "not a JSON object"),
    "max_positions missing": (_manifest(_without("max_positions")), "missing 'max_positions'"),
    "layer count wrong": (_manifest(lambda manifest: {**manifest, "layers": 5}), "decoder contract"),
    "vocabulary wrong": (_manifest(lambda manifest: {**manifest, "vocab_size": 999}), "vocab_size 999"),
    "layer list too short": (_manifest(lambda manifest: {**manifest, "layer_heads": [4]}), "layer_heads"),
    "model_file outside": (_manifest(lambda manifest: {**manifest, "model_file": "../x.onnx"}), "model_file"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("command", ["inspect", "generate", "quantize", "draft"])
def test_damaged_model_directory_is_one_line_exit_2(tiny_llama_dir, tmp_path, damage, command):
    model = copy_model(tiny_llama_dir, tmp_path / "model")
    make_damage, message = DAMAGES[damage]
    make_damage(model)
    arguments = {"inspect": [], "generate": ["--prompt", "hi", "--max-new-tokens", "2"],
                 "quantize": ["-o", str(tmp_path / "out"), "--weights", "int8", "--activations", "none"],
                 "draft": ["-o", str(tmp_path / "out"), "--recipe", "half-layers"]}[command]
    result = run(command, str(model), *arguments)
    assert result.exit_code == 2
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()
    assert "hunter2" not in result.output



def test_runtime_parses_tokenizer_json_once(tiny_llama_dir, tmp_path):
    """The runtime opens the directory without parsing tokenizer.json (its Tokenizer parses it, with the
    same one-line error); the other JSON files are still checked on opening."""
    from graphopt.runtime import Generator

    model = copy_model(tiny_llama_dir, tmp_path / "model")
    _garbage("tokenizer.json")(model)
    with pytest.raises(GraphoptError, match="tokenizer.json: damaged"):
        ModelDir.open(model)
    ModelDir.open(model, parse_tokenizer=False)
    with pytest.raises(GraphoptError, match="tokenizer.json: damaged"):
        Generator(model)
    shutil.copy(tiny_llama_dir / "tokenizer.json", model / "tokenizer.json")
    _garbage("tokenizer_config.json")(model)
    with pytest.raises(GraphoptError, match="tokenizer_config.json: damaged"):
        ModelDir.open(model, parse_tokenizer=False)

# -- 7. inputs that used to crash -------------------------------------------------------------------

def test_prompt_that_is_not_utf8(tiny_llama_dir):
    completed = subprocess.run([os.fsencode(sys.executable), b"-m", b"graphopt", b"generate",
                                os.fsencode(str(tiny_llama_dir)), b"--prompt", b"caf\xe9 \xff",
                                b"--max-new-tokens", b"2"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == "error: the prompt is not valid UTF-8 text"


def _npz(path, ids, name="input_ids"):
    np.savez(path, **{name: np.asarray(ids)})
    return path


CALIBRATION_FILES = {
    "ids past the vocabulary": (lambda path: _npz(path, [[1, 2, 3, 10_000]] * 2), "must lie in [0, 320)"),
    "negative ids": (lambda path: _npz(path, [[1, -2, 3, 4]] * 2), "must lie in [0, 320)"),
    "one-token rows": (lambda path: _npz(path, [[1], [2]]), "at least 2 tokens"),
    "a .npy renamed .npz": (lambda path: (np.save(path.with_suffix(".npy"), np.ones((2, 4), np.int64)),
                                          path.with_suffix(".npy").rename(path)), "not an .npz archive"),
    "not numpy at all": (lambda path: path.write_text("hello"), "not a readable .npz"),
    "floats": (lambda path: _npz(path, [[0.5, 1.5]] * 2), "expected an integer array"),
}


@pytest.mark.parametrize("case", list(CALIBRATION_FILES))
def test_bad_calibration_npz(tiny_llama_dir, tmp_path, case):
    make, message = CALIBRATION_FILES[case]
    path = tmp_path / "calib.npz"
    make(path)
    # W8A8 calibrates (weight-only int8 would not read the file, and says so: see below).
    result = run("quantize", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--activations", "int8",
                 "--calib-npz", str(path))
    assert result.exit_code == 2 and message in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_calibration_data_that_nothing_reads_is_refused(tiny_llama_dir, tmp_path):
    path = _npz(tmp_path / "calib.npz", [[1, 2, 3, 4]] * 2)
    result = run("quantize", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--calib-npz", str(path))
    assert result.exit_code == 2 and "uses no calibration data" in one_line_error(result)


# -- 8. writers, permissions, refusing early, option errors ----------------------------------------

def test_a_writer_that_finishes_second_gets_one_line(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(GraphoptError, match="already exists"):
        with atomic_output(target) as scratch:
            (scratch / "graphopt.json").write_text("{}")
            target.mkdir()  # another process finished first
            (target / "graphopt.json").write_text('{"winner": true}')
    assert json.loads((target / "graphopt.json").read_text()) == {"winner": True}
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_outputs_get_the_users_umask(tiny_llama_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        assert run("fuse", str(tiny_llama_dir), "-o", str(tmp_path / "out"), "--target", "cpu").exit_code == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("command", [["fuse", "--target", "cpu"], ["prune", "--params", "0.2"],
                                     ["quantize"], ["convert", "--dtype", "fp16"]])
def test_existing_output_is_refused_before_any_work(tiny_llama_dir, tmp_path, monkeypatch, command):
    from graphopt import steps

    def fail(*args, **kwargs):
        raise AssertionError("the step ran before the output was checked")

    monkeypatch.setattr(steps.graph_ir, "load", fail)
    (tmp_path / "out").mkdir()
    result = run(command[0], str(tiny_llama_dir), "-o", str(tmp_path / "out"), *command[1:])
    assert result.exit_code == 2 and "already exists" in one_line_error(result)


@pytest.mark.parametrize("arguments", [["quantize", "M", "-o", "x", "--block-size", "7"], ["quantize", "M", "--bogus"],
                                       ["generate", "M"], ["--bogus"], ["nosuchcommand"]])
def test_option_errors_are_one_line(tiny_llama_dir, arguments):
    arguments = [str(tiny_llama_dir) if argument == "M" else argument for argument in arguments]
    result = run(*arguments)
    assert result.exit_code == 2
    one_line_error(result)
    assert "Usage:" not in result.output


def test_a_config_json_linking_outside_is_not_carried_on(tiny_llama_dir, tmp_path):
    """interop builds the output's config.json from the source's: a link out of the folder is not read."""
    model = copy_model(tiny_llama_dir, tmp_path / "model")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({**json.loads((model / "config.json").read_text()), "password": "hunter2"}))
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(secret)
    assert run("fuse", str(model), "-o", str(tmp_path / "out"), "--target", "cpu").exit_code == 0
    written = tmp_path / "out" / "config.json"
    assert not written.exists() or "hunter2" not in written.read_text()
