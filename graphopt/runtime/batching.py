"""Continuous batching: many sequences decoded together by one ONNX Runtime session.

The KV cache is one buffer per layer and per key/value, ``[max_batch, kv_heads, context,
head_dim]``, bound as both ``past_key_values.*`` and ``present.*`` so GroupQueryAttention writes
each step's keys and values in place (the static-cache layout of
:mod:`graphopt.runtime.static_cache`, one row per sequence: a *slot*). The fused graph derives
``seqlens_k`` from each row of ``attention_mask`` and ``total_sequence_length`` from its width, so
a ``[rows, context]`` mask holding each sequence's own number of ones gives every row its own
length: ragged batches need nothing from the model file.

* A request's prefill runs alone in its slot: the slot's rows are a contiguous piece of each
  buffer, bound by address as a ``[1, kv_heads, context, head_dim]`` cache (GroupQueryAttention's
  first-prompt path, exactly what the single-sequence static cache runs).
* Each decode step runs one token of every active sequence together: rows ``0 .. highest active
  slot`` of the buffers, one step for the whole batch, so the weights are read once per step
  instead of once per sequence. Free slots below the highest active one ride along as one-token
  dummies (a mask with a single one): a few wasted rows instead of moving caches around; new
  requests take the lowest free slot, which keeps such holes rare.
* New requests are prefilled between decode steps (continuous batching); a sequence that
  finishes or is cancelled gives its slot back at the end of that step.

Graphs without GroupQueryAttention (unfused exports) are refused with the command that fuses
them: their attention concatenates a growing cache and takes one length for the whole batch.

The engine is driven either synchronously (:meth:`BatchEngine.step`, what tests use to stage
arrivals exactly) or by its own thread (:meth:`BatchEngine.start`); ``submit`` and ``cancel`` are
thread-safe, and each sequence reports its tokens through a callback run on the engine's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Callable, Sequence as SequenceType

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.modeldir import ModelDir
from graphopt.runtime.sampling import GREEDY, Sampling, choose
from graphopt.runtime.static_cache import fused_with_group_query_attention
from graphopt.runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Positions per slot unless asked otherwise: the cache costs max_batch * context positions of
# keys and values for every layer, allocated up front (SmolLM2, 8 slots: 755 MB in float32).
DEFAULT_CONTEXT = 2048
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class QueueFullError(GraphoptError):
    """More requests are waiting than the engine's ``max_queue`` allows."""


class PromptTooLongError(GraphoptError):
    """A prompt (plus the tokens asked for) does not fit in a slot's context."""


