"""Quality of a model directory: perplexity on a text, and agreement with a reference model.

Perplexity follows one fixed protocol so figures compare across models: the text is tokenized
with the model's tokenizer as is (no special tokens added), cut into windows of ``window + 1``
tokens starting every ``window`` tokens; each window runs from an empty cache and scores its
``window`` next-token predictions. Needs no torch.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Callable

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.modeldir import ModelDir
from graphopt.runtime.decoder import Decoder
from graphopt.runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_TEXT = pathlib.Path(__file__).parent / "data" / "eval-gpl3.txt"


def read_text(path: str | pathlib.Path) -> str:
    """Read a UTF-8 text file, refusing binary files with a clear error."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise GraphoptError(f"{path}: no such file")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise GraphoptError(f"{path}: looks like a binary file, expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GraphoptError(f"{path}: not UTF-8 text") from None


def text_windows(token_ids: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    """Windows of ``window + 1`` tokens starting every ``window`` tokens (the last partial one dropped)."""
    starts = range(0, len(token_ids) - window, window)
    windows = [token_ids[start:start + window + 1] for start in starts]
    return windows[:max_windows] if max_windows else windows


def fitting_window(directory: ModelDir, window: int = 512) -> int:
    """``window``, shortened to what the model's context takes (a window runs ``window + 1`` tokens)."""
    return min(window, directory.manifest.max_positions - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sequence_logprobs(decoder: Decoder, ids: list[int]) -> tuple[np.ndarray, float]:
    """Log-probabilities of every next token of ``ids`` from an empty cache, and their negative sum."""
    decoder.reset()
    logprobs = log_softmax(decoder.forward(ids[:-1]))
    return logprobs, -float(logprobs[np.arange(len(ids) - 1), ids[1:]].sum())


def perplexity(logprobs_of: Callable[[list[int]], np.ndarray], sequences: list[list[int]]) -> float:
    """Perplexity over ``sequences``; ``logprobs_of(ids)`` gives the log-probabilities after each of ``ids[:-1]``."""
    nll = sum(-float(logprobs_of(ids)[np.arange(len(ids) - 1), ids[1:]].sum()) for ids in sequences)
    return float(np.exp(nll / sum(len(ids) - 1 for ids in sequences)))


def sequences_perplexity(model_path: str | pathlib.Path, sequences: list[list[int]], ep: str = "cpu") -> float:
    """Perplexity over ``sequences``, each scored from an empty cache."""
    decoder = Decoder(model_path, ep=ep)
    return perplexity(lambda ids: sequence_logprobs(decoder, ids)[0], sequences)


def forward_chunks(decoder: Decoder, ids: list[int], splits: tuple[int, ...]) -> list[np.ndarray]:
    """From an empty cache, ``ids[:splits[0]]``, then each further chunk on the cache; each chunk's logits."""
    decoder.reset()
    bounds = [0, *splits, len(ids)]
    return [decoder.forward(ids[start:end]) for start, end in zip(bounds, bounds[1:])]


def compare_logits(reference: str | pathlib.Path, candidate: str | pathlib.Path, vocab_size: int, ep: str = "cpu",
                   seed: int = 0, kept: np.ndarray | None = None) -> dict[str, float | bool]:
    """Both graphs on the same 12 random tokens: prefill 8, decode 1, a 3-token forward on the cache.

    Returns the max |logits diff| per phase and overall, the reference's max |logit|, argmax
    agreement and whether the candidate's logits are finite: the numeric check of every step that
    rewrites a graph without meaning to change what it computes. ``kept``: compare only these
    token ids' logits (a draft head cut to fewer tokens).
    """
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=12).tolist()
    phases = ("prefill", "decode", "multi_token")
    outputs = [[logits if kept is None else logits[..., kept] for logits in forward_chunks(Decoder(path, ep=ep), ids, (8, 9))]
               for path in (reference, candidate)]
    figures: dict[str, float | bool] = {f"max_abs_logits_diff_{phase}": float(np.abs(a - b).max())
                                        for phase, a, b in zip(phases, *outputs)}
    reference_logits, candidate_logits = (np.concatenate(logits) for logits in outputs)
    figures.update(max_abs_logits_diff=float(np.abs(reference_logits - candidate_logits).max()),
                   max_abs_logits=float(np.abs(reference_logits).max()),
                   argmax_agreement=float((reference_logits.argmax(-1) == candidate_logits.argmax(-1)).mean()),
                   finite=bool(np.isfinite(candidate_logits).all()))
    return figures


@dataclasses.dataclass
class Evaluation:
    """Perplexity over scored tokens; agreement and KL against a reference when one was given."""

    perplexity: float
    tokens: int
    windows: int
    window: int
    token_agreement: float | None = None
    mean_kl: float | None = None

    def to_json(self) -> dict:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


def evaluate(model_dir: str | pathlib.Path, text_path: str | pathlib.Path = DEFAULT_TEXT, window: int = 512,
             reference_dir: str | pathlib.Path | None = None, max_windows: int | None = None, ep: str = "cpu"
             ) -> Evaluation:
    """Perplexity of ``model_dir`` on the text; with ``reference_dir``, greedy agreement and mean KL(ref || model).

    Agreement is the fraction of scored positions where both models' argmax next token is the same;
    KL is averaged over the same positions.
    """
    directory = ModelDir.open(model_dir)
    if window < 1:
        raise GraphoptError("window must be at least 1 token")
    tokenizer = Tokenizer(directory.path)
    token_ids = tokenizer.encode(read_text(text_path))
    windows = text_windows(token_ids, window, max_windows)
    if not windows:
        raise GraphoptError(f"{text_path}: {len(token_ids)} tokens, too short for one window of {window + 1}")
    max_positions = directory.manifest.max_positions
    if window + 1 > max_positions:
        raise GraphoptError(f"window {window} exceeds the model's context of {max_positions}")
    decoder = Decoder(directory.model_path, ep=ep)
    reference = None
    if reference_dir is not None:
        reference_directory = ModelDir.open(reference_dir)
        if Tokenizer(reference_directory.path).encode(read_text(text_path)) != token_ids:
            raise GraphoptError("the reference model tokenizes the text differently; compare models with one tokenizer")
        reference = Decoder(reference_directory.model_path, ep=ep)
    negative_log_likelihood = 0.0
    agreeing = 0
    kl_total = 0.0
    scored = 0
    for index, ids in enumerate(windows):
        logprobs, nll = sequence_logprobs(decoder, ids)
        negative_log_likelihood += nll
        if reference is not None:
            reference_logprobs, _ = sequence_logprobs(reference, ids)
            agreeing += int((reference_logprobs.argmax(-1) == logprobs.argmax(-1)).sum())
            kl_total += float((np.exp(reference_logprobs) * (reference_logprobs - logprobs)).sum())
        scored += len(ids) - 1
        logger.info("perplexity window %d/%d", index + 1, len(windows))
    return Evaluation(perplexity=float(np.exp(negative_log_likelihood / scored)), tokens=scored, windows=len(windows),
                      window=window, token_agreement=None if reference is None else agreeing / scored,
                      mean_kl=None if reference is None else kl_total / scored)
