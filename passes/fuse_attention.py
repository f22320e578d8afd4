"""Written-out attention on a KV cache  =>  one fused attention operator per layer.

``MatMul -> Mul -> Add(mask) -> Softmax -> MatMul`` over ``Concat(past, new)`` (with RoPE and the
Expand/Reshape that repeats grouped KV heads) becomes, per target:

* ``cpu`` / ``cuda``: ``com.microsoft.GroupQueryAttention`` with rotary inside the op (Llama family;
  optionally with the q/k/v projections packed into one MatMul), or
  ``com.microsoft.MultiHeadAttention`` with past and the additive mask as ``attention_bias`` (GPT-2);
  Qwen3's per-head q/k norms stay before GroupQueryAttention (``/normed_qk`` rules); SmolLM3's
  layers without RoPE become GroupQueryAttention with ``do_rotary=0`` (``/no_rotary`` rules);
* ``tensorrt`` / ``onnx``: the standard opset-23 ``Attention`` with ``past_key`` / ``past_value``
  inputs and ``present`` outputs, so no contrib op is needed (RoPE is left to
  ``fuse_rotary``, which makes it opset-23 ``RotaryEmbedding``).

The rules are ours rather than onnxscript's ``ort_fusions`` GQA/MHA rules (``optimize_for_ort``
on this export yields MultiHeadAttention without GQA or rotary) because the KV-cache contract
differs: the export concatenates a BNSH cache and derives an additive mask from a 0/1
``attention_mask``; GroupQueryAttention's ``seqlens_k`` and ``total_sequence_length`` are derived
from that same ``attention_mask`` inside the graph, so the runtime feeds nothing new.

Contract of the GroupQueryAttention graph (recorded in graphopt.json by the fusion command): the
op masks causally and by length (``sum(attention_mask) - 1``), so padding must be on the right, and
positions are the cache positions ``past .. past + seq - 1`` (what the runtime feeds); the rotary
caches cover ``max_positions`` positions.

Rules are applied like any ``RewriteRuleSet`` (main graph, subgraphs, functions), but the GQA rule
needs the main graph's ``attention_mask`` and ``position_ids`` inputs, so in effect only the main
graph fuses (the exported decoder has no subgraphs or functions).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from graphopt.passes import fuse_attention_families
from graphopt.passes._attention_common import (CONTRIB_DOMAIN, FUSED_ATTENTION_OPS, GroupQueryAttentionFusion,
                                               GroupQueryAttentionNoRotaryFusion, GroupQueryAttentionNormedQKFusion,
                                               MultiHeadAttentionFusion, OnnxAttentionFusion)
from graphopt.passes._rule_pass import RulePass
from graphopt.passes.targets import Target, get_target


def rules(target: Target | str, max_positions: int | None = None, pack_qkv: bool = False) -> list[pattern.RewriteRule]:
    """The attention rules for ``target``; ``max_positions`` sizes GroupQueryAttention's rotary caches."""
    target = get_target(target)
    if target.contrib_ops:
        computed = target.computed_rotary_tables
        gqa = [GroupQueryAttentionFusion.rule(f"GroupQueryAttention{suffix}", repeat_kv=repeat, max_positions=max_positions,
                                              pack_qkv=pack_qkv, computed_tables=computed)
               for suffix, repeat in (("", True), ("NoRepeat", False))] if max_positions else []
        # After the plain rules (which take every Llama layer): layers with per-head q/k norms (Qwen3).
        normed = [GroupQueryAttentionNormedQKFusion.rule(f"GroupQueryAttention{suffix}/normed_qk", repeat_kv=repeat,
                                                         max_positions=max_positions, pack_qkv=False, computed_tables=computed)
                  for suffix, repeat in (("", True), ("NoRepeat", False))] if max_positions else []
        # gemma3_text / phi3: q/k norm, partial rotary, LongRoPE, sliding window.
        family = fuse_attention_families.rules(max_positions, computed) if max_positions else []
        # Layers without RoPE (SmolLM3) last: the GPT-2 layout (no RoPE, no KV repeat) is MultiHeadAttention's,
        # which honours any mask; a position-free layer with as many KV heads as heads fuses to it as well.
        no_rotary = [GroupQueryAttentionNoRotaryFusion.rule(f"GroupQueryAttention{suffix}/no_rotary", repeat_kv=repeat)
                     for suffix, repeat in (("", True), ("NoRepeat", False))]
        return [*gqa, *normed, *family, MultiHeadAttentionFusion.rule("MultiHeadAttention"), *no_rotary]
    return [OnnxAttentionFusion.rule(f"Attention{suffix}", repeat_kv=repeat) for suffix, repeat in (("", True), ("NoRepeat", False))]


