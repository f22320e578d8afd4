"""A decoder whose KV cache stays on the execution provider's device (CUDA), through IOBinding.

Each step binds the previous step's ``present.*`` OrtValues as the next step's
``past_key_values.*`` without a host round trip; only the new token ids, the mask and the
positions go up, and only the logits come down. Rolling the cache back (speculative decoding)
slices the cache on the device with a small ONNX Runtime session of Slice nodes.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np

from graphopt.runtime.decoder import Decoder
from graphopt.runtime.session import DEVICE_OF_PROVIDER, captures_cuda_graphs, make_session
from graphopt.manifest import Manifest
from graphopt.runtime.static_cache import (StaticCacheDecoder, fused_with_group_query_attention, manifest_beside,
                                           require_group_query_attention, runs_whole_on_cuda)

logger = logging.getLogger(__name__)


def _slice_model(count: int, dtype: np.dtype):
    """An in-memory model: ``count`` tensors in, each sliced to ``[:, :, :length, :]`` out."""
    import onnx_ir as ir

    element = ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT
    length = ir.Value(name="length", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    zero = ir.Value(name="zero", const_value=ir.tensor(np.array([0], dtype=np.int64)))
    axis = ir.Value(name="axis", const_value=ir.tensor(np.array([2], dtype=np.int64)))
    inputs, outputs, nodes = [length], [], []
    for index in range(count):
        tensor = ir.Value(name=f"cache_{index}", type=ir.TensorType(element), shape=ir.Shape(["b", "h", "s", "d"]))
        node = ir.node("Slice", [tensor, zero, length, axis])
        node.outputs[0].name = f"sliced_{index}"
        node.outputs[0].type = ir.TensorType(element)
        inputs.append(tensor)
        outputs.append(node.outputs[0])
        nodes.append(node)
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=[zero, axis], opset_imports={"": 18}, name="truncate")
    return ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()


class DeviceDecoder(Decoder):
    """``Decoder`` with the KV cache held as OrtValues on the session's device.

    Works on any provider (on CPU it is simply a Decoder driven through IOBinding), so the same
    code path is tested in CI without a GPU.
    """

    def __init__(self, model_path: str | os.PathLike, ep: str = "cuda", threads: int | None = None, device_id: int = 0,
                 session=None):
        self.device = None
        super().__init__(model_path, ep=ep, threads=threads, session=session)
        self.device = DEVICE_OF_PROVIDER.get(self.provider, "cpu")
        self.device_id = device_id if self.device != "cpu" else 0
        import onnxruntime as ort

        self._ort = ort
        providers = [self.provider] if self.device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self._slicer = ort.InferenceSession(_slice_model(len(self.past_names), np.dtype(self.cache_dtype)),
                                            providers=providers)
        self.reset()

    def reset(self) -> None:
        if self.device is None:  # called by Decoder.__init__ before the device is known
            super().reset()
            return
        self._cache = [self._ort.OrtValue.ortvalue_from_numpy(empty, self.device, self.device_id)
                       for empty in self._empty_cache]
        self._length = 0

    def forward(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        total = self._length + ids.shape[1]
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.arange(self._length, total, dtype=np.int64).reshape(1, -1))
        for name, value in zip(self.past_names, self._cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._cache = list(outputs[1:])
        self._length = total
        return outputs[0].numpy()[0].astype(np.float32, copy=False)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate a cache of {self._length} tokens to {length}")
        if length == self._length:
            return
        binding = self._slicer.io_binding()
        binding.bind_cpu_input("length", np.array([length], dtype=np.int64))
        for index, value in enumerate(self._cache):
            binding.bind_ortvalue_input(f"cache_{index}", value)
            binding.bind_output(f"sliced_{index}", self.device, self.device_id)
        self._slicer.run_with_iobinding(binding)
        self._cache = list(binding.get_outputs())
        self._length = length


CACHES = ("auto", "static", "device", "host")


def open_decoder(model_path: str | os.PathLike, ep: str = "cpu", threads: int | None = None, cache: str = "auto",
                 cuda_graph: bool = True, spinning: bool | str = True, manifest: Manifest | None = None,
                 graph_tokens: int = 1) -> Decoder:
    """The right decoder for where the session runs.

    ``cache`` picks where the KV cache lives: ``host`` (numpy, a round trip per step: the naive
    baseline), ``device`` (OrtValues on the session's device, growing each step), ``static``
    (fixed buffers, written in place; needs GroupQueryAttention) or ``auto``: static when the graph
    allows it (also on the CPU, where it saves copying the cache each step), else device on a GPU
    and host on the CPU. A static cache on CUDA replays one-token steps as a CUDA graph unless
    ``cuda_graph`` is False; when ONNX Runtime refuses graph capture for the model (nodes left on
    the CPU) it runs without, with a warning. ``manifest``: the caller's, else read beside the model.
    ``graph_tokens``: a static cache also graphs forwards of 2 .. this many tokens (speculative verify).
    """
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r}; choose from {', '.join(CACHES)}")
    manifest = manifest if manifest is not None else manifest_beside(model_path)
    if cache == "static":
        require_group_query_attention(manifest, model_path)  # before the session: fail fast
    static = cache == "static" or (cache == "auto" and fused_with_group_query_attention(manifest))
    session = None
    cuda_graph = cuda_graph and captures_cuda_graphs(ep)
    if static and cuda_graph and not runs_whole_on_cuda(manifest):
        logger.info("no CUDA graph for %s: its GroupQueryAttention is float32 and runs on the CPU", model_path)
        cuda_graph = False
    if static and cuda_graph:
        try:
            session = make_session(model_path, ep=ep, threads=threads, spinning=spinning, cuda_graph=True)
        except Exception as error:  # ORT refuses capture at session creation, e.g. nodes left on the CPU
            warnings.warn(f"CUDA graphs are off for {model_path}: {str(error).splitlines()[0]}", stacklevel=2)
            cuda_graph = False
    if session is None:
        session = make_session(model_path, ep=ep, threads=threads, spinning=spinning)
    on_device = DEVICE_OF_PROVIDER.get(session.get_providers()[0], "cpu") != "cpu"
    if static:
        return StaticCacheDecoder(model_path, session=session, cuda_graph=cuda_graph, manifest=manifest,
                                  graph_tokens=graph_tokens)
    if cache == "device" or (cache == "auto" and on_device):
        return DeviceDecoder(model_path, session=session)
    return Decoder(model_path, session=session)
