"""What the attention rules share: the match helpers and the rule classes for the Llama layout.

``fuse_attention`` builds its rules from these classes and ``fuse_attention_families`` subclasses
them for the families whose attention differs; both import this module, neither imports the other
back (see ``fuse_attention``'s docstring for what the rules match and produce).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _basics, pattern

from graphopt.ir import node_tag

CONTRIB_DOMAIN = "com.microsoft"
# Attention ops the rules produce; a graph holding any of them counts as fused already.
FUSED_ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention"})
_BSNH_TO_BNSH = [0, 2, 1, 3]


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or folded Constant), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _scalar(value: ir.Value | None) -> float | None:
    array = _constant(value)
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def _static_dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or value.shape.rank() <= axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _attend_on_cache(op, query, key, value, past_key, past_value, mask, scale, repeat_kv: bool, output_shape=None):
    """``softmax(q @ k^T * scale + mask) @ v`` over ``Concat(past, new)``, as the export writes it.

    Returns the context (BNSH) and the two present values; with ``output_shape``, the context with its
    heads merged back (``attention_output``, BSH) instead. With ``repeat_kv`` the cache is widened
    to every query head by ``Reshape(Expand(Unsqueeze(kv)))`` (``repeat_kv`` in models/_common.py).
    """
    present_key = op.Concat(past_key, key, axis=2, _outputs=["present_key"])
    present_value = op.Concat(past_value, value, axis=2, _outputs=["present_value"])
    key_all, value_all = present_key, present_value
    if repeat_kv:
        key_all = op.Reshape(op.Expand(op.Unsqueeze(present_key, pattern.ANY_VALUE), pattern.ANY_VALUE),
                             pattern.ANY_VALUE, _outputs=["key_all"])
        value_all = op.Reshape(op.Expand(op.Unsqueeze(present_value, pattern.ANY_VALUE), pattern.ANY_VALUE),
                               pattern.ANY_VALUE, _outputs=["value_all"])
    scores = op.MatMul(query, op.Transpose(key_all, perm=[0, 1, 3, 2]))
    probs = op.Softmax(op.Add(op.Mul(scores, scale), mask), axis=-1)
    context = op.MatMul(probs, value_all)
    if output_shape is not None:
        context = op.Reshape(op.Transpose(context, perm=_BSNH_TO_BNSH), output_shape, _outputs=["attention_output"])
    return context, present_key, present_value


def _rotate(op, x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half = Concat(-x[half:], x[:half])``."""
    rotated = op.Concat(op.Neg(op.Slice(x, _allow_other_inputs=True)), op.Slice(x, _allow_other_inputs=True), axis=-1)
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))


def _heads(check: _basics.MatchResult, query, present_key, key_all=None):
    """(heads, kv_heads, head_dim) from the BNSH shapes, or a failure in ``check``."""
    heads, head_dim = _static_dim(query, 1), _static_dim(query, 3)
    kv_heads = _static_dim(present_key, 1)
    if None in (heads, head_dim, kv_heads):
        check.fail("query/cache shapes have no static heads or head_dim (run shape inference)", [query, present_key])
        return None
    if heads % kv_heads:
        check.fail(f"{heads} query heads are not a multiple of {kv_heads} KV heads", present_key)
        return None
    if key_all is not None and _static_dim(key_all, 1) != heads:
        check.fail(f"repeated KV has {_static_dim(key_all, 1)} heads, query has {heads}", key_all)
        return None
    if key_all is None and kv_heads != heads:
        check.fail(f"{kv_heads} KV heads used as {heads} heads without repeat", present_key)
        return None
    return heads, kv_heads, head_dim


def _check_scale(check: _basics.MatchResult, scale) -> float | None:
    value = _scalar(scale)
    if value is None:
        check.fail("attention scale is not a constant scalar", scale)
    return value


