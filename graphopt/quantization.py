"""The quantize step: calibrate, pick what to quantize, run the quantization passes.

Schemes (``QuantizeConfig.scheme``): ``w8a8`` is static int8 QDQ (``passes.quantize_qdq``),
optionally after SmoothQuant (``passes.smooth_quant``), with activation ranges streamed through
``graphopt.ranges``' collectors; ``int8`` / ``int4`` are weight-only MatMulNBits
(``passes.quantize_weights``). Calibration sequences are made only for a scheme or method that
reads them. With ``max_ppl_increase`` the sites with the largest error are kept in float until the
calibration perplexity is within the bound. Fuse before quantizing (``graphopt.recipes`` says
why; fused norms take SmoothQuant's factors through their scale input). Needs no torch.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Callable

import numpy as np
import onnx_ir as ir

from graphopt import ir as graph_io
from graphopt.calibration import CalibrationSpec, calibration_sequences
from graphopt.capture import capture
from graphopt.cpu_kernels import default_block_size
from graphopt.errors import GraphoptError
from graphopt.evaluate import DEFAULT_TEXT, evaluate, fitting_window, sequences_perplexity
from graphopt.modeldir import ModelDir
from graphopt.passes.pack_matmulnbits import PackMatMulNBitsPass
from graphopt.passes.quantize_common import QUANTIZABLE_OPS, check_patterns, is_gated_down, linear_sites, quantized_ops
from graphopt.passes.quantize_embedding import EmbeddingQuantizePass
from graphopt.passes.quantize_qdq import QDQQuantizePass, per_channel_weight
from graphopt.passes.quantize_weights import WeightOnlyQuantizePass, snap_to_grid
from graphopt.passes.rotate import RMS_NORMS, OnlineHadamardPass, RotateResidualPass
from graphopt.passes.smooth_quant import SmoothQuantPass
from graphopt.passes.targets import TARGETS
from graphopt.ranges import METHODS as CALIBRATION_METHODS
from graphopt.ranges import QuantParams, RangeCollector, fake_quantize, quantization_parameters
from graphopt.steps import Step, StepConfig, StepOutput, check_choice, run_step

logger = logging.getLogger(__name__)

# The bits of each --head / --embedding choice (None: kept in float).
_BITS = {"auto": 8, "float": None, "int8": 8, "int4": 4}
HEAD_CHOICES = EMBEDDING_CHOICES = tuple(_BITS)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two, at least 16
# auto: the best measured method, affine for weight-only int4 (exact on Q4_1-derived weights, never
# worse than rtn on others: see passes/quantize_weights.py), rtn otherwise.
METHODS = ("auto", "rtn", "mse", "affine", "gptq")
ROTATIONS = ("auto", "none", "residual", "online")
DOWN_PROJ = ("auto", "int8-weights", "float", "w8a8")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(StepConfig):
    """Everything that decides the output model; recorded in the lineage, validated on creation.

    ``measure_windows``: also measure the perplexity of the float and the quantized model on the
    default evaluation text (that many windows of 512 tokens) into the lineage step's figures.
    """

    weights: str = "int8"
    activations: str = "none"  # weight-only: `--weights int4` alone is the whole request
    symmetric: bool = False
    reduce_range: bool = True
    calibration: str = "mse"
    percentile: float = 99.99
    block_size: int | None = None  # weight-only; None: graphopt.cpu_kernels' default for the bits
    method: str = "auto"
    head: str = "auto"
    embedding: str = "auto"
    act_order: bool = False
    awq: bool = False  # weight-only: activation-aware per-channel scales, searched on calibration data
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ("MatMul",)
    smooth: float | None = None
    # passes.rotate first: none, residual, online (+ a Hadamard before down_proj); auto, on a graph
    # with fused RMS norms: residual for W8A8 (it halves W8A8's loss on SmolLM2), online for int8
    # weight-only (the kernel's int8 activations: +0.71% -> -0.01% on SmolLM2, at 0.95x decode), none
    # otherwise (int4's affine grid is the source GGUF's, which a rotation would move off).
    rotation: str = "auto"
    # W8A8: a gated MLP's down projection, whose input carries token-wise massive activations that no
    # static range covers: weight-only int8 (MatMulNBits), float, or static w8a8 like the rest; auto:
    # int8-weights, except w8a8 in a graph fused for a standard-ONNX target (TensorRT: no contrib ops).
    down_proj: str = "auto"
    max_ppl_increase: float | None = None
    calib: CalibrationSpec = CalibrationSpec()
    measure_windows: int | None = None
    pack: bool = True  # weight-only: pack q/k/v and gate/up MatMulNBits (passes.pack_matmulnbits)

    def __post_init__(self):
        if self.method == "auto":  # resolved here, so the lineage records the method that ran
            method = "affine" if self.weights == "int4" and self.activations == "none" else "rtn"
            object.__setattr__(self, "method", method)
        self.validate()

    @property
    def scheme(self) -> str:
        if self.activations == "int8":
            if self.weights != "int8":
                raise GraphoptError(f"--activations int8 needs --weights int8 (got --weights {self.weights}); "
                                    "int4 weights run with int8 activations inside MatMulNBits already")
            return "w8a8"
        if self.activations != "none":
            raise GraphoptError(f"--activations must be int8 or none, got {self.activations}")
        if self.weights not in ("int8", "int4"):
            raise GraphoptError(f"--weights must be int8 or int4, got {self.weights}")
        return self.weights

    def validate(self) -> None:
        scheme = self.scheme
        if self.calibration not in CALIBRATION_METHODS:
            raise GraphoptError(f"unknown calibration {self.calibration!r}; choose from {', '.join(CALIBRATION_METHODS)}")
        unsupported = [op for op in self.op_types if op not in QUANTIZABLE_OPS]
        if unsupported:
            raise GraphoptError(f"cannot quantize op type {unsupported[0]}: these passes quantize "
                                f"{', '.join(QUANTIZABLE_OPS)} with a constant weight")
        check_choice("--embedding", self.embedding, EMBEDDING_CHOICES)
        if scheme == "w8a8" and self.embedding in ("int8", "int4"):
            raise GraphoptError("--embedding int8/int4 needs weight-only quantization (--activations none)")
        check_choice("--head", self.head, HEAD_CHOICES)
        if scheme == "w8a8" and self.head == "int4":
            raise GraphoptError("--head int4 needs weight-only quantization (--activations none)")
        if scheme != "w8a8" and self.smooth is not None:
            raise GraphoptError("--smooth applies to W8A8 (--activations int8)")
        if scheme == "w8a8" and self.awq:
            raise GraphoptError("--awq applies to weight-only quantization (use --smooth for W8A8)")
        if scheme != "w8a8" and self.down_proj != "auto":
            raise GraphoptError("--down-proj applies to W8A8 (--activations int8)")
        if scheme == "int8" and self.max_ppl_increase is not None:
            raise GraphoptError("--max-ppl-increase applies to W8A8 (sites kept float) and int4 (linears kept int8)")
        if self.method != "rtn" and scheme == "w8a8":
            raise GraphoptError(f"--method {self.method} applies to weight-only quantization")
        check_choice("--down-proj", self.down_proj, DOWN_PROJ)
        check_choice("--rotation", self.rotation, ROTATIONS)
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise GraphoptError("--max-ppl-increase is a percentage of at least 0")
        if self.block_size is not None:
            check_choice("--block-size", self.block_size, BLOCK_SIZES)
        check_choice("--method", self.method, METHODS)
        if (self.calib.text or self.calib.npz) and not self.needs_calibration:
            raise GraphoptError(f"--calib-text/--calib-npz: weight-only {self.method} quantization uses no calibration "
                                "data; it applies to W8A8 (--activations int8), --method gptq and --max-ppl-increase")
        if self.measure_windows is not None and self.measure_windows < 1:
            raise GraphoptError("--measure-windows must be at least 1")

    def head_bits(self) -> int | None:
        """Bits of the LM head for weight-only schemes (None keeps it in float)."""
        return _BITS[self.head]

    def embedding_bits(self) -> int | None:
        """Bits of a table the head cannot share (auto: 8); None keeps the embedding in float."""
        return None if self.scheme == "w8a8" else _BITS[self.embedding]

    def describe(self) -> dict:
        record = {"scheme": self.scheme, "weights": self.weights, "activations": self.activations,
                  "head": self.head, "exclude": list(self.exclude), "rotation": self.rotation}
        if self.scheme != "w8a8":
            record["embedding"] = self.embedding
        if self.method == "gptq":
            record["act_order"] = self.act_order
        if self.awq:
            record["awq"] = True
        if self.scheme == "w8a8":
            record.update(symmetric=self.symmetric, reduce_range=self.reduce_range, calibration=self.calibration, smooth=self.smooth,
                          max_ppl_increase=self.max_ppl_increase, down_proj=self.down_proj)
            if self.calibration == "percentile":
                record["percentile"] = self.percentile
        else:
            record.update(block_size=self.weight_block_size, method=self.method, pack=self.pack)
            if self.head_bits() is not None:
                record["head_block_size"] = self.head_block_size
        if self.needs_calibration:
            record["calibration_data"] = self.calib.describe()
        if self.measure_windows:
            record["measure_windows"] = self.measure_windows
        return record

    @property
    def weight_block_size(self) -> int:
        """The block size of weight-only quantization: the user's, else the CPU kernels' default for the bits."""
        return self.block_size or default_block_size(8 if self.weights == "int8" else 4)

    @property
    def head_block_size(self) -> int | None:
        """The LM head's block size: the user's --block-size, else the CPU kernels' default for the head's bits."""
        bits = self.head_bits()
        return None if bits is None else self.block_size or default_block_size(bits, head=True)

    @property
    def error_grid(self) -> str:
        """The grid ``snap_to_grid`` measures this method's rounding on (GPTQ rounds onto mse blocks)."""
        return {"affine": "affine", "mse": "mse", "gptq": "mse"}.get(self.method, "rtn")

    @property
    def needs_calibration(self) -> bool:
        return self.scheme == "w8a8" or self.method == "gptq" or self.awq or self.max_ppl_increase is not None


