"""GroupQueryAttention for the families whose attention differs from Llama's: gemma3_text, phi3.

The Llama rule of ``fuse_attention`` takes ``Transpose(Reshape(x))`` straight into full-width RoPE
with one constant frequency vector and a plain causal mask. These rules accept, each checked:

* a per-head norm between the head split and RoPE (Gemma 3's q/k RMSNorm): the op is given the
  normed query/key flattened back to (batch, sequence, heads * head_dim);
* partial rotary (Phi-4-mini): ``Concat(rope(x[..., :d]), x[..., d:])``; the op's cos/sin caches
  are ``d / 2`` wide (GroupQueryAttention rotates the first ``d`` channels; it needs ``d / 2`` to be a
  multiple of 8);
* LongRoPE: frequencies ``Where(cond, long, short)`` (``cond`` the graph's own ``max(position_ids) +
  1 > original_max``); the op gets ``Where(cond, long_cache, short_cache)`` as its caches;
* a sliding-window mask (``sliding_causal_mask`` of ``models/_window.py``: the causal mask where
  ``query - key < window``), which becomes ``local_window_size = window`` (ONNX Runtime 1.32's CPU
  kernel attends to that many keys, the query's own included: checked against the written-out
  mask past the window in tests/test_families_b.py).

Each layer gets caches for its own frequencies (Gemma 3's local and global RoPE bases). The
contract is the Llama GQA graph's: right padding only, positions equal the cache positions.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _basics, pattern

from graphopt.passes._attention_common import (_BSNH_TO_BNSH, CONTRIB_DOMAIN, GroupQueryAttentionFusion, _ancestors,
                                               _attend_on_cache, _check_causal_mask, _check_scale, _constant, _heads,
                                               _reshaped, _rotate, _scalar)


def _rope(op, x, cos, sin, partial: bool):
    if not partial:
        return _rotate(op, x, cos, sin)
    rotated = _rotate(op, op.Slice(x, _allow_other_inputs=True), cos, sin)
    return op.Concat(rotated, op.Slice(x, _allow_other_inputs=True), axis=-1)


def _slice_bounds(node: ir.Node) -> tuple[int, int] | None:
    """(start, end) of a constant unit-step Slice of the last axis, else None."""
    starts, ends, axes = (_constant(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2, 3))
    steps = _constant(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.array([1])
    if starts is None or ends is None or axes is None or steps.tolist() != [1] or axes.tolist() not in ([-1], [3]):
        return None
    return int(starts[0]), int(ends[0])


def sliding_window(check: _basics.MatchResult, mask: ir.Value) -> int | None:
    """The window of ``Where(query - key < window, causal, lowest)``; 0 for a plain causal mask; None if neither."""
    where = mask.producer()
    if where is not None and where.op_type == "Where" and (_scalar(where.inputs[2]) or 0.0) <= -1e4:
        inner = where.inputs[1]
        if inner.producer() is not None and inner.producer().op_type == "Where":
            windows = [_scalar(node.inputs[1]) for node in [where.inputs[0].producer(), *_ancestors(where.inputs[0], 3)]
                       if node is not None and node.op_type == "Less" and node.inputs[0].producer() is not None
                       and node.inputs[0].producer().op_type == "Sub"]
            windows = [window for window in windows if window is not None]
            if len(windows) != 1 or windows[0] < 1 or not _check_causal_mask(check, inner):
                check.fail("sliding mask is not Where(query - key < constant window, causal mask, lowest)", mask)
                return None
            return int(windows[0])
    if not _check_causal_mask(check, mask):
        return None
    return 0


def _fail(check: _basics.MatchResult, reason: str, where) -> None:
    check.fail(reason, where)
    return None


def _trace_frequencies(check: _basics.MatchResult, trig_value: ir.Value, trig: str):
    """``Unsqueeze([Mul(] Cos|Sin(Concat(f, f)) [, s)])`` with ``f = positions * F`` and F a constant or
    ``Where(cond, long, short)`` of constants: ((short, long or None), scaling, cond or None), else None."""
    node = trig_value.producer()
    if node is None or node.op_type != "Unsqueeze":
        return _fail(check, f"rotary {trig.lower()} is not Unsqueeze({trig}(...))", trig_value)
    node = node.inputs[0].producer()
    scaling = 1.0
    if node is not None and node.op_type == "Mul":
        factors = [_scalar(value) for value in node.inputs]
        if sum(factor is not None for factor in factors) != 1:
            return _fail(check, f"rotary {trig.lower()} is scaled by a non-constant", node)
        scaling = next(factor for factor in factors if factor is not None)
        node = node.inputs[factors.index(None)].producer()
    if node is None or node.op_type != trig:
        return _fail(check, f"rotary table is not computed by {trig}", trig_value)
    concat = node.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return _fail(check, "rotary angles are not Concat(freqs, freqs)", node)
    freqs = concat.inputs[0].producer()
    if freqs is None or freqs.op_type != "Mul":
        return _fail(check, "rotary angles are not positions * inv_freq", concat)
    for positions, frequencies in (freqs.inputs, reversed(freqs.inputs)):
        source = positions
        while source.producer() is not None and source.producer().op_type in ("Cast", "Unsqueeze"):
            source = source.producer().inputs[0]
        if not (source.is_graph_input() and source.name == "position_ids"):
            continue
        constant = _constant(frequencies)
        if constant is not None:
            return (constant.reshape(-1).astype(np.float32), None), scaling, None
        where = frequencies.producer()
        if where is not None and where.op_type == "Where":
            long, short = _constant(where.inputs[1]), _constant(where.inputs[2])
            if long is not None and short is not None and long.size == short.size:
                return (short.reshape(-1).astype(np.float32), long.reshape(-1).astype(np.float32)), scaling, where.inputs[0]
        return _fail(check, "rotary frequencies are neither a constant nor Where(cond, long, short)", freqs)
    return _fail(check, "rotary positions do not come from the position_ids input", freqs)


class FamilyGroupQueryAttentionFusion(GroupQueryAttentionFusion):
    """norm? -> RoPE (full or partial, one or two frequency sets) -> cache -> attention (causal or
    sliding)  =>  GroupQueryAttention."""

    def __init__(self, name: str, repeat_kv: bool, max_positions: int, partial: bool, computed_tables: bool = False):
        super().__init__(name, repeat_kv, max_positions, computed_tables=computed_tables)
        self.partial = partial

    def pattern(self, op, query_bsnh, key_bsnh, value_3d, value_shape, cos, sin, past_key, past_value, mask, scale,
                output_shape):
        query = _rope(op, op.Transpose(query_bsnh, perm=_BSNH_TO_BNSH, _outputs=["query"]), cos, sin, self.partial)
        key = _rope(op, op.Transpose(key_bsnh, perm=_BSNH_TO_BNSH), cos, sin, self.partial)
        value = op.Transpose(op.Reshape(value_3d, value_shape), perm=_BSNH_TO_BNSH)
        return _attend_on_cache(op, query, key, value, past_key, past_value, mask, scale, self.repeat_kv, output_shape)

    def check(self, context, query, present_key, cos, sin, mask, scale, key_all=None, **_):
        check = _basics.MatchResult()
        shape = _heads(check, query, present_key, key_all)
        if shape is None:
            return check
        window = sliding_window(check, mask)
        if window is None:
            return check
        self._shape, self._window = shape, window
        self._scale = _check_scale(check, scale)
        if self._scale is None:
            return check
        traced = [_trace_frequencies(check, cos, "Cos"), _trace_frequencies(check, sin, "Sin")]
        if None in traced:
            return check
        (short, long), scaling, cond = traced[0]
        (short_sin, long_sin), scaling_sin, cond_sin = traced[1]
        if not np.array_equal(short, short_sin) or (long is None) != (long_sin is None) \
                or (long is not None and not np.array_equal(long, long_sin)) or scaling != scaling_sin or cond is not cond_sin:
            return check.fail("cos and sin tables use different frequencies", [cos, sin])
        rotary_dim, head_dim = 2 * short.size, shape[2]
        if (rotary_dim == head_dim) == self.partial:
            return check.fail(f"rotary covers {rotary_dim} of head_dim {head_dim}", cos)
        if short.size % 8:
            return check.fail(f"GroupQueryAttention's rotary needs rotary_dim / 2 = {short.size} to be a multiple of 8", cos)
        if not self._check_slices(check, context.nodes, rotary_dim, head_dim):
            return check
        self._tables = (short, long, np.float32(scaling), cond)
        self._mask_input = self._attention_mask(check, context)
        return check

    def _check_slices(self, check: _basics.MatchResult, nodes, rotary_dim: int, head_dim: int) -> bool:
        """rotate_half's Slices split the rotated width in halves; partial rotary's split it off the rest."""
        half = rotary_dim // 2
        for node in (node for node in nodes if node.op_type == "Slice"):
            bounds = _slice_bounds(node)
            users = [use.node.op_type for use in node.outputs[0].uses()]
            if self.partial and node.inputs[0].producer() is not None and node.inputs[0].producer().op_type == "Transpose":
                expected = [(0, rotary_dim)] if "Mul" in users else [(rotary_dim, None)]
            else:
                expected = [(half, None)] if "Neg" in users else [(0, half)]
            start, end = expected[0]
            if bounds is None or bounds[0] != start or (end is not None and bounds[1] != end) \
                    or (end is None and bounds[1] < (rotary_dim if start == half else head_dim)):
                check.fail(f"rotary Slice {bounds} is not the expected [{start}:{end or 'end'}] (rotary_dim {rotary_dim})",
                           node)
                return False
        return True

    def _rotary_caches(self, op) -> tuple[ir.Value, ir.Value]:
        """Caches for this layer's frequencies (shared by layers with the same ones), switched by LongRoPE's cond."""
        short, long, scaling, cond = self._tables
        key = ("rotary", short.tobytes(), None if long is None else long.tobytes(), float(scaling), id(cond))
        if key not in self._shared:
            index = sum(isinstance(k, tuple) for k in self._shared)
            tables = [self._cos_sin(op, inv_freq, scaling, f"rotary.{index}{label}")
                      for label, inv_freq in (("", short), (".long", long)) if inv_freq is not None]
            if long is not None:
                tables = [[op.Where(cond, tables[1][i], tables[0][i]) for i in range(2)]]
                self._tag(*tables[0])
            self._shared[key] = tuple(tables[0])
        return self._shared[key]

    @staticmethod
    def _flat(op, bsnh: ir.Value) -> ir.Value:
        """(batch, sequence, heads * head_dim) of a BSNH value: the Reshape's input if it is one of a 3-D value."""
        node = bsnh.producer()
        if node is not None and node.op_type == "Reshape" and node.inputs[0].shape is not None \
                and node.inputs[0].shape.rank() == 3:
            return node.inputs[0]
        return op.Reshape(bsnh, op.Constant(value=ir.tensor(np.array([0, 0, -1], dtype=np.int64))))

    def rewrite(self, op, query_bsnh, key_bsnh, value_3d, past_key, past_value, output_shape, attention_output, **_):
        heads, kv_heads, head_dim = self._shape
        seqlens_k, total_length = self._lengths(op)
        cos_cache, sin_cache = self._rotary_caches(op)
        attributes = {"local_window_size": self._window} if self._window else {}
        output, present_key, present_value = op.GroupQueryAttention(
            self._flat(op, query_bsnh), self._flat(op, key_bsnh), value_3d, past_key, past_value, seqlens_k,
            total_length, cos_cache, sin_cache, num_heads=heads, kv_num_heads=kv_heads, scale=self._scale, do_rotary=1,
            rotary_interleaved=0, **attributes, _domain=CONTRIB_DOMAIN, _outputs=3)
        self._tag(output)
        return _reshaped(op, output, output_shape, attention_output, heads * head_dim), present_key, present_value


def rules(max_positions: int, computed_tables: bool = False) -> list[pattern.RewriteRule]:
    """Every variant (KV repeat or not, full or partial rotary), counted as GroupQueryAttention."""
    return [FamilyGroupQueryAttentionFusion.rule(
                f"GroupQueryAttention/family{'' if repeat else '_norepeat'}{'_partial' if partial else ''}",
                repeat_kv=repeat, max_positions=max_positions, partial=partial, computed_tables=computed_tables)
            for repeat in (True, False) for partial in (False, True)]
