"""``Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul`` (RMSNorm) and residual ``Add`` + norm  =>  one norm op.

* ``cpu`` / ``cuda``: ``SimplifiedLayerNormalization``, then the residual Add folded in as
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (Llama) or ``SkipLayerNormalization`` (GPT-2's
  ``LayerNormalization``);
* ``tensorrt`` / ``onnx``: the standard opset-23 ``RMSNormalization`` (no skip variant exists in
  ONNX, so the residual Add stays).

All rules are onnxscript's own (``rewriter.ort_fusions.rms_normalization`` / ``skip_normalization``
and ``rewriter.rules.fusion._rms_normalization``); they fit the export as is. The skip rules check
shapes, so the graph needs the export's value shapes. Walks the main graph, its subgraphs and
functions (as ``RewriteRuleSet`` does).
"""

from __future__ import annotations

import logging

from onnxscript.rewriter.ort_fusions import rms_normalization as ort_rms
from onnxscript.rewriter.ort_fusions import skip_normalization as ort_skip
from onnxscript.rewriter.rules.fusion import _rms_normalization as onnx_rms

from graphopt.passes._rule_pass import RulePass
from graphopt.passes.targets import Target, get_target

logger = logging.getLogger(__name__)


def rules(target: Target | str):
    """(count key, rule) pairs for ``target``, in the order they must run."""
    if get_target(target).contrib_ops:
        # The RMSNorm rules first: the skip rule matches Add -> SimplifiedLayerNormalization.
        return [*(("SimplifiedLayerNormalization", rule) for rule in ort_rms.rms_normalization_rules),
                *(("SkipSimplifiedLayerNormalization", rule) for rule in ort_skip.skip_rms_normalization_ruleset),
                *(("SkipLayerNormalization", rule) for rule in ort_skip.skip_layer_normalization_ruleset)]
    return [("RMSNormalization", rule) for rule in onnx_rms.rms_normalization_rules]


class FuseNormalization(RulePass):
    """Norm fusions for ``target``; counts keyed by the op produced.

    ``SimplifiedLayerNormalization`` counts the RMSNorms that stayed without a residual; those later
    folded into ``SkipSimplifiedLayerNormalization`` are counted there only.
    """

    def __init__(self, target: Target | str):
        super().__init__(rules(target))
        self.target = get_target(target)

    def call(self, model):
        result = super().call(model)
        folded = self.counts.get("SkipSimplifiedLayerNormalization", 0)
        if "SimplifiedLayerNormalization" in self.counts:
            self.counts["SimplifiedLayerNormalization"] -= folded
        return result
