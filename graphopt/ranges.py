"""Streaming activation range collectors for calibration: minmax, percentile, entropy (KL) and mse.

Each tensor gets one ``RangeCollector`` that sees the activations one calibration batch at a time
and keeps only running extrema and a fixed-size histogram of signed values over ``[-R, R]``. When a
batch exceeds ``R`` the range doubles and adjacent bins merge pairwise, so memory stays constant
however many samples are seen and the result does not depend on how the data was batched beyond
bin rounding. The histogram is then reduced to a range by the chosen method:

* ``minmax``: the running extrema;
* ``percentile``: the ``(100 - p)``-th and ``p``-th percentiles, i.e. each tail keeps ``1 - p/100``
  of the values outside the range;
* ``entropy``: TensorRT's KL threshold: the symmetric clip ``T`` on ``|x|`` minimizing
  KL(P || Q) between the clipped distribution and its 128-level quantization;
* ``mse``: the clip (a fraction of the extrema, 100 candidates) minimizing the expected squared
  quantization error of the target integer grid, computed from bin centers.

``quantization_parameters(low, high, symmetric)`` turns a range into an int8 / uint8 scale and
zero point with the conventions of ONNX QuantizeLinear.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 2048


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one tensor; ``dtype`` is ``int8`` (symmetric) or ``uint8``."""

    scale: float
    zero_point: int
    dtype: str

    @property
    def qmin(self) -> int:
        return -127 if self.dtype == "int8" else 0

    @property
    def qmax(self) -> int:
        return 127 if self.dtype == "int8" else 255


def quantization_parameters(low: float, high: float, symmetric: bool) -> QuantParams:
    """Scale and zero point covering ``[low, high]`` (widened to include 0, as ONNX requires).

    Symmetric: int8, zero point 0, scale ``max(|low|, |high|) / 127`` (the -128 code is unused so
    the grid is symmetric). Asymmetric: uint8, scale ``(high - low) / 255``, zero point
    ``round(-low / scale)``.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        amax = max(-low, high)
        scale = amax / 127.0 if amax > 0 else 1.0
        return QuantParams(np.float32(scale).item(), 0, "int8")
    scale = (high - low) / 255.0 if high > low else 1.0
    scale = np.float32(scale).item()
    zero_point = int(np.clip(np.round(-low / scale), 0, 255))
    return QuantParams(scale, zero_point, "uint8")


class RangeCollector:
    """Running min/max and a doubling symmetric histogram of one tensor's values."""

    def __init__(self, name: str = "", bins: int = DEFAULT_BINS):
        if bins % 2:
            raise ValueError("bins must be even")
        self.name = name
        self.bins = bins
        self.low = np.inf
        self.high = -np.inf
        self.radius = 0.0
        self.counts = np.zeros(bins, dtype=np.int64)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise GraphoptError(f"calibration saw NaN or inf in {self.name or 'an activation'}; "
                                "the model overflows on this data (check the calibration text or the model)")
        self.low, self.high = min(self.low, low), max(self.high, high)
        amax = max(-low, high)
        if self.radius == 0.0:
            self.radius = amax if amax > 0 else 1.0
        while amax > self.radius:
            self._double()
        width = 2 * self.radius / self.bins
        index = np.floor((values.astype(np.float64) + self.radius) / width).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _double(self) -> None:
        """Double the radius: pairs of old bins become one bin in the middle half of the new histogram."""
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        quarter = self.bins // 4
        counts = np.zeros_like(self.counts)
        counts[quarter:quarter + merged.size] = merged
        self.counts = counts
        self.radius *= 2

    def range(self, method: str = "minmax", percentile: float = 99.99, symmetric: bool = False) -> tuple[float, float]:
        """The ``(low, high)`` range the method picks from what was collected."""
        if not np.isfinite(self.low):
            raise GraphoptError(f"no calibration data reached {self.name or 'a tensor'}")
        if method == "minmax":
            return self.low, self.high
        if method == "percentile":
            return histogram_percentile_range(self.counts, self.edges, percentile, self.low, self.high)
        if method == "entropy":
            threshold = entropy_threshold(self.counts, self.radius)
            return max(self.low, -threshold), min(self.high, threshold)
        if method == "mse":
            return mse_range(self.counts, self.edges, self.low, self.high, symmetric)
        raise GraphoptError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")


def histogram_percentile_range(counts: np.ndarray, edges: np.ndarray, percentile: float,
                               low: float, high: float) -> tuple[float, float]:
    """Lower and upper percentile (each tail ``1 - p/100``), to the upper edge of the bin they fall in."""
    if not 50.0 < percentile <= 100.0:
        raise GraphoptError(f"percentile must be in (50, 100], got {percentile}")
    cumulative = np.cumsum(counts) / counts.sum()
    tail = 1.0 - percentile / 100.0
    lower = edges[int(np.searchsorted(cumulative, tail, side="left"))]
    upper = edges[int(np.searchsorted(cumulative, 1.0 - tail, side="left")) + 1]
    return max(low, float(lower)), min(high, float(upper))


def entropy_threshold(counts: np.ndarray, radius: float, levels: int = 128) -> float:
    """TensorRT-style KL calibration on the |x| histogram: the clip threshold minimizing KL(P || Q)."""
    half = counts.size // 2
    absolute = (counts[half:] + counts[:half][::-1]).astype(np.float64)
    width = radius / half
    best_kl, best_index = np.inf, absolute.size
    for index in range(levels, absolute.size + 1):
        reference = absolute[:index].copy()
        reference[-1] += absolute[index:].sum()
        if reference.sum() == 0:
            continue
        # Quantize the first `index` bins into `levels` groups, spreading each group's mass over its non-empty bins.
        original = absolute[:index]
        starts = np.array([group[0] for group in np.array_split(np.arange(index), levels)])
        sizes = np.diff(np.append(starts, index))
        nonzero = original > 0
        group_mass = np.add.reduceat(original, starts)
        group_nonzero = np.add.reduceat(nonzero.astype(np.float64), starts)
        share = np.divide(group_mass, group_nonzero, out=np.zeros_like(group_mass), where=group_nonzero > 0)
        candidate = np.repeat(share, sizes) * nonzero
        p = reference / reference.sum()
        q = candidate / candidate.sum() if candidate.sum() > 0 else candidate
        mask = p > 0
        if (q[mask] == 0).any():
            continue
        kl = float((p[mask] * np.log(p[mask] / q[mask])).sum())
        if kl < best_kl:
            best_kl, best_index = kl, index
    return float(best_index * width)


def mse_range(counts: np.ndarray, edges: np.ndarray, low: float, high: float, symmetric: bool,
              candidates: int = 100) -> tuple[float, float]:
    """The clip of ``[low, high]`` (fractions 0.01 .. 1.00) with the least expected quantization MSE."""
    centers = (edges[:-1] + edges[1:]) / 2
    weights = counts.astype(np.float64)
    best_error, best = np.inf, (low, high)
    for fraction in np.arange(1, candidates + 1) / candidates:
        trial_low, trial_high = low * fraction, high * fraction
        params = quantization_parameters(trial_low, trial_high, symmetric)
        error = float((weights * (fake_quantize(centers, params) - centers) ** 2).sum())
        if error < best_error:
            best_error, best = error, (trial_low, trial_high)
    return best


def fake_quantize(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """QuantizeLinear followed by DequantizeLinear (round half to even, saturating), in float64."""
    codes = np.clip(np.round(values / params.scale) + params.zero_point, params.qmin, params.qmax)
    return (codes - params.zero_point) * params.scale