def refuse_quantized(directory: ModelDir, model: ir.Model) -> None:
    ops = quantized_ops(model)
    earlier = [step for step in directory.manifest.lineage if step.name == "quantize"]
    if ops or earlier:
        found = f"it holds {', '.join(ops)}" if ops else "its lineage has a quantize step"
        raise GraphoptError(f"{directory.path} is already quantized ({found}); quantize the float model instead")


def collect(model_path: pathlib.Path, names: list[str], sequences: list[list[int]],
            update: Callable[[str, np.ndarray], None]) -> None:
    """Stream each sequence's activations ``names`` through ``update(name, values)``; nothing is kept."""
    for activations in capture(model_path, names, sequences):
        for name, values in activations.items():
            update(name, values)


def channel_absmax(model_path: pathlib.Path, names: list[str], sequences: list[list[int]]) -> dict[str, np.ndarray]:
    absmax: dict[str, np.ndarray] = {}

    def update(name, values):
        values = np.abs(values.reshape(-1, values.shape[-1])).max(axis=0)
        if not np.isfinite(values).all():
            raise GraphoptError(f"calibration saw NaN or inf in {name}")
        absmax[name] = np.maximum(absmax[name], values) if name in absmax else values

    collect(model_path, names, sequences, update)
    return absmax


