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

Methods (4 bits; 8 bits is always symmetric round to nearest):

* ``rtn``: round to nearest with the block's range stretched to include zero and an integer zero
  point (the original graphopt int4);
* ``mse``: per block, the range ``[lo, hi]`` (zero not forced in) and the integer zero point that
  minimize the block's squared error, searched over a grid of shrunk ranges, then the scale refit
  by least squares for the chosen codes (MSE-optimal clipping, as llama.cpp's and AWQ's clip search);
* ``affine``: ``w = min + scale * code`` per block with a *float* offset (what a Q4_1 GGUF
  stores). MatMulNBits' float zero points exist but ONNX Runtime 1.32's CPU kernel dequantizes the
  whole weight on every call for them (~40x slower, measured). So each block takes the integer
  zero point nearest its offset, and what that leaves, a constant per block and output of at most
  half a step, rides in the same MatMulNBits: its input is ``[x, block sums of x]`` (one small
  MatMul by a constant matrix and a Concat, shared by the linears reading one activation) and the
  residuals are ``K / block`` more 4-bit rows (:func:`integer_affine`), quantized to within 1/28 of
  a step, with a second digit where the rows' last block has room. On a model dequantized from Q4_1
  (the embedded SmolLM2) that reproduces the source weights to about 0.3-0.5% of their norm, in one
  MatMulNBits per linear;
* ``gptq`` (GPTQ, Frantar et al. 2022: columns quantized in order, each one's error spread over the
  not yet quantized columns through the inverse Hessian ``H = sum x x^T`` of the layer's
  calibration inputs; needs ``hessians``), with ``mse`` block parameters and optionally activation
  order (columns by decreasing Hessian diagonal, permuted back before packing). The tied LM head can get
its own precision (``head_bits``: 8, 4 or None to leave it in float). The pass walks the main
graph only.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.ir import node_tag
from graphopt.passes.quantize_common import (CONTRIB_DOMAIN, LinearSite, add_initializer, drop_if_unused, is_head,
                                             linear_sites, weight_name)

logger = logging.getLogger(__name__)

METHODS = ("rtn", "mse", "affine", "gptq")
# Shrink factors of a block's range tried by the ``mse`` search (1.0 = the plain min/max range).
SHRINK_GRID = tuple(np.linspace(1.0, 0.70, 7))
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


