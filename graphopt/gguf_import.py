"""GGUF quantized tensors as MatMulNBits weights, with no float round trip (`graphopt export X.gguf --keep-quantization`).

The plain export loads a GGUF through transformers, which dequantizes every tensor to float32.
This module reads the GGUF's blocks themselves and hands them to the weight-only pass as codes:

* ``Q8_0`` (per 32 weights: float16 ``d``, 32 int8 ``q``; ``w = d q``) -> MatMulNBits 8 bits, block
  32, codes ``q + 128`` and the default zero point 128: ``(q + 128 - 128) d``, the same float32
  products llama.cpp's dequantization computes;
* ``Q4_0`` (``d``, 32 nibbles; ``w = d (q - 8)``; byte ``j`` holds elements ``j`` and ``j + 16``) ->
  MatMulNBits 4 bits, codes ``q`` repacked two consecutive elements per byte, default zero point 8;
* ``Q4_1`` (``d``, ``m``, nibbles; ``w = d q + m``): the fractional offset has no integer zero point,
  and ONNX Runtime's float zero points run ~40x slower, so it becomes the ``affine`` form of
  ``passes.quantize_weights`` (the nearest integer zero point, the rest of ``m`` as 4-bit rows over
  the input's block sums, a second digit where they have room): the same codes, the offsets within
  1/28 of a step, most of them within 1/364 (reported as the error);
* anything else (F16, Q5_*, K-quants, ...) is not mapped: those linears are requantized from the
  dequantized float weights by the default method, and the caller reports their error.

Which graph weight a tensor is: gguf's own name map (``model.layers.3.mlp.up_proj`` ->
``blk.3.ffn_up``), then the rows matched by content, because llama.cpp's converter permutes the
rows of q/k projections for its RoPE layout. Every row of the dequantized tensor must equal a row
of the exported weight bit for bit, or the tensor is not taken (so a GGUF that does not belong to
the export cannot slip in). Nothing in a GGUF is executed; only arrays are read.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.passes.quantize_weights import QuantizedWeight
from graphopt.sources import sha256_of
from graphopt.steps import Step, StepConfig, StepOutput, run_step

logger = logging.getLogger(__name__)

EXACT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
BLOCK = 32


@dataclasses.dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its type name, ``[rows, columns]`` and the raw blocks ``[rows, bytes]``."""

    name: str
    type_name: str
    shape: tuple[int, int]
    raw: np.ndarray
    type_id: int


def read_tensors(path: str | pathlib.Path) -> tuple[dict[str, GGUFTensor], str, int]:
    """The rank-2 tensors of a GGUF file, its architecture and block count."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # the reader raises ValueError, struct.error, ... on a damaged file
        raise GraphoptError(f"{path}: cannot read the GGUF file ({error})") from None
    architecture = _field(reader, "general.architecture")
    blocks = _field(reader, f"{architecture}.block_count")
    tensors = {}
    for tensor in reader.tensors:
        if len(tensor.shape) != 2:
            continue
        columns, rows = (int(value) for value in tensor.shape)  # GGUF lists the fastest axis first
        tensors[tensor.name] = GGUFTensor(tensor.name, tensor.tensor_type.name, (rows, columns),
                                          np.asarray(tensor.data), int(tensor.tensor_type))
    return tensors, str(architecture), int(blocks)


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise GraphoptError(f"the GGUF file has no {key!r} field")
    return field.contents()


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """llama.cpp's dequantization (the gguf package's), ``[rows, columns]`` float32."""
    import gguf

    values = gguf.quants.dequantize(tensor.raw, gguf.GGMLQuantizationType(tensor.type_id))
    return np.asarray(values, dtype=np.float32).reshape(tensor.shape)


def blocks_of(tensor: GGUFTensor) -> QuantizedWeight:
    """The MatMulNBits form of a Q8_0 / Q4_0 / Q4_1 tensor (see the module docstring)."""
    rows, columns = tensor.shape
    if columns % BLOCK:
        raise GraphoptError(f"{tensor.name}: {columns} columns is not a whole number of blocks of {BLOCK}")
    n_blocks = columns // BLOCK
    raw = tensor.raw.reshape(rows, n_blocks, -1)
    if tensor.type_name == "Q8_0":
        scales = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return QuantizedWeight(8, codes, scales)
    if tensor.type_name in ("Q4_0", "Q4_1"):
        header = 2 if tensor.type_name == "Q4_0" else 4
        halves = raw[..., :header].copy().view(np.float16).astype(np.float32)
        nibbles = raw[..., header:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.uint8)
        if tensor.type_name == "Q4_0":
            return QuantizedWeight(4, codes, halves[..., 0])
        return QuantizedWeight(4, codes, halves[..., 0], zero_points=np.zeros((rows, n_blocks), dtype=np.int64),
                               offsets=halves[..., 1])
    raise GraphoptError(f"{tensor.name}: type {tensor.type_name} has no exact MatMulNBits form")


def row_order(dequantized: np.ndarray, weight_t: np.ndarray) -> np.ndarray | None:
    """Indices ``order`` with ``dequantized[order] == weight_t`` bit for bit, or None when some row has no match."""
    if dequantized.shape != weight_t.shape:
        return None
    index = {row.tobytes(): position for position, row in enumerate(dequantized)}
    order = np.empty(len(weight_t), dtype=np.int64)
    for position, row in enumerate(np.ascontiguousarray(weight_t, dtype=np.float32)):
        found = index.get(row.tobytes())
        if found is None:
            return None
        order[position] = found
    return order


@dataclasses.dataclass
class ImportPlan:
    """What ``match`` found: the exact weights by graph initializer name, and what must be requantized."""

    exact: dict[str, QuantizedWeight]
    types: dict[str, str]  # graph initializer name -> GGUF type, for every linear found in the file
    requantized: list[str]  # graph initializer names whose GGUF type has no exact form
    unmatched: list[str]  # graph initializer names with no GGUF tensor of equal content


def match(weights: dict[str, np.ndarray], path: str | pathlib.Path) -> ImportPlan:
    """Map graph weights ``{initializer name: [N, K] float32}`` onto the GGUF's tensors (module docstring)."""
    import gguf

    tensors, architecture, block_count = read_tensors(path)
    try:
        arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    except StopIteration:
        raise GraphoptError(f"{path}: unknown GGUF architecture {architecture!r}") from None
    names = gguf.get_tensor_name_map(arch, block_count)
    plan = ImportPlan({}, {}, [], [])
    for name, weight_t in weights.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        candidates = [gguf_name] if gguf_name in tensors else []
        if name == "lm_head.weight" and "output.weight" not in tensors:
            candidates.append("token_embd.weight")  # a tied head reads the embedding table
        tensor = next((tensors[candidate] for candidate in candidates if candidate in tensors), None)
        if tensor is None:
            plan.unmatched.append(name)
            continue
        order = row_order(dequantize(tensor), weight_t)
        if order is None:
            plan.unmatched.append(name)
            continue
        plan.types[name] = tensor.type_name
        if tensor.type_name in EXACT_TYPES:
            exact = blocks_of(tensor)
            exact.row_order = None if np.array_equal(order, np.arange(len(order))) else order
            plan.exact[name] = exact
        else:
            plan.requantized.append(name)
    return plan