class FuseAttention(RulePass):
    """One fused attention op per layer for ``target``; counts keyed by the op (``GroupQueryAttention``).

    Rules with and without the KV-head repeat count under the same op. ``max_positions`` (the
    model's context length) sizes GroupQueryAttention's rotary caches; without it Llama-family
    models are not fused for cpu/cuda.
    """

    def __init__(self, target: Target | str, max_positions: int | None = None, pack_qkv: bool = False):
        super().__init__([(rule.name.split("/")[0].removesuffix("NoRepeat"), rule)
                          for rule in rules(target, max_positions, pack_qkv)])
        self.target = get_target(target)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if any(self.counts.get(op, 0) for op in ("GroupQueryAttention", "MultiHeadAttention")):
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        return result


# The ops of computed rotary tables (``GroupQueryAttentionFusion._cos_sin``), evaluated with numpy.
_TABLE_OPS = {"Range": lambda start, limit, delta: np.arange(start, limit, delta, dtype=start.dtype),
              "Unsqueeze": lambda x, axes: np.expand_dims(x, tuple(int(axis) for axis in axes)),
              "Mul": np.multiply, "Cos": np.cos, "Sin": np.sin}


def _table_value(value: ir.Value) -> np.ndarray | None:
    """The array a value computed only from constants by ``_TABLE_OPS`` holds, else None."""
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    if node.op_type not in _TABLE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    arguments = [_table_value(argument) for argument in node.inputs]
    if any(argument is None for argument in arguments):
        return None
    return np.asarray(_TABLE_OPS[node.op_type](*arguments)).astype(arguments[0].dtype)


def store_rotary_tables(model: ir.Model) -> int:
    """Computed cos/sin tables become initializers again; returns how many.

    For a float16 conversion: positions past 2048 are not exact in float16, so the tables are
    computed here in float32 and converted as stored tables are. LongRoPE's ``Where`` between two
    tables keeps its (input-dependent) condition.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    stored: dict[int, ir.Value] = {}  # computed value -> its initializer (the layers share tables)
    for node in list(model.graph):
        if node.op_type == "GroupQueryAttention" and node.domain == CONTRIB_DOMAIN:
            indices = [7, 8]
        elif node.op_type == "Where" and node.metadata_props.get("graphopt.rule", "").startswith("GroupQueryAttention"):
            indices = [1, 2]
        else:
            continue
        for index in indices:
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None or value.const_value is not None or value.producer() is None:
                continue
            if id(value) not in stored:
                array = _table_value(value)
                if array is None:
                    continue
                tensor = ir.tensor(array, name=f"rotary.table_{len(stored)}")
                stored[id(value)] = ir.Value(name=tensor.name, shape=ir.Shape(array.shape),
                                             type=ir.TensorType(tensor.dtype), const_value=tensor)
                model.graph.register_initializer(stored[id(value)])
            node.replace_input_with(index, stored[id(value)])
    if stored:
        RemoveUnusedNodesPass()(model)
    return len(stored)


def fused_attention_count(model: ir.Model) -> int:
    """Fused attention ops in the main graph (one per fused layer)."""
    return sum(1 for node in model.graph if node.op_type in FUSED_ATTENTION_OPS
               and node.domain in ("", "ai.onnx", CONTRIB_DOMAIN))
