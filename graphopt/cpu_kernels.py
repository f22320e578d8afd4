"""Kernel choices for weight-only quantization on ONNX Runtime's CPU MatMulNBits, from measurements.

``graphopt quantize --weights int8|int4 --activations none`` takes its block size and its packing
from here unless the user sets them. Measured on the 2-core dev machine (AMD EPYC, AVX-512 with
VNNI, onnxruntime 1.32; ``tools/profile_decode.py``, ``tools/bench_variants.py`` and single-thread
CPU-time micro-benchmarks of 576x1536 and 1536x576 MatMulNBits chains, which other processes on
the machine barely disturb):

* ``accuracy_level=4`` (int8 activations inside the kernel) is the only fast path: levels 1 and
  2 run 6-15x slower for int4 and 15-25x slower for int8 at batch 1.
* Block size is the largest kernel lever. MLAS's int8-activation kernels pay a fixed cost per
  block (a scale load, a float multiply-add, the activation block's own scale), which at block 32
  dominates the reading of 16 (int4) or 32 (int8) bytes of weights. Per 576x1536 matrix, one
  thread: int8 62 us at block 32, 50 at 64, 42 at 128; int4 45, 32.5, 30.5. On the 49152x576 LM
  head: int8 1.51 ms at block 32, 1.04 at 128; int4 0.86, 0.58.
* Sibling projections packed into one MatMulNBits (``passes.pack_matmulnbits``): one activation
  quantization and one thread-pool dispatch instead of three (q/k/v) or two (gate/up), 8-11% less
  CPU per token, bit-identical output.

Larger blocks quantize coarser, so each default below is the largest block whose perplexity
stays within a small tolerance of block 32 (figures in notes/README-cpu.md).
"""

from __future__ import annotations

# Block size along K for weight-only MatMulNBits when the user gives none, by bits. int8: 64, not
# 128 (faster still): on SmolLM2 block 128 costs +0.94% perplexity against +0.33% at 64 and +0.24%
# at 32 (the kernel quantizes the activations per block too). int4 stays at 32 until a
# better rounding than round-to-nearest pays for larger blocks (64: +31.4% against +27.3%).
DEFAULT_BLOCK_SIZE = {8: 64, 4: 32}
# The LM head's block size by the head's bits: its int8 kernel at block 32 is the slowest per
# byte of the model (1.51 ms against 1.11 at 64 for SmolLM2's 49152x576 head, one thread).
DEFAULT_HEAD_BLOCK_SIZE = {8: 64, 4: 32}


def default_block_size(bits: int, head: bool = False) -> int:
    """The block size graphopt uses for ``bits``-bit weight-only quantization by default (of the LM head with ``head``)."""
    return (DEFAULT_HEAD_BLOCK_SIZE if head else DEFAULT_BLOCK_SIZE)[bits]