# GGUF types kept at 8 bits when they must be requantized (they carry more than 4 bits a weight).
WIDE_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"})


@dataclasses.dataclass(frozen=True)
class GGUFImportConfig(StepConfig):
    """Which GGUF's quantized weights to take, and how to requantize the tensors that do not map exactly."""

    gguf: str = ""
    method: str = "mse"
    accuracy_level: int = 4

    def __post_init__(self):
        if not self.gguf or not pathlib.Path(self.gguf).is_file():
            raise GraphoptError(f"{self.gguf or 'the GGUF'}: no such file")


class GGUFImportStep(Step):
    """A float export of a GGUF => the GGUF's own quantized weights as MatMulNBits (no float round trip).

    The lineage step records, per GGUF type, how many linears were taken exactly, and the relative
    weight error of each requantized one.
    """

    name = "import_gguf_quantization"
    config_type = GGUFImportConfig

    def run(self, source, model, config: GGUFImportConfig, work) -> StepOutput:
        from graphopt.passes.quantize_common import is_head, linear_sites, quantized_ops
        from graphopt.passes.quantize_embedding import EmbeddingQuantizePass
        from graphopt.passes.quantize_weights import WeightOnlyQuantizePass

        gguf_path = pathlib.Path(config.gguf)
        if quantized_ops(model):
            raise GraphoptError(f"{source.path} is already quantized; import into the float export of the GGUF")
        sites = linear_sites(model.graph)
        weights = {site.source.name: site.weight().T for site in sites}
        logger.info("matching %d linear weights to the tensors of %s", len(weights), gguf_path.name)
        plan = match(weights, gguf_path)
        if not plan.exact and not plan.requantized:
            raise GraphoptError(f"{gguf_path}: no tensor of the GGUF equals a weight of {source.path}; "
                                "export this GGUF file itself first")
        by_name = {site.source.name: site.name for site in sites}  # before the pass removes the MatMuls
        site_bits = {site.name: 8 if plan.types.get(site.source.name) in WIDE_TYPES else 4 for site in sites}
        head = next((site for site in sites if is_head(site)), None)
        head_bits = 8 if head is None or plan.types.get(head.source.name) in WIDE_TYPES else 4
        quantizer = WeightOnlyQuantizePass(4, BLOCK, config.method, head_bits=head_bits,
                                           accuracy_level=config.accuracy_level, site_bits=site_bits, given=plan.exact)
        quantizer(model)
        counts = dict(quantizer.counts)
        embedding = EmbeddingQuantizePass(8, BLOCK)
        embedding(model)
        counts.update(embedding.counts)
        exact_types: dict[str, int] = {}
        for name in plan.exact:
            exact_types[plan.types[name]] = exact_types.get(plan.types[name], 0) + 1
        requantized = {name: {"type": plan.types[name], "relative_error": round(quantizer.errors[by_name[name]], 6)}
                       for name in plan.requantized}
        if requantized:
            worst = max(requantized, key=lambda name: requantized[name]["relative_error"])
            logger.info("%d linear(s) of types %s have no exact MatMulNBits form: requantized with %s (worst relative "
                        "weight error %.4f, %s)", len(requantized), sorted({r["type"] for r in requantized.values()}),
                        config.method, requantized[worst]["relative_error"], worst)
        if plan.unmatched:
            logger.info("%d linear(s) not found in the GGUF with equal values: requantized with %s",
                        len(plan.unmatched), config.method)
        figures = {"exact": exact_types, "requantized": requantized, "unmatched": plan.unmatched,
                   "exact_max_relative_error": max((quantizer.errors[by_name[name]] for name in plan.exact), default=0.0),
                   "gguf_sha256": sha256_of(gguf_path)}
        return StepOutput(model, counts, figures, changes={"quantization": "gguf"})

    def check(self, source, written, config) -> dict:
        return {"size_bytes": written.size_bytes()}


