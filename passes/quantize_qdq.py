"""Static W8A8: ``MatMul(x, W)``  =>  ``MatMul(DQ(Q(x, s_x, z_x)), DQ(W_int8, s_w[axis=1]))``.

Activations get one QuantizeLinear per tensor (shared by its consumers, e.g. q/k/v) with a
calibrated per-tensor scale: uint8 asymmetric, or int8 symmetric (``symmetric=True``, what
TensorRT needs); each consumer gets its own DequantizeLinear, the form ONNX Runtime's QDQ
selectors expect. Weights become int8 initializers with per-output-channel symmetric scales
behind a DequantizeLinear (axis 1).

What ONNX Runtime 1.32 runs on CPU after its own optimizations (checked with
``SessionOptions.optimized_model_filepath``): each ``DQ(act), DQ(weight) -> MatMul`` becomes
``com.microsoft.MatMulIntegerToFloat`` (int8 GEMM, float output) after one ``QuantizeLinear``
per activation tensor; no float MatMul on dequantized weights remains. With int8 symmetric
activations, ORT's CPU rewrite to uint8 (``QDQS8ToU8``) only handles a QuantizeLinear with one
consumer (o_proj, down_proj, the head); shared inputs (q/k/v, gate/up) then run as float MatMul on
dequantized values (a per-consumer QuantizeLinear does not help: ORT merges identical ones first).
``--symmetric`` is for TensorRT, which takes the QDQ graph as is. Only linear sites (MatMul
by a constant weight) are quantized: the attention score MatMuls have no constant operand and stay
float. The pass walks the main graph only.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.ir import node_tag
from graphopt.passes.quantize_common import (LinearSite, add_initializer, drop_if_unused, linear_sites,
                                             weight_name)
from graphopt.ranges import QuantParams

logger = logging.getLogger(__name__)

RULE = "quantize_qdq"


def per_channel_weight(weight: np.ndarray, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` float -> int8 codes and per-column float32 scales (symmetric, ``max|w| / qmax``).

    ``reduce_range`` uses 7 bits (``qmax`` 63): x86 CPUs without VNNI multiply uint8 activations by
    int8 weights with ``pmaddubsw``, which saturates a pair of products above 32767; with codes in
    [-63, 63] a pair stays below it (measured here: 8-bit weights give ORT-fused results off by
    ~10% of the logits' scale on AVX2, 7-bit ones match the QDQ reference to 1e-6).
    """
    qmax = 63 if reduce_range else 127
    amax = np.abs(weight).max(axis=0)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.round(weight / scale), -qmax, qmax).astype(np.int8)
    return codes, scale


class QDQQuantizePass(ir.passes.InPlacePass):
    """Insert Q/DQ on linear sites' activations and int8 weights (see the module docstring).

    Args:
        activation_params: ``{activation value name: QuantParams}`` from calibration; a site whose
            activation has none is an error (calibration must have seen every site).
        exclude: node-name globs or op types to leave in float.
        head: whether the LM head is quantized too.
        reduce_range: 7-bit weights, exact on x86 CPUs without VNNI (see ``per_channel_weight``).
    """

    def __init__(self, activation_params: Mapping[str, QuantParams], exclude: Sequence[str] = (), head: bool = True,
                 reduce_range: bool = True):
        super().__init__()
        self.reduce_range = reduce_range
        self.activation_params = dict(activation_params)
        self.exclude, self.head = tuple(exclude), head
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "MatMul": 0}
        quantized: dict[str, ir.Value] = {}
        for site in linear_sites(graph, self.exclude, head=self.head):
            activation = site.activation
            params = self.activation_params.get(activation.name)
            if params is None:
                raise GraphoptError(f"no calibration range for {activation.name} (input of {site.name})")
            if activation.name not in quantized:
                quantized[activation.name] = self._quantize_activation(graph, site, params)
            self._rewrite_site(graph, site, quantized[activation.name], params)
        return ir.passes.PassResult(model, modified=self.counts["MatMul"] > 0)

    def _quantize_activation(self, graph: ir.Graph, site: LinearSite, params: QuantParams) -> ir.Value:
        dtype = np.int8 if params.dtype == "int8" else np.uint8
        base = (site.activation.name or "activation").replace("/", ".")
        scale = add_initializer(graph, f"{base}_scale", np.array(params.scale, dtype=np.float32))
        zero_point = add_initializer(graph, f"{base}_zero_point", np.array(params.zero_point, dtype=dtype))
        node = ir.node("QuantizeLinear", [site.activation, scale, zero_point], name=f"{site.name}/QuantizeLinear")
        node.outputs[0].name = f"{base}_quantized"
        node_tag(node, RULE)
        graph.insert_before(site.node, node)
        self.counts["QuantizeLinear"] += 1
        return node.outputs[0]

    def _rewrite_site(self, graph: ir.Graph, site: LinearSite, quantized: ir.Value, params: QuantParams) -> None:
        scale, zero_point = quantized.producer().inputs[1], quantized.producer().inputs[2]
        dequantize_activation = ir.node("DequantizeLinear", [quantized, scale, zero_point],
                                        name=f"{site.name}/DequantizeLinear_input")
        codes, weight_scale = per_channel_weight(site.weight(), self.reduce_range)
        weight_codes = add_initializer(graph, weight_name(site, "int8"), codes)
        weight_scales = add_initializer(graph, weight_name(site, "int8_scale"), weight_scale)
        dequantize_weight = ir.node("DequantizeLinear", [weight_codes, weight_scales], attributes={"axis": 1},
                                    name=f"{site.name}/DequantizeLinear_weight")
        for node in (dequantize_activation, dequantize_weight):
            node_tag(node, RULE)
        graph.insert_before(site.node, [dequantize_activation, dequantize_weight])
        old_weight = site.node.inputs[1]
        site.node.replace_input_with(0, dequantize_activation.outputs[0])
        site.node.replace_input_with(1, dequantize_weight.outputs[0])
        drop_if_unused(graph, old_weight)
        self.counts["DequantizeLinear"] += 2
        self.counts["MatMul"] += 1
