"""Weight-only quantization: ``MatMul(x, W)``  =>  ``com.microsoft.MatMulNBits(x, B, scales[, zero_points])``.

Blockwise along the input dimension (``block_size`` of 16..256, a power of two), 4 or 8 bits:

* 4 bits: asymmetric (per-block scale and 4-bit zero point), codes packed two per byte, low
  nibble first, as MatMulNBits reads them;
* 8 bits: symmetric, no zero point stored (MatMulNBits' default zero point 128), which ONNX
  Runtime's CPU kernel runs fastest.

``accuracy_level=4`` lets the CPU kernel quantize the activations to int8 per block on the fly
(the int8 dot-product path): measured here it is the fast form, 20-40x faster at decode than
``accuracy_level=0`` for 8 bits. Why MatMulNBits and not ``DequantizeLinear + MatMul``: ONNX Runtime
1.32 rewrites a blockwise (opset 21) or per-channel int8 DequantizeLinear feeding MatMul into this
same MatMulNBits (``DQMatMulToMatMulNBits``), so both forms run the same kernel; writing the op
ourselves fixes the accuracy level in the model instead of leaving it to a session option.

Methods: ``rtn`` (round to nearest) and ``gptq`` (GPTQ, Frantar et al. 2022: columns quantized in
order, each one's error spread over the not yet quantized columns through the inverse Hessian
``H = sum x x^T`` of the layer's calibration inputs; needs ``hessians``). The tied LM head can get
its own precision (``head_bits``: 8, 4 or None to leave it in float). The pass walks the main
graph only.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.ir import node_tag
from graphopt.passes.quantize_common import (CONTRIB_DOMAIN, LinearSite, add_initializer, drop_if_unused, is_head,
                                             linear_sites, weight_name)

logger = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
RULE = "quantize_weights"


def _blocks(weight_t: np.ndarray, block_size: int) -> np.ndarray:
    """``[N, K]`` -> ``[N, n_blocks, block_size]``, zero padded along K."""
    rows, columns = weight_t.shape
    n_blocks = -(-columns // block_size)
    padded = np.zeros((rows, n_blocks * block_size), dtype=np.float64)
    padded[:, :columns] = weight_t
    return padded.reshape(rows, n_blocks, block_size)


def block_parameters(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block float32 scale and integer zero point: asymmetric for 4 bits, symmetric (128) for 8."""
    if bits == 8:
        amax = np.abs(blocks).max(axis=-1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        return scale, np.full(scale.shape, 128, dtype=np.int64)
    levels = 2**bits - 1
    low = np.minimum(blocks.min(axis=-1), 0.0)
    high = np.maximum(blocks.max(axis=-1), 0.0)
    scale = np.where(high > low, (high - low) / levels, 1.0).astype(np.float32)
    zero_point = np.clip(np.round(-low / scale), 0, levels).astype(np.int64)
    return scale, zero_point


def quantize_rtn(weight_t: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest: ``[N, K]`` float -> codes ``[N, n_blocks, block_size]`` (uint8), scales, zero points."""
    blocks = _blocks(weight_t, block_size)
    scale, zero_point = block_parameters(blocks, bits)
    codes = np.clip(np.round(blocks / scale[..., None].astype(np.float64)) + zero_point[..., None], 0, 2**bits - 1)
    return codes.astype(np.uint8), scale, zero_point


def quantize_gptq(weight_t: np.ndarray, hessian: np.ndarray, bits: int, block_size: int,
                  damping: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ with one quantization block per lazy-update block (scales taken from the updated weights).

    ``weight_t`` is ``[N, K]``, ``hessian`` ``[K, K]`` (``sum x x^T`` over calibration tokens).
    """
    rows, columns = weight_t.shape
    weight = weight_t.astype(np.float64).copy()
    hessian = hessian.astype(np.float64).copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hessian[np.diag_indices(columns)] += damping * np.mean(np.diag(hessian))
    try:
        inverse = np.linalg.inv(hessian)
        upper = np.linalg.cholesky(inverse).T
    except np.linalg.LinAlgError:
        raise GraphoptError("GPTQ: the calibration Hessian is not positive definite; use more calibration "
                            "samples or --method rtn") from None
    n_blocks = -(-columns // block_size)
    codes = np.zeros((rows, n_blocks, block_size), dtype=np.uint8)
    scales = np.zeros((rows, n_blocks), dtype=np.float32)
    zero_points = np.zeros((rows, n_blocks), dtype=np.int64)
    levels = 2**bits - 1
    for block in range(n_blocks):
        start, stop = block * block_size, min((block + 1) * block_size, columns)
        current = weight[:, start:stop].copy()
        scale, zero_point = block_parameters(current[:, None, :], bits)
        scale, zero_point = scale[:, 0], zero_point[:, 0]
        scales[:, block], zero_points[:, block] = scale, zero_point
        codes[:, block, :] = zero_point[:, None]
        errors = np.zeros_like(current)
        inverse_block = upper[start:stop, start:stop]
        for column in range(stop - start):
            values = current[:, column]
            code = np.clip(np.round(values / scale) + zero_point, 0, levels)
            codes[:, block, column] = code
            dequantized = (code - zero_point) * scale.astype(np.float64)
            error = (values - dequantized) / inverse_block[column, column]
            current[:, column:] -= np.outer(error, inverse_block[column, column:])
            errors[:, column] = error
        weight[:, stop:] -= errors @ upper[start:stop, stop:]
    return codes, scales, zero_points


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[N, n_blocks, block_size]`` -> MatMulNBits ``B`` (``[N, n_blocks, block_size * bits / 8]`` uint8)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``pack``."""
    if bits == 8:
        return packed.astype(np.uint8)
    codes = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def pack_zero_points(zero_points: np.ndarray) -> np.ndarray:
    """4-bit zero points ``[N, n_blocks]`` -> ``[N * ceil(n_blocks / 2)]`` uint8, low nibble first."""
    rows, n_blocks = zero_points.shape
    padded = np.zeros((rows, n_blocks + n_blocks % 2), dtype=np.uint8)
    padded[:, :n_blocks] = zero_points
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1).astype(np.uint8)


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
               in_features: int) -> np.ndarray:
    """MatMulNBits' weight as ``[K, N]`` float32 (what the kernel multiplies by), for tests and checks."""
    codes = unpack(packed, bits).astype(np.float64)
    rows, n_blocks, _ = codes.shape
    scales = scales.reshape(rows, n_blocks).astype(np.float64)
    if zero_points is None:
        zero = np.full((rows, n_blocks), 2 ** (bits - 1), dtype=np.float64)
    elif bits == 4:
        zero = unpack(zero_points.reshape(rows, -1), 4)[:, :n_blocks].astype(np.float64)
    else:
        zero = zero_points.reshape(rows, n_blocks).astype(np.float64)
    weight = (codes - zero[..., None]) * scales[..., None]
    return weight.reshape(rows, -1)[:, :in_features].T.astype(np.float32)


class WeightOnlyQuantizePass(ir.passes.InPlacePass):
    """Replace each linear site's MatMul by MatMulNBits (see the module docstring).

    Args:
        bits: 4 or 8 for the transformer layers.
        block_size: quantization block along the input features.
        method: ``rtn`` or ``gptq``.
        exclude: node-name globs or op types to leave in float.
        head_bits: precision of the LM head (8, 4, or None to keep it in float).
        hessians: for GPTQ, ``{activation value name: H [K, K]}``.
        accuracy_level: MatMulNBits' ``accuracy_level`` (4: int8 activations, the fast CPU kernels).
        head_block_size: block size of the LM head (None: ``block_size``); the head's kernel is the
            largest single one of a small model, see ``graphopt.cpu_kernels``.
    """

    def __init__(self, bits: int = 4, block_size: int = 32, method: str = "rtn", exclude: Sequence[str] = (),
                 head_bits: int | None = 8, hessians: Mapping[str, np.ndarray] | None = None,
                 accuracy_level: int = 4, head_block_size: int | None = None):
        super().__init__()
        if bits not in (4, 8) or (head_bits is not None and head_bits not in (4, 8)):
            raise GraphoptError("weight-only quantization supports 4 or 8 bits")
        for size in (block_size, head_block_size or block_size):
            if size < 16 or size & (size - 1):
                raise GraphoptError(f"--block-size must be a power of two of at least 16, got {size}")
        if method not in METHODS:
            raise GraphoptError(f"unknown method {method!r} for weight-only quantization; choose from {', '.join(METHODS)}")
        if method == "gptq" and hessians is None:
            raise GraphoptError("GPTQ needs calibration Hessians")
        self.bits, self.block_size, self.method = bits, block_size, method
        self.exclude, self.head_bits, self.hessians = tuple(exclude), head_bits, hessians
        self.accuracy_level = accuracy_level
        self.head_block_size = head_block_size or block_size
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        graph = model.graph
        for site in linear_sites(graph, self.exclude, head=self.head_bits is not None):
            bits = self.head_bits if is_head(site) else self.bits
            self._replace(graph, site, bits)
            key = f"MatMulNBits(bits={bits})"
            self.counts[key] = self.counts.get(key, 0) + 1
        modified = bool(self.counts)
        if modified:
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=modified)

    def _replace(self, graph: ir.Graph, site: LinearSite, bits: int) -> None:
        in_features, out_features = site.shape
        block_size = self.head_block_size if is_head(site) else self.block_size
        weight_t = site.weight().T
        hessian = self.hessians.get(site.activation.name) if self.hessians is not None else None
        if self.method == "gptq" and hessian is not None and not is_head(site):
            codes, scales, zero_points = quantize_gptq(weight_t, hessian, bits, block_size)
        else:
            codes, scales, zero_points = quantize_rtn(weight_t, bits, block_size)
        inputs = [site.activation,
                  add_initializer(graph, weight_name(site, f"q{bits}"), pack(codes, bits)),
                  add_initializer(graph, weight_name(site, f"q{bits}_scales"), scales.reshape(-1).astype(np.float32))]
        if bits == 4:
            inputs.append(add_initializer(graph, weight_name(site, f"q{bits}_zero_points"), pack_zero_points(zero_points)))
        node = ir.node("MatMulNBits", inputs, attributes={"K": in_features, "N": out_features, "bits": bits,
                                                          "block_size": block_size,
                                                          "accuracy_level": self.accuracy_level},
                       domain=CONTRIB_DOMAIN, name=f"{site.name}_Q{bits}")
        node_tag(node, RULE)
        replace_node(graph, site.node, node)


def replace_node(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put ``new`` where ``old`` was: same output name, type and shape; drop what only ``old`` read."""
    output, replacement = old.outputs[0], new.outputs[0]
    name = output.name
    output.name = f"{name}.replaced"
    replacement.name, replacement.shape, replacement.type = name, output.shape, output.type
    graph.insert_before(old, new)
    old_inputs = list(old.inputs)
    ir.convenience.replace_all_uses_with(output, replacement, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    for value in old_inputs[1:]:
        if value is not None:
            drop_if_unused(graph, value)
