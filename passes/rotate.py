"""Rotate the residual stream: ``x -> x Q`` for an orthogonal ``Q`` absorbed into the weights (QuaRot / SpinQuant).

An RMS norm commutes with an orthogonal rotation (``||x Q|| = ||x||``) once its scale ``g`` is
folded into the linears it feeds, so the float model computes the same function, to float
rounding, with every residual-stream value rotated:

* what writes the stream: the embedding table ``E -> E Q`` (Gather), ``o_proj`` / ``down_proj``
  ``W -> W Q`` (and a bias ``b -> b Q``);
* what reads a norm: ``W -> Q^T diag(g) W``, the norm's scale becomes 1;
* a tied LM head reads ``Transpose(E)``, already ``Q^T E^T`` with the rotated table, so it stays
  tied: a ``MatMul`` by ``Q^T diag(g) Q`` (``d x d``) goes in front of it instead.

Rotation loses nothing by itself; it changes what quantization sees: a randomized Hadamard ``Q``
spreads the residual stream's few outlier channels over all channels (activations) and makes
weight rows incoherent, so per-tensor activation ranges and weight blocks fit better.

Takes the fused RMS-norm graphs (``SimplifiedLayerNormalization`` /
``com.microsoft.SkipSimplifiedLayerNormalization``, what ``graphopt fuse`` writes for Llama-family
models); anything else touching the residual stream is refused with the reason. Walks the main
graph only (the decoders have no subgraphs or functions).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.ir import node_tag
from graphopt.passes.quantize_common import add_initializer, set_float32, site_of

logger = logging.getLogger(__name__)

RMS_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # op -> scale input
MARKER = "graphopt.rotation"
RULE = "rotate_residual"


@functools.cache
def hadamard(size: int) -> np.ndarray | None:
    """A ``size x size`` matrix of +-1 with orthogonal rows, or None where none is built here.

    Sylvester doubling, Paley's construction for ``q + 1`` with ``q`` a prime = 3 (mod 4), and
    Kronecker products of those: 576 (SmolLM2) = 8 x 72, 72 = 71 + 1.
    """
    if size == 1:
        return np.ones((1, 1))
    if size % 2 == 0 and (half := hadamard(size // 2)) is not None:
        return np.block([[half, half], [half, -half]])
    q = size - 1
    if q % 4 == 3 and q > 2 and all(q % f for f in range(2, int(q**0.5) + 1)):
        residues = {(i * i) % q for i in range(1, q)}
        chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
        jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]  # skew-symmetric for q = 3 (mod 4)
        matrix = np.ones((size, size))  # Paley I: [[1, 1^T], [-1, J + I]]
        matrix[1:, 0] = -1
        matrix[1:, 1:] = jacobsthal + np.eye(q)
        return matrix
    for factor in range(2, int(size**0.5) + 1):
        if size % factor == 0:
            left, right = hadamard(factor), hadamard(size // factor)
            if left is not None and right is not None:
                return np.kron(left, right)
    return None


def random_rotation(size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """A seeded orthogonal ``size x size`` matrix (float64) and what it is.

    A randomized Hadamard (``H diag(+-1) / sqrt(size)``) where a Hadamard of that size is built,
    else the Q of a Gaussian matrix's QR (sign-fixed so the seed alone decides it).
    """
    rng = np.random.default_rng(seed)
    matrix = hadamard(size)
    if matrix is not None:
        signs = rng.choice([-1.0, 1.0], size=size)
        return matrix * signs[None, :] / np.sqrt(size), "randomized Hadamard"
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))[None, :], "random orthogonal"


def _constant(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy().astype(np.float64)


class RotateResidualPass(ir.passes.InPlacePass):
    """Rotate the residual stream by a seeded orthogonal matrix (see the module docstring).

    Args:
        seed: picks the random signs (or matrix) of the rotation.

    Raises ``GraphoptError`` naming the first value that cannot be rotated, before changing anything.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.counts: dict[str, int] = {}
        self.rotation = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        if MARKER in model.metadata_props:  # rotating again would be lossless too, but nobody asked
            return ir.passes.PassResult(model, modified=False)
        norms = [node for node in model.graph if node.op_type in RMS_NORMS and node.domain in ("", "com.microsoft")]
        if not norms:
            raise GraphoptError("rotation needs the fused RMS norms of a Llama-family graph: "
                                "run `graphopt fuse MODEL --target cpu` first")
        # Plan everything first, so a refusal leaves the model as it was.
        writers = {id(constant): constant for value in _stream_values(norms) for constant in _written_by(value)}
        readers = [(norm, _read_by(norm)) for norm in norms]
        for _norm, sites in readers:
            for site in sites:
                if site.transposed and id(site.source) not in writers:
                    raise GraphoptError(f"rotation: the tied head {site.name} reads a table the stream does not start from")
        scale_of = lambda norm: norm.inputs[RMS_NORMS[norm.op_type]]  # noqa: E731
        size = int(scale_of(norms[0]).const_value.numpy().size)
        rotation, self.rotation = random_rotation(size, self.seed)
        for constant in writers.values():
            set_float32(constant, _constant(constant) @ rotation)
        for norm, sites in readers:
            scale = _constant(scale_of(norm))
            for site in sites:
                if site.transposed:
                    _rotate_tied_head(model.graph, site, rotation.T @ (scale[:, None] * rotation))
                else:
                    set_float32(site.weight_value, rotation.T @ (scale[:, None] * _constant(site.weight_value)))
            set_float32(scale_of(norm), np.ones_like(scale))
        self.counts = {"norms": len(norms), "readers": sum(len(sites) for _norm, sites in readers),
                       "writers": len(writers), "tied_head": sum(site.transposed for _norm, sites in readers for site in sites)}
        model.metadata_props[MARKER] = f"{self.rotation} {size}, seed {self.seed}"
        return ir.passes.PassResult(model, modified=True)


