"""logits  =>  logits and ``next_token = ArgMax(logits, axis=-1)``: greedy decoding without the logits on the host.

A one-token step on a GPU otherwise copies the whole logits row to the host (49152 float32 values
for SmolLM2, ~196 KB) and takes its argmax in numpy, every token. With this output a greedy
runtime binds ``next_token`` (int64, ``[batch, sequence]``) instead and reads back 8 bytes per
position; ``logits`` stays an output for sampling and for checks. ArgMax keeps the first of equal
maxima, as ``numpy.argmax`` does, so greedy tokens are the same either way.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graphopt.ir import node_tag

logger = logging.getLogger(__name__)

RULE = "greedy_head"
OUTPUT = "next_token"


class AddGreedyHead(ir.passes.InPlacePass):
    """Add the graph output ``next_token`` = ArgMax of ``logits`` over the vocabulary (unchanged if present)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = [value.name for value in graph.outputs]
        if OUTPUT in names:
            return ir.passes.PassResult(model, modified=False)
        if "logits" not in names:
            raise ValueError("the graph has no 'logits' output to take the argmax of")
        logits = graph.outputs[names.index("logits")]
        node = ir.node("ArgMax", [logits], attributes={"axis": -1, "keepdims": 0, "select_last_index": 0},
                       num_outputs=1)
        node_tag(node, RULE)
        token = node.outputs[0]
        token.name = OUTPUT
        token.dtype = ir.DataType.INT64
        if logits.shape is not None:
            token.shape = ir.Shape(list(logits.shape)[:-1])
        graph.append(node)
        graph.outputs.append(token)
        return ir.passes.PassResult(model, modified=True)


def write_with_greedy_head(source_dir, output_dir) -> None:
    """Copy the model directory ``source_dir`` to ``output_dir`` (new) with :class:`AddGreedyHead` applied.

    The weights are written again (``model.onnx.data``); the manifest's ``outputs`` gain
    ``next_token``; every other file is copied as it is.
    """
    import json
    import pathlib
    import shutil

    source, output = pathlib.Path(source_dir), pathlib.Path(output_dir)
    output.mkdir(parents=True)
    model = ir.load(source / "model.onnx")
    AddGreedyHead()(model)
    ir.save(model, output / "model.onnx", external_data="model.onnx.data")
    for file in source.iterdir():
        if file.is_file() and not file.name.startswith("model.onnx"):
            shutil.copy2(file, output / file.name)
    manifest_path = output / "graphopt.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if OUTPUT not in manifest["outputs"]:
            manifest["outputs"].append(OUTPUT)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
