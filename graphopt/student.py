"""A trainable torch module computing what a model directory's ONNX graph computes, with the same weight names.

Distillation changes a graph's weights, never its graph. The exported decoders name every weight
after the checkpoint module it belongs to (``model.layers.3.mlp.up_proj.weight``, stored as a
MatMul's ``(in_features, out_features)``), so a module whose parameters carry exactly those names
and shapes can be trained in torch and its weights written back into a copy of the graph.

Shapes are read from the graph's initializers, not from a config: a pruned model's layers may each
keep a different number of heads, KV heads and MLP channels, and dropped layers are simply absent
(the prune passes renumber the rest). The rotary frequencies are the graph's own ``inv_freq``
initializer, and the RMSNorm epsilon is the constant the graph adds before its square root.

Supported: unfused float32 Llama-family graphs (Llama, SmolLM2, Mistral, Qwen2, Qwen3 with its per-head
q/k norms, SmolLM3 with its layers without RoPE), pruned or not.
Fused graphs (com.microsoft attention ops) and quantized graphs are refused: distill first, then
fuse and quantize (prune -> distill -> fuse -> quantize). :func:`check_round_trip` compares the
module with ONNX Runtime on the graph itself before any weight changes.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional

from graphopt import ir as graph_ir
from graphopt.errors import GraphoptError, ValidationError
from graphopt.manifest import Manifest
from graphopt.modeldir import ModelDir
from graphopt.passes.quantize_common import QUANTIZED_OPS

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention", "RotaryEmbedding",
                        "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"})
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


# Families whose graphs the module below computes: the Llama layout, with optional q/k norms and RoPE-free layers.
_FAMILIES = ("llama", "qwen3", "smollm3")


class StudentError(GraphoptError):
    """The model directory's graph cannot be trained as a torch module (fused, quantized, other family)."""


@dataclasses.dataclass
class LayerShape:
    """One decoder layer of the graph: its query heads, KV heads and MLP channels."""

    heads: int
    kv_heads: int
    intermediate: int
    bias: bool
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on query and key before RoPE
    rotary: bool = True  # False for SmolLM3's position-free layers


@dataclasses.dataclass
class GraphSpec:
    """What the module needs to know about the graph besides its weights."""

    layers: list[LayerShape]
    head_dim: int
    hidden: int
    vocab: int
    eps: float
    embedding: str  # the Gather's table (``lm_head.weight`` when the head is tied)
    head: str | None  # an untied LM head's (hidden, vocab) weight; None when tied to the embedding
    inv_freq: np.ndarray


def _refuse_unsupported(model: ir.Model, manifest: Manifest, path: pathlib.Path) -> None:
    ops = {node.op_type for node in model.graph}
    if ops & QUANTIZED_OPS:
        raise StudentError(f"{path}: the graph is quantized ({', '.join(sorted(ops & QUANTIZED_OPS))}); distill the "
                           "float model, then quantize (prune -> distill -> fuse -> quantize)")
    if ops & _FUSED_OPS or any(node.domain not in ("", "ai.onnx") for node in model.graph):
        raise StudentError(f"{path}: the graph is fused; distill the unfused model, then fuse "
                           "(prune -> distill -> fuse -> quantize)")
    if manifest.family not in _FAMILIES:
        raise StudentError(f"{path}: distill supports the {', '.join(_FAMILIES)} families, not {manifest.family!r}")
    if manifest.dtype != "float32":
        raise StudentError(f"{path}: distill needs a float32 model, got {manifest.dtype}; convert after distilling")


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _rms_eps(graph: ir.Graph) -> float:
    """The epsilon the RMSNorms add to the mean of squares (Add(ReduceMean(x^2), eps))."""
    for node in graph:
        if node.op_type != "Add":
            continue
        for this, other in ((0, 1), (1, 0)):
            producer = node.inputs[this].producer() if node.inputs[this] is not None else None
            if producer is not None and producer.op_type == "ReduceMean":
                eps = _constant(node.inputs[other])
                if eps is not None and eps.size == 1:
                    return float(eps.reshape(-1)[0])
    raise StudentError("no RMSNorm epsilon found in the graph (Add(ReduceMean, eps)); is this a Llama-family export?")