def import_quantization(model_dir: str | pathlib.Path, gguf_path: str | pathlib.Path, output: str | pathlib.Path,
                        force: bool = False, method: str = "mse", accuracy_level: int = 4):
    """Write ``output``: ``model_dir`` (a float export of ``gguf_path``) with the GGUF's own quantized weights."""
    config = GGUFImportConfig(str(pathlib.Path(gguf_path).resolve()), method, accuracy_level)
    return run_step(GGUFImportStep(), model_dir, output, config, force=force).output


def requantize_gguf(source: str | pathlib.Path, destination: str | pathlib.Path, choose) -> dict[str, str]:
    """Write a copy of the GGUF ``source`` whose rank-2 tensors are re-encoded with the gguf package's quantizers.

    ``choose(name, shape) -> type name`` (e.g. ``"Q4_0"``, ``"Q8_0"``, ``"F32"``) picks each
    tensor's type from its llama.cpp dequantization; metadata is copied as it is. Used to make the
    Q4_0 / Q8_0 references and test files. Returns the types written.
    """
    import gguf

    reader = gguf.GGUFReader(str(source))
    architecture = str(_field(reader, "general.architecture"))
    writer = gguf.GGUFWriter(str(destination), architecture)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    written = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        shape = tuple(int(value) for value in reversed(tensor.shape))
        data = data.reshape(shape)
        type_name = choose(tensor.name, shape) if len(shape) == 2 else "F32"
        quant_type = gguf.GGMLQuantizationType[type_name]
        if quant_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, data)
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, quant_type), raw_dtype=quant_type)
        written[tensor.name] = type_name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def llama_cpp_choice(bulk: str):
    """The type llama.cpp's ``llama-quantize`` picks per tensor for ``bulk`` (Q4_0 or Q8_0), as far as it matters here.

    A tied embedding (no ``output.weight``) is treated as the output tensor: llama.cpp gives it Q6_K,
    or Q8_0 when its width is not a multiple of 256 (SmolLM2's 576), which is what is used here
    (the gguf package has no Q6_K quantizer).
    """
    def choose(name: str, shape: tuple[int, ...]) -> str:
        if name == "token_embd.weight" and bulk == "Q4_0":
            return "Q8_0"
        return bulk
    return choose


def export_keeping_quantization(src: str, output, force: bool, validate: bool, tolerance: float, opset: int,
                                fuse_target: str | None, export_fused) -> object:
    """``graphopt export SRC --keep-quantization``: float export (and fusion) in a scratch directory, then the import.

    The float export is validated against PyTorch as usual; the import then checks, tensor by
    tensor, that the codes it keeps dequantize to exactly the weights that were validated.
    """
    import tempfile

    from graphopt.checkpoint import describe_source
    from graphopt.export import export
    from graphopt.modeldir import check_output

    kind, gguf_path, _name = describe_source(src)
    if kind not in ("registry", "gguf"):
        raise GraphoptError(f"{src}: --keep-quantization needs a GGUF source (a .gguf file or a registry name)")
    target = check_output(output, force, sources=[src])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", suffix=".float", dir=target.parent) as scratch:
        float_dir = pathlib.Path(scratch) / "float"
        if fuse_target is None:
            export(src, float_dir, run_validation=validate, tolerance=tolerance, opset=opset)
        else:
            export_fused(src, float_dir, False, validate, tolerance, opset, fuse_target)
        return import_quantization(float_dir, gguf_path, output, force=force)
