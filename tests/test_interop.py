"""Other runtimes load graphopt model directories as they are: onnxruntime-genai (and Optimum, see
test_interop_optimum.py).

Every claim ``graphopt.interop`` records is checked here in the real package: the files it
writes, and greedy tokens from onnxruntime-genai equal graphopt's own (the same ONNX Runtime
underneath, so equality is exact, not within a tolerance) on every variant graphopt writes.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner

from graphopt import interop
from graphopt.cli import main
from graphopt.modeldir import ModelDir
from graphopt.pruning import Plan, PruneConfig
from graphopt.recipes import STEPS
from graphopt.runtime import Generator
from graphopt.steps import run_step

og = pytest.importorskip("onnxruntime_genai", reason="the interop extra (onnxruntime-genai) is not installed")

TOOLS = pathlib.Path(__file__).resolve().parent.parent / "tools"
CHAT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                "Explain in two sentences why the sky is blue.", "List three uses of a paperclip.")


def genai_tokens(model_dir: pathlib.Path, prompt_ids: list[int], max_new_tokens: int, **search) -> list[int]:
    """New tokens from onnxruntime-genai's generator loop (what a C#, Java or C app calls)."""
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, **search)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def assert_same_greedy(model_dir: pathlib.Path, prompts=CHAT_PROMPTS, max_new_tokens: int = 64) -> int:
    """genai's greedy tokens equal graphopt's for each chat prompt (both stop at EOS); tokens compared."""
    generator = Generator(model_dir)
    compared = 0
    for prompt in prompts:
        prompt_ids = generator.encode_prompt(prompt, chat=True)
        ours = generator.generate(prompt_ids, max_new_tokens=max_new_tokens).token_ids
        theirs = genai_tokens(model_dir, prompt_ids, max_new_tokens, do_sample=False)
        assert theirs == ours, f"{model_dir.name}, {prompt!r}: genai {theirs} vs graphopt {ours}"
        compared += len(ours)
    return compared


def _step(name: str, source: pathlib.Path, output: pathlib.Path, config=None, **parameters) -> pathlib.Path:
    step = STEPS[name]
    run_step(step, source, output, config or step.config_type.from_parameters(parameters))
    return output


@pytest.fixture(scope="module")
def variants(tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory, load_tool) -> dict[str, pathlib.Path]:
    """Every kind of graph graphopt writes, from the tiny seeded models."""
    root = tmp_path_factory.mktemp("interop")
    fused = _step("fuse", tiny_llama_dir, root / "fuse-cpu", target="cpu")
    uneven = _step("prune", tiny_llama_dir, root / "prune-uneven", PruneConfig(plan=Plan(heads={0: [0, 1]})))
    int4 = _step("quantize", fused, root / "int4", weights="int4", activations="none")
    load_tool("to_ort_format").convert(int4, root / "ort-format")
    return {
        "export": tiny_llama_dir,
        "fuse-cpu": fused,
        "fuse-onnx": _step("fuse", tiny_llama_dir, root / "fuse-onnx", target="onnx"),
        "int8": _step("quantize", fused, root / "int8", weights="int8", activations="none"),
        "int4": int4,
        "w8a8": _step("quantize", fused, root / "w8a8", weights="int8", activations="int8"),
        "prune-uneven": uneven,
        "prune-uneven-fused": _step("fuse", uneven, root / "prune-uneven-fused", target="cpu"),
        "fp16": _step("convert", fused, root / "fp16", dtype="fp16"),
        "gpt2": tiny_gpt2_dir,
        "gpt2-fused": _step("fuse", tiny_gpt2_dir, root / "gpt2-fused", target="cpu"),
        "ort-format": root / "ort-format",
    }




# --- the files ----------------------------------------------------------------------------------


