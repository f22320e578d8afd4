"""`graphopt export`: a checkpoint to a KV-cache ONNX decoder in a model directory, validated.

The graph is one decoder that serves prefill, one-token decode and a multi-token forward on a
cache. Validation compares ONNX Runtime against the checkpoint's own PyTorch model.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import pathlib
import re
import time

import numpy as np

import graphopt
from graphopt import checkpoint as checkpoint_lib
from graphopt import interop
from graphopt import ir as graphopt_ir
from graphopt.errors import ValidationError
from graphopt.evaluate import forward_chunks
from graphopt.manifest import LineageStep, Manifest, io_names
from graphopt.modeldir import MODEL_FILE, ModelDir, atomic_output, check_output
from graphopt.runtime.decoder import Decoder

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
VALIDATION_PROMPT = "The capital of France is"


def export_module(module, facts: dict, path: pathlib.Path, opset: int = DEFAULT_OPSET) -> None:
    """torch.onnx.export (dynamo) with dynamic batch, sequence and past axes; weights as external data."""
    import torch

    if not logger.isEnabledFor(logging.INFO):
        # torch configures its loggers on import; quiet the exporter's notes about absent torchvision.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    layers, kv_heads, head_dim = facts["layers"], facts["kv_heads"], facts["head_dim"]
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    ids = torch.tensor([[1, 2, 3]], dtype=torch.int64).repeat(2, 1)
    past_len = 4
    example = (ids, torch.ones(2, past_len + 3, dtype=torch.int64), torch.arange(past_len, past_len + 3)[None].repeat(2, 1),
               [torch.zeros(2, kv_heads, past_len, head_dim) for _ in range(2 * layers)])
    dynamic_shapes = {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past_key_values": [{0: batch, 2: past} for _ in range(2 * layers)],
    }
    inputs, outputs = io_names(layers)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=inputs,
                                    output_names=outputs, opset_version=opset, optimize=True, verbose=False)
    tidy(program.model)
    graphopt_ir.save(program.model, path)


_KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)


def _module_scope(node) -> str:
    """The checkpoint module a node came from, e.g. ``model.layers.0.self_attn.q_proj``."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return ""
    parts = ast.literal_eval(scopes)
    scope = parts[-2] if len(parts) >= 2 else ""
    if scope.startswith("_"):  # the exporter's placeholder for "no module"
        return ""
    return scope[len("hf."):] if scope.startswith("hf.") else scope


def tidy(model) -> None:
    """Name nodes and weights after the checkpoint modules they implement; drop bulky export metadata.

    Nodes become ``/model/layers.0/self_attn/q_proj/MatMul`` and a MatMul's weight (stored
    ``(in_features, out_features)``) becomes ``model.layers.0.self_attn.q_proj.weight``, so
    ``--exclude`` patterns and pruning can address parts of the model by name. Stack traces and fx
    node dumps (with local file paths) are removed; the module scope is kept.
    """
    used_names: set[str] = set()
    initializers = model.graph.initializers
    for node in model.graph:
        scope = _module_scope(node)
        path = re.sub(r"\.(\d+)(?=\.|$)", r"#\1", scope).replace(".", "/").replace("#", ".")
        base = f"/{path}/{node.op_type}" if scope else f"/{node.op_type}"
        name, suffix = base, 0
        while name in used_names:
            suffix += 1
            name = f"{base}_{suffix}"
        used_names.add(name)
        node.name = name
        for key in list(node.metadata_props):
            if key not in _KEPT_METADATA:
                del node.metadata_props[key]
        if node.op_type == "MatMul" and scope and len(node.inputs) == 2:
            weight = node.inputs[1]
            if weight is not None and weight.is_initializer() and len(weight.uses()) == 1 \
                    and f"{scope}.weight" not in initializers:
                initializers.pop(weight.name)
                weight.name = f"{scope}.weight"
                initializers[weight.name] = weight
    for name in list(initializers):
        if name.startswith("hf."):
            value = initializers.pop(name)
            value.name = name[len("hf."):]
            initializers[value.name] = value


