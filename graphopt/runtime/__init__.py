"""graphopt's runtime: generation over ONNX Runtime sessions.

Needs only onnxruntime, numpy, tokenizers and jinja2 (no torch), so it ships to edge devices.
"""

from __future__ import annotations

from graphopt.runtime.decoder import Decoder
from graphopt.runtime.device import DeviceDecoder, open_decoder
from graphopt.runtime.generator import GenerationResult, Generator
from graphopt.runtime.sampling import GREEDY, Sampling
from graphopt.runtime.session import EXECUTION_PROVIDERS, make_session, resolve_providers
from graphopt.runtime.speculative import SpeculativeGenerator

__all__ = ["Decoder", "DeviceDecoder", "EXECUTION_PROVIDERS", "GREEDY", "GenerationResult", "Generator", "Sampling",
           "SpeculativeGenerator", "make_session", "open_decoder", "resolve_providers"]