def _check_rotate_half(check: _basics.MatchResult, nodes, head_dim: int) -> bool:
    """The two Slices take the last axis' halves: ``x[..., half:]`` negated, then ``x[..., :half]``."""
    half = head_dim // 2
    slices = [node for node in nodes if node.op_type == "Slice"]
    for node in slices:
        starts, ends, axes = (_constant(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2, 3))
        steps = _constant(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.array([1])
        if starts is None or ends is None or axes is None or steps.tolist() != [1] or axes.tolist() not in ([-1], [3]):
            check.fail("rotary Slice is not a constant unit-step slice of the last axis", node)
            return False
        negated = node.outputs[0].uses() and next(iter(node.outputs[0].uses())).node.op_type == "Neg"
        expected = (half, None) if negated else (0, half)
        if int(starts[0]) != expected[0] or (expected[1] is not None and int(ends[0]) != expected[1]) \
                or (expected[1] is None and int(ends[0]) < head_dim):
            check.fail(f"rotary Slice [{int(starts[0])}:{int(ends[0])}] is not rotate_half of head_dim {head_dim} "
                       "(interleaved or partial rotary is not fused)", node)
            return False
    return True


def _ancestors(value: ir.Value, limit: int = 12) -> list[ir.Node]:
    """Producers up to ``limit`` steps above ``value`` (the mask subgraph is small)."""
    seen, frontier = [], [value]
    for _ in range(limit):
        frontier = [v.producer() for v in frontier if v is not None and v.producer() is not None]
        frontier = [node for node in frontier if node not in seen]
        seen += frontier
        frontier = [v for node in frontier for v in node.inputs]
    return seen


def _check_causal_mask(check: _basics.MatchResult, mask: ir.Value) -> bool:
    """The mask is the export's ``Where(causal & attention_mask > 0, 0, lowest)``.

    GroupQueryAttention drops the mask and masks causally by length itself, so any other mask
    (sliding window, bidirectional, a bias) must not be fused into it.
    """
    where = mask.producer()
    if where is None or where.op_type != "Where" or _scalar(where.inputs[1]) != 0.0 \
            or (_scalar(where.inputs[2]) or 0.0) > -1e4:  # the dtype's lowest: -3.4e38, -65504 in fp16
        check.fail("mask is not Where(condition, 0, lowest) as the export builds it", mask)
        return False
    ancestors = _ancestors(where.inputs[0])
    causal = any(node.op_type == "LessOrEqual" for node in ancestors)
    from_input = any(value.is_graph_input() and value.name == "attention_mask"
                     for node in ancestors for value in node.inputs if value is not None)
    if not (causal and from_input):
        check.fail("mask is not causal & attention_mask (GroupQueryAttention masks causally by length only)", mask)
        return False
    return True


@dataclasses.dataclass
class _RotaryTables:
    inv_freq: np.ndarray
    scaling: float


def _trace_rotary(check: _basics.MatchResult, trig_value: ir.Value, trig: str) -> _RotaryTables | None:
    """Follow ``Unsqueeze([Mul(] Cos|Sin(Concat(f, f)) [, s)]) <- f = Cast(Unsqueeze(position_ids)) * inv_freq``.

    Returns the constant frequencies and scaling, so the op's cos/sin caches equal what the graph
    computes at every position; fails when the angles do not come from ``position_ids``.
    """
    node = trig_value.producer()
    if node is None or node.op_type != "Unsqueeze":
        check.fail(f"rotary {trig.lower()} is not Unsqueeze({trig}(...)) of the position angles", trig_value)
        return None
    node = node.inputs[0].producer()
    scaling = 1.0
    if node is not None and node.op_type == "Mul":
        factors = [_scalar(value) for value in node.inputs]
        constant = [factor for factor in factors if factor is not None]
        if len(constant) != 1:
            check.fail(f"rotary {trig.lower()} is scaled by a non-constant", node)
            return None
        scaling = constant[0]
        node = node.inputs[factors.index(None)].producer()
    if node is None or node.op_type != trig:
        check.fail(f"rotary table is not computed by {trig} from position ids", trig_value)
        return None
    concat = node.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        check.fail("rotary angles are not Concat(freqs, freqs)", node)
        return None
    freqs = concat.inputs[0].producer()
    if freqs is None or freqs.op_type != "Mul":
        check.fail("rotary angles are not positions * inv_freq", concat)
        return None
    arrays = [_constant(value) for value in freqs.inputs]
    inv_freq = next((array for array in arrays if array is not None), None)
    positions = next((value for value, array in zip(freqs.inputs, arrays) if array is None), None)
    if inv_freq is None or positions is None:
        check.fail("rotary frequencies are not a constant", freqs)
        return None
    source = positions
    while source.producer() is not None and source.producer().op_type in ("Cast", "Unsqueeze"):
        source = source.producer().inputs[0]
    if not source.is_graph_input() or source.name != "position_ids":
        check.fail("rotary positions do not come from the position_ids input", positions)
        return None
    return _RotaryTables(inv_freq.reshape(-1).astype(np.float32), scaling)


def _projection(value: ir.Value):
    """``value = MatMul(x, W) [+ b]`` with constant 2-D W (1-D b): (x, W, b or None), else None."""
    node = value.producer()
    bias = None
    if node is not None and node.op_type == "Add":
        arrays = [_constant(v) for v in node.inputs]
        biases = [array for array in arrays if array is not None and array.ndim == 1]
        if len(biases) != 1:
            return None
        bias = biases[0]
        node = node.inputs[[array is None for array in arrays].index(True)].producer()
    if node is None or node.op_type != "MatMul":
        return None
    weight = _constant(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    return node.inputs[0], weight, bias


def _reshaped(op, output: ir.Value, output_shape: ir.Value, original: ir.Value, width: int) -> ir.Value:
    """The fused (batch, sequence, width) output, reshaped like the original only where that differs."""
    shape = original.shape
    if shape is not None and shape.rank() == 3 and shape[2] == width:
        return output
    return op.Reshape(output, output_shape)


class _CacheRule(pattern.RewriteRuleClassBase):
    """Shared state of the contrib rules: values derived once per graph and reused by every layer."""

    def __init__(self, name: str, repeat_kv: bool):
        super().__init__(name)
        self.repeat_kv = repeat_kv

    def setup(self):
        self._shared: dict[str, ir.Value] = {}

    def _attention_mask(self, check: _basics.MatchResult, context) -> ir.Value | None:
        graph = context.graph_or_function
        mask = next((value for value in graph.inputs if value.name == "attention_mask"), None)
        if mask is None:
            check.fail("graph has no attention_mask input to derive the op's lengths from")
        return mask

    def _tag(self, *values: ir.Value) -> None:
        for value in values:
            node_tag(value.producer(), self.name)

    def _check_heads_mask_scale(self, check: _basics.MatchResult, query, present_key, key_all, mask, scale) -> bool:
        """Heads, causal mask and scale: sets ``_shape`` and ``_scale``; False (``check`` says why) when one fails."""
        shape = _heads(check, query, present_key, key_all)
        if shape is None or not _check_causal_mask(check, mask):
            return False
        self._shape = shape
        self._scale = _check_scale(check, scale)
        return self._scale is not None


class GroupQueryAttentionFusion(_CacheRule):
    """Llama family: projections -> BNSH -> RoPE -> cache -> attention  =>  GroupQueryAttention.

    Rotary runs inside the op from cos/sin caches of ``max_positions`` rows, computed from the
    graph's own constant frequencies. With ``pack_qkv`` the three projections become one MatMul
    (off by default: no decode gain measured on SmolLM2, where the weights' bytes dominate, and the
    packed weight loses the checkpoint's per-projection names that later passes key on).
    """

    def __init__(self, name: str, repeat_kv: bool, max_positions: int, pack_qkv: bool = False,
                 computed_tables: bool = False):
        super().__init__(name, repeat_kv)
        self.max_positions = max_positions
        self.pack_qkv = pack_qkv
        self.computed_tables = computed_tables

    def pattern(self, op, query_3d, key_3d, value_3d, query_shape, key_shape, value_shape, cos, sin, past_key,
                past_value, mask, scale, output_shape):
        query = _rotate(op, op.Transpose(op.Reshape(query_3d, query_shape), perm=_BSNH_TO_BNSH, _outputs=["query"]),
                        cos, sin)
        key = _rotate(op, op.Transpose(op.Reshape(key_3d, key_shape), perm=_BSNH_TO_BNSH), cos, sin)
        value = op.Transpose(op.Reshape(value_3d, value_shape), perm=_BSNH_TO_BNSH)
        return _attend_on_cache(op, query, key, value, past_key, past_value, mask, scale, self.repeat_kv, output_shape)

    def check(self, context, query, present_key, cos, sin, mask, scale, key_all=None, **_):
        check = _basics.MatchResult()
        if not self._check_heads_mask_scale(check, query, present_key, key_all, mask, scale):
            return check
        shape = self._shape
        if not _check_rotate_half(check, context.nodes, shape[2]):
            return check
        tables = [_trace_rotary(check, cos, "Cos"), _trace_rotary(check, sin, "Sin")]
        if None in tables:
            return check
        if not np.array_equal(tables[0].inv_freq, tables[1].inv_freq) or tables[0].scaling != tables[1].scaling:
            return check.fail("cos and sin tables use different frequencies", [cos, sin])
        if 2 * tables[0].inv_freq.size != shape[2]:
            return check.fail(f"rotary covers {2 * tables[0].inv_freq.size} of head_dim {shape[2]} (partial rotary)", cos)
        self._tables = tables[0]
        self._mask_input = self._attention_mask(check, context)
        return check

    def _lengths(self, op) -> tuple[ir.Value, ir.Value]:
        """``seqlens_k = sum(attention_mask) - 1`` (int32, per batch) and ``total_sequence_length``."""
        if "seqlens_k" not in self._shared:
            mask = self._mask_input
            one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int64)))
            summed = op.ReduceSum(mask, one, keepdims=0)
            seqlens = op.Cast(op.Sub(summed, op.Constant(value=ir.tensor(np.array(1, dtype=np.int64)))),
                              to=ir.DataType.INT32)
            total = op.Cast(op.Squeeze(op.Shape(mask, start=1, end=2), op.Constant(value=ir.tensor(np.array([0], dtype=np.int64)))),
                            to=ir.DataType.INT32)
            self._tag(summed, seqlens, total)
            self._shared.update(seqlens_k=seqlens, total_sequence_length=total)
        return self._shared["seqlens_k"], self._shared["total_sequence_length"]

    def _rotary_caches(self, op) -> tuple[ir.Value, ir.Value]:
        """(max_positions, head_dim / 2) cos and sin tables, computed like the graph computes them."""
        if "cos_cache" not in self._shared:
            self._shared["cos_cache"], self._shared["sin_cache"] = self._cos_sin(
                op, self._tables.inv_freq, self._tables.scaling, "rotary")
        return self._shared["cos_cache"], self._shared["sin_cache"]

    def _cos_sin(self, op, inv_freq: np.ndarray, scaling: float, name: str) -> tuple[ir.Value, ir.Value]:
        """``cos(p * inv_freq) * scaling`` and ``sin(...)`` for positions ``p < max_positions``.

        Stored as initializers, or with ``computed_tables`` written as the few ops that compute them
        from ``inv_freq`` (ONNX Runtime folds them once when the session starts): 2 x max_positions x
        head_dim / 2 floats fewer in the file (2.1 MB for SmolLM2's 8192 positions).
        """
        inv_freq = np.asarray(inv_freq, dtype=np.float32)
        scaling = np.float32(scaling)
        if not self.computed_tables:
            angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
            return (op.initializer(ir.tensor((np.cos(angles) * scaling).astype(np.float32)), name=f"{name}.cos_cache"),
                    op.initializer(ir.tensor((np.sin(angles) * scaling).astype(np.float32)), name=f"{name}.sin_cache"))
        scalar = lambda value: op.Constant(value=ir.tensor(np.array(value, dtype=np.float32)))  # noqa: E731
        positions = op.Range(scalar(0), scalar(self.max_positions), scalar(1))
        column = op.Unsqueeze(positions, op.Constant(value=ir.tensor(np.array([1], dtype=np.int64))))
        angles = op.Mul(column, op.initializer(ir.tensor(inv_freq[None, :]), name=f"{name}.inv_freq"))
        made = [positions, column, angles, op.Cos(angles), op.Sin(angles)]
        if scaling != 1:
            made += [op.Mul(table, scalar(scaling)) for table in made[-2:]]
        self._tag(*made)
        return made[-2], made[-1]

    def _packed_qkv(self, op, query_3d, key_3d, value_3d) -> ir.Value | None:
        """One MatMul (+ bias) with the three projections' weights side by side, or None.

        Three GEMVs become one per decoded token; GroupQueryAttention takes the packed tensor as
        its query and no key/value. Applies when all three are ``MatMul(x, W) [+ b]`` on the same
        ``x`` with constant weights (and all or none biased).
        """
        projections = [_projection(value) for value in (query_3d, key_3d, value_3d)]
        if None in projections or len({p[0] for p in projections}) != 1 \
                or len({p[2] is None for p in projections}) != 1:
            return None
        hidden = projections[0][0]
        # Numbered per match (layer order): unique even if two layers share a weight value.
        index = sum(key.startswith("qkv_proj.") for key in self._shared)
        name = f"qkv_proj.{index}.weight"
        self._shared[name] = hidden
        weight = np.concatenate([p[1] for p in projections], axis=1)
        packed = op.MatMul(hidden, op.initializer(ir.tensor(weight), name=name))
        self._tag(packed)
        if projections[0][2] is not None:
            bias = np.concatenate([p[2] for p in projections])
            packed = op.Add(packed, op.initializer(ir.tensor(bias), name=f"qkv_proj.{index}.bias"))
            self._tag(packed)
        return packed

    def rewrite(self, op, query_3d, key_3d, value_3d, past_key, past_value, output_shape, attention_output, **_):
        heads, kv_heads, _head_dim = self._shape
        seqlens_k, total_length = self._lengths(op)
        cos_cache, sin_cache = self._rotary_caches(op)
        packed = self._packed_qkv(op, query_3d, key_3d, value_3d) if self.pack_qkv else None
        if packed is not None:
            query_3d, key_3d, value_3d = packed, None, None
        output, present_key, present_value = op.GroupQueryAttention(
            query_3d, key_3d, value_3d, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
            num_heads=heads, kv_num_heads=kv_heads, scale=self._scale, do_rotary=1, rotary_interleaved=0,
            _domain=CONTRIB_DOMAIN, _outputs=3)
        self._tag(output)
        return _reshaped(op, output, output_shape, attention_output, heads * _head_dim), present_key, present_value