def test_export_writes_genai_and_transformers_configs(tiny_llama_dir):
    genai = json.loads((tiny_llama_dir / interop.GENAI_CONFIG).read_text())
    decoder = genai["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (2, 4, 2, 16, 64)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    # genai's own default is one intra-op thread; 0 is ONNX Runtime's one per physical core.
    assert decoder["session_options"]["intra_op_num_threads"] == 0
    assert genai["model"]["vocab_size"] == ModelDir.open(tiny_llama_dir).manifest.vocab_size
    # The unfused graph concatenates past and new keys: genai must not share the buffer.
    assert genai["search"]["past_present_share_buffer"] is False
    config = json.loads((tiny_llama_dir / interop.HF_CONFIG).read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["num_key_value_heads"]) == ("llama", 2, 2)
    generation = json.loads((tiny_llama_dir / interop.GENERATION_CONFIG).read_text())
    assert generation["eos_token_id"] == genai["model"]["eos_token_id"]
    manifest = ModelDir.open(tiny_llama_dir).manifest
    assert {name: support["loads"] for name, support in manifest.runtimes.items()} == {
        "graphopt": True, "onnxruntime-genai": True, "optimum": True}


def test_every_step_writes_them_and_shares_the_buffer_only_for_gqa(variants):
    for name, directory in variants.items():
        genai = json.loads((directory / interop.GENAI_CONFIG).read_text())
        gqa = interop.graph_facts(directory / ModelDir.open(directory).manifest.model_file)["gqa"]
        assert genai["search"]["past_present_share_buffer"] is gqa, name
        assert ModelDir.open(directory).manifest.lineage[-1].name in ("export", "fuse", "quantize", "prune", "convert",
                                                                        "to_ort_format")
    assert json.loads((variants["fuse-cpu"] / interop.GENAI_CONFIG).read_text())["search"]["past_present_share_buffer"]
    assert json.loads((variants["gpt2"] / interop.GENAI_CONFIG).read_text())["model"]["type"] == "decoder"


def test_pruned_sizes_reach_config_json(tiny_llama_dir, tmp_path):
    pruned = _step("prune", tiny_llama_dir, tmp_path / "pruned", channels=0.5, layers=1)
    manifest = ModelDir.open(pruned).manifest
    config = json.loads((pruned / interop.HF_CONFIG).read_text())
    sizes = set(manifest.intermediate_per_layer())
    assert config["num_hidden_layers"] == manifest.layers == 1
    assert config["intermediate_size"] == (sizes.pop() if len(sizes) == 1 else 128)  # uneven: the source's
    assert manifest.intermediate_per_layer()[0] < 128
    genai = json.loads((pruned / interop.GENAI_CONFIG).read_text())["model"]["decoder"]
    assert genai["num_hidden_layers"] == 1


def test_pruned_heads_genai_yes_optimum_no(tiny_llama_dir, tmp_path):
    pruned = _step("prune", tiny_llama_dir, tmp_path / "pruned", heads=0.5)
    genai = json.loads((pruned / interop.GENAI_CONFIG).read_text())["model"]["decoder"]
    assert (genai["num_attention_heads"], genai["num_key_value_heads"], genai["head_size"]) == (2, 1, 16)
    optimum = ModelDir.open(pruned).manifest.runtimes["optimum"]
    assert not optimum["loads"] and "hidden_size // num_attention_heads" in optimum["reason"]
    assert not (pruned / interop.HF_CONFIG).exists()


def test_uneven_heads_are_refused_for_optimum_with_the_reason(variants):
    directory = variants["prune-uneven"]
    runtimes = ModelDir.open(directory).manifest.runtimes
    assert runtimes["onnxruntime-genai"]["loads"] and not runtimes["optimum"]["loads"]
    assert "differ between layers" in runtimes["optimum"]["reason"]
    assert not (directory / interop.HF_CONFIG).exists()  # no config that would fail at run time
    shown = CliRunner().invoke(main, ["inspect", str(directory)])
    assert shown.exit_code == 0, shown.output
    assert "optimum            cannot load (query heads and KV heads differ between layers" in shown.output
    as_json = json.loads(CliRunner().invoke(main, ["inspect", str(directory), "--json"]).output)
    assert as_json["runtimes"]["onnxruntime-genai"] == {"loads": True, "reason": ""}


def test_inspect_says_an_old_directory_lacks_the_files(tiny_llama_dir, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_llama_dir, old)
    (old / interop.GENAI_CONFIG).unlink()
    shown = CliRunner().invoke(main, ["inspect", str(old)])
    assert shown.exit_code == 0, shown.output
    assert "onnxruntime-genai  cannot load (no genai_config.json" in shown.output


def test_a_strangers_remote_code_is_not_carried_forward(tiny_llama_dir, tmp_path):
    """config.json is read as JSON only, and an ``auto_map`` (code to import) is not passed on."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_llama_dir, source)
    config = json.loads((source / interop.HF_CONFIG).read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (source / interop.HF_CONFIG).write_text(json.dumps(config))
    fused = _step("fuse", source, tmp_path / "fused", target="cpu")
    written = json.loads((fused / interop.HF_CONFIG).read_text())
    assert "auto_map" not in written and written["num_hidden_layers"] == 2


def _optimize(source: pathlib.Path, out: pathlib.Path, *options: str) -> None:
    done = CliRunner().invoke(main, ["optimize", str(source), "-o", str(out), "--recipe", "cpu-int8", *options])
    assert done.exit_code == 0, done.output


def test_optimize_target_and_draft_load_in_genai(checkpoints, tmp_path):
    """`graphopt optimize`'s target/ and draft/ carry the files (every stage runs through the step runner)."""
    out = tmp_path / "out"
    _optimize(checkpoints["llama"], out, "--no-reference", "--eval-windows", "4", "--window", "64", "--tokens", "8",
              "--keep-draft")
    for part in ("target", "draft"):
        runtimes = ModelDir.open(out / part).manifest.runtimes
        assert runtimes["onnxruntime-genai"]["loads"] and runtimes["optimum"]["loads"], part
        assert (out / part / interop.GENAI_CONFIG).is_file() and (out / part / interop.HF_CONFIG).is_file()
    assert assert_same_greedy(out / "target") >= 64


@pytest.mark.slow
def test_smollm2_optimize_target_loads_in_genai_and_optimum_with_the_same_tokens(smollm2_dir, optimum_python,
                                                                                   tmp_path):
    out = tmp_path / "out"
    _optimize(smollm2_dir, out, "--no-reference", "--eval-windows", "1", "--tokens", "16")
    assert assert_same_greedy(out / "target") >= 4 * 8
    assert assert_optimum_same_greedy(optimum_python, out / "target") >= 4 * 8


# --- the runtime itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["export", "fuse-cpu", "fuse-onnx", "int8", "int4", "w8a8", "prune-uneven",
                                  "prune-uneven-fused", "fp16", "gpt2", "gpt2-fused", "ort-format"])
