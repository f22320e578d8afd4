"""Continuous batching: many sequences decoded together by one ONNX Runtime session.

The KV cache is one buffer per layer and per key/value, ``[max_batch, kv_heads, context,
head_dim]``, bound as both ``past_key_values.*`` and ``present.*`` so GroupQueryAttention writes
each step's keys and values in place (the static-cache layout of
:mod:`graphopt.runtime.static_cache`, one row per sequence: a *slot*). The fused graph derives
``seqlens_k`` from each row of ``attention_mask`` and ``total_sequence_length`` from its width, so
a ``[rows, context]`` mask holding each sequence's own number of ones gives every row its own
length: ragged batches need nothing from the model file.

* A request's prompt enters its slot alone (GroupQueryAttention takes several positions at once
  only for a batch of one when the slot already holds some): bound by address as a
  ``[1, kv_heads, context, head_dim]`` cache, the first piece through the first-prompt path (a
  mask as wide as the piece), later pieces through the subsequent-prompt path (a mask as wide as
  all positions so far), exactly what a single-sequence decoder runs for a prompt given in parts.
* **Chunked prefill**: while other sequences decode, a prompt enters at most ``prefill_chunk``
  tokens per engine step, between decode steps, so a long prompt no longer stops every decoding
  sequence for its whole prefill; with nothing decoding it enters whole.
* **Prefix reuse** (CPU): the engine keeps the keys and values of the last prompt it prefilled
  (up to ``prefix_cache`` positions) and copies the positions that a new prompt shares with it
  into the new slot, so only the rest is computed: the chat template's system prompt, repeated
  instructions, a conversation's earlier turns. Causal attention makes a position's keys and values
  depend only on the tokens up to it, so the copy is what the prefill would have written.
* **Last-position logits**: the engine loads the graph with the LM head sliced to the last
  position (:mod:`graphopt.passes.last_token_logits`, in memory only): prefill no longer pays the
  LM head, about a fifth of the multiply-adds, for every prompt token. The same graph gets their
  argmax as ``next_token`` (:mod:`graphopt.passes.greedy_head`): a step whose rows are all greedy
  reads back one id per row instead of every row's logits (on a GPU, 6.3 MB a step at 32 rows of
  SmolLM2 in float32, and their argmax on the host).
* A step's IOBinding is made once per row count (and output): the cache rows, bound as past and
  present, and the host array the step's ids or logits land in stay bound; each step binds only its
  ids, mask and positions. Each sequence's text grows by decoding its last few ids
  (:class:`graphopt.runtime.tokenizer.TextStream`), not all of them again.
* Each decode step runs one token of every decoding sequence together: rows ``0 .. highest
  busy slot`` of the buffers, one step for the whole batch, so the weights are read once per step
  instead of once per sequence. Rows not decoding ride along as one-token dummies written where
  they do no harm: at position 0 of a free slot, and at the next position a half-prefilled prompt
  will overwrite anyway. New requests take the lowest free slot, which keeps such holes rare.
* A sequence that finishes or is cancelled gives its slot back at the end of that step.

Two ways to take prefills off the decode path are not open with ONNX Runtime's
GroupQueryAttention: decode rows and a prompt piece in one run (several positions per row with a
cache already in the slot need a batch of one), and several new prompts in one right-padded run
(possible through the first-prompt path, but prefix reuse needs the other path, and on the CPU the
int8 MatMulNBits kernel costs about as much per row at 128 rows as at 37, so the gain is small).

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
import warnings
from typing import Callable, Sequence as SequenceType

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.modeldir import ModelDir
from graphopt.runtime.sampling import GREEDY, Sampling, choose
from graphopt.runtime.static_cache import GREEDY_OUTPUT, fused_with_group_query_attention, runs_whole_on_cuda
from graphopt.runtime.tokenizer import TextStream, Tokenizer

logger = logging.getLogger(__name__)

# Positions per slot unless asked otherwise: the cache costs max_batch * context positions of
# keys and values for every layer, allocated up front (SmolLM2, 8 slots: 755 MB in float32).
DEFAULT_CONTEXT = 2048
# Prompt tokens a step prefills at most while other sequences decode: a 64-token piece costs a few
# decode steps of 8 sequences on a 2-core CPU, and larger pieces gain little per token there.
DEFAULT_PREFILL_CHUNK = 64
# Positions of the last prompt kept for prefix reuse (SmolLM2: 46 KB per position).
DEFAULT_PREFIX_CACHE = 256
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
        self.prefilled = 0  # prompt positions already in the slot (reused or computed)
        self.token_ids: list[int] = []
        self.text = ""  # text delivered so far (through events)
        self.decoded: TextStream | None = None  # the text of token_ids (the engine's tokenizer)
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
        """Positions this sequence holds in its slot: the prompt and every generated token but the last
        (while its prompt enters: the positions entered so far)."""
        if not self.token_ids:
            return self.prefilled
        return self.prompt_length + len(self.token_ids) - 1

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
    prefill_tokens: int = 0  # prompt tokens computed by prefills
    prefill_chunks: int = 0  # prefill runs (a prompt may enter in several)
    prefix_reused_tokens: int = 0  # prompt tokens copied from the previous prompt instead of computed
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
        prefill_chunk: prompt tokens one step prefills at most while other sequences decode (0: whole
            prompts at once).
        prefix_cache: positions of the last prompt kept to be copied into new slots that share them
            (0: off; CPU only).
        on_step: called after every decode step with (batch size, seconds): for metrics.
        cuda_graph: on CUDA, decode steps run every slot through fixed device buffers, captured once
            as a CUDA graph and replayed (prefill pieces run outside it); False: eager steps of the
            busy rows only.

    Example:
        >>> engine = BatchEngine("smollm2-int8", max_batch=8).start()
        >>> sequence = engine.submit(BatchRequest(tuple(engine.tokenizer.encode("Hello"))))
        >>> sequence.wait(); engine.tokenizer.decode(sequence.token_ids)
    """

    def __init__(self, model_dir: str | os.PathLike, ep: str = "cpu", max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None, threads: int | None = None, spinning: bool = True,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache: int = DEFAULT_PREFIX_CACHE,
                 on_step: Callable[[int, float], None] | None = None, cuda_graph: bool = True):
        if max_batch < 1:
            raise GraphoptError("max_batch must be at least 1")
        if max_queue < 0:
            raise GraphoptError("max_queue must be at least 0")
        if prefill_chunk < 0 or prefix_cache < 0:
            raise GraphoptError("prefill_chunk and prefix_cache must be at least 0")
        self.model_dir = require_batchable(model_dir, parse_tokenizer=False)  # parsed once, by the Tokenizer
        self.tokenizer = Tokenizer(self.model_dir.path)
        model_path = self.model_dir.model_path
        import onnxruntime as ort

        from graphopt.runtime.session import DEVICE_OF_PROVIDER, captures_cuda_graphs, make_session

        self._ort = ort
        self.manifest = self.model_dir.manifest
        graph_bytes = _last_token_graph(model_path)
        # As open_decoder decides for one sequence: a float32 GroupQueryAttention runs on the CPU, and a
        # session ONNX Runtime will not capture runs without a graph (with a warning).
        cuda_graph = cuda_graph and captures_cuda_graphs(ep) and runs_whole_on_cuda(self.model_dir.manifest)
        self.session = None
        if cuda_graph:
            try:
                self.session = make_session(model_path, ep=ep, threads=threads, spinning=spinning, cuda_graph=True,
                                            model_bytes=graph_bytes)
            except Exception as error:
                warnings.warn(f"CUDA graphs are off for {model_path}: {str(error).splitlines()[0]}", stacklevel=2)
                cuda_graph = False
        if self.session is None:
            self.session = make_session(model_path, ep=ep, threads=threads, spinning=spinning, model_bytes=graph_bytes)
        self.provider = self.session.get_providers()[0]
        self.device = DEVICE_OF_PROVIDER.get(self.provider, "cpu")
        inputs = {meta.name: meta for meta in self.session.get_inputs()}
        # The served graph's argmax (passes/greedy_head.py): an all-greedy step reads back one id per row.
        self._greedy_output = GREEDY_OUTPUT in {meta.name for meta in self.session.get_outputs()}
        self._decode_bindings: dict[tuple[int, bool], tuple] = {}  # (rows, greedy) -> (IOBinding, output array)
        logits = next(meta for meta in self.session.get_outputs() if meta.name == "logits")
        self._vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else self.manifest.vocab_size
        self._logits_type = _NUMPY_TYPES[logits.type]
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
        self.prefill_chunk = prefill_chunk
        # Cache buffers: numpy arrays on the CPU (the prefix copies are slices of them), OrtValues
        # on a device. Written through once here so that the memory the cache takes is resident from
        # the start, not a slow climb as slots reach positions no sequence reached before.
        self._cache = []  # (address, per-slot shape, bytes per slot, element type, array or None) per past input
        self._cache_values = []  # keeps device buffers alive
        for name in self.past_names:
            meta = inputs[name]
            kv_heads, head_dim = meta.shape[1], meta.shape[3]
            if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                raise GraphoptError(f"{model_path}: cache input {name} needs static heads and head dim, "
                                    f"has {meta.shape}")
            dtype = _NUMPY_TYPES[meta.type]
            shape = [max_batch, kv_heads, self.context, head_dim]
            if self.device == "cpu":
                array = np.zeros(shape, dtype)
                array.fill(0)
                address = array.ctypes.data
            else:
                array = None
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0)
                self._cache_values.append(value)
                address = value.data_ptr()
            slot_bytes = kv_heads * self.context * head_dim * np.dtype(dtype).itemsize
            self._cache.append((address, (kv_heads, self.context, head_dim), slot_bytes, dtype, array))
        # Prefix reuse: the last prompt's tokens and its keys and values (CPU caches only).
        self.prefix_cache = min(prefix_cache, self.context) if self.device == "cpu" else 0
        self._prefix_tokens: tuple[int, ...] = ()
        self._prefix = [np.zeros((shape[0], self.prefix_cache, shape[2]), dtype)
                        for _, shape, _, dtype, _ in self._cache] if self.prefix_cache else []
        self._eager = ort.RunOptions()  # outside any CUDA graph: prefill pieces, unfixed steps
        self._eager.add_run_config_entry("gpu_graph_id", "-1")
        self._fixed_step = None
        if cuda_graph and self.device == "cuda":
            self._fix_step(graph=True)
        self.eos_token_ids = frozenset(self.manifest.eos_token_ids)
        self.on_step = on_step
        self.stats = EngineStats()
        self._slots: list[Sequence | None] = [None] * max_batch
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._entering: list[Sequence] = []  # in slots, prompt not all in yet (admission order)
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
        """Free cancelled slots, give free slots to waiting requests, decode one token of every decoding
        sequence, then let waiting prompts enter (at most ``prefill_chunk`` tokens while others decode).
        Returns whether there was anything to do."""
        with self._condition:
            for sequence in self._slots:
                if sequence is not None and sequence._cancel_requested:
                    self._finish(sequence, "cancelled")
            admitted = []
            while self._waiting and None in self._slots:
                sequence = self._waiting.popleft()
                sequence.slot = self._slots.index(None)
                self._slots[sequence.slot] = sequence
                admitted.append(sequence)
            self._entering = [sequence for sequence in self._entering
                             if sequence.finish_reason is None and not sequence.token_ids] + admitted
            decoding = [sequence for sequence in self._slots if sequence is not None and sequence.token_ids]
            entering = list(self._entering)
        for sequence in admitted:
            self._reuse_prefix(sequence)
        if decoding:
            self._decode(decoding)
        # With nothing decoding, nothing waits on a prompt: it enters whole.
        budget = self.prefill_chunk if decoding and self.prefill_chunk else None
        for sequence in entering:
            if budget is not None and budget <= 0:
                break
            remaining = sequence.prompt_length - sequence.prefilled
            count = remaining
            if budget is not None:
                # Never a one-token piece of a longer prompt, first or last: GroupQueryAttention's
                # one-token path rounds differently from its prompt path (up to ~1 logit on the int8
                # SmolLM2 with packed q/k/v, 0 between pieces of two or more tokens), and
                # `graphopt generate` computes every prompt position on the prompt path.
                count = min(remaining, max(budget, 2))
                if remaining - count == 1:
                    count = remaining
                budget -= count
            self._prefill(sequence, count)
        return bool(entering or decoding)

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
        for past, present, (base, shape, slot_bytes, dtype, _) in zip(self.past_names, self.present_names, self._cache):
            address = base + first_slot * slot_bytes
            binding.bind_input(past, self.device, 0, dtype, [rows, *shape], address)
            binding.bind_output(present, self.device, 0, dtype, [rows, *shape], address)

    def _fix_step(self, graph: bool) -> None:
        """Decode steps through fixed buffers on the session's device: every slot every step (free slots
        and entering prompts as the dummies they already are), inputs updated in place, logits and
        argmax in buffers of their own; with ``graph``, ONNX Runtime captures that step once as a CUDA
        graph and replays it (the batch's row count no longer changes the shapes). One launch a step
        instead of ~400 makes a step on a GPU cost about what one sequence's graphed step costs."""
        rows, ort = self.max_batch, self._ort
        shapes = {"input_ids": ((rows, 1), np.int64), "attention_mask": ((rows, self.context), np.int64),
                  "logits": ((rows, 1, self._vocab), self._logits_type)}
        if self._has_positions:
            shapes["position_ids"] = ((rows, 1), np.int64)
        if self._greedy_output:
            shapes[GREEDY_OUTPUT] = ((rows, 1), np.int64)
        buffers = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, 0)
                   for name, (shape, dtype) in shapes.items()}
        binding = self.session.io_binding()
        for name, value in buffers.items():
            if name in ("logits", GREEDY_OUTPUT):
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        self._bind_cache(binding, 0, rows)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", "1" if graph else "-1")
        self._fixed_step = binding, options, buffers

    def _reuse_prefix(self, sequence: Sequence) -> None:
        """Copy the positions ``sequence``'s prompt shares with the last prompt into its slot."""
        if not self.prefix_cache:
            return
        prompt = sequence.request.prompt_ids
        # At least the prompt's last two tokens are computed: the last one's logits give the first
        # new token, and a one-token piece would take GroupQueryAttention's one-token path (see step).
        shared = _common_prefix(prompt, self._prefix_tokens, sequence.prompt_length - 2)
        if shared <= 0:
            return
        for (_, _, _, _, array), kept in zip(self._cache, self._prefix):
            array[sequence.slot, :, :shared] = kept[:, :shared]
        sequence.prefilled = shared
        self.stats.prefix_reused_tokens += shared

    def _remember_prefix(self, sequence: Sequence) -> None:
        """Keep the prompt just prefilled (its first ``prefix_cache`` positions) for the next ones."""
        if not self.prefix_cache:
            return
        prompt = sequence.request.prompt_ids[:self.prefix_cache]
        same = _common_prefix(prompt, self._prefix_tokens, len(prompt))
        if same == len(prompt):
            return
        for (_, _, _, _, array), kept in zip(self._cache, self._prefix):
            kept[:, same:len(prompt)] = array[sequence.slot, :, same:len(prompt)]
        self._prefix_tokens = tuple(prompt)

    def _prefill(self, sequence: Sequence, count: int) -> None:
        """Run the next ``count`` prompt tokens of ``sequence`` into its slot; after the last, take its first token."""
        started = time.perf_counter()
        start = sequence.prefilled
        end = start + count
        binding = self.session.io_binding()
        piece = np.asarray(sequence.request.prompt_ids[start:end], dtype=np.int64).reshape(1, -1)
        binding.bind_cpu_input("input_ids", piece)
        # A mask as wide as the positions so far: as wide as the piece for the first (GroupQueryAttention's
        # first-prompt path, writing from position 0), wider for the next ones (its subsequent-prompt
        # path, writing after the positions already in the slot).
        binding.bind_cpu_input("attention_mask", np.ones((1, end), dtype=np.int64))
        if self._has_positions:
            binding.bind_cpu_input("position_ids", np.arange(start, end, dtype=np.int64).reshape(1, -1))
        binding.bind_output("logits", "cpu")
        self._bind_cache(binding, sequence.slot, 1)
        self.session.run_with_iobinding(binding, self._eager)
        sequence.prefilled = end
        seconds = time.perf_counter() - started
        self.stats.prefill_chunks += 1
        self.stats.prefill_tokens += count
        self.stats.prefill_s += seconds
        self.stats.busy_s += seconds
        if end < sequence.prompt_length:
            return
        logits = binding.get_outputs()[0].numpy()[0, -1].astype(np.float32)
        self.stats.prefills += 1
        self._remember_prefix(sequence)
        self._accept(sequence, choose(logits, sequence.request.sampling, sequence._rng))

    def _decode(self, running: list[Sequence]) -> None:
        started = time.perf_counter()
        with self._condition:
            holders = [sequence for sequence in self._slots if sequence is not None]
        rows = self.max_batch if self._fixed_step else max(sequence.slot for sequence in running) + 1
        ids = np.zeros((rows, 1), dtype=np.int64)
        positions = np.zeros((rows, 1), dtype=np.int64)
        mask = np.zeros((rows, self.context), dtype=np.int64)
        mask[:, 0] = 1  # free rows: a one-token dummy written at position 0 of a slot nobody holds
        for sequence in holders:
            # A prompt still entering: the dummy goes where its next piece will write.
            if not sequence.token_ids and sequence.slot < rows and sequence.finish_reason is None:
                positions[sequence.slot, 0] = sequence.prefilled
                mask[sequence.slot, :sequence.prefilled + 1] = 1
        for sequence in running:
            position = sequence.cache_length  # where the last generated token goes
            ids[sequence.slot, 0] = sequence.token_ids[-1]
            positions[sequence.slot, 0] = position
            mask[sequence.slot, :position + 1] = 1
        greedy = self._greedy_output and all(sequence.request.sampling.greedy for sequence in running)
        if self._fixed_step:
            binding, options, buffers = self._fixed_step
            buffers["input_ids"].update_inplace(ids)
            buffers["attention_mask"].update_inplace(mask)
            if self._has_positions:
                buffers["position_ids"].update_inplace(positions)
            self.session.run_with_iobinding(binding, options)
            result = buffers[GREEDY_OUTPUT if greedy else "logits"].numpy()[:, -1]
        else:
            # One binding per row count and output, bound once: the cache rows (60 bindings for SmolLM2,
            # ~0.8 ms a step on the CPU) and a host array the step's ids (or logits) land in.
            binding, result = self._decode_bindings.get((rows, greedy), (None, None))
            if binding is None:
                binding = self.session.io_binding()
                result = np.empty((rows, 1), np.int64) if greedy else \
                    np.empty((rows, 1, self._vocab), self._logits_type)
                binding.bind_output(GREEDY_OUTPUT if greedy else "logits", "cpu", 0, result.dtype,
                                    list(result.shape), result.ctypes.data)
                self._bind_cache(binding, 0, rows)
                self._decode_bindings[rows, greedy] = binding, result
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask)
            if self._has_positions:
                binding.bind_cpu_input("position_ids", positions)
            self.session.run_with_iobinding(binding, self._eager)
            result = result[:, -1]
        seconds = time.perf_counter() - started
        self.stats.steps += 1
        self.stats.busy_s += seconds
        self.stats.decode_s += seconds
        self.stats.decode_tokens += len(running)
        self.stats.last_batch_size = len(running)
        for sequence in running:
            token = int(result[sequence.slot]) if greedy else \
                choose(result[sequence.slot].astype(np.float32), sequence.request.sampling, sequence._rng)
            self._accept(sequence, token)
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
        if sequence.decoded is None:
            sequence.decoded = self.tokenizer.stream()
        decoded = sequence.decoded.push(token)  # without a trailing incomplete character
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
            end -= _held_back(decoded, request.stop)
        elif end == len(decoded):  # the end: bytes of an unfinished character show as U+FFFD
            decoded = self.tokenizer.decode(sequence.token_ids)
            end = len(decoded)
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


