"""Knowledge distillation: train a student model directory's weights to imitate a teacher, keep its graph.

``distill(student, teacher, output, config)`` builds the student's torch form
(:mod:`graphopt.student`: same function, same weight names), trains it on the KL divergence to the
teacher's next-token distribution (optionally plus cross-entropy on the data), and writes the
trained weights into a copy of the student's graph. Order of a pipeline: prune -> distill -> fuse ->
quantize; fused or quantized students are refused.

* Data: by default sequences the teacher samples itself (temperature 1, top-p 0.95) from seed
  prompts (calibration's plus a few chat turns), so no dataset is needed; ``data`` reads a text
  or JSONL (``{"text": ...}`` per line) file instead. graphopt's evaluation text is refused.
* Teacher: a model directory, run as torch (the same builder as the student; the only choice on
  a GPU machine whose onnxruntime is CPU-only) or through ONNX Runtime (``teacher_runtime="ort"``).
* Runs under torch.distributed (``torchrun --nproc-per-node N``, or a process group the caller
  made): ``batch_size`` is the global batch, split evenly over the processes, so one process
  and N processes take the same optimizer steps on the same data (DDP averages the gradients).
* Budget: ``tokens`` (deterministic) and/or ``max_minutes`` (wall clock of the whole run). The
  learning rate warms up, then follows a cosine to 10% over the budget's progress.
* Checkpoints (student, optimizer, step, curve, data) every ``checkpoint_minutes`` into
  ``<output>.ckpt/``, written atomically; ``resume=True`` continues from the last one. With a
  token budget a resumed run ends with the same weights as an uninterrupted one (same seed).
* QAT: ``quantize="int4"|"int8"`` trains through fake-quantized weights (straight-through
  estimator) on the exact grid of ``passes/quantize_weights.py`` that ``graphopt quantize
  --weights int4|int8`` will use: its default method (``affine`` for int4: ``min + scale x code``
  per block, stored as an integer zero point plus a 4-bit residual, as the pass stores it; ``rtn`` selectable), its
  default block sizes, and its LM head (``auto``: int8; ``float``, ``int4``). The written weights
  are snapped onto that grid, so the weight-only pass afterwards reproduces them exactly.
* GPU throughput: bf16 autocast over float32 master weights, TF32 for what stays in float32, a
  bf16 teacher, and the KL computed over chunks of tokens from the final hidden states (the
  49k-vocabulary logits of a chunk are recomputed in the backward instead of kept), so large
  micro-batches fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import time

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.evaluate import DEFAULT_TEXT, read_text
from graphopt.manifest import LineageStep
from graphopt.modeldir import ModelDir, atomic_output, check_output, derive
from graphopt.passes.quantize_weights import snap_to_grid
from graphopt.runtime.generator import encode_prompt
from graphopt.steps import StepConfig, check_choice

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int4", "int8")
QAT_METHODS = ("affine", "rtn")  # the weight-only pass's grids QAT can train on exactly
HEAD_CHOICES = ("auto", "float", "int8", "int4")
DEFAULT_MAX_MINUTES = 10.0  # the CLI's budget when neither --tokens nor --max-minutes is given
# What measured best per device (README "Distillation"): on one H200, the 25%-pruned SmolLM2 healed
# to 1.25x fp32 in 8.5 minutes and int4 QAT kept +3.2% in 4.6 (lr 5e-5: QAT starts from a trained
# model); on the 2-core CPU, 10 minutes took it from 3.58x to 2.07x (bf16, 38 steps: a short warm-up).
# The loss's chunk: a CPU step with 256 tokens' logits at a time (50 MB, kept by the heap) ran 1.3x
# one with 4096 (400 MB, mapped and page-faulted anew each step); a GPU's allocator keeps either.
# The self-sampled pool: distinct data beat more passes on both (CPU, 10 minutes: 48k tokens -42.3%,
# 32k -40.1%; H200: 8.4 M tokens 1.25x fp32, 4.2 M 1.33x).
DEVICE_DEFAULTS = {
    "cpu": {"lr": 5e-4, "qat_lr": 3e-4, "batch_size": 8, "seq_len": 256, "warmup_steps": 3,
            "kl_chunk_tokens": 256, "data_tokens": 49152},
    "cuda": {"lr": 5e-4, "qat_lr": 5e-5, "batch_size": 64, "micro_batch": 64, "seq_len": 512,
             "warmup_steps": 30, "kl_chunk_tokens": 4096, "data_tokens": 1 << 23},
}
TOP_K = 128  # sampling: top-p within the top-k (a full sort of 49k logits per step is the slow part)
TEACHER_RUNTIMES = ("torch", "ort")
PRECISIONS = ("auto", "bf16", "fp32")
CHAT_SEEDS = (
    "Explain how a rainbow forms.",
    "Give me three tips for learning a new language.",
    "What is the largest planet in the solar system?",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
    "What does a computer's CPU do?",
    "Summarize the plot of a fairy tale you like.",
    "Why is the sky blue?",
    "What is the capital of Japan?",
    "Explain the difference between a virus and a bacterium.",
    "Write a Python function that reverses a string.",
    "What are the main causes of climate change?",
    "Translate 'good morning' into French and Spanish.",
    "Describe the water cycle in simple terms.",
    "Who wrote Romeo and Juliet, and what is it about?",
    "What should I consider when buying a used car?",
    "Explain what a software license is.",
    "How many continents are there? Name them.",
    "Give a recipe for a simple vegetable soup.",
    "What is machine learning?",
    "Write a short email asking for a meeting next week.",
    "What is the boiling point of water at sea level?",
    "Explain how a bill becomes a law.",
    "What are the benefits of regular exercise?",
)
# Openings of other kinds of text than calibration's, so the pool is not a few topics' worth.
TEXT_SEEDS = (
    "The court held that the agreement",
    "Terms and conditions. 1. Definitions.",
    "Permission is hereby granted, free of charge, to any person",
    "Abstract. We study the problem of",
    "The patient was admitted to the hospital with",
    "In 1848, revolutions broke out across Europe",
    "Photosynthesis is the process by which",
    "import numpy as np\n\n",
    "The recipe calls for two cups of flour",
    "Chapter 1\n\nThe morning the letter arrived,",
    "Breaking news: officials confirmed on Tuesday that",
    "How to change a flat tire: first,",
    "The economy grew by",
    "Dear Sir or Madam,",
    "The following instructions describe how to install",
    "In this tutorial, we will learn",
    "The game ended in a draw after",
    "User manual. Safety information:",
    "The philosopher argued that",
    "Table of contents\n1. Introduction",
    "Q: How do vaccines work?\nA:",
    "The mountain village of",
)
CHECKPOINT_FILE = "state.pt"
POOL_FILE = "pool.npy"
RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class DistillConfig(StepConfig):
    """How to distill; recorded in the lineage, validated on creation. ``batch_size`` is global
    (all processes together)."""

    tokens: int | None = None
    max_minutes: float | None = None
    device: str = "cpu"
    # None: the measured best for the device and, for lr, for QAT (DEVICE_DEFAULTS).
    lr: float | None = None
    batch_size: int | None = None
    micro_batch: int | None = None  # sequences per forward on one process (memory); None: all of its share
    seq_len: int | None = None
    seed: int = 0
    temperature: float = 1.0
    ce_weight: float = 0.0
    data: str | None = None
    data_tokens: int | None = None  # size of the self-sampled pool (at most 30% of max_minutes); None: by device
    teacher_runtime: str = "torch"
    quantize: str | None = None
    quantize_method: str = "affine"  # int4 grid: affine (graphopt quantize's default) or rtn; int8 is symmetric
    block_size: int | None = None  # None: graphopt quantize's default for the bits
    head: str = "auto"  # the LM head's QAT grid, as graphopt quantize --head: auto (int8), float, int8, int4
    # QAT also rounds each quantized linear's input to int8 per block, as ONNX Runtime's CPU kernel does
    # (MatMulNBits at accuracy_level 4, graphopt quantize's default); False trains on float inputs.
    int8_activations: bool = True
    train_embeddings: bool = False  # QAT of a tied, quantized LM head trains the table anyway
    checkpoint_minutes: float = 5.0
    checkpoint_dir: str | None = None
    resume: bool = False
    eval_windows: int = 4
    warmup_steps: int | None = None
    kl_chunk_tokens: int | None = None  # tokens whose logits are materialized at once in the loss
    # bf16 autocast over float32 master weights: auto = on CUDA, and on a CPU with native bf16
    # (AVX512-BF16 / AMX: 2.3x the float32 matmul rate on the 2-core dev machine).
    precision: str = "auto"
    stop_after_steps: int | None = None  # end as if interrupted after this step (a checkpoint is written)
    # End as if interrupted this many minutes into this invocation's budget (sampling and training; a
    # checkpoint is written); the schedule still spans max_minutes, so a resumed run continues it.
    stop_after_minutes: float | None = None

    def __post_init__(self):
        defaults = dict(DEVICE_DEFAULTS.get(self.device, {}))
        qat_lr = defaults.pop("qat_lr", None)
        if self.quantize and qat_lr is not None:
            defaults["lr"] = qat_lr
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.tokens is None and self.max_minutes is None:
            raise GraphoptError("give a budget: --tokens N and/or --max-minutes M")
        if self.tokens is not None and self.tokens < 1:
            raise GraphoptError(f"--tokens must be positive, got {self.tokens}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise GraphoptError(f"--max-minutes must be positive, got {self.max_minutes}")
        if self.stop_after_minutes is not None and self.stop_after_minutes <= 0:
            raise GraphoptError(f"stop_after_minutes must be positive, got {self.stop_after_minutes}")
        if self.device not in ("cpu", "cuda"):
            raise GraphoptError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.batch_size < 1 or self.seq_len < 2:
            raise GraphoptError("--batch-size must be at least 1 and --seq-len at least 2")
        if self.temperature <= 0 or not 0.0 <= self.ce_weight <= 1.0:
            raise GraphoptError("--temperature must be positive and --ce-weight in [0, 1]")
        if self.lr <= 0:
            raise GraphoptError(f"--lr must be positive, got {self.lr}")
        if self.quantize is not None:
            check_choice("--quantize", self.quantize, QUANTIZE_CHOICES)
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise GraphoptError(f"--block-size must be a power of two of at least 16, got {self.block_size}")
        check_choice("--quantize-method", self.quantize_method, QAT_METHODS)
        check_choice("--head", self.head, HEAD_CHOICES)
        if self.kl_chunk_tokens < 1:
            raise GraphoptError(f"kl_chunk_tokens must be positive, got {self.kl_chunk_tokens}")
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--teacher-runtime", self.teacher_runtime, TEACHER_RUNTIMES)

    def describe(self) -> dict:
        unrecorded = ("resume", "checkpoint_dir", "stop_after_steps", "stop_after_minutes")
        record = {key: value for key, value in dataclasses.asdict(self).items()
                  if value is not None and key not in unrecorded}
        if not self.quantize:
            for key in ("quantize_method", "block_size", "head", "int8_activations"):
                record.pop(key, None)
        return record

    def qat_grids(self, linear_names: list[str], head_name: str) -> dict[str, tuple[int, int, str]]:
        """``name -> (bits, block_size, method)`` of every weight QAT fake-quantizes, as graphopt quantize
        (with ``--weights {quantize} --method {quantize_method} --head {head}``) will quantize it."""
        from graphopt.cpu_kernels import default_block_size

        if not self.quantize:
            return {}
        bits = int(self.quantize[3:])
        method = self.quantize_method if bits == 4 else "rtn"
        grids = {name: (bits, self.block_size or default_block_size(bits), method) for name in linear_names}
        head_bits = {"auto": 8, "float": None, "int8": 8, "int4": 4}[self.head]
        if head_bits is not None:
            grids[head_name] = (head_bits, self.block_size or default_block_size(head_bits, head=True),
                                self.quantize_method if head_bits == 4 else "rtn")
        return grids


@dataclasses.dataclass
class DistillResult:
    """What a finished run reports (on the process that wrote the output; None elsewhere)."""

    model_dir: ModelDir
    figures: dict


# ---------------------------------------------------------------------------------------------
# Data


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refuse_evaluation_text(path: str | pathlib.Path) -> None:
    """graphopt's evaluation text must never be trained on: refuse it by path and by content."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise GraphoptError(f"{path}: no such file")
    if path.resolve() == DEFAULT_TEXT.resolve() or _digest(path.read_bytes()) == _digest(DEFAULT_TEXT.read_bytes()):
        raise GraphoptError(f"{path} is graphopt's evaluation text; training on it would make every perplexity "
                            "figure meaningless: give other data")