def validate(model_dir: pathlib.Path, hf_model, prompt_ids: list[int], vocab_size: int, tolerance: float,
             greedy_steps: int = 32, seed: int = 0) -> dict:
    """ORT vs PyTorch: logits on random and real inputs (prefill and decode on a cache), greedy tokens.

    Greedy decoding follows the reference's tokens for ``greedy_steps`` steps; a step where ORT's
    argmax differs passes only if it is a numerical tie (the reference scores both tokens within
    ``tolerance``); such steps are counted in ``greedy_numerical_ties``.

    Raises:
        ValidationError: logits differ by more than ``tolerance`` or greedy tokens diverge.
    """
    import torch

    decoder = Decoder(model_dir / MODEL_FILE, ep="cpu")
    rng = np.random.default_rng(seed)
    random_ids = rng.integers(0, vocab_size, size=12).tolist()
    figures = {}
    for label, ids in (("random", random_ids), ("prompt", prompt_ids)):
        split = max(1, len(ids) // 2)
        with torch.no_grad():
            reference = hf_model(torch.tensor([ids])).logits[0].float().numpy()
        ours = np.concatenate(forward_chunks(decoder, ids, (split,)))  # prefill, then the rest on the cache
        figures[f"max_abs_logits_diff_{label}_prefill"] = float(np.abs(ours[:split] - reference[:split]).max())
        figures[f"max_abs_logits_diff_{label}_decode"] = float(np.abs(ours[split:] - reference[split:]).max())
    worst = max(figures.values())
    figures["tolerance"] = tolerance
    if worst > tolerance:
        raise ValidationError(f"export does not match PyTorch: max |logits diff| {worst:.3g} > tolerance {tolerance:g}")

    expected = checkpoint_lib.greedy_tokens(hf_model, prompt_ids, greedy_steps)
    decoder.reset()
    logits = decoder.forward(prompt_ids)[-1]
    agreeing, ties = 0, 0
    for step, token in enumerate(expected):
        ours = int(np.argmax(logits))
        if ours != token:
            with torch.no_grad():
                reference = hf_model(torch.tensor([prompt_ids + expected[:step]])).logits[0, -1].float().numpy()
            if reference[token] - reference[ours] > tolerance:
                break
            ties += 1
        agreeing += 1
        logits = decoder.forward([token])[-1]
    figures["greedy_steps_agreeing"] = agreeing
    figures["greedy_numerical_ties"] = ties
    if agreeing < greedy_steps:
        raise ValidationError(f"greedy tokens diverge from PyTorch at step {agreeing} of {greedy_steps}")
    return figures


def _compact_json(path: pathlib.Path) -> None:
    """Rewrite ``path`` (when present) as the same JSON without indentation: transformers saves
    tokenizer.json indented, 3.5 MB for SmolLM2's vocabulary where the same JSON is 1.6 MB."""
    if path.is_file():
        text = json.dumps(json.loads(path.read_text(encoding="utf-8")), ensure_ascii=False, separators=(",", ":"))
        path.write_text(text, encoding="utf-8")


def export(src: str, output: str | os.PathLike, force: bool = False, run_validation: bool = True,
           tolerance: float = 1e-3, opset: int = DEFAULT_OPSET) -> ModelDir:
    """Export SRC to a new model directory at ``output``; returns it.

    Nothing is written at ``output`` unless every step, validation included, succeeds.
    """
    from graphopt.models import adapter_for

    check_output(output, force, sources=[src])
    logger.info("loading %s", src)
    started = time.perf_counter()
    loaded = checkpoint_lib.load(src)
    hf_model = loaded.model
    adapter = adapter_for(hf_model.config.model_type)
    facts = adapter.describe(hf_model.config)
    module = adapter.build(hf_model).eval()
    inputs, outputs = io_names(facts["layers"])
    with atomic_output(output, force=force, sources=[src]) as scratch:
        logger.info("exporting %s (%d layers) to ONNX; this takes a while for large models", facts["family"],
                    facts["layers"])
        export_module(module, facts, scratch / MODEL_FILE, opset=opset)
        tokenizer = loaded.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
            _compact_json(scratch / "tokenizer.json")
        eos = hf_model.generation_config.eos_token_id if hf_model.generation_config is not None else None
        eos = eos if eos is not None else hf_model.config.eos_token_id
        eos_ids = sorted({int(token) for token in (eos if isinstance(eos, list) else [eos]) if token is not None})
        manifest = Manifest(
            **facts, dtype="float32", opset=opset, inputs=inputs, outputs=outputs,
            cache={"layout": "batch, kv_heads, sequence, head_dim", "kv_heads": [facts["kv_heads"]] * facts["layers"],
                   "head_dim": facts["head_dim"]},
            eos_token_ids=eos_ids, bos_token_id=hf_model.config.bos_token_id,
            add_bos_token=bool(getattr(tokenizer, "add_bos_token", False)), source=loaded.source,
            graphopt_version=graphopt.__version__)
        manifest = interop.write_runtime_files(scratch, manifest, source=json.loads(hf_model.config.to_json_string()))
        step = LineageStep("export", {"opset": opset, "validate": run_validation, "tolerance": tolerance})
        if run_validation:
            logger.info("validating ONNX Runtime against PyTorch (prefill, decode on a cache, 32 greedy tokens)")
            prompt_ids = tokenizer.encode(VALIDATION_PROMPT) if tokenizer is not None else [1, 2, 3, 4, 5]
            step.figures = validate(scratch, hf_model, prompt_ids, facts["vocab_size"], tolerance)
        step.seconds = round(time.perf_counter() - started, 1)
        ModelDir(scratch).write_manifest(manifest.with_step(step))
    return ModelDir(output)
