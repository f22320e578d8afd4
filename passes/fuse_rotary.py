"""``x * cos + Concat(-x2, x1) * sin`` (RoPE, rotate-half form)  =>  standard opset-23 ``RotaryEmbedding``.

For the ``tensorrt`` / ``onnx`` targets only: on ``cpu`` / ``cuda`` GroupQueryAttention applies the
rotary itself. The rule is onnxscript's ``rewriter.rules.fusion._rotary_embedding`` as it is; each
match recomputes ``Cos`` / ``Sin`` of the shared angles, so common-subexpression elimination
follows to keep one pair per graph. Walks the main graph, its subgraphs and functions.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass
from onnxscript.rewriter.rules.fusion import _rotary_embedding as onnx_rotary

from graphopt.passes._rule_pass import RulePass

logger = logging.getLogger(__name__)


class FuseRotaryEmbedding(RulePass):
    """RoPE on query and key  =>  ``RotaryEmbedding`` (opset 23); counts under ``RotaryEmbedding``."""

    def __init__(self):
        super().__init__([("RotaryEmbedding", onnx_rotary.RotaryEmbedding23Fusion.rule())])

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:
            CommonSubexpressionEliminationPass()(model)
        return result