def test_genai_greedy_tokens_equal_graphopts(variants, name):
    assert ModelDir.open(variants[name]).manifest.runtimes["onnxruntime-genai"]["loads"]
    assert assert_same_greedy(variants[name]) >= 64


def test_genai_samples(variants):
    directory = variants["int4"]
    generator = Generator(directory)
    prompt_ids = generator.encode_prompt(CHAT_PROMPTS[1], chat=True)
    options = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
    first = genai_tokens(directory, prompt_ids, 32, random_seed=7, **options)
    again = genai_tokens(directory, prompt_ids, 32, random_seed=7, **options)
    other = genai_tokens(directory, prompt_ids, 32, random_seed=8, **options)
    greedy = genai_tokens(directory, prompt_ids, 32, do_sample=False)
    vocab = ModelDir.open(directory).manifest.vocab_size
    assert 0 < len(first) <= 32 and all(0 <= token < vocab for token in first)
    assert first == again  # seeded
    assert first != other or first != greedy  # sampling, not argmax in disguise


# --- the real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_variants(smollm2_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("interop-smollm2")
    fused = _step("fuse", smollm2_dir, root / "fused", target="cpu")
    return {"fused": fused,
            "int8": _step("quantize", fused, root / "int8", weights="int8", activations="none"),
            "int4": _step("quantize", fused, root / "int4", weights="int4", activations="none")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fused", "int8", "int4"])
def test_smollm2_genai_greedy_tokens_equal_graphopts(smollm2_variants, name):
    assert assert_same_greedy(smollm2_variants[name]) >= 4 * 8


@pytest.mark.slow
def test_smollm2_genai_tokenizer_and_chat_template_match(smollm2_variants):
    """An app that uses genai alone encodes and decodes the same ids as graphopt."""
    directory = smollm2_variants["int4"]
    model = og.Model(str(directory))
    tokenizer = og.Tokenizer(model)
    generator = Generator(directory)
    text = generator.tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPTS[0]}])
    assert list(tokenizer.encode(text)) == generator.tokenizer.encode(text)
    ids = generator.encode_prompt(CHAT_PROMPTS[0], chat=True)
    assert tokenizer.decode(ids) == generator.tokenizer.decode(ids)  # both skip special tokens
    messages = json.dumps([{"role": "user", "content": CHAT_PROMPTS[0]}])
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == text  # chat_template.jinja


# --- Optimum, in an environment of its own (transformers 4.57) --------------------------------------

@pytest.fixture(scope="session")
def optimum_python(tmp_path_factory) -> pathlib.Path:
    """The python of the Optimum venv: ``$GRAPHOPT_OPTIMUM_PYTHON``, or built once per run (~3 minutes)."""
    import os
    import sys

    existing = os.environ.get("GRAPHOPT_OPTIMUM_PYTHON")
    if existing:
        return pathlib.Path(existing)
    sys.path.insert(0, str(TOOLS))
    try:
        import optimum_env
    finally:
        sys.path.remove(str(TOOLS))
    return optimum_env.build(tmp_path_factory.mktemp("optimum") / "venv")