def hessians(model_path: pathlib.Path, names: list[str], sequences: list[list[int]]) -> dict[str, np.ndarray]:
    """``sum x x^T`` over all calibration tokens for each linear input (float64, ``[K, K]`` each)."""
    totals: dict[str, np.ndarray] = {}

    def update(name, values):
        rows = values.reshape(-1, values.shape[-1]).astype(np.float64)
        if not np.isfinite(rows).all():
            raise GraphoptError(f"calibration saw NaN or inf in {name}")
        totals[name] = totals.get(name, 0) + rows.T @ rows

    collect(model_path, names, sequences, update)
    return totals


def site_errors(model: ir.Model, model_path: pathlib.Path, params: dict[str, QuantParams],
                sequences: list[list[int]], head: bool, reduce_range: bool) -> dict[str, float]:
    """Squared output error of each linear site quantized alone (activation and weight), summed over tokens.

    Absolute, not relative: what a site adds to the residual stream is what hurts, and a site with
    large outputs (down_proj on outlier channels) hurts more at the same relative error.
    """
    sites = linear_sites(model.graph, head=head)
    weights = {}
    for site in sites:
        codes, scale = per_channel_weight(site.weight(), reduce_range)
        weights[site.name] = (site.weight(), codes.astype(np.float32) * scale)
    errors = {site.name: 0.0 for site in sites}
    by_activation: dict[str, list] = {}
    for site in sites:
        by_activation.setdefault(site.activation.name, []).append(site.name)

    def update(name, values):
        rows = values.reshape(-1, values.shape[-1])
        quantized_rows = fake_quantize(rows, params[name]).astype(np.float32)
        for site_name in by_activation[name]:
            weight, quantized_weight = weights[site_name]
            reference = rows @ weight
            errors[site_name] += float(((quantized_rows @ quantized_weight - reference) ** 2).sum())

    collect(model_path, list(by_activation), sequences, update)
    return errors


