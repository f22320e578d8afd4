"""A decoder over preallocated fixed-size KV buffers: the layout that lets CUDA graphs replay a step.

GroupQueryAttention writes new keys and values in place when ``past`` and ``present`` are bound to
the same memory (ORT's ``past_present_share_buffer``), at the positions ``seqlens_k`` gives, and
reads only up to there. With every cache buffer sized to a capacity up front and the attention
mask padded to that capacity (ones for held tokens, zeros after), a one-token step has the same
shapes and the same addresses every time. ONNX Runtime can then capture it once as a CUDA graph
and replay it: one launch per token instead of one per kernel.

The fused graph derives ``seqlens_k`` from the mask's sum and ``total_sequence_length`` (the
capacity) from its width, so the graph itself is unchanged. Rolling back (speculative decoding)
is a shorter mask. Prefill runs eagerly on the same buffers (run option ``gpu_graph_id = -1``).

Forwards of 2 .. ``graph_tokens`` tokens on a non-empty cache (speculative decoding's verify over
gamma + 1 tokens, a draft catching up on two) get fixed bindings of their own too, one per length,
and so a CUDA graph each: GroupQueryAttention's "subsequent prompt" path reads the same
full-width mask and writes at the positions the mask's sum gives, so its shapes and addresses are
fixed per length as well. Each such graph is checked once against the eager forward when it is
captured (same tokens, logits within a float16 rounding); one that disagrees is dropped with a
warning and that length runs eagerly. Needs a graph fused with GroupQueryAttention (``graphopt
fuse --target cpu|cuda``); it runs on the CPU provider too (bindings without graphs), which is how
CI tests it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import warnings

import numpy as np

from graphopt import manifest as manifest_io
from graphopt.errors import GraphoptError
from graphopt.manifest import Manifest
from graphopt.modeldir import MANIFEST_FILE
from graphopt.runtime.decoder import Decoder
from graphopt.runtime.session import DEVICE_OF_PROVIDER

logger = logging.getLogger(__name__)

GROUP_QUERY_ATTENTION = "com.microsoft.GroupQueryAttention"
# Capacity grows in steps of this many positions, so a longer request rarely means a new graph.
CAPACITY_STEP = 256
# gpu_graph_id of the first captured one-token step; -1 means "run without a graph".
FIRST_GRAPH_ID = 1
# One-token runs before a graph is surely captured: ORT runs a graph id normally first (to settle
# its memory allocations), captures on the next run, and replays from then on.
WARM_UP_STEPS = 3
GREEDY_OUTPUT = "next_token"
# A captured multi-token graph must reproduce the eager forward's logits to within this fraction of
# their largest magnitude (the same kernels run either way; only a broken capture differs more).
GRAPH_CHECK_TOLERANCE = 1e-2


def manifest_beside(model_path: str | os.PathLike) -> Manifest | None:
    """The manifest of the model directory holding ``model_path``, if it is in one."""
    path = pathlib.Path(model_path).parent / MANIFEST_FILE
    return manifest_io.read(path) if path.is_file() else None


def fused_with_group_query_attention(manifest: Manifest | None) -> bool:
    """Whether the manifest says the model's attention is GroupQueryAttention."""
    return manifest is not None and (manifest.fusion or {}).get("attention_op") == GROUP_QUERY_ATTENTION


def runs_whole_on_cuda(manifest: Manifest | None) -> bool:
    """Whether a GroupQueryAttention graph can run entirely on CUDA, as graph capture requires.

    ORT's CUDA GroupQueryAttention is float16 / bfloat16 only; a float32 graph leaves it on the CPU.
    """
    return manifest is not None and manifest.dtype in ("float16", "bfloat16")


def require_group_query_attention(manifest: Manifest | None, model_path: str | os.PathLike) -> None:
    """Raise GraphoptError, with the command that fixes it, unless the model uses GroupQueryAttention."""
    if not fused_with_group_query_attention(manifest):
        raise GraphoptError(f"{pathlib.Path(model_path).parent}: a static KV cache needs attention fused into "
                            "GroupQueryAttention (graphopt fuse --target cuda, or cpu)")


