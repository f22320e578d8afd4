"""Fusion targets: where a model will run, and so which fused ops its graph may use.

* ``cpu``, ``cuda``: ONNX Runtime contrib ops (GroupQueryAttention / MultiHeadAttention,
  Skip(Simplified)LayerNormalization, FastGelu); the graph is the same for both, the ops have CPU
  and CUDA kernels;
* ``tensorrt``, ``onnx``: standard ONNX only, opset 23 (Attention, RotaryEmbedding,
  RMSNormalization, Gelu), so any runtime implementing ONNX can run the model.

Every fusion rule module reads the ``Target`` record, never the target's name: a new target is
one row here.
"""

from __future__ import annotations

import dataclasses

from graphopt.errors import GraphoptError


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    contrib_ops: bool  # may use ONNX Runtime's com.microsoft ops
    opset: int | None  # the default-domain opset the target's fused ops need, if above the export's
    # GroupQueryAttention's cos/sin tables written as ops ONNX Runtime folds at session start, not
    # stored (2.1 MB less for SmolLM2); stored for CUDA, whose graph capture path is measured that way.
    computed_rotary_tables: bool = False


TARGETS = {
    "cpu": Target("cpu", contrib_ops=True, opset=None, computed_rotary_tables=True),
    "cuda": Target("cuda", contrib_ops=True, opset=None),
    "tensorrt": Target("tensorrt", contrib_ops=False, opset=23),
    "onnx": Target("onnx", contrib_ops=False, opset=23),
}


def get_target(target: Target | str) -> Target:
    """The record for a target or its name."""
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise GraphoptError(f"unknown fusion target {target!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[target]