class QuantizeStep(Step):
    """Static W8A8 QDQ or weight-only MatMulNBits (see the module docstring)."""

    name = "quantize"
    config_type = QuantizeConfig

    def run(self, source: ModelDir, model: ir.Model, config: QuantizeConfig, work: pathlib.Path) -> StepOutput:
        refuse_quantized(source, model)
        check_patterns(model.graph, config.exclude)
        if not linear_sites(model.graph, config.exclude, head=config.head != "float"):
            raise GraphoptError(f"{source.path}: no MatMul with a constant weight left to quantize")
        sequences = []
        if config.needs_calibration:
            logger.info("calibration data: %s, %d x %d tokens", config.calib.describe()["source"], config.calib.samples,
                        config.calib.seq_len)
            sequences = calibration_sequences(source.path, config.calib)
        model_path, rotation = source.model_path, _rotate(config, model, source)
        if "rotated" in rotation and config.needs_calibration:  # calibration runs the rotated model
            model_path = _stage(model, work, "rotated")
        if config.scheme == "w8a8":
            config = dataclasses.replace(config, down_proj=_down_proj(config, source))
            model, counts, figures = _w8a8(model_path, model, config, sequences, work)
        else:
            model, counts, figures = _weight_only(model_path, model, config, sequences, work)
        return StepOutput(model, counts, {**rotation, **figures}, changes={"quantization": config.scheme})

    def check(self, source: ModelDir, written: ModelDir, config: QuantizeConfig) -> dict:
        figures = {"size_bytes": written.size_bytes()}
        if config.measure_windows:
            figures.update(measure_perplexity(source.path, written.path, config.measure_windows))
        return figures


def _rotate(config: QuantizeConfig, model: ir.Model, source: ModelDir) -> dict:
    """Run the rotation ``config`` asks for on ``model``; the figures for the lineage.

    ``auto`` is residual for W8A8 and online for weight-only int8 where the graph has fused RMS
    norms, except on weights trained for int8's grid (``graphopt distill --quantize int8``), which a
    rotation would move off it; a graph the pass refuses (a family whose norms also sit elsewhere,
    e.g. Gemma 3's sandwich norms) is left unrotated.
    """
    wanted = config.rotation
    if wanted == "auto":
        fused = any(node.op_type in RMS_NORMS for node in model.graph)
        wanted = {"w8a8": "residual", "int8": "online"}.get(config.scheme, "none") if fused else "none"
        trained = any(step.name == "distill" and step.parameters.get("quantize") == config.scheme
                      for step in source.manifest.lineage)
        if trained and wanted != "none":
            logger.info(f"not rotated: the weights were trained on {config.scheme}'s grid (QAT)")
            return {"rotation_skipped": f"trained on {config.scheme}'s grid (distill --quantize)"}
    if wanted == "none":
        return {}
    rotate = RotateResidualPass(config.calib.seed)
    try:
        rotate(model)  # plans before it changes anything: a refusal leaves the model as it was
    except GraphoptError as error:
        if config.rotation != "auto":
            raise
        logger.info(f"not rotated: {error}")
        return {"rotation_skipped": str(error)}
    figures = {"rotation": rotate.rotation, **rotate.counts}
    if wanted == "online":
        online = OnlineHadamardPass()
        online(model)
        figures["online"] = online.counts["down_proj"]
    logger.info(f"rotated: {figures}")
    return {"rotated": figures}


def _down_proj(config: QuantizeConfig, source: ModelDir) -> str:
    """``auto``: weight-only int8, unless the graph is fused for a target without ONNX Runtime's contrib ops."""
    if config.down_proj != "auto":
        return config.down_proj
    target = TARGETS.get((source.manifest.fusion or {}).get("target"))
    return "w8a8" if target is not None and not target.contrib_ops else "int8-weights"


def quantize(model_dir: str | pathlib.Path, output: str | pathlib.Path, config: QuantizeConfig = QuantizeConfig(),
             force: bool = False) -> ModelDir:
    """Quantize ``model_dir`` into a new model directory ``output`` (atomic; see the module docstring)."""
    return run_step(QuantizeStep(), model_dir, output, config, force=force).output


