"""Intermediate activations of a model directory's graph, streamed one calibration sequence at a time.

The graph is loaded without its weights, the requested values are added as graph outputs, and
ONNX Runtime runs it from memory with the original external-data folder, so nothing is copied or
written. Used by calibration (quantization ranges) and importance measures (pruning).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Iterable, Iterator

import numpy as np

from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)


def session_with_outputs(model_path: str | pathlib.Path, names: list[str]):
    """An ORT session over ``model_path`` whose outputs also include ``names``."""
    import onnx
    import onnxruntime as ort

    model_path = pathlib.Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    known = {value.name: value for value in model.graph.value_info}
    known.update({value.name: value for value in model.graph.input})
    existing = {value.name for value in model.graph.output}
    produced = {output for node in model.graph.node for output in node.output} | set(known)
    missing = [name for name in names if name not in produced]
    if missing:
        raise GraphoptError(f"{model_path}: no values named {missing[:3]} in the graph")
    for name in names:
        if name not in existing:
            model.graph.output.append(known[name] if name in known else onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    # Keep every requested value as the graph computes it (no fusion may swallow it).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def empty_cache_feeds(session) -> dict[str, np.ndarray]:
    feeds = {}
    for meta in session.get_inputs():
        if meta.name.startswith("past_key_values."):
            dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
            feeds[meta.name] = np.zeros((1, meta.shape[1], 0, meta.shape[3]), dtype=dtype)
    return feeds


def capture(model_path: str | pathlib.Path, names: list[str], sequences: Iterable[list[int]]) -> Iterator[dict[str, np.ndarray]]:
    """For each token sequence (a prefill from an empty cache), yield {name: activation}."""
    session = session_with_outputs(model_path, names)
    cache = empty_cache_feeds(session)
    for ids in sequences:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **cache}
        values = session.run(names, feeds)
        yield dict(zip(names, values))
