"""The ``vocabulary`` step: a draft's LM head cut to the tokens it is likely to propose.

The target verifies every proposal with its own full head, so a draft that scores fewer tokens
changes how often it is accepted, never what speculative decoding outputs. Which tokens: the
``size`` most frequent in text the source model itself samples from distillation's seed prompts
(``sample_tokens`` of it, through ONNX Runtime, so a fused draft works too) or in a counts file (``counts``: a ``.npy`` of one count per token
id), ties broken by the lower id (byte-level BPE gives frequent merges low ids); the special tokens
(BOS, EOS) are always kept. See :mod:`graphopt.passes.draft_vocabulary` for the graph.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError, ValidationError
from graphopt.evaluate import compare_logits
from graphopt.modeldir import ModelDir
from graphopt.passes.draft_vocabulary import KEPT_IDS, RestrictHeadVocabulary, coverage, frequent_tokens
from graphopt.steps import Step, StepConfig, StepOutput, StepRecord, run_step

logger = logging.getLogger(__name__)

SAMPLE_LENGTH = 256  # tokens per sampled answer


@dataclasses.dataclass(frozen=True)
class VocabularyConfig(StepConfig):
    """How many tokens the head keeps, and where their frequencies come from."""

    size: int = 8192
    counts: str | None = None  # .npy of per-token counts; None: sample from the source model
    sample_tokens: int = 8192
    seed: int = 0
    tolerance: float = 1e-3  # max |logits diff| of the kept tokens against the source

    def __post_init__(self):
        if self.size < 1:
            raise GraphoptError(f"the draft vocabulary size must be positive, got {self.size}")
        if self.counts is None and self.sample_tokens < 1:
            raise GraphoptError(f"sample_tokens must be positive, got {self.sample_tokens}")
        if not self.tolerance > 0:
            raise GraphoptError(f"the tolerance must be positive, got {self.tolerance}")
        if self.counts is not None and not pathlib.Path(self.counts).is_file():
            raise GraphoptError(f"token counts file {self.counts} does not exist")


def token_counts(source: ModelDir, config: VocabularyConfig) -> np.ndarray:
    """Per-token-id counts: the counts file, or what the source model generates from distillation's
    seed prompts (sampled at temperature 1, top-p 0.95 within the top 128, as distillation samples; any graph, fused too)."""
    vocab = source.manifest.vocab_size
    if config.counts is not None:
        try:
            counts = np.load(config.counts, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise GraphoptError(f"{config.counts}: not a numpy array of token counts ({error})") from None
        if counts.ndim != 1 or len(counts) != vocab or not np.issubdtype(counts.dtype, np.number):
            raise GraphoptError(f"{config.counts}: expected {vocab} numeric counts, got shape {counts.shape}")
        return counts
    from graphopt.distill import TOP_K, seed_prompts
    from graphopt.runtime import Generator, Sampling

    logger.info("sampling %d tokens from %s to count token frequencies", config.sample_tokens, source.path)
    generator = Generator(source.path)
    prompts = [prompt for prompt in seed_prompts(source.path) if len(prompt) < generator.max_positions - 16]
    if not prompts:
        raise GraphoptError(f"{source.path}: its context ({generator.max_positions}) is too short to sample from; "
                            "give --counts")
    counts = np.zeros(vocab, dtype=np.int64)
    counted, index = 0, 0
    while counted < config.sample_tokens:
        length = min(SAMPLE_LENGTH, config.sample_tokens - counted)
        prompt = prompts[index % len(prompts)]
        length = min(length, generator.max_positions - len(prompt))
        sampling = Sampling(temperature=1.0, top_k=TOP_K, top_p=0.95, seed=config.seed * 100_003 + index)
        tokens = generator.generate(prompt, length, sampling, stop_on_eos=False).token_ids
        np.add.at(counts, np.asarray(tokens, dtype=np.int64), 1)
        counted, index = counted + len(tokens), index + 1
    return counts


class VocabularyStep(Step):
    """The LM head keeps its ``size`` most frequent tokens (a draft for speculative decoding)."""

    name = "vocabulary"
    config_type = VocabularyConfig

    def refuse(self, source: ModelDir, config: VocabularyConfig) -> None:
        if source.manifest.quantization:
            raise GraphoptError(f"{source.path} is quantized; cut the vocabulary of the float model, then quantize")

    def run(self, source: ModelDir, model: ir.Model, config: VocabularyConfig, work) -> StepOutput:
        manifest = source.manifest
        if config.size >= manifest.vocab_size:
            logger.info("the head keeps all %d tokens (size %d)", manifest.vocab_size, config.size)
            return StepOutput(model, {"kept_tokens": manifest.vocab_size}, {"kept": manifest.vocab_size}, False)
        counts = token_counts(source, config)
        special = [token for token in (manifest.bos_token_id, *manifest.eos_token_ids) if token is not None]
        keep = frequent_tokens(counts, config.size, always=special)
        result = RestrictHeadVocabulary(keep)(model)
        seen = int(np.count_nonzero(counts))
        logger.info("head keeps %d of %d tokens (%d distinct among the %d counted, %.1f%% of them kept)",
                    len(keep), manifest.vocab_size, seen, int(np.sum(counts)), 100 * coverage(counts, keep))
        figures = {"kept": int(len(keep)), "vocab_size": manifest.vocab_size, "counted_tokens": int(np.sum(counts)),
                   "distinct_counted": seen}
        return StepOutput(model, {"kept_tokens": int(len(keep))}, figures, result.modified)

    def check(self, source: ModelDir, written: ModelDir, config: VocabularyConfig) -> dict:
        kept = _kept_ids(written)
        if kept is None:
            return {}
        figures = compare_logits(source.model_path, written.model_path, source.manifest.vocab_size, kept=kept)
        if figures["max_abs_logits_diff"] > config.tolerance:
            raise ValidationError(f"the kept tokens' logits moved by {figures['max_abs_logits_diff']:.3g} "
                                  f"(> {config.tolerance:g})")
        return {"max_abs_logits_diff_kept": figures["max_abs_logits_diff"]}


def _kept_ids(model_dir: ModelDir) -> np.ndarray | None:
    from graphopt import ir as graph_ir

    value = graph_ir.load(model_dir.model_path).graph.initializers.get(KEPT_IDS)
    return None if value is None else value.const_value.numpy()


def restrict_vocabulary(model_dir: str | os.PathLike, output: str | os.PathLike, size: int = 8192,
                        force: bool = False, **parameters) -> StepRecord:
    """MODEL_DIR with its LM head cut to ``size`` tokens, into ``output`` (``parameters``: :class:`VocabularyConfig`)."""
    return run_step(VocabularyStep(), model_dir, output, VocabularyConfig(size=size, **parameters), force=force)