def measure_perplexity(reference: pathlib.Path, quantized: pathlib.Path, max_windows: int) -> dict:
    """Perplexity of both models on the default evaluation text, and their agreement."""
    window = fitting_window(ModelDir.open(reference))
    logger.info("measuring perplexity on %s (%d windows of %d)", DEFAULT_TEXT.name, max_windows, window)
    float_result = evaluate(reference, DEFAULT_TEXT, window=window, max_windows=max_windows)
    result = evaluate(quantized, DEFAULT_TEXT, window=window, reference_dir=reference, max_windows=max_windows)
    return {"eval_text": DEFAULT_TEXT.name, "eval_window": window, "eval_tokens": result.tokens,
            "perplexity_float": round(float_result.perplexity, 4), "perplexity": round(result.perplexity, 4),
            "perplexity_increase_percent": round(100 * (result.perplexity / float_result.perplexity - 1), 3),
            "token_agreement": round(result.token_agreement, 4), "mean_kl": round(result.mean_kl, 6)}


def _stage(model: ir.Model, scratch: pathlib.Path, name: str) -> pathlib.Path:
    """Save an intermediate model in the scratch directory (removed before the rename)."""
    graph_io.save(model, scratch / f"stage-{name}.onnx")
    return scratch / f"stage-{name}.onnx"


def _w8a8(model_path: pathlib.Path, model: ir.Model, config: QuantizeConfig, sequences, scratch: pathlib.Path):
    """``model_path``: where ``model`` (as it is now) can be run for calibration."""
    head = config.head != "float"
    extra: dict = {}
    names = sorted({site.activation.name for site in linear_sites(model.graph, head=head)})
    if config.smooth is not None:
        logger.info(f"SmoothQuant alpha {config.smooth}: collecting per-channel maxima")
        smooth = SmoothQuantPass(config.smooth, channel_absmax(model_path, names, sequences))
        smooth(model)
        extra["smooth_folded"] = smooth.counts
        model_path = _stage(model, scratch, "smoothed")
    logger.info(f"collecting {config.calibration} ranges of {len(names)} activations")
    collectors = {name: RangeCollector(name) for name in names}
    collect(model_path, names, sequences, lambda name, values: collectors[name].update(values))
    params = {name: quantization_parameters(*collector.range(config.calibration, config.percentile, config.symmetric),
                                            symmetric=config.symmetric)
              for name, collector in collectors.items()}
    down = [site.name for site in linear_sites(model.graph) if is_gated_down(site)]
    exclude = [*config.exclude, *(down if config.down_proj != "w8a8" else [])]
    if config.max_ppl_increase is not None:
        kept = _sensitive_sites(model, model_path, params, dataclasses.replace(config, exclude=tuple(exclude)), sequences,
                                scratch, extra)
        exclude += kept
        extra["kept_float"] = kept
    qdq = QDQQuantizePass(params, exclude, head=head, reduce_range=config.reduce_range)
    qdq(model)
    counts = dict(qdq.counts)
    if down and config.down_proj == "int8-weights":
        # Only the down projections are float sites now (QDQ took the rest): int8 weights, activations
        # quantized per block at run time inside MatMulNBits, so the first token's outliers survive.
        others = [site.name for site in linear_sites(model.graph) if site.name not in down]
        weights = WeightOnlyQuantizePass(8, config.weight_block_size, "rtn", [*others, *config.exclude], head_bits=None)
        weights(model)
        counts.update(weights.counts)
    if down:
        extra["down_proj"] = {config.down_proj: len(down)}
    return model, counts, extra


AWQ_ALPHAS = np.linspace(0.0, 1.0, 9)
AWQ_TOKENS = 512  # calibration rows per activation the search multiplies through