def _stream_values(norms: list[ir.Node]) -> list[ir.Value]:
    """The values added into the residual stream: the norms' inputs that are not a norm's running sum."""
    stream = {}
    for norm in norms:
        skip = norm.op_type.startswith("Skip")
        if skip and len(norm.inputs) > 3 and norm.inputs[3] is not None:
            raise GraphoptError(f"rotation: {norm.name} adds a bias into the residual stream")
        for value in norm.inputs[:2 if skip else 1]:
            producer = value.producer()
            if not (producer is not None and producer.op_type in RMS_NORMS and value.index() == 3):
                stream[id(value)] = value
        total = norm.outputs[3] if skip and len(norm.outputs) > 3 else None
        for user, index in (total.uses() if total is not None else ()):
            if user.op_type not in RMS_NORMS or index > 1:
                raise GraphoptError(f"rotation: the residual stream after {norm.name} is also read by {user.op_type}")
    return list(stream.values())


def _written_by(value: ir.Value) -> list[ir.Value]:
    """The constants to rotate so ``value`` comes out rotated: a Gather's table, a linear's weight (and bias)."""
    for user, index in value.uses():
        if user.op_type not in RMS_NORMS or index > 1:
            raise GraphoptError(f"rotation: {value.name} enters the residual stream and also {user.op_type}")
    producer = value.producer()
    if producer is not None and producer.op_type == "Gather" and producer.inputs[0].const_value is not None:
        return [producer.inputs[0]]
    bias = None
    if producer is not None and producer.op_type == "Add":
        constants = [operand for operand in producer.inputs if operand.const_value is not None]
        computed = [operand for operand in producer.inputs if operand.const_value is None]
        if len(constants) == len(computed) == 1 and len(constants[0].uses()) == 1 and len(computed[0].uses()) == 1:
            bias, producer = constants[0], computed[0].producer()
    site = site_of(producer) if producer is not None else None
    if site is None or site.transposed or len(site.weight_value.uses()) != 1:
        raise GraphoptError(f"rotation: {value.name} enters the residual stream from "
                            f"{producer.op_type if producer is not None else 'a graph input'}, "
                            "not a Gather or a MatMul by a weight of its own")
    return [site.weight_value] + ([bias] if bias is not None else [])


def _read_by(norm: ir.Node) -> list:
    """The linear sites reading the norm's output; refuses anything else there."""
    scale = norm.inputs[RMS_NORMS[norm.op_type]]
    if scale is None or scale.const_value is None or len(scale.uses()) != 1:
        raise GraphoptError(f"rotation: the scale of {norm.name} is shared or not a constant")
    sites = []
    for user, index in norm.outputs[0].uses():
        site = site_of(user) if index == 0 else None
        if site is None or (not site.transposed and len(site.weight_value.uses()) != 1):
            raise GraphoptError(f"rotation: {norm.name}'s output is read by {user.op_type}, "
                                "not a MatMul by a weight of its own")
        sites.append(site)
    return sites


