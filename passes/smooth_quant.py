"""SmoothQuant: ``norm(x) * g -> MatMul(., W)``  =>  ``norm(x) * (g / s) -> MatMul(., diag(s) W)``.

Activation outliers live in a few input channels; dividing those channels by
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` (Xiao et al. 2023) and multiplying the matching
weight rows by ``s_j`` computes the same function with activations that quantize better. The
division is folded into what produces the activation, so no op is added:

* a norm's scale: ``Mul(normalized, g)`` with a constant ``g`` (the unfused export's RMSNorm /
  LayerNorm), or the ``scale`` (and ``bias``) of ``LayerNormalization``,
  ``SimplifiedLayerNormalization`` and ``com.microsoft.SkipSimplifiedLayerNormalization``
  (fused graphs);
* the up projection of a gated MLP: ``Mul(act(gate), x W_up) -> MatMul(., W_down)`` divides
  ``W_up``'s columns.

Every consumer of the activation must be a linear site whose weight nothing else reads (a tied
LM head is skipped: its weight is also the embedding table). Walks the main graph only.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantize_common import set_float32, site_of

logger = logging.getLogger(__name__)

NORM_SCALE_INPUT = {"LayerNormalization": 1, "SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2,
                    "SkipLayerNormalization": 2}
MARKER = "graphopt.smooth_quant.alpha"
NORM_BIAS_INPUT = {"LayerNormalization": 2, "SkipLayerNormalization": 3}


def smoothing_factors(activation_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|x_j|^alpha / max|W_j|^(1-alpha)``, 1 where a channel is all zero."""
    activation_absmax = np.maximum(activation_absmax.astype(np.float64), 1e-5)
    weight_absmax = np.maximum(weight_absmax.astype(np.float64), 1e-5)
    factors = activation_absmax**alpha / weight_absmax ** (1 - alpha)
    return np.clip(factors, 1e-4, 1e4)


def _single_use(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and len(value.uses()) == 1


class SmoothQuantPass(ir.passes.InPlacePass):
    """Migrate activation outliers into the weights (see the module docstring).

    Args:
        alpha: migration strength in [0, 1] (0.5 is the paper's default).
        activation_absmax: ``{activation value name: per-channel max |x|}`` from calibration.
    """

    def __init__(self, alpha: float, activation_absmax: Mapping[str, np.ndarray],
                 factors: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            from graphopt.errors import GraphoptError
            raise GraphoptError(f"--smooth ALPHA must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.activation_absmax = dict(activation_absmax)
        # Given factors (AWQ's searched scales) replace the alpha formula for their activations.
        self.factors = dict(factors or {})
        self.counts: dict[str, int] = {}
        self.skipped: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts, self.skipped = {"norm": 0, "up_proj": 0}, {}
        if MARKER in model.metadata_props:
            # Smoothing twice with the same statistics would migrate twice; the model says it is done.
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        for name in [*self.activation_absmax, *(name for name in self.factors if name not in self.activation_absmax)]:
            activation = next((value for node in graph for value in node.outputs if value.name == name), None)
            if activation is None:
                continue
            sites = [site_of(use.node) if use.idx == 0 else None for use in activation.uses()]
            if not sites or any(site is None or site.transposed or not _single_use(site.weight_value) for site in sites):
                self.skipped[name] = "a consumer is not a linear site with its own weight"
                continue
            if name in self.factors:
                factors = self.factors[name]
            else:
                weight_absmax = np.max([np.abs(site.weight()).max(axis=1) for site in sites], axis=0)
                factors = smoothing_factors(self.activation_absmax[name], weight_absmax, self.alpha)
            kind = self._fold_into_producer(activation, factors)
            if kind is None:
                continue
            for site in sites:
                set_float32(site.weight_value, site.weight() * factors[:, None])
            self.counts[kind] += 1
        modified = any(self.counts.values())
        if modified:
            model.metadata_props[MARKER] = "awq" if self.factors else str(self.alpha)
        return ir.passes.PassResult(model, modified=modified)

    def _fold_into_producer(self, activation: ir.Value, factors: np.ndarray) -> str | None:
        """Divide what produces ``activation`` by ``factors`` per channel; the kind folded, or None."""
        producer = activation.producer()
        if producer is None or activation.index() != 0:
            self.skipped[activation.name] = "no producer to fold into"
            return None
        if producer.op_type in NORM_SCALE_INPUT:
            scale = producer.inputs[NORM_SCALE_INPUT[producer.op_type]]
            bias_index = NORM_BIAS_INPUT.get(producer.op_type)
            bias = producer.inputs[bias_index] if bias_index is not None and len(producer.inputs) > bias_index else None
            if not _single_use(scale) or (bias is not None and not _single_use(bias)):
                self.skipped[activation.name] = f"{producer.op_type} scale is shared or not constant"
                return None
            set_float32(scale, scale.const_value.numpy() / factors)
            if bias is not None:
                set_float32(bias, bias.const_value.numpy() / factors)
            return "norm"
        if producer.op_type != "Mul":
            self.skipped[activation.name] = f"produced by {producer.op_type}, which has no scale to fold into"
            return None
        for index, operand in enumerate(producer.inputs):
            if _single_use(operand) and operand.shape is not None and tuple(operand.shape.numpy())[-1:] == factors.shape:
                set_float32(operand, operand.const_value.numpy() / factors)
                return "norm"
            up = operand.producer() if operand is not None else None
            site = site_of(up) if up is not None else None
            if site is not None and len(operand.uses()) == 1 and not site.transposed and _single_use(site.weight_value):
                set_float32(site.weight_value, site.weight() / factors[None, :])
                return "up_proj"
        self.skipped[activation.name] = "Mul without a constant scale or a linear operand"
        return None