def _flatten_heads(op, states: ir.Value, width: int) -> ir.Value:
    """(batch, seq, heads, head_dim) -> (batch, seq, width), reusing the projection's 3-D output
    where ``states`` is only its reshape into heads."""
    producer = states.producer()
    if producer is not None and producer.op_type == "Reshape":
        source = producer.inputs[0]
        if source.shape is not None and source.shape.rank() == 3 and source.shape[2] == width:
            return source
    # An initializer, not a Constant node: pruning rewrites the width in place of constant targets.
    target = op.initializer(ir.tensor(np.array([0, 0, width], dtype=np.int64)), name=f"{states.name}.flattened_shape")
    return op.Reshape(states, target)


class GroupQueryAttentionNormedQKFusion(GroupQueryAttentionFusion):
    """Qwen3: query and key normalized per head (BSNH) before RoPE  =>  the norms, then GroupQueryAttention.

    Query and key may come from any (batch, seq, heads, head_dim) producer (the per-head RMSNorm);
    they are flattened back to (batch, seq, heads * head_dim) for the op, which applies the rotary
    itself, so the norm stays where the model has it: before the rotation.
    """

    def pattern(self, op, query_4d, key_4d, value_3d, value_shape, cos, sin, past_key, past_value, mask, scale,
                output_shape):
        query = _rotate(op, op.Transpose(query_4d, perm=_BSNH_TO_BNSH, _outputs=["query"]), cos, sin)
        key = _rotate(op, op.Transpose(key_4d, perm=_BSNH_TO_BNSH), cos, sin)
        value = op.Transpose(op.Reshape(value_3d, value_shape), perm=_BSNH_TO_BNSH)
        return _attend_on_cache(op, query, key, value, past_key, past_value, mask, scale, self.repeat_kv, output_shape)

    def rewrite(self, op, query_4d, key_4d, value_3d, past_key, past_value, output_shape, attention_output, **_):
        heads, kv_heads, head_dim = self._shape
        return super().rewrite(op, _flatten_heads(op, query_4d, heads * head_dim),
                               _flatten_heads(op, key_4d, kv_heads * head_dim), value_3d, past_key, past_value,
                               output_shape, attention_output)