def _layer_rotates(graph: ir.Graph, index: int) -> bool:
    """Whether layer ``index`` applies RoPE to its query: a ``Neg`` (rotate_half) between the query
    projection and the attention scores' MatMul (SmolLM3's position-free layers have none)."""
    weight = graph.initializers.get(f"model.layers.{index}.self_attn.q_proj.weight")
    frontier = [use.node for use in weight.uses()] if weight is not None else []
    seen: set[ir.Node] = set()
    for _ in range(24):
        following = []
        for node in frontier:
            if node.op_type == "Neg":
                return True
            seen.add(node)
            if node.op_type == "MatMul" and node.inputs[1] is not weight:
                continue  # the attention scores: the query's path ends here
            following += [use.node for output in node.outputs for use in output.uses() if use.node not in seen]
        frontier = following
    return False


def graph_spec(model: ir.Model, manifest: Manifest) -> GraphSpec:
    """Read layer shapes, the embedding/head arrangement, RoPE frequencies and epsilon from ``model``."""
    graph = model.graph
    initializers = graph.initializers
    head_dim = manifest.head_dim
    indices = sorted({int(match.group(1)) for name in initializers if (match := _LAYER.match(name))})
    if indices != list(range(len(indices))) or len(indices) != manifest.layers:
        raise StudentError(f"the graph's layers {indices[:5]}... do not match graphopt.json's {manifest.layers}")
    layers = []
    for index in indices:
        prefix = f"model.layers.{index}."
        missing = [name for name in _PROJECTIONS if f"{prefix}{name}.weight" not in initializers]
        if missing:
            raise StudentError(f"layer {index} has no initializer {prefix}{missing[0]}.weight (packed or renamed "
                               "weights cannot be trained; distill before fusing)")
        shape = {name: tuple(initializers[f"{prefix}{name}.weight"].shape.numpy()) for name in _PROJECTIONS}
        layers.append(LayerShape(heads=shape["self_attn.q_proj"][1] // head_dim,
                                 kv_heads=shape["self_attn.k_proj"][1] // head_dim,
                                 intermediate=shape["mlp.up_proj"][1],
                                 bias=f"{prefix}self_attn.q_proj.bias" in initializers,
                                 qk_norm=f"{prefix}self_attn.q_norm.weight" in initializers,
                                 rotary=_layer_rotates(graph, index)))
    gathers = [node for node in graph if node.op_type == "Gather" and node.inputs[0] is not None
               and node.inputs[0].is_initializer() and node.inputs[1] is graph.inputs[0]]
    if len(gathers) != 1:
        raise StudentError("cannot find the token embedding (one Gather of input_ids from an initializer)")
    embedding = gathers[0].inputs[0].name
    vocab, hidden = tuple(initializers[embedding].shape.numpy())
    logits = graph.outputs[0]
    producer = logits.producer()
    if producer is None or producer.op_type != "MatMul":
        raise StudentError("the logits are not produced by a MatMul (LM head); cannot map the graph")
    weight = producer.inputs[1]
    if weight.is_initializer():
        head = weight.name
    elif weight.producer() is not None and weight.producer().op_type == "Transpose" \
            and weight.producer().inputs[0].name == embedding:
        head = None
    else:
        raise StudentError("the LM head's weight is neither an initializer nor the transposed embedding")
    inv_freq = initializers.get("inv_freq")
    if inv_freq is None or inv_freq.const_value is None:
        raise StudentError("the graph has no inv_freq initializer (rotary frequencies)")
    return GraphSpec(layers=layers, head_dim=head_dim, hidden=int(hidden), vocab=int(vocab), eps=_rms_eps(graph),
                     embedding=embedding, head=head, inv_freq=inv_freq.const_value.numpy().astype(np.float32))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _register(root: nn.Module, name: str, parameter: nn.Parameter) -> None:
    """Register ``parameter`` under the dotted ``name``, creating the modules on the way."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_parameter(leaf, parameter)


class StudentModel(nn.Module):
    """The graph's decoder as torch: ``forward(input_ids, past) -> (logits, present)``.

    Parameters are named exactly like the graph's initializers and have their shapes (MatMul weights
    ``(in, out)``), so ``state_dict()`` maps one to one onto the graph. ``fake_quant`` (set by QAT)
    is applied to the weights named in ``quantized_names`` when they are read, ``fake_quant_input``
    (QAT too, optional) to what those weights multiply.
    """

    def __init__(self, spec: GraphSpec, weights: dict[str, np.ndarray]):
        super().__init__()
        self.spec = spec
        self.names: list[str] = []
        for name, array in weights.items():
            _register(self, name, nn.Parameter(torch.from_numpy(np.array(array, dtype=np.float32))))
            self.names.append(name)
        self.register_buffer("inv_freq", torch.from_numpy(spec.inv_freq.copy()), persistent=False)
        self.fake_quant = None  # callable(weight, name) -> weight, set for quantization-aware training
        self.quantized_names: set[str] = set()
        self.fake_quant_input = None  # callable(x, weight name) -> x, the kernel's rounding of the input

    def parameter(self, name: str) -> torch.Tensor:
        value = self.get_parameter(name)
        if self.fake_quant is not None and name in self.quantized_names:
            return self.fake_quant(value, name)
        return value

    def linear_names(self, head: bool) -> list[str]:
        """Names of the weights graphopt's weight-only pass quantizes (layer projections, optionally the head)."""
        names = [f"model.layers.{index}.{projection}.weight" for index in range(len(self.spec.layers))
                 for projection in _PROJECTIONS]
        if head:
            names.append(self.spec.head or self.spec.embedding)
        return names

    def _input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.fake_quant_input is not None and name in self.quantized_names:
            return self.fake_quant_input(x, name)
        return x

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        out = self._input(x, f"{prefix}.weight") @ self.parameter(f"{prefix}.weight").to(x.dtype)
        bias_name = f"{prefix}.bias"
        if bias_name in self.names:
            out = out + self.get_parameter(bias_name).to(x.dtype)
        return out

    def head_matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The LM head as a ``(hidden, vocab)`` matrix (the transposed embedding when tied), fake-quantized under QAT."""
        head = self.parameter(self.spec.head or self.spec.embedding).to(dtype)
        return head if self.spec.head else head.t()

    def forward(self, input_ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                dtype: torch.dtype = torch.float32, head: bool = True):
        """``(logits, present)``; with ``head=False`` the final normalized hidden states instead of logits
        (the distillation loss applies the head chunk by chunk)."""
        spec = self.spec
        batch, seq_len = input_ids.shape
        past_len = past[0][0].shape[2] if past else 0
        hidden = functional.embedding(input_ids, self.get_parameter(spec.embedding)).to(dtype)
        positions = torch.arange(past_len, past_len + seq_len, device=input_ids.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(dtype)[None, None], angles.sin().to(dtype)[None, None]
        presents = []
        for index, layer in enumerate(spec.layers):
            prefix = f"model.layers.{index}"
            residual = hidden
            normed = _rms_norm(hidden, self.get_parameter(f"{prefix}.input_layernorm.weight").to(dtype), spec.eps)
            query = self._linear(normed, f"{prefix}.self_attn.q_proj").view(batch, seq_len, layer.heads, spec.head_dim)
            key = self._linear(normed, f"{prefix}.self_attn.k_proj").view(batch, seq_len, layer.kv_heads, spec.head_dim)
            value = self._linear(normed, f"{prefix}.self_attn.v_proj").view(batch, seq_len, layer.kv_heads, spec.head_dim)
            if layer.qk_norm:
                query = _rms_norm(query, self.get_parameter(f"{prefix}.self_attn.q_norm.weight").to(dtype), spec.eps)
                key = _rms_norm(key, self.get_parameter(f"{prefix}.self_attn.k_norm.weight").to(dtype), spec.eps)
            query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            if layer.rotary:
                query = query * cos + _rotate_half(query) * sin
                key = key * cos + _rotate_half(key) * sin
            if past:
                key = torch.cat((past[index][0], key), dim=2)
                value = torch.cat((past[index][1], value), dim=2)
            presents.append((key, value))
            # Causal within the new tokens; every cached position is visible (the cache holds no padding here).
            context = functional.scaled_dot_product_attention(
                query, key, value, is_causal=not past and seq_len > 1, enable_gqa=layer.heads != layer.kv_heads)
            if past and seq_len > 1:
                raise ValueError("multi-token forward on a cache is not needed for training or sampling")
            context = context.transpose(1, 2).reshape(batch, seq_len, layer.heads * spec.head_dim)
            hidden = residual + self._linear(context, f"{prefix}.self_attn.o_proj")
            residual = hidden
            normed = _rms_norm(hidden, self.get_parameter(f"{prefix}.post_attention_layernorm.weight").to(dtype), spec.eps)
            gate = self._linear(normed, f"{prefix}.mlp.gate_proj")
            up = self._linear(normed, f"{prefix}.mlp.up_proj")
            hidden = residual + self._linear(functional.silu(gate) * up, f"{prefix}.mlp.down_proj")
        hidden = _rms_norm(hidden, self.get_parameter("model.norm.weight").to(dtype), spec.eps)
        hidden = self._input(hidden, spec.head or spec.embedding)
        if not head:
            return hidden, presents
        return hidden @ self.head_matrix(dtype), presents


@dataclasses.dataclass
class LoadedStudent:
    """A model directory read for training: its manifest, graph facts and the torch module."""

    directory: ModelDir
    manifest: Manifest
    spec: GraphSpec
    module: StudentModel


def load_student(model_dir: str | pathlib.Path) -> LoadedStudent:
    """Build the torch module of ``model_dir``'s graph, with the graph's weights loaded.

    Raises:
        StudentError: the graph is fused, quantized, not float32 or not of the Llama family.
    """
    directory = ModelDir.open(model_dir)
    manifest = directory.manifest
    model = graph_ir.load(directory.model_path)
    _refuse_unsupported(model, manifest, directory.path)
    spec = graph_spec(model, manifest)
    wanted = ["model.norm.weight", spec.embedding] + ([spec.head] if spec.head else [])
    for index in range(len(spec.layers)):
        prefix = f"model.layers.{index}."
        wanted += [f"{prefix}{name}" for name in ("input_layernorm.weight", "post_attention_layernorm.weight")]
        if spec.layers[index].qk_norm:
            wanted += [f"{prefix}self_attn.q_norm.weight", f"{prefix}self_attn.k_norm.weight"]
        for projection in _PROJECTIONS:
            wanted.append(f"{prefix}{projection}.weight")
            if f"{prefix}{projection}.bias" in model.graph.initializers:
                wanted.append(f"{prefix}{projection}.bias")
    weights = {}
    for name in wanted:
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise StudentError(f"{directory.path}: no initializer {name}")
        weights[name] = value.const_value.numpy()
    return LoadedStudent(directory, manifest, spec, StudentModel(spec, weights))


def write_weights(source: ModelDir, weights: dict[str, np.ndarray], destination: pathlib.Path) -> int:
    """Save ``source``'s graph with ``weights`` replacing initializers of the same names into ``destination``.

    Returns how many initializers changed. Shapes and dtypes must match: the graph is not edited.
    """
    model = graph_ir.load(source.model_path)
    changed = 0
    for name, array in weights.items():
        value = model.graph.initializers.get(name)
        if value is None:
            raise StudentError(f"the graph has no initializer {name}")
        old_shape = tuple(value.shape.numpy())
        if tuple(array.shape) != old_shape:
            raise StudentError(f"{name}: trained shape {tuple(array.shape)} differs from the graph's {old_shape}")
        value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=name)
        changed += 1
    graph_ir.save(model, destination / "model.onnx")
    return changed


def ort_logits(model_path: pathlib.Path, input_ids: np.ndarray) -> np.ndarray:
    """Logits of the ONNX graph for ``input_ids`` (batch, seq) from an empty cache, with ONNX Runtime."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return run_session(session, input_ids)


