"""Per-family export adapters, one module per family: everything graphopt knows about a family.

Each module exposes ``MODEL_TYPES`` (Hugging Face ``model_type`` values it handles),
``build(hf_model) -> nn.Module`` (the exportable decoder with an explicit KV cache),
``describe(config) -> dict`` (the shape facts recorded in graphopt.json) and ``WEIGHT_NAMES``
(how its checkpoint names the decoder weights, which the export keeps: what pruning and
quantization address layers and projections by). A new family is one module plus its name in
``FAMILY_MODULES``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from types import ModuleType
from typing import Mapping

from graphopt.errors import UnsupportedModelError

FAMILY_MODULES = ("llama", "gpt2", "qwen3", "smollm3", "phi3", "gemma3")
ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")


@dataclasses.dataclass(frozen=True)
class WeightNames:
    """How a family names its decoder weights: ``{layers}.{i}.{module}.weight``.

    ``roles`` maps a module inside a layer to its role (one of ``ROLES``): the query, key and
    value projections (or ``qkv`` packed), the attention output ``o``, and the MLP's ``gate``,
    ``up`` (or ``gate_up`` packed, [gate | up] columns) and ``down`` projections. ``lm_head`` is the module name of the output projection.
    """

    layers: str
    roles: Mapping[str, str]
    lm_head: str = "lm_head"

    def __post_init__(self):
        unknown = set(self.roles.values()) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown weight roles {sorted(unknown)}; roles are {', '.join(ROLES)}")

    @functools.cached_property
    def layer_pattern(self) -> re.Pattern:
        """Matches a name inside layer i, with i as group 1."""
        return re.compile(rf"^{re.escape(self.layers)}\.(\d+)\.")


@functools.cache
def weight_names() -> tuple[WeightNames, ...]:
    """Every family's weight names."""
    return tuple(importlib.import_module(f"graphopt.models.{name}").WEIGHT_NAMES for name in FAMILY_MODULES)


def adapter_for(model_type: str) -> ModuleType:
    """The family module for a Hugging Face ``model_type``, or a clear error listing what is supported."""
    for name in FAMILY_MODULES:
        module = importlib.import_module(f"graphopt.models.{name}")
        if model_type in module.MODEL_TYPES:
            return module
    raise UnsupportedModelError(f"unsupported model type {model_type!r}; graphopt exports: {', '.join(supported_model_types())}")


def supported_model_types() -> list[str]:
    types: list[str] = []
    for name in FAMILY_MODULES:
        types.extend(importlib.import_module(f"graphopt.models.{name}").MODEL_TYPES)
    return types