def mse_parameters(blocks: np.ndarray, bits: int, grid: Sequence[float] = SHRINK_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per-block float32 scale and integer zero point minimizing the squared error of the block.

    Tries ranges ``[shrink_lo * min, shrink_hi * max]`` over ``grid`` x ``grid`` (zero need not lie
    inside), rounds the zero point, then refits the scale by least squares for the resulting codes
    (a smaller error is kept only where it is smaller). 8 bits stays symmetric.
    """
    if bits == 8:
        return block_parameters(blocks, bits)
    levels = 2**bits - 1
    low_all, high_all = blocks.min(axis=-1), blocks.max(axis=-1)
    best_error = np.full(low_all.shape, np.inf)
    best_scale = np.ones(low_all.shape)
    best_zero = np.zeros(low_all.shape)
    for shrink_low in grid:
        for shrink_high in grid:
            low, high = low_all * shrink_low, high_all * shrink_high
            scale = np.where(high > low, (high - low) / levels, 1.0)
            zero = np.clip(np.round(-low / scale), 0, levels)
            codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, levels)
            centered = codes - zero[..., None]
            # Least-squares scale for these codes: argmin_s |w - s * (c - z)|^2.
            denominator = (centered * centered).sum(-1)
            refit = np.where(denominator > 0, (blocks * centered).sum(-1) / np.where(denominator > 0, denominator, 1), scale)
            for candidate in (scale, refit):
                error = ((blocks - centered * candidate[..., None]) ** 2).sum(-1)
                better = error < best_error
                best_error = np.where(better, error, best_error)
                best_scale = np.where(better, candidate, best_scale)
                best_zero = np.where(better, zero, best_zero)
    best_scale = np.where(best_scale > 0, best_scale, 1.0)
    return best_scale.astype(np.float32), best_zero.astype(np.int64)


def affine_parameters(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block float32 scale and float offset (the block's minimum): ``w = offset + scale * code``."""
    levels = 2**bits - 1
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    scale = np.where(high > low, (high - low) / levels, 1.0).astype(np.float32)
    return scale, low.astype(np.float32)


def quantize_affine(weight_t: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[N, K]`` -> codes ``[N, n_blocks, block_size]``, scales and float offsets ``[N, n_blocks]``."""
    blocks = _blocks(weight_t, block_size)
    scale, offset = affine_parameters(blocks, bits)
    codes = np.clip(np.round((blocks - offset[..., None]) / scale[..., None].astype(np.float64)), 0, 2**bits - 1)
    return codes.astype(np.uint8), scale, offset


# The second residual digit's weight: the block sums it reads are divided by this (|digit| <= 6 < 13 / 2,
# so rounding the whole residual to the first digit's step gives the first digit back).
SECOND_DIGIT = 13.0


def residual_inputs(in_features: int, block_size: int) -> tuple[int, slice]:
    """The block sums an affine linear's input carries: ``blocks`` of them (the residual's first digit,
    one per block), then those of the blocks in ``seconds`` again, divided by :data:`SECOND_DIGIT` (a
    second digit, in the slots that pad the last residual row block: free in size and kernel work;
    the blocks whose first digit shares that row block, so both digits share its scale)."""
    blocks = in_features // block_size
    rows = -(-blocks // block_size) * block_size
    last = rows - block_size
    return blocks, slice(last, last + min(blocks - last, rows - blocks))


def integer_affine(codes: np.ndarray, scales: np.ndarray, zero: np.ndarray | None, offsets: np.ndarray,
                   block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine 4-bit blocks ``w = (code - zero) * scale + offset`` as integer-zero-point MatMulNBits
    blocks over the input ``[x, block sums of x, some block sums / 13]`` (:func:`residual_inputs`).

    Each block takes the integer zero point ``z`` nearest ``zero - offset / scale``; the residual
    ``offset - (zero - z) * scale`` (at most half a step) is constant over the block, so it multiplies
    the block's sum of ``x``: those ``K / block`` residuals per output become extra rows, quantized
    (4 bits, symmetric) in blocks of ``block_size`` of their own, to within 1/28 of a step. The rows
    that pad them to whole blocks hold a second digit of the first residuals (to within 1/26 of the
    first digit's step): on K = 576 that is 14 of 18 blocks, on K = 1536 16 of 48 (weight error 0.65% ->
    0.31% and 0.54% of the norm on SmolLM2).
    Returns codes ``[N, blocks + extra, block_size]``, scales and zero points ``[N, blocks + extra]``.
    """
    rows, blocks = scales.shape
    scale = scales.astype(np.float64)
    zero = np.full((rows, blocks), 8.0) if zero is None else zero.astype(np.float64)
    unclipped = zero - offsets / scale
    integer = np.clip(np.round(unclipped), 0, 15)
    nearest = integer == np.round(unclipped)
    residual = offsets - (zero - integer) * scale
    extra = -(-blocks // block_size)
    padded = np.zeros((rows, extra * block_size))
    padded[:, :blocks] = residual
    padded = padded.reshape(rows, extra, block_size)
    # Symmetric around zero point 8: padding decodes to exactly 0, and snapped weights snap to
    # themselves again (the largest residual is exactly 7 steps), which QAT's grid relies on.
    largest = np.abs(padded).max(axis=-1)
    residual_scale = np.where(largest > 0, largest / 7, 1.0).astype(np.float32)
    step = residual_scale.repeat(block_size, axis=1).astype(np.float64)
    steps = np.round(padded.reshape(rows, -1) / step)[:, :blocks]
    # A residual rounded past half its own block's step would pick another zero point when the
    # weights are quantized again: those round toward zero instead (blocks whose zero point was not clipped).
    outward = (np.abs(steps * step[:, :blocks]) > scale / 2) & nearest
    steps = np.clip(np.where(outward, steps - np.sign(steps), steps), -7, 7)
    _, seconds = residual_inputs(blocks * block_size, block_size)
    first = step[:, seconds]
    fine = np.clip(np.round((residual[:, seconds] - steps[:, seconds] * first) * SECOND_DIGIT / first), -6, 6)
    # The same guard for the two digits together.
    fine = np.where((np.abs((steps[:, seconds] + fine / SECOND_DIGIT) * first) > scale[:, seconds] / 2)
                    & nearest[:, seconds], 0, fine)
    residual_codes = np.full((rows, extra * block_size), 8.0)
    residual_codes[:, :blocks] = steps + 8
    residual_codes[:, blocks:blocks + fine.shape[1]] = fine + 8
    residual_codes = residual_codes.reshape(rows, extra, block_size)
    return (np.concatenate([codes, residual_codes.astype(np.uint8)], axis=1),
            np.concatenate([scales.astype(np.float32), residual_scale], axis=1),
            np.concatenate([integer, np.full((rows, extra), 8)], axis=1).astype(np.uint8))


def block_weight(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                 in_features: int) -> np.ndarray:
    """The ``[N, K]`` weight of unpacked codes ``[N, blocks, block_size]`` (zero points None: ``2^(bits-1)``)."""
    zero = np.full(scales.shape, 2 ** (bits - 1)) if zero_points is None else zero_points.reshape(scales.shape)
    weight = (codes.astype(np.float64) - zero[..., None]) * scales.astype(np.float64)[..., None]
    return weight.reshape(weight.shape[0], -1)[:, :in_features]


def integer_affine_weight(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                          in_features: int) -> np.ndarray:
    """The ``[N, K]`` weight that :func:`integer_affine`'s blocks apply to ``x`` (residual rows folded back)."""
    rows, total, block_size = codes.shape
    blocks = -(-in_features // block_size)  # as integer_affine counts them (the scales' blocks)
    _, seconds = residual_inputs(blocks * block_size, block_size)
    weight = block_weight(codes, scales, zero_points, 4, total * block_size).reshape(rows, total, block_size)
    digits = weight[:, blocks:].reshape(rows, -1)
    residual = digits[:, :blocks].copy()
    residual[:, seconds] += digits[:, blocks:blocks + seconds.stop - seconds.start] / SECOND_DIGIT
    return (weight[:, :blocks] + residual[..., None]).reshape(rows, -1)[:, :in_features]


def quantize_rtn(weight_t: np.ndarray, bits: int, block_size: int,
                 parameters=block_parameters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest: ``[N, K]`` float -> codes ``[N, n_blocks, block_size]`` (uint8), scales, zero points.

    ``parameters`` chooses each block's scale and zero point (``block_parameters`` or ``mse_parameters``).
    """
    blocks = _blocks(weight_t, block_size)
    scale, zero_point = parameters(blocks, bits)
    codes = np.clip(np.round(blocks / scale[..., None].astype(np.float64)) + zero_point[..., None], 0, 2**bits - 1)
    return codes.astype(np.uint8), scale, zero_point


def quantize_gptq(weight_t: np.ndarray, hessian: np.ndarray, bits: int, block_size: int,
                  damping: float = 0.01, parameters=mse_parameters,
                  act_order: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ with one quantization block per lazy-update block (scales taken from the updated weights).

    ``weight_t`` is ``[N, K]``, ``hessian`` ``[K, K]`` (``sum x x^T`` over calibration tokens).
    With ``act_order``, columns are processed by decreasing Hessian diagonal *within each block*
    (the blocks themselves stay where MatMulNBits reads them, so no permutation is stored).
    """
    if act_order:
        # Reorder inside each quantization block only: block membership (and so scales) is kept.
        columns_total = weight_t.shape[1]
        order = np.arange(columns_total)
        diagonal = np.diag(hessian)
        for start in range(0, columns_total, block_size):
            stop = min(start + block_size, columns_total)
            order[start:stop] = start + np.argsort(-diagonal[start:stop], kind="stable")
        codes, scales, zero_points = quantize_gptq(weight_t[:, order], hessian[np.ix_(order, order)], bits,
                                                   block_size, damping, parameters, act_order=False)
        inverse = np.argsort(order)
        flat = codes.reshape(codes.shape[0], -1)
        padded = np.zeros_like(flat)
        padded[:, :columns_total] = flat[:, :columns_total][:, inverse]
        return padded.reshape(codes.shape), scales, zero_points
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
        scale, zero_point = parameters(current[:, None, :], bits)
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


def snap_to_grid(weight: np.ndarray, bits: int, block_size: int, method: str = "affine") -> np.ndarray:
    """``weight`` (in, out) replaced by its dequantized codes, with this pass's own math (``method``:
    ``affine`` for 4 bits as the pass stores it, :func:`integer_affine`; ``mse`` its block search; else RTN)."""
    weight_t = weight.T.astype(np.float32)
    if bits == 4 and method == "affine":
        codes, scale, low = quantize_affine(weight_t, bits, block_size)
        stored = integer_affine(codes, scale, None, low.astype(np.float64) + 8.0 * scale, block_size)
        return np.ascontiguousarray(integer_affine_weight(*stored, weight_t.shape[1]).T.astype(np.float32))
    else:
        parameters = mse_parameters if bits == 4 and method == "mse" else block_parameters
        codes, scale, zero = quantize_rtn(weight_t, bits, block_size, parameters)
        values = (codes.astype(np.float64) - zero[..., None]) * scale[..., None].astype(np.float64)
    return np.ascontiguousarray(values.reshape(values.shape[0], -1)[:, :weight.shape[0]].T.astype(np.float32))


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
    codes = unpack(packed, bits)
    rows, n_blocks, _ = codes.shape
    if zero_points is not None and bits == 4:
        zero_points = unpack(zero_points.reshape(rows, -1), 4)[:, :n_blocks]
    return block_weight(codes, scales.reshape(rows, n_blocks), zero_points, bits, in_features).T.astype(np.float32)


@dataclasses.dataclass
class QuantizedWeight:
    """A linear's weight already in MatMulNBits form: ``w[n, k] = (codes - zero) * scale (+ offset)`` per block.

    ``codes`` ``[N, blocks, block_size]`` uint8; ``scales`` ``[N, blocks]`` float32; ``zero_points``
    ``[N, blocks]`` integers or None for the default ``2^(bits-1)``; ``offsets`` ``[N, blocks]``
    float (the ``affine`` form) or None; ``row_order`` the rows' order in the graph's weight, when
    the source stores them permuted (GGUF's q/k projections).
    """

    bits: int
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None
    offsets: np.ndarray | None = None
    row_order: np.ndarray | None = None


class WeightOnlyQuantizePass(ir.passes.InPlacePass):
    """Replace each linear site's MatMul by MatMulNBits (see the module docstring).

    Args:
        bits: 4 or 8 for the transformer layers.
        block_size: quantization block along the input features.
        method: ``rtn``, ``mse``, ``affine`` or ``gptq``.
        exclude: node-name globs or op types to leave in float.
        head_bits: precision of the LM head (8, 4, or None to keep it in float).
        hessians: for GPTQ, ``{activation value name: H [K, K]}``.
        accuracy_level: MatMulNBits' ``accuracy_level`` (4: int8 activations, the fast CPU kernels).
        act_order: GPTQ columns by decreasing Hessian diagonal within each block.
        site_bits: per-site overrides ``{node name: bits}`` (mixed precision).
        given: codes already made elsewhere, ``{weight initializer name: QuantizedWeight}`` (an
            exact GGUF import); used as they are, no rounding.
        head_block_size: block size of the LM head (None: ``block_size``); the head's kernel is the
            largest single one of a small model, see ``graphopt.cpu_kernels``.
    """

    def __init__(self, bits: int = 4, block_size: int = 32, method: str = "rtn", exclude: Sequence[str] = (),
                 head_bits: int | None = 8, hessians: Mapping[str, np.ndarray] | None = None,
                 accuracy_level: int = 4, act_order: bool = False, site_bits: Mapping[str, int] | None = None,
                 given: Mapping[str, QuantizedWeight] | None = None, head_block_size: int | None = None):
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
        self.accuracy_level, self.act_order = accuracy_level, act_order
        self.site_bits = dict(site_bits or {})
        self.given = dict(given or {})
        self.head_block_size = head_block_size or block_size
        self.counts: dict[str, int] = {}
        self.errors: dict[str, float] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        self.errors = {}
        graph = model.graph
        augmented: dict[tuple[str, int], ir.Value] = {}
        for site in linear_sites(graph, self.exclude, head=self.head_bits is not None):
            bits = self.head_bits if is_head(site) else self.site_bits.get(site.name, self.bits)
            key = self._replace(graph, site, bits, augmented)
            self.counts[key] = self.counts.get(key, 0) + 1
        modified = bool(self.counts)
        if modified:
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=modified)

    def _affine_applies(self, site: LinearSite, bits: int, block_size: int) -> bool:
        """``affine`` needs 4 bits and whole blocks (each block's sum is one input of the residual rows)."""
        return self.method == "affine" and bits == 4 and site.shape[0] % block_size == 0

    def _replace(self, graph: ir.Graph, site: LinearSite, bits: int, augmented: dict[tuple[str, int], ir.Value]) -> str:
        in_features, out_features = site.shape
        block_size = self.head_block_size if is_head(site) else self.block_size
        weight_t = site.weight().T
        hessian = self.hessians.get(site.activation.name) if self.hessians is not None else None
        offsets = None
        given = self.given.get(site.source.name or "")
        if given is not None:
            bits, codes, scales, zero_points, offsets = given.bits, given.codes, given.scales, given.zero_points, given.offsets
            if given.row_order is not None:
                codes, scales = codes[given.row_order], scales[given.row_order]
                zero_points = zero_points[given.row_order] if zero_points is not None else None
                offsets = offsets[given.row_order] if offsets is not None else None
        elif self._affine_applies(site, bits, block_size):
            codes, scales, low = quantize_affine(weight_t, bits, block_size)
            offsets = low.astype(np.float64) + 8.0 * scales.astype(np.float64)
            zero_points = None
        elif self.method == "gptq" and hessian is not None and not is_head(site) and bits == 4:
            codes, scales, zero_points = quantize_gptq(weight_t, hessian, bits, block_size, act_order=self.act_order)
        elif self.method in ("mse", "affine", "gptq") and bits == 4:
            codes, scales, zero_points = quantize_rtn_chunked(weight_t, bits, block_size, mse_parameters)
        else:
            codes, scales, zero_points = quantize_rtn(weight_t, bits, block_size)
        block_size = codes.shape[-1]
        activation, features = site.activation, in_features
        if offsets is not None:
            offsets = np.asarray(offsets, dtype=np.float64).reshape(scales.shape)
            codes, scales, zero_points = integer_affine(codes, scales, zero_points, offsets, block_size)
            activation = self._with_block_sums(graph, site, block_size, augmented)
            blocks, seconds = residual_inputs(in_features, block_size)
            features = in_features + blocks + seconds.stop - seconds.start
        packed = pack(codes, bits)
        inputs = [activation,
                  add_initializer(graph, weight_name(site, f"q{bits}"), packed),
                  add_initializer(graph, weight_name(site, f"q{bits}_scales"), scales.reshape(-1).astype(np.float32))]
        if bits == 4 and zero_points is not None:
            inputs.append(add_initializer(graph, weight_name(site, f"q{bits}_zero_points"), pack_zero_points(zero_points)))
        node = ir.node("MatMulNBits", inputs, attributes={"K": features, "N": out_features, "bits": bits,
                                                          "block_size": block_size,
                                                          "accuracy_level": self.accuracy_level},
                       domain=CONTRIB_DOMAIN, name=f"{site.name}_Q{bits}")
        node_tag(node, RULE)
        # Which float initializer these codes came from: lets the embedding pass share a tied table.
        node.metadata_props["graphopt.weight_source"] = site.source.name or ""
        if offsets is not None:
            restored = integer_affine_weight(codes, scales, zero_points, in_features)
        else:
            restored = block_weight(codes, scales, zero_points, bits, in_features)
        self.errors[site.name] = weight_error(weight_t, restored)
        replace_node(graph, site.node, node)
        return f"MatMulNBits(bits={bits}, affine)" if offsets is not None else f"MatMulNBits(bits={bits})"

    @staticmethod
    def _with_block_sums(graph: ir.Graph, site: LinearSite, block_size: int, augmented: dict) -> ir.Value:
        """``Concat(x, x @ S)``, S the ``[K, blocks + seconds]`` block-membership matrix (1, and 1/13 for
        the second digits, :func:`residual_inputs`; shared by equal K): one per activation and block
        size, read by every affine linear on it."""
        key = (site.activation.name, block_size)
        if key not in augmented:
            in_features = site.shape[0]
            name = f"block_sum_matrix_{in_features}_{block_size}"
            matrix = graph.initializers.get(name)
            if matrix is None:
                blocks, seconds = residual_inputs(in_features, block_size)
                members = np.zeros((in_features, blocks), dtype=np.float32)
                members[np.arange(in_features), np.arange(in_features) // block_size] = 1.0
                members = np.concatenate([members, members[:, seconds] / SECOND_DIGIT], axis=1)
                matrix = add_initializer(graph, name, members)
            sums = ir.node("MatMul", [site.activation, matrix], name=f"{site.name}_block_sums")
            joined = ir.node("Concat", [site.activation, sums.outputs[0]], attributes={"axis": -1},
                             name=f"{site.name}_with_block_sums")
            for node in (sums, joined):
                node_tag(node, RULE)
            graph.insert_before(site.node, [sums, joined])
            augmented[key] = joined.outputs[0]
        return augmented[key]


def quantize_rtn_chunked(weight_t: np.ndarray, bits: int, block_size: int, parameters,
                         rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``quantize_rtn`` over chunks of rows (the ``mse`` search holds a few copies of its input)."""
    parts = [quantize_rtn(weight_t[start:start + rows_per_chunk], bits, block_size, parameters)
             for start in range(0, weight_t.shape[0], rows_per_chunk)]
    return tuple(np.concatenate([part[index] for part in parts]) for index in range(3))


def weight_error(weight_t: np.ndarray, restored: np.ndarray) -> float:
    """Relative Frobenius error of the stored weight ``[N, K]`` against the float one (what the lineage reports)."""
    norm = float(np.linalg.norm(weight_t))
    return float(np.linalg.norm(restored - weight_t)) / norm if norm > 0 else 0.0


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