def _rotate_tied_head(graph: ir.Graph, site, matrix: np.ndarray) -> None:
    """``x -> x M`` in front of a tied head (``M = Q^T diag(g) Q``): the table it shares is rotated already."""
    weight = add_initializer(graph, "rotation.head_scale", matrix.astype(np.float32))
    activation = site.node.inputs[0]
    node = ir.node("MatMul", [activation, weight], name=f"{site.name}/rotation")
    node.outputs[0].shape = activation.shape
    node.outputs[0].dtype = activation.dtype
    node_tag(node, RULE)
    graph.insert_before(site.node, node)
    site.node.replace_input_with(0, node.outputs[0])


def _kronecker_factors(size: int) -> tuple[int, int] | None:
    """``(a, b)`` with ``a * b = size``, a Hadamard of each built, ``a + b`` smallest (the cost per row)."""
    pairs = [(a, size // a) for a in range(1, size + 1) if size % a == 0
             and hadamard(a) is not None and hadamard(size // a) is not None]
    return min(pairs, key=sum) if pairs else None


class OnlineHadamardPass(ir.passes.InPlacePass):
    """``act(gate) * up -> down_proj``  =>  ``... -> x H -> down_proj`` with ``H^T`` folded into its weight.

    The input of a gated MLP's down projection carries the largest activation outliers of a Llama
    layer, and no norm precedes it to fold a rotation into, so the rotation runs in the graph:
    ``H = (A kron B) / sqrt(size)`` applied as ``A^T X B`` on the input reshaped to ``(a, b)``
    (two small MatMuls, ``size * (a + b)`` multiply-adds a token instead of ``size^2``). Lossless
    in float; the MatMuls carry the rule tag that keeps quantizers off them.
    """

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {"down_proj": 0}
        for node in list(model.graph):
            site = site_of(node)
            product = node.inputs[0].producer() if site is not None else None
            # act(gate) * up: a Mul of two computed values (a norm's constant scale is not a gate)
            if (site is None or site.transposed or product is None or product.op_type != "Mul"
                    or any(operand.const_value is not None for operand in product.inputs)
                    or len(site.weight_value.uses()) != 1):
                continue
            size = site.shape[0]
            factors = _kronecker_factors(size)
            if factors is None:
                continue
            a, b = factors
            self._insert(model.graph, node, a, b)
            set_float32(site.weight_value, np.kron(hadamard(a), hadamard(b)).T / np.sqrt(size) @ _constant(site.weight_value))
            self.counts["down_proj"] += 1
        return ir.passes.PassResult(model, modified=bool(self.counts["down_proj"]))

    @staticmethod
    def _insert(graph: ir.Graph, linear: ir.Node, a: int, b: int) -> None:
        activation = linear.inputs[0]
        scale = np.float32(1 / np.sqrt(a * b))
        shape = add_initializer(graph, "rotation.online.shape", np.array([0, 0, a, b], dtype=np.int64))
        flat = add_initializer(graph, "rotation.online.flat", np.array([0, 0, a * b], dtype=np.int64))
        right = add_initializer(graph, f"rotation.online.h{b}", hadamard(b).astype(np.float32) * scale)
        left = add_initializer(graph, f"rotation.online.h{a}t", hadamard(a).T.astype(np.float32))
        name = linear.name or activation.name
        nodes = [ir.node("Reshape", [activation, shape], name=f"{name}/rotation/reshape")]
        nodes.append(ir.node("MatMul", [nodes[-1].outputs[0], right], name=f"{name}/rotation/right"))
        nodes.append(ir.node("MatMul", [left, nodes[-1].outputs[0]], name=f"{name}/rotation/left"))
        nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], flat], name=f"{name}/rotation/flat"))
        for node in nodes:
            node.outputs[0].dtype = activation.dtype
            node_tag(node, RULE)
        nodes[-1].outputs[0].shape = activation.shape
        graph.insert_before(linear, nodes)
        linear.replace_input_with(0, nodes[-1].outputs[0])
