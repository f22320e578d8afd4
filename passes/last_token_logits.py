"""Logits of the last input position only: a Slice before the LM head.

A decoder graph computes logits for every input position, which perplexity and speculative
verification need. A serving engine reads only the last position's (the next token after a
prompt or a prompt chunk; a decode step has one position anyway), yet the LM head is about a fifth
of SmolLM2's multiply-adds per token and prefill pays it for every prompt token, plus a
``[prompt, vocab]`` float output. Slicing the hidden state to its last position before the LM
head removes both; the rows that remain compute exactly what they computed before (each output
row of a MatMul reads only its own input row).

The LM head is the node that produces the ``logits`` graph output, or the one before the Cast to
float32 that produces it (a float16 graph keeps its logits in float32, passes/convert_fp16.py); the
pass applies only when it is a MatMul or a MatMulNBits whose first input is
``[batch, sequence, hidden]``. Applied by
:mod:`graphopt.runtime.batching` to the graph it loads in memory, never written into a model
directory (graphopt's other tools need every position's logits).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphopt.ir import unique_value_name

logger = logging.getLogger(__name__)

LOGITS = "logits"
HEAD_OPS = {("", "MatMul"), ("com.microsoft", "MatMulNBits")}


class LastTokenLogitsPass(ir.passes.InPlacePass):
    """Make ``logits`` ``[batch, 1, vocab]``: the LM head reads only the last position's hidden state."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        output = next((value for value in graph.outputs if value.name == LOGITS), None)
        head = output.producer() if output is not None else None
        cast = None
        if head is not None and (head.domain or "", head.op_type) == ("", "Cast") and head.inputs[0] is not None \
                and len(head.inputs[0].uses()) == 1:
            cast, head = head, head.inputs[0].producer()
        if head is None or (head.domain or "", head.op_type) not in HEAD_OPS or head.inputs[0] is None:
            logger.debug("no MatMul LM head produces %r: logits left for every position", LOGITS)
            return ir.passes.PassResult(model, modified=False)
        hidden = head.inputs[0]
        if hidden.producer() is not None and hidden.producer().op_type == "Slice" and \
                hidden.producer().name == "graphopt_last_token":
            return ir.passes.PassResult(model, modified=False)  # already applied
        if hidden.shape is not None and len(hidden.shape) != 3:
            return ir.passes.PassResult(model, modified=False)
        constants = []
        for suffix, number in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1)):
            value = ir.Value(name=unique_value_name(graph, f"graphopt_last_token_{suffix}"),
                             const_value=ir.tensor(np.array([number], dtype=np.int64)))
            graph.register_initializer(value)
            constants.append(value)
        last = ir.Value(name=unique_value_name(graph, "graphopt_last_token_hidden"))
        node = ir.Node("", "Slice", [hidden, *constants], outputs=[last], name="graphopt_last_token")
        graph.insert_before(head, node)
        head.replace_input_with(0, last)
        for value in (output, head.outputs[0] if cast is not None else None):
            if value is not None and value.shape is not None and len(value.shape) == 3:
                value.shape = ir.Shape([value.shape[0], 1, value.shape[2]])
        return ir.passes.PassResult(model, modified=True)
