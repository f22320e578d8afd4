"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")


GREEDY = Sampling()


def probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution sampling draws from: tempered, then cut to top-k and top-p, renormalised.

    ``logits`` has shape (..., vocab); the result has the same shape, float64.
    """
    scaled = logits.astype(np.float64) / max(sampling.temperature, 1e-8)
    vocab = scaled.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = np.partition(scaled, vocab - sampling.top_k, axis=-1)[..., vocab - sampling.top_k, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        # Only tokens with probability left can be kept: with top-k, sort those k, not the vocabulary.
        candidates = int(np.count_nonzero(probs, axis=-1).max()) if 0 < sampling.top_k < vocab else vocab
        order = np.argsort(-probs, axis=-1) if candidates == vocab else _top_order(probs, candidates)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        cumulative = np.cumsum(sorted_probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop_sorted = (cumulative - sorted_probs) >= sampling.top_p
        keep = np.zeros(probs.shape, dtype=bool)
        np.put_along_axis(keep, order, ~drop_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def _top_order(probs: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest values along the last axis, largest first."""
    top = np.argpartition(-probs, count - 1, axis=-1)[..., :count]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(probs, top, axis=-1), axis=-1), axis=-1)


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id from a (vocab,) logits row."""
    if sampling.greedy:
        return int(np.argmax(logits))
    return sample(probabilities(logits, sampling), rng)


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from a (vocab,) distribution."""
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(probs) - 1))
