"""The written-out GELU (tanh or erf form)  =>  one GELU op.

* ``cpu`` / ``cuda``: onnxscript's ``ort_fusions.gelu`` rules as they are (``com.microsoft.FastGelu``
  for the tanh form, ``com.microsoft.Gelu`` for erf);
* ``tensorrt`` / ``onnx``: the same patterns rewritten to the standard opset-20 ``Gelu``
  (``approximate="tanh"`` or ``"none"``).

Walks the main graph, its subgraphs and functions (as ``RewriteRuleSet`` does).
"""

from __future__ import annotations

import logging

from onnxscript.rewriter.ort_fusions import gelu as ort_gelu

from graphopt.passes._rule_pass import RulePass
from graphopt.passes.targets import Target, get_target

logger = logging.getLogger(__name__)


class OnnxGeluTanhFusion(ort_gelu.GeluTanhFusion):
    def rewrite(self, op, x):
        return op.Gelu(x, approximate="tanh")


class OnnxGeluErfFusion(ort_gelu.GeluErfFusion):
    def rewrite(self, op, x):
        return op.Gelu(x, approximate="none")


def rules(target: Target | str):
    """(count key, rule) pairs for ``target``."""
    if get_target(target).contrib_ops:
        return [("FastGelu", ort_gelu.GeluTanhFusion.rule("FastGelu")), ("Gelu", ort_gelu.GeluErfFusion.rule("Gelu"))]
    return [("Gelu", OnnxGeluTanhFusion.rule("GeluTanh")), ("Gelu", OnnxGeluErfFusion.rule("GeluErf"))]


class FuseGelu(RulePass):
    """GELU fusion for ``target``; counts keyed by the op produced."""

    def __init__(self, target: Target | str):
        super().__init__(rules(target))
        self.target = get_target(target)