class StaticCacheDecoder(Decoder):
    """``Decoder`` whose KV cache lives in fixed buffers of ``capacity`` positions, shared past/present.

    Args:
        model_path: ``model.onnx`` of a directory fused with GroupQueryAttention.
        capacity: positions to allocate now; :meth:`reserve` and longer forwards grow it (grown
            buffers have new addresses, so a new CUDA graph is captured then).
        cuda_graph: replay one-token steps as a CUDA graph. Needs a session made with
            ``make_session(..., cuda_graph=True)``; ignored on CPU.
        session: an existing session for ``model_path``.
        manifest: the model directory's manifest, when the caller holds it already.
        graph_tokens: forwards of up to this many tokens on a non-empty cache run through fixed
            bindings (and, with ``cuda_graph``, captured graphs); 1 means one-token steps only.
    """

    def __init__(self, model_path: str | os.PathLike, ep: str = "cuda", threads: int | None = None,
                 capacity: int = CAPACITY_STEP, cuda_graph: bool = False, session=None, device_id: int = 0,
                 manifest: Manifest | None = None, graph_tokens: int = 1):
        if graph_tokens < 1:
            raise ValueError(f"graph_tokens must be at least 1, got {graph_tokens}")
        manifest = manifest if manifest is not None else manifest_beside(model_path)
        require_group_query_attention(manifest, model_path)
        self.device = None
        super().__init__(model_path, ep=ep, threads=threads, session=session)
        import onnxruntime as ort

        self._ort = ort
        self.device = DEVICE_OF_PROVIDER.get(self.provider, "cpu")
        self.device_id = device_id if self.device != "cpu" else 0
        self.cuda_graph = cuda_graph and self.device == "cuda"
        # GroupQueryAttention's rotary tables cover max_positions; the capacity may not exceed them.
        self.max_positions = int((manifest.fusion or {}).get("max_positions") or manifest.max_positions)
        # A graph that reads no position_ids (GroupQueryAttention's own positions) gets them bound once:
        # one host-to-device copy fewer per step (manifests from before graphopt recorded it: fed).
        self._feeds_positions = (manifest.fusion or {}).get("reads_position_ids", True)
        outputs = {meta.name: meta for meta in self.session.get_outputs()}
        self._logits_dtype = {"tensor(float16)": np.float16}.get(outputs["logits"].type, np.float32)
        self._vocab = outputs["logits"].shape[2]
        # A graph with passes/greedy_head.py's output gives greedy tokens without the logits on the host.
        self.greedy_output = GREEDY_OUTPUT in outputs
        self._eager = ort.RunOptions()
        self._eager.add_run_config_entry("gpu_graph_id", "-1")
        self._graph_id = FIRST_GRAPH_ID - 1
        self.graph_tokens = graph_tokens
        # Lengths whose captured graph disagreed with the eager forward: those run eagerly for good.
        self._refused: set[int] = set()
        self.capacity = 0
        self._length = 0
        self._allocate(min(capacity, self.max_positions))
        self.reset()

    def reset(self) -> None:
        if self.device is None:  # called by Decoder.__init__ before the buffers exist
            super().reset()
            return
        self._length = 0
        self._mask[:] = 0

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions, at most the model's (grows the buffers, keeping what they hold)."""
        length = min(length, self.max_positions)
        if length <= self.capacity:
            return
        grown = min(max(-(-length // CAPACITY_STEP) * CAPACITY_STEP, 2 * self.capacity), self.max_positions)
        logger.debug("static KV cache grows from %d to %d positions", self.capacity, grown)
        self._allocate(grown)

    def _allocate(self, capacity: int) -> None:
        """(Re)build the cache buffers, the mask and the one-token step's fixed inputs and outputs."""
        held = [value.numpy()[:, :, :self._length] for value in self._cache] if self.capacity else []
        cache = []
        for index, empty in enumerate(self._empty_cache):
            buffer = np.zeros((1, empty.shape[1], capacity, empty.shape[3]), dtype=empty.dtype)
            if held:
                buffer[:, :, :self._length] = held[index]
            cache.append(self._ort.OrtValue.ortvalue_from_numpy(buffer, self.device, self.device_id))
        self._cache = cache
        mask = np.zeros((1, capacity), dtype=np.int64)
        if self.capacity:
            mask[:, :self.capacity] = self._mask
        self._mask = mask
        self.capacity = capacity
        self._step_mask = self._fixed((1, capacity), np.int64)
        # One fixed binding per forward length: n = 1 is the decode step, 2 .. graph_tokens serve
        # multi-token forwards on a non-empty cache. All share the mask and the cache buffers.
        self._bindings = {count: self._binding(count) for count in range(1, self.graph_tokens + 1)
                          if count not in self._refused}
        if self.cuda_graph:
            self.warm_up()

    def _fixed(self, shape, dtype):
        return self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), self.device, self.device_id)

    def _binding(self, count: int) -> dict:
        """Fixed inputs, logits and run options for forwards of ``count`` tokens (a new graph id each)."""
        ids = self._fixed((1, count), np.int64)
        positions = self._fixed((1, count), np.int64)
        logits = self._fixed((1, count, self._vocab), self._logits_dtype)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", ids)
        binding.bind_ortvalue_input("attention_mask", self._step_mask)
        if "position_ids" in self.input_names:
            binding.bind_ortvalue_input("position_ids", positions)
        binding.bind_ortvalue_output("logits", logits)
        tokens = None
        if self.greedy_output:
            # One token: the argmax lands in the step's own input buffer, so a greedy loop feeds the
            # next step without a host-to-device copy (the step reads its input before it writes it).
            tokens = ids if count == 1 else self._fixed((1, count), np.int64)
            binding.bind_ortvalue_output(GREEDY_OUTPUT, tokens)
        self._bind_cache(binding)
        # New addresses need a new graph: a fresh id, captured now (warm_up) rather than in the
        # middle of someone's first request (that first capture costs more than a hundred plain steps).
        self._graph_id += 1
        options = self._ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(self._graph_id) if self.cuda_graph else "-1")
        return {"ids": ids, "positions": positions, "logits": logits, "tokens": tokens, "binding": binding,
                "options": options, "holds": None}

    @property
    def graphed_lengths(self) -> list[int]:
        """Forward lengths that run through a fixed binding (captured graphs, with ``cuda_graph``)."""
        return sorted(self._bindings)

    def warm_up(self) -> None:
        """Run throwaway forwards past the held tokens until every graph is captured, then forget them.

        An eager two-token forward first: it pays the provider's one-time setup as well, and gives
        the multi-token graphs a non-empty cache. Each multi-token graph's replay is compared with
        the eager forward of the same tokens; a disagreeing one is dropped (see the module docstring).
        """
        length, mask = self._length, self._mask.copy()

        def restore() -> None:
            self._length, self._mask[:] = length, mask
            self._mask[0, length:] = 0

        room = self.capacity - length
        if room >= 2:
            self.forward([0, 0])
            restore()
        for _ in range(min(WARM_UP_STEPS, room)):
            self.forward([0])
            restore()
        base = [0] if length == 0 else []
        for count in [count for count in self.graphed_lengths if count > 1]:
            if room < len(base) + count:
                continue
            ids = list(range(1, count + 1))
            if base:
                self.forward(base)
            eager = self._forward_eager(np.asarray(ids, dtype=np.int64).reshape(1, -1), self._length)
            held = self._length
            try:
                # One run more than the one-token step: the last is a plain replay of the capture.
                for _ in range(WARM_UP_STEPS + 1):
                    self._length, self._mask[0, held:] = held, 0
                    graphed = self.forward(ids)
                problem = None
                scale = max(float(np.abs(eager).max()), 1.0)
                if (not np.array_equal(eager.argmax(-1), graphed.argmax(-1))
                        or float(np.abs(eager - graphed).max()) > GRAPH_CHECK_TOLERANCE * scale):
                    problem = f"disagrees with the eager forward (max |diff| {float(np.abs(eager - graphed).max()):.3g})"
            except Exception as error:  # ORT refused to capture this length
                problem = f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            restore()
            if problem is not None:
                warnings.warn(f"the captured {count}-token graph of {self.model_path} {problem}; "
                              f"{count}-token forwards run without a graph", stacklevel=2)
                self._refused.add(count)
                del self._bindings[count]

    def _bind_cache(self, binding) -> None:
        for past, present, value in zip(self.past_names, self.present_names, self._cache):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: written in place

    def forward(self, token_ids) -> np.ndarray:
        return self._forward(token_ids, greedy=False).astype(np.float32, copy=False)

    def forward_greedy(self, token_ids) -> np.ndarray:
        """Like :meth:`forward`, but only each position's argmax token id comes back (int64, ``(n,)``).

        With the graph's ``next_token`` output the argmax is taken on the device and the logits
        stay there; without it, this is the argmax of :meth:`forward`.
        """
        if not self.greedy_output:
            return super().forward_greedy(token_ids)
        return self._forward(token_ids, greedy=True)

    def _forward(self, token_ids, greedy: bool) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        start, total = self._length, self._length + ids.shape[1]
        if total > self.max_positions:
            raise GraphoptError(f"{total} positions exceed the model's {self.max_positions}")
        self.reserve(total)
        self._mask[0, start:total] = 1
        fixed = self._bindings.get(ids.shape[1])
        # The first prompt takes GroupQueryAttention's first-prompt path (a mask as wide as the
        # prompt); one token runs the step binding even then, as it always has.
        if fixed is not None and (start > 0 or ids.shape[1] == 1):
            result = self._run_fixed(fixed, ids, start, greedy)
        else:
            result = self._forward_eager(ids, start, greedy)
        self._length = total
        return result

    def _forward_eager(self, ids: np.ndarray, start: int, greedy: bool = False) -> np.ndarray:
        """Run ``ids`` at ``start`` with fresh bindings and no graph; the mask must already cover them."""
        total = start + ids.shape[1]
        self._mask[0, start:total] = 1
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        # A prompt on an empty cache gets a mask as wide as itself: GroupQueryAttention's
        # first-prompt path (total length = prompt length), which writes into the shared
        # buffers all the same; on a non-empty cache the full-width mask is its "subsequent
        # prompt" path.
        binding.bind_cpu_input("attention_mask", self._mask[:, :total] if start == 0 else self._mask)
        if "position_ids" in self.input_names:
            binding.bind_cpu_input("position_ids", np.arange(start, total, dtype=np.int64).reshape(1, -1))
        binding.bind_output(GREEDY_OUTPUT if greedy else "logits", "cpu")
        self._bind_cache(binding)
        self.session.run_with_iobinding(binding, self._eager)
        return binding.get_outputs()[0].numpy()[0]

    def _run_fixed(self, fixed: dict, ids: np.ndarray, start: int, greedy: bool = False) -> np.ndarray:
        """``ids`` through a fixed binding: inputs updated in place, then run (or replay its graph)."""
        # "holds": the token the input buffer is known to hold (the last greedy step's argmax).
        if fixed["holds"] is None or ids.shape[1] != 1 or int(ids[0, 0]) != fixed["holds"]:
            fixed["ids"].update_inplace(ids)
        if self._feeds_positions:
            fixed["positions"].update_inplace(np.arange(start, start + ids.shape[1], dtype=np.int64).reshape(1, -1))
        self._step_mask.update_inplace(self._mask)
        self.session.run_with_iobinding(fixed["binding"], fixed["options"])
        result = fixed["tokens" if greedy else "logits"].numpy()[0]
        # The argmax now sits in the input buffer of an aliased binding: known when it was read back.
        fixed["holds"] = int(result[-1]) if greedy and fixed["tokens"] is fixed["ids"] else None
        # On the CPU that array is a view of the bound buffer, which the next run overwrites.
        return result.copy() if self.device == "cpu" else result

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate a cache of {self._length} tokens to {length}")
        # Positions past the mask are never read and are overwritten by the next forward.
        self._mask[0, length:] = 0
        self._length = length
