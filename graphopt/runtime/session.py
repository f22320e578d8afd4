"""ONNX Runtime sessions for a model directory: execution-provider choice with CPU fallback."""

from __future__ import annotations

import logging
import os
import pathlib
import warnings

from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)

# The one provider table: what each --ep name asks ONNX Runtime for (in order of preference) and
# where the first provider keeps its tensors. A new provider is one row here.
EXECUTION_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
# Providers that can replay a captured step as a CUDA graph (ORT's enable_cuda_graph).
CUDA_GRAPH_PROVIDERS = ("CUDAExecutionProvider",)


def captures_cuda_graphs(ep: str) -> bool:
    return EXECUTION_PROVIDERS.get(ep, [""])[0] in CUDA_GRAPH_PROVIDERS


def tensorrt_options(cache_dir: str | os.PathLike | None = None, fp16: bool = False, int8: bool = False) -> dict:
    """TensorRT execution-provider options: engine cache beside the model, explicit QDQ for int8."""
    options = {"trt_fp16_enable": fp16, "trt_int8_enable": int8}
    if cache_dir is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
    return options


TENSORRT_LIBRARIES = ("libnvinfer.so.10", "nvinfer_10.dll")


def tensorrt_missing_library() -> str | None:
    """The TensorRT runtime library this process cannot load, or None when it loads."""
    import ctypes
    import sys

    name = TENSORRT_LIBRARIES[1] if sys.platform == "win32" else TENSORRT_LIBRARIES[0]
    try:
        ctypes.CDLL(name)
    except OSError:
        return name
    return None


def resolve_providers(ep: str, available: list[str] | None = None, model_dir: str | os.PathLike | None = None,
                      cuda_graph: bool = False):
    """Map ``cpu|cuda|tensorrt`` to an ORT provider list, dropping what this onnxruntime lacks.

    Falls back to CPU with a warning when the requested provider is unavailable. ``cuda_graph``
    turns on CUDA graph capture in the CUDA provider (runs then choose a graph with the run option
    ``gpu_graph_id``; see :mod:`graphopt.runtime.static_cache`).
    """
    import onnxruntime as ort

    if ep not in EXECUTION_PROVIDERS:
        raise ValueError(f"unknown execution provider {ep!r}; choose from {', '.join(EXECUTION_PROVIDERS)}")
    available = ort.get_available_providers() if available is None else available
    wanted = EXECUTION_PROVIDERS[ep]
    providers = [name for name in wanted if name in available] or ["CPUExecutionProvider"]
    if "TensorrtExecutionProvider" in providers and tensorrt_missing_library() is not None:
        # onnxruntime-gpu lists the TensorRT provider whether or not TensorRT is installed; without
        # its libraries the session would fail (or fall back) with a long loader error.
        providers.remove("TensorrtExecutionProvider")
        warnings.warn(f"TensorRT libraries not found ({tensorrt_missing_library()}): install TensorRT 10 "
                      f"(pip install tensorrt) or add its lib directory to LD_LIBRARY_PATH; "
                      f"falling back to {providers[0]}", stacklevel=2)
    elif providers[0] != wanted[0]:
        warnings.warn(f"{wanted[0]} is not available in this onnxruntime "
                      f"(has {', '.join(available)}); falling back to {providers[0]}", stacklevel=2)
    resolved = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            cache = pathlib.Path(model_dir) / "trt_cache" if model_dir is not None else None
            resolved.append((name, tensorrt_options(cache)))
        elif name in CUDA_GRAPH_PROVIDERS and cuda_graph:
            resolved.append((name, {"enable_cuda_graph": "1"}))
        else:
            resolved.append(name)
    return resolved


SPINNING = (True, False, "run")


def make_session(model_path: str | os.PathLike, ep: str = "cpu", threads: int | None = None,
                 optimization: str = "all", spinning: bool | str = True, cuda_graph: bool = False,
                 model_bytes: bytes | None = None):
    """An InferenceSession on the requested provider; ``session.get_providers()[0]`` is what ran.

    ``model_bytes``: a graph derived from ``model_path`` in memory, run instead of the file; its
    external weights are read from ``model_path``'s directory.

    ``spinning``: ``True`` lets ORT's worker threads busy-wait for work, within a run and between
    runs (the fastest steps for one session that owns its cores); ``"run"`` spins within a run and
    stops the moment it returns, which is what two sessions taking turns on the same cores
    (speculative decoding) need: the idle one does not steal the busy one's cores, and neither pays
    a thread wake-up per operator; ``False`` never spins (a machine shared with other work).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    if spinning not in SPINNING:
        raise ValueError(f"spinning must be one of {SPINNING}, got {spinning!r}")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spinning == "run":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    model_path = pathlib.Path(model_path)
    providers = resolve_providers(ep, model_dir=model_path.parent, cuda_graph=cuda_graph)
    if model_bytes is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    try:
        return ort.InferenceSession(model_bytes if model_bytes is not None else str(model_path), sess_options=options,
                                    providers=providers)
    except (RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf, ort.capi.onnxruntime_pybind11_state.NoSuchFile) as error:
        # A damaged or foreign file: ONNX Runtime's message is long, its first line says what failed.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GraphoptError(f"{model_path}: ONNX Runtime cannot load it ({first[:300]})") from None