class GroupQueryAttentionNoRotaryFusion(_CacheRule):
    """SmolLM3's position-free layers: BNSH -> cache -> attention, no RoPE  =>  GroupQueryAttention, ``do_rotary=0``.

    Query and key may come from any (batch, seq, heads, head_dim) producer (a plain reshape of the
    projection, or a per-head norm). Runs after the rotary rules, which take every layer that rotates.
    """

    def pattern(self, op, query_4d, key_4d, value_3d, value_shape, past_key, past_value, mask, scale, output_shape):
        query = op.Transpose(query_4d, perm=_BSNH_TO_BNSH, _outputs=["query"])
        key = op.Transpose(key_4d, perm=_BSNH_TO_BNSH)
        value = op.Transpose(op.Reshape(value_3d, value_shape), perm=_BSNH_TO_BNSH)
        return _attend_on_cache(op, query, key, value, past_key, past_value, mask, scale, self.repeat_kv, output_shape)

    def check(self, context, query, present_key, mask, scale, key_all=None, **_):
        check = _basics.MatchResult()
        if not self._check_heads_mask_scale(check, query, present_key, key_all, mask, scale):
            return check
        self._mask_input = self._attention_mask(check, context)
        return check

    def rewrite(self, op, query_4d, key_4d, value_3d, past_key, past_value, output_shape, attention_output, **_):
        heads, kv_heads, head_dim = self._shape
        seqlens_k, total_length = GroupQueryAttentionFusion._lengths(self, op)
        output, present_key, present_value = op.GroupQueryAttention(
            _flatten_heads(op, query_4d, heads * head_dim), _flatten_heads(op, key_4d, kv_heads * head_dim), value_3d,
            past_key, past_value, seqlens_k, total_length, num_heads=heads, kv_num_heads=kv_heads, scale=self._scale,
            do_rotary=0, _domain=CONTRIB_DOMAIN, _outputs=3)
        self._tag(output)
        return _reshaped(op, output, output_shape, attention_output, heads * head_dim), present_key, present_value


