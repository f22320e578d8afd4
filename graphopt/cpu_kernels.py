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

Larger blocks quantize coarser (int4 most: block 64 loses more perplexity than 32), so the int4
default is a speed/quality choice recorded with its figures in notes/README-cpu.md; int8 at
block 128 stays within a fraction of a percent of float.
"""

from __future__ import annotations

# Block size along K for weight-only MatMulNBits when the user gives none, by bits.
DEFAULT_BLOCK_SIZE = {8: 128, 4: 64}
# MatMulNBits' accuracy_level: 4 = int8 activations (the fast CPU kernels).
ACCURACY_LEVEL = 4
# Pack q/k/v (into GroupQueryAttention's packed input) and gate/up after quantizing.
PACK_SIBLINGS = True


def default_block_size(bits: int) -> int:
    """The block size graphopt uses for ``bits``-bit weight-only quantization by default."""
    return DEFAULT_BLOCK_SIZE[bits]