def optimum_run(python: pathlib.Path, model_dir: pathlib.Path, prompts: list[list[int]], max_new_tokens: int,
                **request):
    import subprocess

    done = subprocess.run([str(python), str(TOOLS / "optimum_generate.py")], capture_output=True, text=True,
                          input=json.dumps({"model_dir": str(model_dir), "prompts": prompts,
                                            "max_new_tokens": max_new_tokens, **request}))
    return done


def assert_optimum_same_greedy(python: pathlib.Path, model_dir: pathlib.Path, max_new_tokens: int = 64) -> int:
    generator = Generator(model_dir)
    prompts = [generator.encode_prompt(prompt, chat=True) for prompt in CHAT_PROMPTS]
    done = optimum_run(python, model_dir, prompts, max_new_tokens)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout)["tokens"]
    compared = 0
    for prompt_ids, tokens in zip(prompts, theirs):
        ours = generator.generate(prompt_ids, max_new_tokens=max_new_tokens).token_ids
        assert tokens == ours, f"{model_dir.name}: Optimum {tokens} vs graphopt {ours}"
        compared += len(ours)
    return compared


@pytest.mark.slow
def test_optimum_greedy_tokens_equal_graphopts(optimum_python, variants):
    loadable = [name for name, directory in variants.items()
                if ModelDir.open(directory).manifest.runtimes["optimum"]["loads"]]
    assert {"export", "fuse-cpu", "fuse-onnx", "int8", "int4", "w8a8", "fp16", "gpt2-fused"} <= set(loadable)
    for name in loadable:
        assert assert_optimum_same_greedy(optimum_python, variants[name]) >= 64, name


@pytest.mark.slow
@pytest.mark.parametrize("name, error", [("prune-uneven", "Got invalid dimensions for input: past_key_values"),
                                         ("pruned-heads", "Got invalid dimensions for input: past_key_values"),
                                         ("ort-format", "no file named")])
def test_optimum_refusals_are_true(optimum_python, variants, tiny_llama_dir, tmp_path, name, error):
    """Where graphopt writes no config.json for Optimum, one written anyway fails in Optimum."""
    import shutil

    source = _step("prune", tiny_llama_dir, tmp_path / "pruned", heads=0.5) if name == "pruned-heads" else variants[name]
    directory = tmp_path / "forced"
    shutil.copytree(source, directory)
    manifest = ModelDir.open(directory).manifest
    assert not manifest.runtimes["optimum"]["loads"]
    ids = interop._special_ids(directory, manifest, {})
    interop._write_json(directory / interop.HF_CONFIG, interop.hf_config(manifest, {}, ids))
    done = optimum_run(optimum_python, directory, [[5, 9, 17]], 8)
    assert done.returncode != 0 and error in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fused", "int8", "int4"])
def test_smollm2_optimum_greedy_tokens_equal_graphopts(optimum_python, smollm2_variants, name):
    assert assert_optimum_same_greedy(optimum_python, smollm2_variants[name]) >= 4 * 8


# --- the examples ------------------------------------------------------------------------------------

EXAMPLES = TOOLS.parent / "examples" / "runtimes"


def _example(python, name: str, model_dir: pathlib.Path, *args: str):
    import subprocess

    return subprocess.run([str(python), str(EXAMPLES / name), str(model_dir), "--prompt", CHAT_PROMPTS[0], *args],
                          capture_output=True, text=True)


def test_genai_example_gives_graphopts_greedy_tokens(variants):
    import sys

    done = _example(sys.executable, "genai_chat.py", variants["int4"], "--max-new-tokens", "16", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    generator = Generator(variants["int4"])
    expected = generator.generate_text(CHAT_PROMPTS[0], chat=True, max_new_tokens=16)
    assert json.loads(done.stdout)["token_ids"] == expected.token_ids


def test_graphopt_example_runs(variants):
    import sys

    done = _example(sys.executable, "graphopt_runtime.py", variants["int4"], "--max-new-tokens", "16")
    assert done.returncode == 0, done.stderr[-2000:]
    expected = Generator(variants["int4"]).generate_text(CHAT_PROMPTS[0], chat=True, max_new_tokens=16)
    assert done.stdout.strip() == expected.text.strip() and "tokens/s" in done.stderr


@pytest.mark.slow
def test_optimum_example_gives_graphopts_text(optimum_python, variants):
    done = _example(optimum_python, "optimum_generate.py", variants["int4"], "--max-new-tokens", "16")
    assert done.returncode == 0, done.stderr[-2000:]
    expected = Generator(variants["int4"]).generate_text(CHAT_PROMPTS[0], chat=True, max_new_tokens=16)
    assert done.stdout.strip() == expected.text.strip()