def run_session(session, input_ids: np.ndarray) -> np.ndarray:
    """One forward of an exported decoder session on ``input_ids`` with an empty KV cache."""
    batch, seq_len = input_ids.shape
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": np.ones((batch, seq_len), np.int64),
             "position_ids": np.tile(np.arange(seq_len, dtype=np.int64), (batch, 1))}
    for graph_input in session.get_inputs():
        if graph_input.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = graph_input.shape
            feeds[graph_input.name] = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    return session.run(["logits"], feeds)[0]


def check_round_trip(loaded: LoadedStudent, input_ids: np.ndarray, tolerance: float = 1e-4) -> float:
    """Max |torch - ONNX Runtime| logits on ``input_ids`` over max(1, max |logits|); raises above ``tolerance``.

    Relative to the logits' scale because float32 rounding alone, summed over 30 layers, puts ONNX
    Runtime 5e-4 away from a float64 evaluation of SmolLM2 on random tokens (logits up to 35);
    the torch module is closer to float64 than that.
    """
    module = loaded.module
    with torch.no_grad():
        ours = module(torch.from_numpy(input_ids.astype(np.int64)).to(module.inv_freq.device))[0].float().cpu().numpy()
    reference = ort_logits(loaded.directory.model_path, input_ids)
    difference = float(np.abs(ours - reference).max()) / max(1.0, float(np.abs(reference).max()))
    if difference > tolerance:
        raise ValidationError(f"the torch form of {loaded.directory.path} differs from its graph: max |logits diff| "
                              f"{difference:.3g} of the logits' scale > {tolerance:g}")
    return difference