class EngineClosedError(GraphoptError):
    """The engine is shutting down and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """What one sequence asks for.

    Attributes:
        prompt_ids: the prompt's token ids (at least one).
        max_new_tokens: tokens to generate at most, the first (from prefill) included.
        sampling: temperature / top-k / top-p / seed of this request alone.
        stop: strings that end generation; the text returned stops before the first one.
        stop_on_eos: end on the model's end-of-sequence tokens.
    """

    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 128
    sampling: Sampling = GREEDY
    stop: tuple[str, ...] = ()
    stop_on_eos: bool = True


@dataclasses.dataclass(frozen=True)
class SequenceEvent:
    """One update of a sequence: a new token and the text it completes, or the end.

    ``text`` is the new printable text (possibly empty: held back while it might be the start of a
    stop string or an incomplete UTF-8 character). The last event of a sequence has
    ``finish_reason`` set (``stop``, ``length`` or ``cancelled``) and may carry text with no token.
    """

    token_id: int | None
    text: str
    finish_reason: str | None = None


class Sequence:
    """A request's state in the engine: waiting, then in a slot, then finished."""

    def __init__(self, sequence_id: int, request: BatchRequest, listener: Callable[[SequenceEvent], None] | None):
        self.id = sequence_id
        self.request = request
        self.listener = listener
        self.slot: int | None = None
        self.token_ids: list[int] = []
        self.text = ""  # text delivered so far (through events)
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.finished = threading.Event()
        self._rng = np.random.default_rng(request.sampling.seed)
        self._cancel_requested = False

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def cache_length(self) -> int:
        """Positions this sequence holds in its slot: the prompt and every generated token but the last."""
        return self.prompt_length + max(len(self.token_ids) - 1, 0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the sequence has finished; False on timeout."""
        return self.finished.wait(timeout)


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine started (read by the server's /metrics)."""

    steps: int = 0
    prefills: int = 0
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    busy_s: float = 0.0
    last_batch_size: int = 0
    prefill_tokens: int = 0  # prompt tokens prefilled
    prefill_s: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (a request's first token comes from its prefill)
    decode_s: float = 0.0


class BatchEngine:
    """Decodes many sequences at once over one session and a slot-per-sequence static KV cache.

    Args:
        model_dir: a model directory fused with GroupQueryAttention (``graphopt fuse --target cpu``).
        ep: ONNX Runtime execution provider (``cpu``, ``cuda``, ``tensorrt``).
        max_batch: slots, i.e. sequences decoded together at most.
        max_queue: requests allowed to wait for a slot; ``submit`` raises QueueFullError past it.
        context: positions per slot (prompt plus generated tokens); default the smaller of
            DEFAULT_CONTEXT and the model's ``max_positions``.
        threads: ONNX Runtime intra-op threads (default: ORT's choice).
        spinning: let ORT's idle threads spin between runs (faster steps; costs a core while idle).
        on_step: called after every decode step with (batch size, seconds): for metrics.

    Example:
        >>> engine = BatchEngine("smollm2-int8", max_batch=8).start()
        >>> sequence = engine.submit(BatchRequest(tuple(engine.tokenizer.encode("Hello"))))
        >>> sequence.wait(); engine.tokenizer.decode(sequence.token_ids)
    """

    def __init__(self, model_dir: str | os.PathLike, ep: str = "cpu", max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, threads: int | None = None, spinning: bool = True,
                 on_step: Callable[[int, float], None] | None = None):
        if max_batch < 1:
            raise GraphoptError("max_batch must be at least 1")
        if max_queue < 0:
            raise GraphoptError("max_queue must be at least 0")
        self.model_dir = require_batchable(model_dir)
        model_path = self.model_dir.model_path
        import onnxruntime as ort

        from graphopt.runtime.session import DEVICE_OF_PROVIDER, make_session

        self._ort = ort
        self.manifest = self.model_dir.manifest
        self.session = make_session(model_path, ep=ep, threads=threads, spinning=spinning)
        self.provider = self.session.get_providers()[0]
        self.device = DEVICE_OF_PROVIDER.get(self.provider, "cpu")
        inputs = {meta.name: meta for meta in self.session.get_inputs()}
        self._has_positions = "position_ids" in inputs
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        self.present_names = ["present." + name[len("past_key_values."):] for name in self.past_names]
        # GroupQueryAttention's rotary tables cover max_positions; a slot may not hold more.
        max_positions = int((self.manifest.fusion or {}).get("max_positions") or self.manifest.max_positions)
        self.context = min(context or DEFAULT_CONTEXT, max_positions)
        if self.context < 2:
            raise GraphoptError(f"a context of {self.context} positions leaves no room to generate")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._cache = []  # (OrtValue, per-slot shape, bytes per slot, element type) per past input
        for name in self.past_names:
            meta = inputs[name]
            kv_heads, head_dim = meta.shape[1], meta.shape[3]
            if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                raise GraphoptError(f"{model_path}: cache input {name} needs static heads and head dim, has {meta.shape}")
            dtype = _NUMPY_TYPES[meta.type]
            value = ort.OrtValue.ortvalue_from_shape_and_type([max_batch, kv_heads, self.context, head_dim], dtype,
                                                              self.device, 0)
            slot_bytes = kv_heads * self.context * head_dim * np.dtype(dtype).itemsize
            self._cache.append((value, (kv_heads, self.context, head_dim), slot_bytes, dtype))
        self.tokenizer = Tokenizer(self.model_dir.path)
        self.eos_token_ids = frozenset(self.manifest.eos_token_ids)
        self.on_step = on_step
        self.stats = EngineStats()
        self._slots: list[Sequence | None] = [None] * max_batch
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._ids = itertools.count()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._failure: BaseException | None = None

    # ---- requests ------------------------------------------------------------------------

    def submit(self, request: BatchRequest, listener: Callable[[SequenceEvent], None] | None = None) -> Sequence:
        """Queue ``request``; ``listener`` gets its events on the engine's thread. Thread-safe.

        Raises:
            PromptTooLongError: the prompt plus ``max_new_tokens`` exceeds the context.
            QueueFullError: ``max_queue`` requests are already waiting.
            EngineClosedError: the engine is shutting down.
        """
        self.check_request(request)
        with self._condition:
            if self._closing:
                raise EngineClosedError("the server is shutting down")
            # Requests that a free slot takes at the next step do not count as queued.
            if len(self._waiting) - self._free_slots() >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue {self.max_queue})")
            sequence = Sequence(next(self._ids), request, listener)
            self._waiting.append(sequence)
            self._condition.notify_all()
        return sequence

    def check_request(self, request: BatchRequest) -> None:
        """Raise the GraphoptError ``submit`` would raise for ``request``'s size, without queueing it."""
        if not request.prompt_ids:
            raise GraphoptError("the prompt is empty")
        if request.max_new_tokens < 1:
            raise GraphoptError("max_new_tokens must be at least 1")
        if len(request.prompt_ids) + request.max_new_tokens > self.context:
            raise PromptTooLongError(f"this model's context is {self.context} tokens; the prompt has "
                                     f"{len(request.prompt_ids)} and {request.max_new_tokens} more were asked for")

    def cancel(self, sequence: Sequence) -> None:
        """Stop ``sequence``: at once if it is waiting, at the end of the current step if it runs. Thread-safe."""
        with self._condition:
            if sequence.finish_reason is not None:
                return
            if sequence in self._waiting:
                self._waiting.remove(sequence)
                self._finish(sequence, "cancelled")
                return
            sequence._cancel_requested = True
            self._condition.notify_all()

    # ---- state ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        """Sequences holding a slot now."""
        return sum(sequence is not None for sequence in self._slots)

    @property
    def accepting(self) -> bool:
        """Whether ``submit`` takes requests: False once shutting down, or after the session failed."""
        return not self._closing

    def idle(self) -> bool:
        return not self._waiting and self.batch_size == 0

    def _free_slots(self) -> int:
        return self.max_batch - self.batch_size

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> bool:
        """Free cancelled slots, prefill waiting requests into free slots, decode one token of every
        running sequence. Returns whether there was anything to do."""
        with self._condition:
            for sequence in self._slots:
                if sequence is not None and sequence._cancel_requested:
                    self._finish(sequence, "cancelled")
            running = [sequence for sequence in self._slots if sequence is not None]
            admitted = []
            while self._waiting and None in self._slots:
                sequence = self._waiting.popleft()
                sequence.slot = self._slots.index(None)
                self._slots[sequence.slot] = sequence
                admitted.append(sequence)
        # The decode step before the prefills: the step writes a dummy token at position 0 of every
        # row it does not decode, which would overwrite the first prompt token of a slot
        # prefilled just before. Newcomers join the batch from the next step on.
        if running:
            self._decode(running)
        for sequence in admitted:
            self._prefill(sequence)
        return bool(admitted or running)

    def start(self) -> "BatchEngine":
        """Run :meth:`step` on a thread of its own until :meth:`shutdown`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="graphopt-batch-engine", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                with self._condition:
                    while not self._closing and self.idle():
                        self._condition.wait()
                    if self._closing and self.idle():
                        return
                self.step()
        except BaseException as error:  # a broken session: fail every request rather than hang them
            logger.exception("batch engine stopped")
            self._failure = error
            with self._condition:
                self._closing = True
                for sequence in [*self._waiting, *self._slots]:
                    if sequence is not None and sequence.finish_reason is None:
                        self._finish(sequence, "error")
                self._waiting.clear()

    def shutdown(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Take no new requests; finish (or with ``cancel``, cancel) those in flight, then stop the thread."""
        with self._condition:
            self._closing = True
            if cancel:
                for sequence in list(self._waiting):
                    self._waiting.remove(sequence)
                    self._finish(sequence, "cancelled")
                for sequence in self._slots:
                    if sequence is not None:
                        sequence._cancel_requested = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        elif cancel:
            self.step()  # synchronous use: free the cancelled slots now

    def run_until_idle(self) -> None:
        """Step until nothing waits or runs (synchronous use)."""
        while not self.idle():
            self.step()

    def generate(self, requests: SequenceType[BatchRequest]) -> list[Sequence]:
        """Submit ``requests`` together and decode them to the end (synchronous use)."""
        sequences = [self.submit(request) for request in requests]
        self.run_until_idle()
        return sequences

    # ---- model runs ----------------------------------------------------------------------

    def _bind_cache(self, binding, first_slot: int, rows: int) -> None:
        """Bind rows ``first_slot .. first_slot + rows`` of every cache buffer as past and present."""
        for past, present, (value, shape, slot_bytes, dtype) in zip(self.past_names, self.present_names, self._cache):
            address = value.data_ptr() + first_slot * slot_bytes
            binding.bind_input(past, self.device, 0, dtype, [rows, *shape], address)
            binding.bind_output(present, self.device, 0, dtype, [rows, *shape], address)

    def _prefill(self, sequence: Sequence) -> None:
        started = time.perf_counter()
        prompt = np.asarray(sequence.request.prompt_ids, dtype=np.int64).reshape(1, -1)
        length = prompt.shape[1]
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", prompt)
        # A mask as wide as the prompt: GroupQueryAttention's first-prompt path, which writes the
        # prompt's keys and values into the bound slot from position 0.
        binding.bind_cpu_input("attention_mask", np.ones((1, length), dtype=np.int64))
        if self._has_positions:
            binding.bind_cpu_input("position_ids", np.arange(length, dtype=np.int64).reshape(1, -1))
        binding.bind_output("logits", "cpu")
        self._bind_cache(binding, sequence.slot, 1)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()[0, -1].astype(np.float32)
        seconds = time.perf_counter() - started
        self.stats.prefills += 1
        self.stats.prefill_tokens += length
        self.stats.prefill_s += seconds
        self.stats.busy_s += seconds
        self._accept(sequence, choose(logits, sequence.request.sampling, sequence._rng))

    def _decode(self, running: list[Sequence]) -> None:
        started = time.perf_counter()
        rows = max(sequence.slot for sequence in running) + 1
        ids = np.zeros((rows, 1), dtype=np.int64)
        positions = np.zeros((rows, 1), dtype=np.int64)
        mask = np.zeros((rows, self.context), dtype=np.int64)
        mask[:, 0] = 1  # free rows: a one-token dummy written at position 0 of a slot nobody holds
        for sequence in running:
            position = sequence.cache_length  # where the last generated token goes
            ids[sequence.slot, 0] = sequence.token_ids[-1]
            positions[sequence.slot, 0] = position
            mask[sequence.slot, :position + 1] = 1
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self._has_positions:
            binding.bind_cpu_input("position_ids", positions)
        binding.bind_output("logits", "cpu")
        self._bind_cache(binding, 0, rows)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()[:, -1].astype(np.float32)
        seconds = time.perf_counter() - started
        self.stats.steps += 1
        self.stats.busy_s += seconds
        self.stats.decode_s += seconds
        self.stats.decode_tokens += len(running)
        self.stats.last_batch_size = len(running)
        for sequence in running:
            self._accept(sequence, choose(logits[sequence.slot], sequence.request.sampling, sequence._rng))
        if self.on_step is not None:
            self.on_step(len(running), seconds)

    # ---- tokens and text -----------------------------------------------------------------

    def _accept(self, sequence: Sequence, token: int) -> None:
        """Record ``token`` for ``sequence``, emit the text it completes, finish the sequence if it is done."""
        request = sequence.request
        sequence.token_ids.append(token)
        self.stats.tokens += 1
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
        decoded = self.tokenizer.decode(sequence.token_ids)
        finish = None
        end = len(decoded)
        if request.stop:
            # A stop string may straddle tokens: search from just before the text already sent.
            search_from = max(len(sequence.text) - max(map(len, request.stop)) + 1, 0)
            hits = [index for index in (decoded.find(stop, search_from) for stop in request.stop) if index >= 0]
            if hits:
                end, finish = min(hits), "stop"
        if finish is None:
            if request.stop_on_eos and token in self.eos_token_ids:
                finish = "stop"
            elif len(sequence.token_ids) >= request.max_new_tokens or sequence.cache_length + 1 > self.context:
                finish = "length"
        if finish is None:
            if decoded.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next bytes
                end = len(sequence.text)
            else:
                end -= _held_back(decoded, request.stop)
        delta = decoded[len(sequence.text):max(end, len(sequence.text))]
        sequence.text += delta
        self._emit(sequence, SequenceEvent(token, delta))
        if finish is not None:
            with self._condition:
                self._finish(sequence, finish)

    def _finish(self, sequence: Sequence, reason: str) -> None:
        """End ``sequence`` and free its slot (called with the condition held)."""
        if sequence.finish_reason is not None:
            return
        sequence.finish_reason = reason
        sequence.finished_at = time.perf_counter()
        if sequence.slot is not None and self._slots[sequence.slot] is sequence:
            self._slots[sequence.slot] = None
        self.stats.finished += 1
        self.stats.cancelled += reason == "cancelled"
        self._emit(sequence, SequenceEvent(None, "", reason))
        sequence.finished.set()
        self._condition.notify_all()

    @staticmethod
    def _emit(sequence: Sequence, event: SequenceEvent) -> None:
        if sequence.listener is None:
            return
        try:
            sequence.listener(event)
        except Exception:  # one client's broken callback must not take the batch down
            logger.exception("listener of sequence %d failed", sequence.id)


def require_batchable(model_dir: str | os.PathLike) -> ModelDir:
    """The model directory, or GraphoptError (with the command that fixes it) unless it is fused with
    GroupQueryAttention, which batched decoding needs."""
    directory = ModelDir.open(model_dir)
    if not fused_with_group_query_attention(directory.manifest):
        raise GraphoptError(f"{directory.path}: batched decoding needs attention fused into GroupQueryAttention "
                            f"(graphopt fuse {directory.path} -o FUSED --target cpu)")
    return directory


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string (not sent yet)."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held