class MultiHeadAttentionFusion(_CacheRule):
    """GPT-2: split QKV -> BNSH -> cache -> attention  =>  MultiHeadAttention with past.

    The export's additive mask (causal and padding) becomes ``attention_bias``, so every mask the
    plain graph honours is still honoured.
    """

    def __init__(self, name: str):
        super().__init__(name, repeat_kv=False)

    def pattern(self, op, query_3d, key_3d, value_3d, query_shape, key_shape, value_shape, past_key, past_value,
                mask, scale, output_shape):
        query = op.Transpose(op.Reshape(query_3d, query_shape), perm=_BSNH_TO_BNSH, _outputs=["query"])
        key = op.Transpose(op.Reshape(key_3d, key_shape), perm=_BSNH_TO_BNSH)
        value = op.Transpose(op.Reshape(value_3d, value_shape), perm=_BSNH_TO_BNSH)
        return _attend_on_cache(op, query, key, value, past_key, past_value, mask, scale, False, output_shape)

    def check(self, context, query, present_key, scale, **_):
        check = _basics.MatchResult()
        shape = _heads(check, query, present_key)
        if shape is None:
            return check
        self._heads = shape[0]
        self._scale = _check_scale(check, scale)
        return check

    def rewrite(self, op, query_3d, key_3d, value_3d, past_key, past_value, mask, output_shape, **_):
        output, present_key, present_value = op.MultiHeadAttention(
            query_3d, key_3d, value_3d, None, None, mask, past_key, past_value,
            num_heads=self._heads, scale=self._scale, _domain=CONTRIB_DOMAIN, _outputs=3)
        self._tag(output)
        return op.Reshape(output, output_shape), present_key, present_value