def module_from_transformers(model) -> StudentModel:
    """The :class:`StudentModel` of a transformers Llama-family causal LM (weights copied, named as an
    export of it names them), without exporting: a teacher to sample from while the export runs.

    Raises:
        StudentError: not a Llama-family model this module can compute.
    """
    config = model.config
    if config.model_type not in ("llama", "mistral", "qwen2"):
        raise StudentError(f"module_from_transformers supports llama, mistral and qwen2, not {config.model_type!r}")
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise StudentError(f"rotary scaling {rope_type!r} is not supported here")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    state = {name: tensor.detach().float().cpu() for name, tensor in model.state_dict().items()}
    layers, weights = [], {}
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            weights[prefix + name] = state[prefix + name].numpy()
        for projection in _PROJECTIONS:
            weights[f"{prefix}{projection}.weight"] = state[f"{prefix}{projection}.weight"].t().contiguous().numpy()
            if f"{prefix}{projection}.bias" in state:
                weights[f"{prefix}{projection}.bias"] = state[f"{prefix}{projection}.bias"].numpy()
        layers.append(LayerShape(heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                                 intermediate=config.intermediate_size,
                                 bias=f"{prefix}self_attn.q_proj.bias" in state))
    weights["model.norm.weight"] = state["model.norm.weight"].numpy()
    weights["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].numpy()
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state
    if not tied:
        weights["lm_head.weight"] = state["lm_head.weight"].t().contiguous().numpy()
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is not None and hasattr(rotary, "inv_freq"):
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise StudentError("rotary attention scaling is not supported here")
        inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
    else:  # transformers 5 keeps the base in rope_parameters, 4 in rope_theta
        parameters = getattr(config, "rope_parameters", None) or {}
        base = parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    spec = GraphSpec(layers=layers, head_dim=head_dim, hidden=config.hidden_size, vocab=config.vocab_size,
                     eps=float(config.rms_norm_eps), embedding="model.embed_tokens.weight",
                     head=None if tied else "lm_head.weight", inv_freq=inv_freq.astype(np.float32))
    return StudentModel(spec, weights)