def require_batchable(model_dir: str | os.PathLike, parse_tokenizer: bool = True) -> ModelDir:
    """The model directory, or GraphoptError (with the command that fixes it) unless it is fused with
    GroupQueryAttention, which batched decoding needs (``parse_tokenizer``: as ``ModelDir.open``)."""
    directory = ModelDir.open(model_dir, parse_tokenizer=parse_tokenizer)
    if not fused_with_group_query_attention(directory.manifest):
        raise GraphoptError(f"{directory.path}: batched decoding needs attention fused into GroupQueryAttention "
                            f"(graphopt fuse {directory.path} -o FUSED --target cpu)")
    return directory


def _common_prefix(first: SequenceType[int], second: SequenceType[int], limit: int) -> int:
    """How many leading tokens ``first`` and ``second`` share, at most ``limit``."""
    count = 0
    for a, b in zip(first[:limit], second[:limit]):
        if a != b:
            break
        count += 1
    return count


def _last_token_graph(model_path: os.PathLike) -> bytes | None:
    """The decoder graph with logits for the last position only and their argmax (``next_token``; weights
    stay in their files), or None where the LM head is not a plain MatMul."""
    import onnx_ir as ir

    from graphopt.passes.greedy_head import AddGreedyHead
    from graphopt.passes.last_token_logits import LastTokenLogitsPass

    model = ir.load(os.fspath(model_path))
    if not LastTokenLogitsPass()(model).modified:
        return None
    AddGreedyHead()(model)
    try:
        return ir.to_proto(model).SerializeToString()
    except ValueError as error:  # weights inside the file past protobuf's 2 GB: run the file as it is
        logger.warning("%s: logits for every position (%s)", model_path, error)
        return None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string (not sent yet)."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held
