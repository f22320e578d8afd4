"""A draft's LM head over the tokens it is likely to propose: the same logits, a fraction of the head.

A distilled draft is cheap because it is shallow, which leaves its LM head (49152 x 576 for
SmolLM2, tied to the embedding) half of what a draft step reads. Speculative decoding only needs the
draft's most likely token (or a sample from its distribution), and the target verifies every
proposal with its own full head, so a draft that scores only the tokens text is mostly made of
loses acceptance only when the target's token is outside them: the output stays the target's.

    logits = MatMul(h, W)                     [batch, seq, vocab]
=>
    scores = MatMul(h, W[:, keep])            [batch, seq, len(keep)]
    logits = ScatterElements(Expand(lowest, [batch, seq, vocab]), Expand(keep), scores, axis=-1)

``logits`` keeps the decoder contract (the whole vocabulary), with the float32 minimum for the
tokens left out: argmax and sampling never choose them. A tied embedding keeps reading the whole
table; the head reads its own copy of the kept rows. :func:`frequent_tokens` picks ``keep`` from
token counts (text sampled from the target). The pass edits the main graph only (the exported
decoders have no subgraphs or functions), in place.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.ir import node_tag, unique_value_name
from graphopt.passes.quantize_common import add_initializer, drop_if_unused, site_of

logger = logging.getLogger(__name__)

RULE = "draft_vocabulary"
KEPT_IDS = "draft_vocabulary.ids"  # the initializer holding the kept token ids


def frequent_tokens(counts: np.ndarray, size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The ``size`` most frequent token ids by ``counts`` (ties: lower id first), ``always`` included, sorted."""
    if not 0 < size <= len(counts):
        raise GraphoptError(f"a draft vocabulary must keep 1 to {len(counts)} tokens, not {size}")
    forced = {int(token) for token in always if 0 <= int(token) < len(counts)}
    order = np.lexsort((np.arange(len(counts)), -np.asarray(counts)))  # by count, descending; then by id
    chosen = [int(token) for token in order if int(token) not in forced][:max(size - len(forced), 0)]
    return np.array(sorted({*forced, *chosen}), dtype=np.int64)


def coverage(counts: np.ndarray, keep: np.ndarray) -> float:
    """Share of the counted tokens that ``keep`` holds."""
    total = float(np.sum(counts))
    return float(np.sum(np.asarray(counts)[keep])) / total if total else 0.0


class HeadPreconditionError(GraphoptError, ir.passes.PreconditionError):
    """Raised from ``requires()``: still a GraphoptError, so the CLI prints one line."""


class RestrictHeadVocabulary(ir.passes.InPlacePass):
    """Score only the token ids ``keep`` in the head that produces ``logits``; the rest get the float32 minimum."""

    def __init__(self, keep: Sequence[int]):
        super().__init__()
        self.keep = np.unique(np.asarray(keep, dtype=np.int64))

    def requires(self, model: ir.Model) -> None:
        producer = _logits_producer(model.graph)
        if producer.metadata_props.get("graphopt.rule") != RULE and site_of(producer) is None:
            raise HeadPreconditionError(f"'logits' comes from {producer.op_type}, not a float MatMul by a constant "
                                "weight: restrict the vocabulary before quantizing")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        producer = _logits_producer(graph)
        if producer.metadata_props.get("graphopt.rule") == RULE:
            return ir.passes.PassResult(model, modified=False)  # the ScatterElements of an earlier run
        logits = producer.outputs[0]
        site = site_of(producer)
        weight = site.weight()  # [hidden, vocab]
        vocab = weight.shape[1]
        if len(self.keep) == 0 or self.keep[0] < 0 or self.keep[-1] >= vocab:
            raise GraphoptError(f"kept token ids must lie in 0..{vocab - 1}")
        if len(self.keep) == vocab:
            return ir.passes.PassResult(model, modified=False)

        kept = add_initializer(graph, f"{site.source.name or 'lm_head'}.kept", np.ascontiguousarray(weight[:, self.keep]))
        ids = add_initializer(graph, KEPT_IDS, self.keep)
        lowest = add_initializer(graph, "draft_vocabulary.lowest",
                                 np.full([vocab], np.finfo(np.float32).min, dtype=np.float32))
        vocab_size = add_initializer(graph, "draft_vocabulary.size", np.array([vocab], dtype=np.int64))
        old_weight = producer.inputs[1]
        nodes = [
            scores := ir.node("MatMul", [site.activation, kept]),
            batch_seq := ir.node("Shape", [scores.outputs[0]], attributes={"start": 0, "end": -1}),
            full := ir.node("Concat", [batch_seq.outputs[0], vocab_size], attributes={"axis": 0}),
            base := ir.node("Expand", [lowest, full.outputs[0]]),
            scores_shape := ir.node("Shape", [scores.outputs[0]]),
            where := ir.node("Expand", [ids, scores_shape.outputs[0]]),
            scatter := ir.node("ScatterElements", [base.outputs[0], where.outputs[0], scores.outputs[0]],
                               attributes={"axis": -1}),
        ]
        for node in nodes:
            node_tag(node, RULE)
        scores.name = (producer.name or "/lm_head/MatMul") + "_kept"
        graph.insert_before(producer, nodes)
        new = scatter.outputs[0]
        position = [value.name for value in graph.outputs].index("logits")
        logits.name = unique_value_name(graph, "logits_whole_vocabulary")
        new.name, new.dtype, new.shape = "logits", ir.DataType.FLOAT, logits.shape
        graph.outputs[position] = new
        ir.convenience.replace_all_uses_with(logits, new)
        graph.remove(producer, safe=True)
        drop_if_unused(graph, old_weight)
        logger.info("draft head scores %d of %d tokens", len(self.keep), vocab)
        return ir.passes.PassResult(model, modified=True)


def _logits_producer(graph: ir.Graph) -> ir.Node:
    logits = next((value for value in graph.outputs if value.name == "logits"), None)
    producer = logits.producer() if logits is not None else None
    if producer is None:
        raise HeadPreconditionError("the graph has no 'logits' output computed by a node")
    return producer
