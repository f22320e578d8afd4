"""Logits of the last input position only: a Slice before the LM head.

A decoder graph computes logits for every input position, which perplexity and speculative
verification need. A serving engine reads only the last position's (the next token after a
prompt or a prompt chunk; a decode step has one position anyway), yet the LM head is about a fifth
of SmolLM2's multiply-adds per token and prefill pays it for every prompt token, plus a
``[prompt, vocab]`` float output. Slicing the hidden state to its last position before the LM
head removes both; the rows that remain compute exactly what they computed before (each output
row of a MatMul reads only its own input row).

With ``positions`` (an input name), each row's position is chosen by a new graph input instead,
``[batch]`` int64 (``GatherND`` with ``batch_dims=1``): a batch of right-padded prompts then gets
the logits of each prompt's own last token.

The LM head is the node that produces the ``logits`` graph output; the pass applies only when it
is a MatMul or a MatMulNBits whose first input is ``[batch, sequence, hidden]``. Applied by
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
    """Make ``logits`` ``[batch, 1, vocab]``: the LM head reads only the last position's hidden state
    (or, with ``positions``, the position that graph input names for each row)."""

    def __init__(self, positions: str | None = None):
        super().__init__()
        self.positions = positions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        output = next((value for value in graph.outputs if value.name == LOGITS), None)
        head = output.producer() if output is not None else None
        if head is None or (head.domain or "", head.op_type) not in HEAD_OPS or head.inputs[0] is None:
            logger.debug("no MatMul LM head produces %r: logits left for every position", LOGITS)
            return ir.passes.PassResult(model, modified=False)
        hidden = head.inputs[0]
        if hidden.producer() is not None and hidden.producer().name in ("graphopt_last_token",
                                                                       "graphopt_last_token_unsqueeze"):
            return ir.passes.PassResult(model, modified=False)  # already applied
        if hidden.shape is not None and len(hidden.shape) != 3:
            return ir.passes.PassResult(model, modified=False)
        if self.positions is not None:
            self._gather(graph, head, hidden)
        else:
            self._slice(graph, head, hidden)
        if output.shape is not None and len(output.shape) == 3:
            output.shape = ir.Shape([output.shape[0], 1, output.shape[2]])
        return ir.passes.PassResult(model, modified=True)

    def _gather(self, graph: ir.Graph, head: ir.Node, hidden: ir.Value) -> None:
        """hidden ``[B, S, H]`` -> ``[B, 1, H]`` at ``positions`` ``[B]``."""
        positions = ir.Value(name=self.positions, type=ir.TensorType(ir.DataType.INT64),
                             shape=ir.Shape([hidden.shape[0] if hidden.shape is not None else "batch"]))
        graph.inputs.append(positions)
        axis = ir.Value(name=unique_value_name(graph, "graphopt_last_token_axis"),
                        const_value=ir.tensor(np.array([1], dtype=np.int64)))
        graph.register_initializer(axis)
        index = ir.node("Unsqueeze", [positions, axis], name="graphopt_last_token_index")
        picked = ir.node("GatherND", [hidden, index.outputs[0]], attributes={"batch_dims": 1},
                         name="graphopt_last_token_gather")
        last = ir.node("Unsqueeze", [picked.outputs[0], axis], name="graphopt_last_token_unsqueeze")
        graph.insert_before(head, [index, picked, last])
        head.replace_input_with(0, last.outputs[0])

    @staticmethod
    def _slice(graph: ir.Graph, head: ir.Node, hidden: ir.Value) -> None:
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