def read_data_file(path: str | pathlib.Path) -> list[str]:
    """Documents of a text file (one) or a JSONL file (``{"text": ...}`` per line)."""
    refuse_evaluation_text(path)
    path = pathlib.Path(path)
    text = read_text(path)
    if path.suffix not in (".jsonl", ".ndjson"):
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise GraphoptError(f"{path}:{number}: not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise GraphoptError(f"{path}:{number}: expected an object with a \"text\" string")
        documents.append(record["text"])
    if not documents:
        raise GraphoptError(f"{path}: no documents")
    return documents


def data_sequences(model_dir: pathlib.Path, path: str, seq_len: int) -> np.ndarray:
    """The file's documents tokenized, joined by EOS, cut into rows of ``seq_len`` tokens.

    A ``.npy`` file is token ids already, (rows, seq_len) integers, e.g. a pool saved by
    :func:`sample_data` and shared by several runs with one teacher.
    """
    from graphopt.runtime.tokenizer import Tokenizer

    if str(path).endswith(".npy"):
        try:
            rows = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise GraphoptError(f"{path}: not a readable .npy of token ids ({error})") from None
        if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer) or rows.shape[1] < seq_len:
            raise GraphoptError(f"{path}: expected integer token ids (rows, >= {seq_len}), got {rows.dtype} {rows.shape}")
        return np.ascontiguousarray(rows[:, :seq_len]).astype(np.int32)
    tokenizer = Tokenizer(model_dir)
    eos = (ModelDir.open(model_dir).manifest.eos_token_ids or [0])[0]
    stream: list[int] = []
    for document in read_data_file(path):
        stream.extend(tokenizer.encode(document))
        stream.append(eos)
    rows = len(stream) // seq_len
    if rows < 1:
        raise GraphoptError(f"{path}: {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return np.asarray(stream[:rows * seq_len], dtype=np.int32).reshape(rows, seq_len)


def seed_prompts(model_dir: pathlib.Path) -> list[list[int]]:
    """Token ids of the sampling prompts: calibration's seed texts, more openings of many kinds of
    text, and chat turns (when a template exists)."""
    from graphopt.calibration import SEED_PROMPTS
    from graphopt.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)
    manifest = ModelDir.open(model_dir).manifest
    prompts = [encode_prompt(tokenizer, manifest, text) for text in (*SEED_PROMPTS, *TEXT_SEEDS)]
    if tokenizer.chat_template:
        prompts += [encode_prompt(tokenizer, manifest, text, chat=True) for text in CHAT_SEEDS]
    return [prompt for prompt in prompts if prompt]


