"""Calibration sequences for quantization and pruning: from a text file, an .npz, or the model itself.

Every source yields lists of token ids of one length (``seq_len``), deterministic for a seed.
The data-free default samples continuations from the unquantized model from a few seed prompts,
so calibration needs nothing but the model directory.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.evaluate import read_text, text_windows
from graphopt.modeldir import ModelDir
from graphopt.runtime import Generator, Sampling
from graphopt.runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SEED_PROMPTS = (
    "The history of the city begins",
    "In mathematics, a function is",
    "Here is a short story about a robot:",
    "def fibonacci(n):",
    "The weather today is",
    "Scientists have discovered that",
    "Question: What is the capital of France?\nAnswer:",
    "Once upon a time,",
)


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration data comes from and how much of it; recorded in the lineage."""

    text: str | None = None
    npz: str | None = None
    samples: int = 16
    seq_len: int = 128
    seed: int = 0

    def describe(self) -> dict:
        source = "text" if self.text else "npz" if self.npz else "self-generated"
        return {"source": source, "path": self.text or self.npz, "samples": self.samples, "seq_len": self.seq_len,
                "seed": self.seed}


def calibration_sequences(model_dir: str | pathlib.Path, spec: CalibrationSpec) -> list[list[int]]:
    """``spec.samples`` sequences of ``spec.seq_len`` token ids for the model in ``model_dir``."""
    if spec.samples < 1 or spec.seq_len < 2:
        raise GraphoptError("calibration needs at least 1 sample of at least 2 tokens")
    if spec.text and spec.npz:
        raise GraphoptError("give either --calib-text or --calib-npz, not both")
    if spec.text:
        return _from_text(model_dir, spec)
    if spec.npz:
        return _from_npz(spec, ModelDir.open(model_dir).manifest.vocab_size)
    return _self_generated(model_dir, spec)


def _from_text(model_dir, spec: CalibrationSpec) -> list[list[int]]:
    token_ids = Tokenizer(ModelDir.open(model_dir).path).encode(read_text(spec.text))
    windows = [window[:spec.seq_len] for window in text_windows(token_ids, spec.seq_len)]
    if not windows:
        raise GraphoptError(f"{spec.text}: {len(token_ids)} tokens, too short for one calibration window of "
                            f"{spec.seq_len + 1} tokens")
    rng = np.random.default_rng(spec.seed)
    if len(windows) > spec.samples:
        picked = sorted(rng.choice(len(windows), size=spec.samples, replace=False).tolist())
        windows = [windows[index] for index in picked]
    return windows


def _from_npz(spec: CalibrationSpec, vocab_size: int) -> list[list[int]]:
    """Token ids from an .npz archive (``input_ids``, or its first array), checked against the vocabulary."""
    path = pathlib.Path(spec.npz)
    if not path.is_file():
        raise GraphoptError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise GraphoptError(f"{path}: not an .npz archive (a plain .npy array? save it with numpy.savez)")
        with archive:
            if not archive.files:
                raise GraphoptError(f"{path}: the archive holds no array")
            ids = np.asarray(archive["input_ids" if "input_ids" in archive.files else archive.files[0]])
    except (ValueError, OSError, EOFError) as error:
        raise GraphoptError(f"{path}: not a readable .npz of token ids ({str(error).splitlines()[0]})") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise GraphoptError(f"{path}: expected an integer array (samples, seq_len), got {ids.dtype} {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] < 2:
        raise GraphoptError(f"{path}: calibration rows need at least 2 tokens, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise GraphoptError(f"{path}: token ids must lie in [0, {vocab_size}) for this model, found "
                            f"{int(ids.min())}..{int(ids.max())}")
    return [row[:spec.seq_len].tolist() for row in ids[:spec.samples]]


def _self_generated(model_dir, spec: CalibrationSpec) -> list[list[int]]:
    """Sample continuations from the model itself (temperature 1, top-p 0.95) from seed prompts."""
    generator = Generator(model_dir)
    sequences = []
    for index in range(spec.samples):
        prompt = generator.encode_prompt(SEED_PROMPTS[index % len(SEED_PROMPTS)])
        budget = max(1, spec.seq_len - len(prompt))
        sampling = Sampling(temperature=1.0, top_p=0.95, seed=spec.seed * 1000 + index)
        result = generator.generate(prompt, max_new_tokens=budget, sampling=sampling, stop_on_eos=False)
        sequences.append((prompt + result.token_ids)[:spec.seq_len])
    return sequences