class OnnxAttentionFusion(pattern.RewriteRuleClassBase):
    """Any family: cache -> attention on BNSH tensors  =>  opset-23 ``Attention`` with past and present.

    Grouped KV heads need no repeat (the op takes fewer KV heads); the export's additive mask is
    ``attn_mask``. Needs the model's default opset to be 23.
    """

    def __init__(self, name: str, repeat_kv: bool):
        super().__init__(name)
        self.repeat_kv = repeat_kv

    def pattern(self, op, query, key, value, past_key, past_value, mask, scale):
        return _attend_on_cache(op, query, key, value, past_key, past_value, mask, scale, self.repeat_kv)

    def check(self, context, query, present_key, scale, key_all=None, **_):
        check = _basics.MatchResult()
        opset = context.model.opset_imports.get("", 0)
        if opset < 23:
            return check.fail(f"standard Attention needs opset 23, the model has {opset}")
        if _heads(check, query, present_key, key_all) is None:
            return check
        self._scale = _check_scale(check, scale)
        return check

    def rewrite(self, op, query, key, value, past_key, past_value, mask, **_):
        outputs = op.Attention(query, key, value, mask, past_key, past_value, scale=self._scale, _outputs=3)
        node_tag(outputs[0].producer(), self.name)
        return outputs