def awq_factors(model_path: pathlib.Path, model: ir.Model, config: QuantizeConfig, sequences) -> tuple[dict, dict]:
    """AWQ (Lin et al. 2024): per input channel ``s = mean|x|^alpha``, alpha searched per activation.

    For each activation feeding linears, the alpha in ``AWQ_ALPHAS`` whose ``W diag(s)`` rounded to
    the method's grid (then divided back) gives the smallest output error ``||X (W_q - W)||`` summed
    over its linears; alpha 0 (no scaling) is a candidate, so the search never makes the calibration
    error worse. Returns ``({activation: s}, {activation: alpha})`` for the activations that scale.
    """
    bits = 8 if config.scheme == "int8" else 4
    grid = config.error_grid
    groups: dict[str, list] = {}
    for site in linear_sites(model.graph, config.exclude, head=False):
        groups.setdefault(site.activation.name, []).append(site)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in groups}

    def keep(name, values):
        if sum(len(block) for block in rows[name]) < AWQ_TOKENS:
            rows[name].append(values.reshape(-1, values.shape[-1]).astype(np.float32))

    logger.info(f"AWQ: searching scales for {len(groups)} layer inputs on {AWQ_TOKENS} calibration tokens")
    collect(model_path, list(groups), sequences, keep)
    factors, alphas = {}, {}
    for name, sites in groups.items():
        x = np.concatenate(rows[name])[:AWQ_TOKENS]
        magnitude = np.maximum(np.abs(x).mean(axis=0), 1e-6)
        weights = [site.weight() for site in sites]

        def error(scale):
            return sum(float(np.sum((x @ (snap_to_grid(weight * scale[:, None], bits, config.weight_block_size, grid)
                                          / scale[:, None] - weight)) ** 2)) for weight in weights)

        best = min(AWQ_ALPHAS, key=lambda alpha: error(_awq_scale(magnitude, alpha)))
        if best > 0:
            factors[name], alphas[name] = _awq_scale(magnitude, best), round(float(best), 3)
    return factors, alphas


def _awq_scale(magnitude: np.ndarray, alpha: float) -> np.ndarray:
    scale = magnitude.astype(np.float64) ** alpha
    return (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)  # centred: weights keep their range


def _weight_pass(config: QuantizeConfig, layer_hessians, site_bits: dict[str, int]):
    return WeightOnlyQuantizePass(8 if config.scheme == "int8" else 4, config.weight_block_size, config.method,
                                  config.exclude, config.head_bits(), layer_hessians if config.method == "gptq" else None,
                                  act_order=config.act_order, head_block_size=config.head_block_size,
                                  site_bits=site_bits)


def _int8_linears(model_path: pathlib.Path, model: ir.Model, config: QuantizeConfig, sequences, layer_hessians,
                  scratch: pathlib.Path, extra: dict) -> list[str]:
    """The int4 linears to keep int8 so the calibration perplexity rises at most ``max_ppl_increase`` %.

    Ranked by the output error their int4 rounding causes on the calibration tokens,
    ``trace(dW^T H dW)`` with ``H = sum x x^T`` of the linear's input (GPTQ ranked on its MSE grid).
    """
    errors = {}
    for site in linear_sites(model.graph, config.exclude, head=False):
        weight = site.weight()
        delta = (weight - snap_to_grid(weight, 4, config.weight_block_size, config.error_grid)).astype(np.float64)
        errors[site.name] = float(np.sum((layer_hessians[site.activation.name] @ delta) * delta))

    def quantize_keeping(candidate: ir.Model, kept: list[str]) -> None:
        _weight_pass(config, layer_hessians, {name: 8 for name in kept})(candidate)

    return _keep_fewest(sorted(errors, key=lambda name: -errors[name]), quantize_keeping, "int8", model_path,
                        config, sequences, scratch, extra, bisect=True)


def _sensitive_sites(model, model_path, params, config, sequences, scratch, extra) -> list[str]:
    """Names of the sites to keep in float so the calibration perplexity rises at most ``max_ppl_increase`` %."""
    head = config.head != "float"
    errors = site_errors(model, model_path, params, sequences[:2], head, config.reduce_range)

    def quantize_keeping(candidate: ir.Model, kept: list[str]) -> None:
        QDQQuantizePass(params, [*config.exclude, *kept], head=head, reduce_range=config.reduce_range)(candidate)

    ranked = [name for name in sorted(errors, key=lambda name: -errors[name]) if name not in config.exclude]
    return _keep_fewest(ranked, quantize_keeping, "in float", model_path, config, sequences, scratch, extra)


