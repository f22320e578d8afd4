"""Other runtimes' files in every model directory: onnxruntime-genai and Hugging Face Optimum.

A graphopt decoder already follows the names both expect (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``), so
what they lack is their own description of the model:

- onnxruntime-genai reads ``genai_config.json`` (decoder file, input/output name patterns, heads,
  KV heads, head size, layers, vocabulary, context length, special token ids, search defaults).
  ``past_present_share_buffer`` is true only for GroupQueryAttention graphs: GQA writes the new
  keys and values into the past buffer in place (its present output aliases the past input); any
  other graph concatenates, so genai must feed a growing cache.
- Optimum's ``ORTModelForCausalLM`` reads ``config.json`` (the source model's transformers config,
  with the sizes pruning changed) and ``generation_config.json``.

:func:`write_runtime_files` writes them and returns the manifest with ``runtimes``: for each
runtime whether it can load the directory, and if not, why. The reasons are measured facts about
each runtime (``tests/test_interop.py`` runs every variant in the real packages, and fails when a
claim here stops being true); a runtime that cannot load a graph gets no file of its own, so a
directory never carries a configuration that fails at run time.

Only JSON is read from a source directory (``config.json``, ``generation_config.json``,
``tokenizer_config.json``, ``tokenizer.json``): nothing in a model directory runs code.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

from graphopt.manifest import Manifest

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
RUNTIMES = ("graphopt", "onnxruntime-genai", "optimum")

# transformers config keys per family for the sizes graphopt records (pruning changes them).
_CONFIG_KEYS = {
    "gpt2": {"layers": "n_layer", "heads": "n_head", "hidden_size": "n_embd", "intermediate_size": "n_inner",
             "max_positions": "n_positions"},
}
_DEFAULT_KEYS = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                 "head_dim": "head_dim", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                 "max_positions": "max_position_embeddings"}
# Sampling defaults a generation_config.json may carry, and genai's names for them.
_SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def graph_facts(model_path: pathlib.Path) -> dict[str, Any]:
    """The facts about a graph that decide which runtimes load it (read without its weights)."""
    model_path = pathlib.Path(model_path)
    if model_path.suffix != ".onnx":  # the ORT format (tools/to_ort_format.py): a flatbuffer, not protobuf
        return {"format": model_path.suffix.lstrip("."), "gqa": b"GroupQueryAttention" in model_path.read_bytes()}
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    ops = {(node.domain or "ai.onnx", node.op_type) for node in proto.graph.node}
    return {"format": "onnx", "gqa": ("com.microsoft", "GroupQueryAttention") in ops}


def compatibility(manifest: Manifest, facts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For each runtime: ``{"loads": bool, "reason": str}``; the reason says why not, or what to know.

    Measured with onnxruntime-genai 0.18 (CPU) and optimum-onnx 0.1.0 (transformers 4.57) on every
    variant graphopt writes (export, fuse for cpu and for onnx/tensorrt at opset 23, int8/int4
    weight-only, W8A8 QDQ, pruned heads / channels / layers, heads pruned unevenly, float16,
    GPT-2, and the ORT format of tools/to_ort_format.py). genai loads all of them and gives graphopt's greedy tokens: it reads each layer's KV
    shape from the graph. Optimum gives them too, except where its past shapes come out wrong:
    KV heads that differ per layer, and pruned query heads (it derives head_dim from hidden_size).
    """
    uneven = _uneven(manifest)
    optimum_refusals = []
    if facts.get("format", "onnx") != "onnx":
        optimum_refusals.append(f"the ORT format ({manifest.model_file}): ORTModelForCausalLM.from_pretrained looks "
                                "for an .onnx file (genai loads it)")
    elif uneven:
        optimum_refusals.append(f"{uneven} differ between layers; Optimum builds every layer's empty past from one "
                                "num_key_value_heads")
    elif manifest.hidden_size and manifest.heads_per_layer()[0] * manifest.head_dim != manifest.hidden_size:
        optimum_refusals.append(f"heads x head_dim ({manifest.heads_per_layer()[0]} x {manifest.head_dim}) != "
                                f"hidden {manifest.hidden_size} (query heads pruned, or a family such as Gemma 3 "
                                "with its own head_dim); Optimum sizes the past's head_dim as hidden_size // "
                                "num_attention_heads, not config.head_dim")
    genai_note = ""
    if (manifest.fusion or {}).get("target") == "cuda":
        # Not measured: no CUDA build of onnxruntime-genai was at hand (its CPU wheel refuses the provider).
        genai_note = "made for CUDA: genai_config.json asks for the CUDA provider (onnxruntime-genai-cuda)"
    return {"graphopt": {"loads": True, "reason": ""},
            "onnxruntime-genai": {"loads": True, "reason": genai_note},
            "optimum": {"loads": not optimum_refusals, "reason": "; ".join(optimum_refusals)}}


