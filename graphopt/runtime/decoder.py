"""One ONNX Runtime decoder session and the KV cache it owns.

The graph contract (graphopt.json ``io``): inputs ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.{i}.key|value``; outputs ``logits`` and
``present.{i}.key|value``. The cache shapes (KV heads, head dim, dtype) are read from the graph's
own inputs, so pruned models with fewer heads or layers need nothing special here.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

from graphopt.runtime.session import make_session

logger = logging.getLogger(__name__)

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


class Decoder:
    """Batch-1 forward passes over a growing KV cache.

    ``forward(ids)`` runs the new tokens on top of the cache and returns their logits, so the
    same call does prefill, one-token decode, and a multi-token forward for speculative decoding.
    ``truncate(n)`` rolls the cache back to its first ``n`` tokens.
    """

    def __init__(self, model_path: str | os.PathLike, ep: str = "cpu", threads: int | None = None, session=None):
        self.model_path = pathlib.Path(model_path)
        self.session = session if session is not None else make_session(self.model_path, ep=ep, threads=threads)
        self.provider = self.session.get_providers()[0]
        inputs = {meta.name: meta for meta in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.output_names = [meta.name for meta in self.session.get_outputs()]
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        self.present_names = ["present." + name[len("past_key_values."):] for name in self.past_names]
        missing = [name for name in self.present_names if name not in self.output_names]
        if missing:
            raise ValueError(f"{self.model_path}: graph has no outputs {missing[:2]} for its past inputs")
        self._empty_cache = []
        for name in self.past_names:
            meta = inputs[name]
            kv_heads, head_dim = meta.shape[1], meta.shape[3]
            if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                raise ValueError(f"{self.model_path}: cache input {name} needs static heads and head dim, has {meta.shape}")
            self._empty_cache.append(np.zeros((1, kv_heads, 0, head_dim), dtype=_NUMPY_TYPES[meta.type]))
        self.cache_dtype = self._empty_cache[0].dtype if self._empty_cache else np.float32
        self.reset()

    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self._length

    def reset(self) -> None:
        self._cache = list(self._empty_cache)
        self._length = 0

    def reserve(self, length: int) -> None:
        """Prepare for ``length`` positions; only decoders with preallocated caches act on it."""

    def forward(self, token_ids) -> np.ndarray:
        """Run ``token_ids`` (a sequence of ints) on the cache; return float32 logits (n, vocab)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        count = ids.shape[1]
        total = self._length + count
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(self._length, total, dtype=np.int64).reshape(1, -1),
        }
        feeds.update(zip(self.past_names, self._cache))
        outputs = self.session.run(["logits", *self.present_names], feeds)
        self._cache = outputs[1:]
        self._length = total
        return outputs[0][0].astype(np.float32, copy=False)

    def forward_greedy(self, token_ids) -> np.ndarray:
        """Each new position's argmax token id (int64, ``(n,)``): :meth:`forward` without the logits.

        Decoders that can take the argmax on the device (a graph with a ``next_token`` output) do.
        """
        return np.argmax(self.forward(token_ids), axis=-1)

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens (rollback after rejected draft tokens)."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate a cache of {self._length} tokens to {length}")
        if length < self._length:
            self._cache = [np.ascontiguousarray(tensor[:, :, :length, :]) for tensor in self._cache]
            self._length = length