def _keep_fewest(ranked: list[str], quantize_keeping: Callable[[ir.Model, list[str]], None], kept_as: str,
                 model_path: pathlib.Path, config: QuantizeConfig, sequences, scratch: pathlib.Path, extra: dict,
                 bisect: bool = False) -> list[str]:
    """The shortest head of ``ranked`` to keep out of the quantization (``quantize_keeping(model, kept)``
    quantizes a fresh copy of ``model_path``) for the calibration perplexity to rise at most
    ``max_ppl_increase`` %: counts 0, 1, 2, 4, ... until one meets the bound, then with ``bisect`` the
    count bisected between the last miss and that (to 1/32 of the list)."""
    baseline = sequences_perplexity(model_path, sequences)
    extra["calibration_perplexity_float"] = round(baseline, 4)

    def perplexity_with(count: int) -> float:
        candidate = graph_io.load(model_path)
        quantize_keeping(candidate, ranked[:count])
        perplexity = sequences_perplexity(_stage(candidate, scratch, "candidate"), sequences)
        logger.info(f"{count} linear(s) kept {kept_as}: calibration perplexity {perplexity:.3f} "
                    f"({100 * (perplexity / baseline - 1):+.2f}%)")
        return perplexity

    def meets(perplexity: float) -> bool:
        return 100 * (perplexity / baseline - 1) <= config.max_ppl_increase

    missed, count = -1, 0
    perplexity = perplexity_with(count)
    while not meets(perplexity) and count < len(ranked):
        missed, count = count, min(len(ranked), max(1, 2 * count))
        perplexity = perplexity_with(count)
    if not meets(perplexity):
        logger.warning(f"--max-ppl-increase {config.max_ppl_increase:g}: not met even with every linear kept {kept_as}")
    while bisect and meets(perplexity) and missed >= 0 and count - missed > max(1, len(ranked) // 32):
        middle = (missed + count) // 2
        trial = perplexity_with(middle)
        if meets(trial):
            count, perplexity = middle, trial
        else:
            missed = middle
    extra["calibration_perplexity_quantized"] = round(perplexity, 4)
    return ranked[:count]


def _weight_only(model_path: pathlib.Path, model: ir.Model, config: QuantizeConfig, sequences, scratch: pathlib.Path):
    """``model_path``: where ``model`` (as it is now) can be run for calibration."""
    bits = 8 if config.scheme == "int8" else 4
    head_bits = config.head_bits()
    extra: dict = {}
    if config.awq:
        factors, alphas = awq_factors(model_path, model, config, sequences)
        scaling = SmoothQuantPass(0.0, {}, factors=factors)
        scaling(model)
        # o_proj's input (the attention output) has no scale before it to fold into: not scaled.
        extra["awq_alpha"] = {name: alpha for name, alpha in alphas.items() if name not in scaling.skipped}
        extra["awq_folded"] = scaling.counts
        model_path = _stage(model, scratch, "awq")  # what GPTQ and the sensitivity search then run
    layer_hessians = None
    if config.method == "gptq" or config.max_ppl_increase is not None:
        names = sorted({site.activation.name for site in linear_sites(model.graph, config.exclude, head=False)})
        logger.info(f"collecting Hessians of {len(names)} layer inputs")
        layer_hessians = hessians(model_path, names, sequences)
    site_bits = {}
    if config.max_ppl_increase is not None:
        site_bits = {name: 8 for name in _int8_linears(model_path, model, config, sequences, layer_hessians, scratch, extra)}
        extra["kept_int8"] = sorted(site_bits)
    logger.info(f"quantizing weights to int{bits}, block {config.weight_block_size}, {config.method}"
                + ("" if head_bits == bits else f", LM head {'float' if head_bits is None else f'int{head_bits}'}")
                + (f", {len(site_bits)} linear(s) int8" if site_bits else ""))
    weights = _weight_pass(config, layer_hessians, site_bits)
    weights(model)
    counts = dict(weights.counts)
    errors = weights.errors
    if errors:
        worst = max(errors, key=errors.get)
        extra["weight_error_mean"] = round(float(np.mean(list(errors.values()))), 6)
        extra["weight_error_max"] = {worst: round(errors[worst], 6)}
    embedding_bits = config.embedding_bits()
    if embedding_bits is not None:
        embedding = EmbeddingQuantizePass(embedding_bits, config.head_block_size or config.weight_block_size)
        embedding(model)
        counts.update(embedding.counts)
    if config.pack:
        # Last: packing needs every linear's final MatMulNBits (and the embedding's shared codes) in place.
        packer = PackMatMulNBitsPass()
        packer(model)
        extra["packed"] = packer.counts
    return model, counts, extra