def _top_p_sample(logits, top_p: float, generator, top_k: int = TOP_K):
    """Nucleus sampling within the ``top_k`` most likely tokens (a partial sort, not one of the whole vocabulary)."""
    import torch

    values, indices = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(values, dim=-1)
    cumulative = probs.cumsum(-1)
    probs = torch.where(cumulative - probs > top_p, torch.zeros_like(probs), probs)
    choice = torch.multinomial(probs, 1, generator=generator)
    return indices.gather(-1, choice)


def sample_chunk(teacher, prompts: list[list[int]], seq_len: int, seed: int, device,
                 temperature: float = 1.0) -> np.ndarray:
    """One sequence of ``seq_len`` tokens per prompt: the prompt, then the teacher's sampled continuation.

    Top-p 0.95 at ``temperature``; below 1 the rows stay nearer the teacher's greedy path (what a
    greedy speculative draft is asked to predict).

    Prompts of different lengths share one batch: every row starts from its prompt's first token and
    a row's prompt tokens are forced (not sampled) until it runs out, so no padding or mask is needed.
    """
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    count = len(prompts)
    width = min(seq_len, max(len(prompt) for prompt in prompts))
    forced = torch.full((count, width), -1, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        forced[row, :min(width, len(prompt))] = torch.tensor(prompt[:width])
    forced = forced.to(device)
    # bf16 where distill cast the teacher to it, and on CUDA (autocast over float32 weights).
    bf16 = device.type == "cuda" or next(teacher.parameters()).dtype == torch.bfloat16
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokens = [forced[:, :1]]
    past = None
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for position in range(1, seq_len):
            logits, past = teacher(tokens[-1], past, dtype=dtype)
            token = _top_p_sample(logits[:, -1] / temperature, 0.95, generator)
            if position < width:
                prompt_token = forced[:, position:position + 1]
                token = torch.where(prompt_token >= 0, prompt_token, token)
            tokens.append(token)
    return torch.cat(tokens, dim=1).cpu().numpy().astype(np.int32)


def uses_bf16(device, precision: str = "auto") -> bool:
    """Whether to compute in bf16 (autocast) on ``device``: ``auto`` = CUDA, or a CPU with native bf16."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    device = torch.device(device)
    if device.type != "cpu":
        return device.type == "cuda"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN's probe: float32
        return False


def _sampling_rows(device) -> int:
    """Rows the teacher samples at once: wide chunks (a CPU samples 64 rows at 3-5x the tokens/s of 8)."""
    return 512 if device.type == "cuda" else 64


def self_sampled_pool(teacher, teacher_dir: pathlib.Path | None, rows: int, seq_len: int, seed: int, device,
                      rank: int, world: int, chunk: int, deadline: float | None = None,
                      prompts: list[list[int]] | None = None) -> np.ndarray:
    """``rows`` teacher-sampled sequences. Chunk ``c`` (its rows' prompts drawn from all seed prompts,
    seed ``(seed, c)``) is sampled by process ``c % world``, so the pool does not depend on the
    number of processes.

    Past ``deadline`` (a ``time.perf_counter()`` value) a process starts no new chunk once it has one:
    a time-bounded run then trains on fewer rows rather than spending its budget sampling.
    ``prompts`` (token ids) replaces ``seed_prompts(teacher_dir)``.
    """
    prompts = prompts or seed_prompts(teacher_dir)
    chunks = -(-rows // chunk)
    mine = {}
    started = time.perf_counter()
    for index in range(rank, chunks, world):
        if mine and deadline is not None and time.perf_counter() > deadline:
            logger.info("sampling stopped at its share of the time budget")
            break
        order = np.random.default_rng([seed, index]).integers(0, len(prompts), size=chunk)
        mine[index] = sample_chunk(teacher, [prompts[choice] for choice in order], seq_len,
                                   seed * 1_000_003 + index, device)
        done = len(mine) * chunk * seq_len * world
        logger.info("sampled %d of %d sequences (%.0f tokens/s)", min(rows, (len(mine)) * chunk * world), rows,
                    done / max(1e-9, time.perf_counter() - started))
    if world > 1:
        import torch.distributed as dist

        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            mine.update(part)
    return np.concatenate([mine[index] for index in sorted(mine)])[:rows]


def sample_data(teacher_dir: str | pathlib.Path | None, tokens: int, seq_len: int, seed: int = 0, device: str = "cpu",
                chunk: int | None = None, teacher=None, prompts: list[list[int]] | None = None,
                max_seconds: float | None = None) -> np.ndarray:
    """A self-sampled pool of about ``tokens`` tokens from ``teacher_dir`` on one device, as rows of ``seq_len``.

    ``teacher`` (a module as :mod:`graphopt.student` builds) and ``prompts`` replace what would be
    read from ``teacher_dir``; past ``max_seconds`` no new chunk is started.
    """
    import torch

    from graphopt.student import load_student

    target = torch.device(device)
    if teacher is None:
        teacher = load_student(teacher_dir).module
    teacher = teacher.to(target).eval()
    rows = max(1, -(-tokens // seq_len))
    chunk = min(rows, chunk or _sampling_rows(target))
    rows = -(-rows // chunk) * chunk
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    return self_sampled_pool(teacher, None if teacher_dir is None else pathlib.Path(teacher_dir), rows, seq_len, seed,
                             target, 0, 1, chunk, deadline, prompts)


# ---------------------------------------------------------------------------------------------
# Quantization-aware training


def fake_quantize(weight, bits: int, block_size: int, method: str = "affine"):
    """``weight`` (in, out) rounded onto quantize_weights' grid in the forward, identity in the backward.

    ``method`` (4 bits): ``affine`` is the pass's affine form as it stores it (``in`` must be whole
    blocks): codes over the block's min-max range, an integer zero point and the block's residual
    offset on a 4-bit grid of its own (``quantize_weights.integer_affine``, mirrored here in torch);
    ``rtn`` the integer-zero-point grid. 8 bits is always symmetric (zero point 128).
    """
    import torch

    weight_t = weight.t()
    rows, columns = weight_t.shape
    pad = (-columns) % block_size
    padded = torch.nn.functional.pad(weight_t, (0, pad)) if pad else weight_t
    # float64 with float32 scales, as the pass computes: the same codes and residuals, not 1 ulp off.
    blocks = padded.reshape(rows, -1, block_size).detach().double()
    if bits == 4 and method == "affine":
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        scale = torch.where(high > low, (high - low) / 15.0, torch.ones_like(high)).float().double()
        codes = torch.clamp(torch.round((blocks - low) / scale), 0, 15)
        dequantized = _integer_affine(codes, scale.squeeze(-1), (low + 8.0 * scale).squeeze(-1), block_size)
    else:
        if bits == 8:
            amax = blocks.abs().amax(-1, keepdim=True)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float().double()
            zero = torch.full_like(scale, 128.0)
            levels = 255
        else:
            levels = 2**bits - 1
            low = blocks.amin(-1, keepdim=True).clamp(max=0.0)
            high = blocks.amax(-1, keepdim=True).clamp(min=0.0)
            scale = torch.where(high > low, (high - low) / levels, torch.ones_like(high)).float().double()
            zero = torch.clamp(torch.round(-low / scale), 0, levels)
        codes = torch.clamp(torch.round(blocks / scale) + zero, 0, levels)
        dequantized = (codes - zero) * scale
    dequantized = dequantized.reshape(rows, -1)[:, :columns].t().to(weight.dtype)
    return weight + (dequantized - weight).detach()


def _integer_affine(codes, scale, offset, block_size: int):
    """``quantize_weights.integer_affine`` folded back to ``[rows, blocks, block_size]`` weights, in torch (float64)."""
    import torch

    from graphopt.passes.quantize_weights import SECOND_DIGIT, residual_inputs

    rows, blocks = scale.shape
    unclipped = 8.0 - offset / scale
    integer = torch.clamp(torch.round(unclipped), 0, 15)
    nearest = integer == torch.round(unclipped)
    residual = offset - (8.0 - integer) * scale
    extra = -(-blocks // block_size)
    padded = torch.nn.functional.pad(residual, (0, extra * block_size - blocks)).reshape(rows, extra, block_size)
    largest = padded.abs().amax(-1)
    residual_scale = torch.where(largest > 0, largest / 7, torch.ones_like(largest)).float().double()
    step = residual_scale.repeat_interleave(block_size, dim=1)[:, :blocks]
    steps = torch.round(residual / step)
    outward = ((steps * step).abs() > scale / 2) & nearest
    steps = torch.clamp(torch.where(outward, steps - torch.sign(steps), steps), -7, 7)
    _, seconds = residual_inputs(blocks * block_size, block_size)
    first = step[:, seconds]
    fine = torch.clamp(torch.round((residual[:, seconds] - steps[:, seconds] * first) * SECOND_DIGIT / first), -6, 6)
    fine = torch.where((((steps[:, seconds] + fine / SECOND_DIGIT) * first).abs() > scale[:, seconds] / 2)
                       & nearest[:, seconds], torch.zeros_like(fine), fine)
    snapped = steps * step
    snapped[:, seconds] += fine * first / SECOND_DIGIT
    return (codes - integer.unsqueeze(-1)) * scale.unsqueeze(-1) + snapped.unsqueeze(-1)


def fake_quantize_activations(x, block_size: int):
    """``x`` rounded as MatMulNBits' int8 path (accuracy_level 4) rounds its input: symmetric int8 per
    block of ``block_size`` along the last axis (scale = block max |x| / 127), identity in the backward."""
    import torch

    columns = x.shape[-1]
    pad = (-columns) % block_size
    values = x.detach().float()
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    blocks = values.reshape(*values.shape[:-1], -1, block_size)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    rounded = torch.round(blocks / torch.where(scale > 0, scale, torch.ones_like(scale))) * scale
    rounded = rounded.reshape(values.shape)[..., :columns].to(x.dtype)
    return x + (rounded - x).detach()


# ---------------------------------------------------------------------------------------------
# Training


class _Distributed:
    """Rank, world size and device; makes (and later ends) a process group under torchrun."""

    def __init__(self, device: str):
        import torch
        import torch.distributed as dist

        self.created = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not dist.is_initialized() and world > 1:
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
            self.created = True
        self.active = dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        if device == "cuda":
            if not torch.cuda.is_available():
                raise GraphoptError("--device cuda: no CUDA device is visible to torch")
            local = int(os.environ.get("LOCAL_RANK", self.rank % max(1, torch.cuda.device_count())))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _keep_freed_memory():
    """Make glibc's malloc keep freed memory in the process; returns what gives it back.

    By default a block above glibc's mmap threshold (128 KB, rising to at most 32 MB) is mapped from
    the kernel and unmapped on free, so each CPU step's large tensors were page-faulted in anew: a
    third of the 2-core machine's training time was kernel time (40 of 122 CPU-seconds over 5 steps;
    9 with this). Does nothing without glibc.
    """
    import ctypes

    libc = ctypes.CDLL(None)
    mallopt, malloc_trim = getattr(libc, "mallopt", None), getattr(libc, "malloc_trim", None)
    if mallopt is None or malloc_trim is None:
        return lambda: None
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)

    def restore() -> None:
        mallopt(m_mmap_max, 65536)  # glibc's defaults
        mallopt(m_trim_threshold, 128 * 1024)
        malloc_trim(0)

    return restore


def _schedule(step: int, progress: float, config: DistillConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _kl_loss(student_logits, teacher_logits, temperature: float):
    import torch

    teacher_log = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean()
    return kl * temperature * temperature


def _chunk_sums(student_hidden, student_head, teacher_hidden, teacher_head, labels, temperature: float):
    """[sum of KL(teacher || student) * T^2, sum of cross-entropy] over one chunk of tokens."""
    import torch
    from torch.nn import functional

    student_logits = (student_hidden @ student_head).float()
    teacher_log = torch.log_softmax((teacher_hidden @ teacher_head).float() / temperature, dim=-1)
    student_log = torch.log_softmax(student_logits / temperature, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum() * temperature * temperature
    if labels is None:
        return torch.stack([kl, torch.zeros_like(kl)])
    ce = functional.cross_entropy(student_logits, labels, ignore_index=-100, reduction="sum")
    return torch.stack([kl, ce])


def chunked_distill_loss(student_hidden, student_head, teacher_hidden, teacher_head, temperature: float,
                         chunk_tokens: int, input_ids=None, ce_weight: float = 0.0):
    """The distillation loss from final hidden states, ``chunk_tokens`` tokens' logits at a time.

    Equals ``_kl_loss`` on the full logits (mean over tokens of the KL, times T^2), mixed as
    ``(1 - ce_weight) * KL + ce_weight * CE(next token of input_ids)``. Each chunk's logits
    (tokens x vocabulary, the largest tensors of a small model's step) are recomputed in the
    backward (activation checkpointing) rather than kept, so memory does not grow with the batch.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden_size = student_hidden.shape[-1]
    student_flat = student_hidden.reshape(-1, hidden_size)
    teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    labels = None
    if ce_weight:
        labels = torch.full_like(input_ids, -100)
        labels[:, :-1] = input_ids[:, 1:]
        labels = labels.reshape(-1)
    total = student_flat.shape[0]
    sums = None
    grad = torch.is_grad_enabled() and student_flat.requires_grad
    for start in range(0, total, chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        args = (student_flat[piece], student_head, teacher_flat[piece], teacher_head,
                None if labels is None else labels[piece], temperature)
        part = checkpoint(_chunk_sums, *args, use_reentrant=False) if grad else _chunk_sums(*args)
        sums = part if sums is None else sums + part
    kl = sums[0] / total
    if not ce_weight:
        return kl
    valid = max(1, int((labels != -100).sum()))
    return (1 - ce_weight) * kl + ce_weight * sums[1] / valid


def _objective(student, config: DistillConfig):
    """The student and its loss as one module (what DDP wraps): ``forward(ids, teacher) -> loss``.

    ``teacher`` is ``("hidden", hidden_states, head_matrix)`` (chunked loss) or ``("logits", logits)``
    (an ONNX Runtime teacher's full logits).
    """
    import torch

    class Objective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, ids, teacher, dtype, autocast: bool):
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
                if teacher[0] == "logits":
                    logits = self.student(ids, dtype=dtype)[0]
                    loss = _kl_loss(logits, teacher[1], config.temperature)
                    if config.ce_weight:
                        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                               ids[:, 1:].reshape(-1))
                        loss = (1 - config.ce_weight) * loss + config.ce_weight * ce
                    return loss
                hidden = self.student(ids, dtype=dtype, head=False)[0]
                return chunked_distill_loss(hidden, self.student.head_matrix(dtype), teacher[1], teacher[2],
                                            config.temperature, config.kl_chunk_tokens, ids, config.ce_weight)

    return Objective()


