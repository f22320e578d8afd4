"""Per-family export adapters, one module per family.

Each module exposes ``MODEL_TYPES`` (Hugging Face ``model_type`` values it handles),
``build(hf_model) -> nn.Module`` (the exportable decoder with an explicit KV cache) and
``describe(config) -> dict`` (the shape facts recorded in graphopt.json).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from graphopt.errors import UnsupportedModelError

FAMILY_MODULES = ("llama", "gpt2")


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