def _genai_type(manifest: Manifest) -> str:
    """genai's model type: its own for Llama-like families; GPT-2 as the generic "decoder".

    genai's "gpt2" type is its older GPT-2 model with one combined past per layer; graphopt's GPT-2
    graph has separate key and value caches like every other decoder.
    """
    family = manifest.model_type or manifest.family
    return "decoder" if family == "gpt2" else family


def _uneven(manifest: Manifest) -> str:
    """Which per-layer sizes are not the same in every layer ("" when all are uniform)."""
    uneven = [label for label, values in (("query heads", manifest.heads_per_layer()),
                                          ("KV heads", manifest.kv_heads_per_layer()))
              if len(set(values)) > 1]
    return " and ".join(uneven)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    """A JSON object from a (stranger's) file, or {} when it is absent, not an object, or a link out of its folder."""
    if path.is_symlink() and path.resolve().parent != path.parent.resolve():
        logger.warning("%s links outside its model directory; not read", path)
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_id(directory: pathlib.Path, token: Any) -> int | None:
    """A special token's id from tokenizer.json (its added tokens, then its vocabulary)."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    tokenizer = _read_json(directory / "tokenizer.json")
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == token and isinstance(added.get("id"), int):
            return added["id"]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    value = vocab.get(token) if isinstance(vocab, dict) else None
    return value if isinstance(value, int) else None


def _special_ids(directory: pathlib.Path, manifest: Manifest, source: dict[str, Any]) -> dict[str, Any]:
    eos = list(manifest.eos_token_ids) or ([source["eos_token_id"]] if isinstance(source.get("eos_token_id"), int) else [])
    pad = source.get("pad_token_id")
    if not isinstance(pad, int):
        pad = _token_id(directory, _read_json(directory / "tokenizer_config.json").get("pad_token"))
    if pad is None and eos:
        pad = eos[0]
    bos = manifest.bos_token_id if manifest.bos_token_id is not None else source.get("bos_token_id")
    return {"eos": eos, "pad": pad, "bos": bos}


def genai_config(manifest: Manifest, facts: dict[str, Any], ids: dict[str, Any],
                 generation: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for this decoder."""
    fusion = manifest.fusion or {}
    provider_options = [{"cuda": {}}] if fusion.get("target") == "cuda" else []
    eos = ids["eos"]
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": manifest.max_positions,
              "min_length": 0, "early_stopping": True, "length_penalty": 1.0, "diversity_penalty": 0.0,
              "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
              # GQA writes the step's keys and values into the past buffer in place; other
              # attention concatenates past and new into a new present, so the buffer cannot be shared.
              "past_present_share_buffer": bool(facts["gqa"])}
    for key in _SEARCH_KEYS:
        value = generation.get(key)
        if isinstance(value, (int, float)) and not (key != "do_sample" and isinstance(value, bool)):
            search[key] = value
    return {
        "model": {
            "bos_token_id": ids["bos"] if ids["bos"] is not None else (eos[0] if eos else 0),
            "context_length": manifest.max_positions,
            "decoder": {
                # genai runs one intra-op thread unless told; 0 asks ONNX Runtime for one per
                # physical core, as graphopt's runtime does (SmolLM2 int4, 2 cores: 75 -> 132 tok/s).
                "session_options": {"log_id": "onnxruntime-genai", "intra_op_num_threads": 0,
                                    "provider_options": provider_options},
                "filename": manifest.model_file,
                "head_size": manifest.head_dim,
                "hidden_size": manifest.hidden_size or manifest.heads * manifest.head_dim,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": manifest.heads_per_layer()[0],
                "num_hidden_layers": manifest.layers,
                "num_key_value_heads": manifest.kv_heads_per_layer()[0],
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": ids["pad"] if ids["pad"] is not None else 0,
            "type": _genai_type(manifest),
            "vocab_size": manifest.vocab_size,
        },
        "search": search,
    }


def hf_config(manifest: Manifest, source: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
    """The source's transformers config with the sizes this graph has (pruning may have changed them)."""
    config = dict(source)
    family = manifest.model_type or manifest.family
    keys = _CONFIG_KEYS.get(family, _DEFAULT_KEYS)
    intermediate = set(manifest.intermediate_per_layer())
    values = {"layers": manifest.layers, "heads": manifest.heads_per_layer()[0],
              "kv_heads": manifest.kv_heads_per_layer()[0], "head_dim": manifest.head_dim,
              "hidden_size": manifest.hidden_size,
              # Channels pruned unevenly have no one size: the source's stands (the graph holds the truth).
              "intermediate_size": intermediate.pop() if len(intermediate) == 1 else None,
              "max_positions": manifest.max_positions}
    for fact, key in keys.items():
        if values.get(fact) is not None:
            config[key] = values[fact]
    config.setdefault("model_type", family)
    config["vocab_size"] = manifest.vocab_size
    config["tie_word_embeddings"] = manifest.tied_embeddings
    config["use_cache"] = True
    config["eos_token_id"] = ids["eos"] if len(ids["eos"]) != 1 else ids["eos"][0]
    for key in ("bos", "pad"):
        if ids[key] is not None:
            config[f"{key}_token_id"] = ids[key]
    config["torch_dtype"] = manifest.dtype
    config.pop("dtype", None)
    config.pop("quantization_config", None)  # the graph's quantization is in the graph, not for transformers
    config.pop("auto_map", None)  # a stranger's code to import; the ONNX graph needs none
    return config


def write_runtime_files(directory: pathlib.Path, manifest: Manifest, source: pathlib.Path | dict[str, Any] | None = None,
                        ) -> Manifest:
    """Write the runtimes' files for the graph in ``directory``; return ``manifest`` with ``runtimes``.

    Args:
        directory: the model directory being written (its graph and tokenizer files already there).
        manifest: its manifest.
        source: the source model directory (its ``config.json`` is the base of ours) or the source
            checkpoint's transformers config as a dict.
    """
    directory = pathlib.Path(directory)
    base = source if isinstance(source, dict) else _read_json(pathlib.Path(source) / HF_CONFIG) if source else {}
    facts = graph_facts(directory / manifest.model_file)
    runtimes = compatibility(manifest, facts)
    generation = _read_json(directory / GENERATION_CONFIG)
    ids = _special_ids(directory, manifest, {**base, **generation})
    for name in (GENAI_CONFIG, HF_CONFIG):
        (directory / name).unlink(missing_ok=True)
    if runtimes["onnxruntime-genai"]["loads"]:
        _write_json(directory / GENAI_CONFIG, genai_config(manifest, facts, ids, generation))
    if runtimes["optimum"]["loads"]:
        _write_json(directory / HF_CONFIG, hf_config(manifest, base, ids))
        generation = {**generation, "eos_token_id": ids["eos"] if len(ids["eos"]) != 1 else ids["eos"][0]}
        for key in ("bos", "pad"):
            if ids[key] is not None:
                generation[f"{key}_token_id"] = ids[key]
        _write_json(directory / GENERATION_CONFIG, generation)
    logger.debug("runtimes of %s: %s", directory, {name: support["loads"] for name, support in runtimes.items()})
    return manifest.replace(runtimes=runtimes)


def runtimes_of(directory: pathlib.Path, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Which runtimes load ``directory``: as its files say.

    A directory written before graphopt wrote the runtimes' files (or one a stranger edited) may
    lack them: a runtime whose file is missing is reported as not loading it, whatever the graph.
    """
    runtimes = compatibility(manifest, graph_facts(directory / manifest.model_file))
    needed = {"onnxruntime-genai": GENAI_CONFIG, "optimum": HF_CONFIG}
    for runtime, file in needed.items():
        if runtimes[runtime]["loads"] and not (directory / file).is_file():
            runtimes[runtime] = {"loads": False, "reason": f"no {file}: an older graphopt wrote this directory; "
                                                           "rerun its last step to add it"}
    return runtimes


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