def _save_atomic(payload, path: pathlib.Path) -> None:
    import torch

    partial = path.with_name(f".{path.name}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _save_pool(pool: np.ndarray, path: pathlib.Path) -> None:
    partial = path.with_name(f".{path.name}.partial.npy")
    np.save(partial, pool)
    os.replace(partial, path)


def _same_tokenizer(student: ModelDir, teacher: ModelDir) -> None:
    student_tok, teacher_tok = student.path / "tokenizer.json", teacher.path / "tokenizer.json"
    # Parsed, not bytes: directories exported before graphopt wrote tokenizer.json compact hold it indented.
    if student.manifest.vocab_size != teacher.manifest.vocab_size or (
            student_tok.is_file() and teacher_tok.is_file()
            and json.loads(student_tok.read_text(encoding="utf-8")) != json.loads(teacher_tok.read_text(encoding="utf-8"))):
        raise GraphoptError("the student and the teacher tokenize differently; distill between models of one tokenizer")


def distill(student_dir: str | pathlib.Path, teacher_dir: str | pathlib.Path, output: str | pathlib.Path,
            config: DistillConfig, force: bool = False) -> DistillResult | None:
    """Distill ``teacher_dir`` into ``student_dir``'s weights; write ``output`` (on process 0).

    Returns the result on the process that wrote the output, None on the others and when the run
    stopped early on ``stop_after_steps`` or ``stop_after_minutes`` (its checkpoint is then ready for
    ``resume``). A resumed run's ``max_minutes`` counts the time the earlier runs spent sampling and
    training, so it ends where the uninterrupted run would have.
    """
    import torch

    from graphopt.evaluate import evaluate
    from graphopt.student import check_round_trip, load_student

    if config.data:
        refuse_evaluation_text(config.data)
    started = time.perf_counter()
    output = pathlib.Path(output)
    check_output(output, force, sources=[student_dir, teacher_dir])
    checkpoint_dir = pathlib.Path(config.checkpoint_dir) if config.checkpoint_dir else \
        output.parent / f"{output.name}.ckpt"
    state_path = checkpoint_dir / CHECKPOINT_FILE
    if state_path.exists() and not config.resume:
        raise GraphoptError(f"{checkpoint_dir} holds an earlier run's checkpoint: --resume to continue it, "
                            "or delete it to start over")
    env = _Distributed(config.device)
    restore_heap = _keep_freed_memory() if env.device.type == "cpu" else None
    try:
        if config.batch_size % env.world:
            raise GraphoptError(f"--batch-size {config.batch_size} must be a multiple of the {env.world} processes")
        loaded = load_student(student_dir)
        teacher_loaded = load_student(teacher_dir)
        _same_tokenizer(loaded.directory, teacher_loaded.directory)
        torch.manual_seed(config.seed)
        probe = np.random.default_rng(config.seed).integers(0, loaded.spec.vocab, size=(1, 12))
        round_trip = check_round_trip(loaded, probe) if env.rank == 0 else None
        student, teacher = loaded.module.to(env.device), teacher_loaded.module.to(env.device).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        grids = config.qat_grids(student.linear_names(head=False), loaded.spec.head or loaded.spec.embedding)
        # A tied head is the embedding table, stored (vocab, hidden) = (out, in): its blocks run along hidden.
        transposed = {loaded.spec.embedding} if loaded.spec.head is None else set()
        # The table trains when asked, or when QAT quantizes it as the tied LM head: the head's rounding
        # is then learned away (SmolLM2, int4 head: frozen, QAT kept PTQ's +5%).
        frozen = set() if config.train_embeddings or loaded.spec.embedding in grids else {loaded.spec.embedding}
        for name, parameter in student.named_parameters():
            parameter.requires_grad_(name not in frozen)
        for name, (bits, block_size, method) in grids.items():
            rows = student.get_parameter(name).shape[0 if name != loaded.spec.embedding else 1]
            if method == "affine" and rows % block_size:
                raise GraphoptError(f"{name}: {rows} input features are not whole blocks of {block_size}; the affine "
                                    "grid needs whole blocks (--quantize-method rtn, or another --block-size)")
        if grids:
            student.fake_quant = lambda weight, name: (
                fake_quantize(weight.t(), *grids[name]).t() if name in transposed else fake_quantize(weight, *grids[name]))
            student.quantized_names = set(grids)
            if config.int8_activations:
                student.fake_quant_input = lambda x, name: fake_quantize_activations(x, grids[name][1])
        autocast = uses_bf16(env.device, config.precision)
        if env.device.type == "cuda":
            # TF32 for what autocast leaves in float32.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if autocast:
            # The frozen teacher runs in bf16 outright (its rotary frequencies, a buffer, stay float32).
            for parameter in teacher.parameters():
                parameter.data = parameter.data.to(torch.bfloat16)

        before = None
        if env.rank == 0 and config.eval_windows:
            before = evaluate(loaded.directory.path, max_windows=config.eval_windows).perplexity
            logger.info("perplexity before: %.3f (eval-gpl3, %d windows of 512)", before, config.eval_windows)

        # The time budget is the distillation's: the perplexity before is measured outside it.
        budget_started = time.perf_counter()
        deadline = None if config.max_minutes is None else budget_started + 60 * config.max_minutes
        # Data: the same rows whatever the number of processes; kept with the checkpoint for --resume.
        pool_path = checkpoint_dir / POOL_FILE
        if config.resume and pool_path.is_file():
            pool = np.load(pool_path)
        elif config.data:
            pool = data_sequences(loaded.directory.path, config.data, config.seq_len)
        else:
            wanted = config.data_tokens
            if config.tokens:
                wanted = min(wanted, max(config.tokens, config.batch_size * config.seq_len))
            rows = max(config.batch_size, -(-wanted // config.seq_len))
            chunk = min(rows, max(_sampling_rows(env.device), config.batch_size))
            rows = -(-rows // chunk) * chunk
            logger.info("sampling %d sequences of %d tokens from the teacher", rows, config.seq_len)
            # Sampling may take at most 30% of a time budget; the rest is training.
            sampling_deadline = None if deadline is None else budget_started + 0.3 * (deadline - budget_started)
            pool = self_sampled_pool(teacher, teacher_loaded.directory.path, rows, config.seq_len, config.seed,
                                     env.device, env.rank, env.world, chunk, sampling_deadline)
        if pool.shape[1] != config.seq_len or len(pool) < config.batch_size:
            raise GraphoptError(f"the data has {len(pool)} rows of {pool.shape[1]} tokens; need at least "
                                f"--batch-size {config.batch_size} rows of --seq-len {config.seq_len}")
        if env.rank == 0:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if not pool_path.is_file():
                _save_pool(pool, pool_path)
        sampling_seconds = time.perf_counter() - budget_started

        ort_session = None
        if config.teacher_runtime == "ort":
            import onnxruntime

            ort_session = onnxruntime.InferenceSession(str(teacher_loaded.directory.model_path),
                                                       providers=["CPUExecutionProvider"])
            teacher.to("cpu")

        model = _objective(student, config)
        if env.active:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        trainable = [parameter for parameter in student.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
        tokens_per_step = config.batch_size * config.seq_len
        total_steps = -(-config.tokens // tokens_per_step) if config.tokens else None
        step, curve, train_seconds = 0, [], 0.0
        run = {"student": str(loaded.directory.path), "teacher": str(teacher_loaded.directory.path),
               **{key: value for key, value in config.describe().items() if key not in ("max_minutes", "eval_windows")}}
        if config.resume and state_path.is_file():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            if state["run"] != run:
                raise GraphoptError(f"{checkpoint_dir} was made by a different run (other models or settings); "
                                    "resume with the same ones or delete it")
            student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            step, curve, train_seconds = state["step"], state["curve"], state["train_seconds"]
            sampling_seconds = state.get("sampling_seconds", sampling_seconds)
            if deadline is not None:
                deadline -= train_seconds + sampling_seconds
            logger.info("resumed at step %d (%d tokens, %.0f s of training)", step, step * tokens_per_step,
                        train_seconds)
        per_rank = config.batch_size // env.world
        micro = min(per_rank, config.micro_batch or per_rank)
        compute_dtype = torch.bfloat16 if autocast else torch.float32
        steps_per_epoch = len(pool) // config.batch_size
        last_checkpoint = time.perf_counter()
        last_log = 0.0
        train_started = time.perf_counter() - train_seconds
        window_tokens, window_started = 0, time.perf_counter()
        stopped_early = False
        while True:
            now = time.perf_counter()
            # One all-reduce carries process 0's decisions (its clock) and every process's loss.
            progress = step / total_steps if total_steps else 0.0
            if deadline is not None:
                progress = max(progress, (now - train_started) / max(1e-9, deadline - train_started))
            # At least one step: a budget that sampling used up still trains (and says how little).
            done = (total_steps is not None and step >= total_steps) or (deadline is not None and now >= deadline
                                                                          and step > 0)
            checkpoint_due = now - last_checkpoint >= 60 * config.checkpoint_minutes
            stop = (not done and config.stop_after_minutes is not None
                    and now - budget_started >= 60 * config.stop_after_minutes)
            control = torch.tensor([float(done), float(checkpoint_due), progress, float(stop)], device=env.device,
                                   dtype=torch.float64)
            if env.active:
                import torch.distributed as dist

                dist.broadcast(control, 0)
            done, checkpoint_due, progress = bool(control[0]), bool(control[1]), float(control[2])
            if bool(control[3]):
                stopped_early = True
                break
            if checkpoint_due and env.rank == 0:
                _save_atomic({"run": run, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                              "step": step, "curve": curve, "train_seconds": time.perf_counter() - train_started,
                              "sampling_seconds": sampling_seconds}, state_path)
            if checkpoint_due:
                last_checkpoint = time.perf_counter()
            if done:
                break
            epoch, position = divmod(step, steps_per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(len(pool))
            rows = order[position * config.batch_size:(position + 1) * config.batch_size]
            rows = rows[env.rank::env.world]
            lr = _schedule(step, progress, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
            pieces = [rows[start:start + micro] for start in range(0, len(rows), micro)]
            for index, piece in enumerate(pieces):
                ids = torch.from_numpy(pool[piece].astype(np.int64)).to(env.device)
                with torch.no_grad():
                    if ort_session is not None:
                        from graphopt.student import run_session

                        teacher_out = ("logits", torch.from_numpy(run_session(ort_session, pool[piece])).to(env.device))
                    else:
                        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
                            teacher_out = ("hidden", teacher(ids, dtype=compute_dtype, head=False)[0],
                                           teacher.head_matrix(compute_dtype))
                sync = contextlib.nullcontext() if (not env.active or index == len(pieces) - 1) else model.no_sync()
                with sync:
                    loss = model(ids, teacher_out, compute_dtype, autocast)
                    (loss * len(piece) / len(rows)).backward()
                loss_sum += loss.detach().double() * len(piece) / len(rows)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            if env.active:
                import torch.distributed as dist

                dist.all_reduce(loss_sum)
                loss_sum /= env.world
            step += 1
            window_tokens += tokens_per_step
            loss_value = float(loss_sum)
            curve.append([step, step * tokens_per_step, round(loss_value, 5), round(time.perf_counter() - train_started, 2)])
            if env.rank == 0 and (time.perf_counter() - last_log >= 10 or step == 1):
                rate = window_tokens / max(1e-9, time.perf_counter() - window_started)
                logger.info("step %d | tokens %s | loss %.4f | %.0f tokens/s | lr %.2e | %.0f s", step,
                            f"{step * tokens_per_step:,}", loss_value, rate, lr, time.perf_counter() - started)
                last_log, window_tokens, window_started = time.perf_counter(), 0, time.perf_counter()
            if config.stop_after_steps is not None and step >= config.stop_after_steps:
                stopped_early = True
                break
        train_seconds = time.perf_counter() - train_started
        if stopped_early:
            if env.rank == 0:
                _save_atomic({"run": run, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                              "step": step, "curve": curve, "train_seconds": train_seconds,
                              "sampling_seconds": sampling_seconds}, state_path)
            env.barrier()
            return None
        result = None
        if env.rank == 0:
            weights = {}
            for name, parameter in student.named_parameters():
                if not parameter.requires_grad:
                    continue
                array = parameter.detach().float().cpu().numpy()
                if name in transposed and name in grids:
                    array = snap_to_grid(array.T, *grids[name]).T
                elif name in grids:
                    array = snap_to_grid(array, *grids[name])
                weights[name] = array
            result = _write_output(loaded, output, force, weights, config, {
                "tokens": step * tokens_per_step, "steps": step, "world_size": env.world,
                "device": _device_name(env.device), "sampling_seconds": round(sampling_seconds, 1),
                "train_seconds": round(train_seconds, 1), "data_rows": int(len(pool)),
                "tokens_per_second": round(step * tokens_per_step / max(1e-9, train_seconds), 1),
                "final_loss": curve[-1][2] if curve else None, "round_trip_max_diff": round_trip,
                "perplexity_before": before, "loss_curve": _thin(curve, 200)}, started)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        env.barrier()
        return result
    finally:
        if restore_heap is not None:
            restore_heap()
        env.close()


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def _thin(curve: list, points: int) -> list:
    if len(curve) <= points:
        return curve
    stride = len(curve) / points
    return [curve[int(index * stride)] for index in range(points)] + [curve[-1]]


def _write_output(loaded, output: pathlib.Path, force: bool, weights: dict, config: DistillConfig, figures: dict,
                  started: float) -> DistillResult:
    from graphopt.evaluate import evaluate
    from graphopt.student import write_weights

    with atomic_output(output, force, sources=[loaded.directory.path]) as scratch:
        changed = write_weights(loaded.directory, weights, scratch)
        figures["initializers_changed"] = changed
        step = LineageStep("distill", config.describe(), figures=figures)
        written = ModelDir(scratch, derive(loaded.directory, scratch, step))
        if config.eval_windows:
            after = evaluate(scratch, max_windows=config.eval_windows).perplexity
            figures["perplexity_after"] = after
            logger.info("perplexity after: %.3f (before: %s)", after, figures.get("perplexity_before"))
        step.seconds = round(time.perf_counter() - started, 1)
        written.write_manifest(written.manifest)
    return DistillResult(ModelDir(output), figures)


def plot_loss(curve: list, path: str | pathlib.Path, title: str = "distillation") -> None:
    """Loss (KL to the teacher) against tokens seen, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([point[1] for point in curve], [point[2] for point in curve])
    axis.set_xlabel("tokens seen")
    axis.set_ylabel("loss (KL to teacher)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = pathlib.Path(path)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    os.replace(partial, path)


def recipe_stage(student_dir: str | pathlib.Path, teacher_dir: str | pathlib.Path, destination: str | pathlib.Path,
                 config: DistillConfig) -> tuple[ModelDir, dict]:
    """A ``distill`` stage of ``graphopt optimize``: the distilled directory and the figures a report
    shows (tokens, seconds, loss, perplexity before/after), the loss curve left out."""
    result = distill(student_dir, teacher_dir, destination, config, force=True)
    if result is None:
        raise GraphoptError("the distill stage ended without a model (interrupted)")
    return result.model_dir, {key: value for key, value in result.figures.items() if key != "loss_curve"}
