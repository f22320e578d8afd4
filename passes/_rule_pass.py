"""A pass that applies onnxscript rewrite rules one at a time, counting matches per produced op.

Shared by the ``fuse_*`` passes: exact ``modified``, counts per op (``{"GroupQueryAttention": 30}``),
every new node tagged with the rule that made it, and ``explain()`` giving the reason each rule
did not match (onnxscript's matching tracer).
"""

from __future__ import annotations

import logging
from typing import Sequence

import onnx_ir as ir
from onnxscript.rewriter import _basics, pattern
from onnxscript.rewriter._rewrite_rule import RULE_NAME_TAG

from graphopt.ir import node_tag

logger = logging.getLogger(__name__)


class RulePass(ir.passes.InPlacePass):
    """Apply ``rules`` (pairs of count key and rule) in order to the main graph, in place.

    Walks the main graph and its subgraphs (what ``RewriteRuleSet`` walks) and the model's
    functions. ``counts`` holds the matches of the last call, keyed by the op each rule produces.
    """

    def __init__(self, rules: Sequence[tuple[str, pattern.RewriteRule]]):
        super().__init__()
        self.rules = list(rules)
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {key: 0 for key, _ in self.rules}
        for key, rule in self.rules:
            matched = pattern.RewriteRuleSet([rule]).apply_to_model(model)
            if matched:
                logger.debug("%s: %d match(es)", rule.name, matched)
            self.counts[key] += matched
        modified = any(self.counts.values())
        if modified:
            _tag_new_nodes(model)
        return ir.passes.PassResult(model, modified=modified)

    def explain(self, model: ir.Model, keys: set[str] | None = None) -> list[str]:
        """Why each rule (of those counted under ``keys``, default all) did not match ``model``.

        Gives the best partial match and the failure reason; runs the matcher with a tracer, which
        changes nothing.
        """
        selected = [(key, rule) for key, rule in self.rules if keys is None or key in keys]
        if not selected:
            return []
        tracer = _basics.MatchingTracer()
        pattern.RewriteRuleSet([rule for _, rule in selected]).apply_to_model(model, tracer=tracer)
        reasons = []
        for _key, rule in selected:
            matches = tracer.best_matches_map.get(rule, [])
            failed = [match for match in matches if match.status != _basics.MatchStatus.SUCCESS]
            if not matches:
                reasons.append(f"{rule.name}: no node starts the pattern")
            elif failed and len(failed) == len(matches):
                best = failed[0]
                reason = best.match_result.reason or "the graph differs from the pattern"
                status = "check failed" if best.status == _basics.MatchStatus.CONDITION_FAILED else "no match"
                node = best.root_node
                reasons.append(f"{rule.name}: {status} at {node.op_type} '{node.name}' "
                               f"({len(best.match_result.nodes)} nodes matched): {reason}")
        return reasons


def _tag_new_nodes(model: ir.Model) -> None:
    """Copy onnxscript's rule-name metadata to graphopt's tag on nodes that lack it."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        rule = node.metadata_props.get(RULE_NAME_TAG)
        if rule and "graphopt.rule" not in node.metadata_props:
            node_tag(node, rule)
