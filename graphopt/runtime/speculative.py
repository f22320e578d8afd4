"""Speculative decoding over two ONNX Runtime decoders: a cheap draft proposes, the target verifies.

Each step the draft proposes ``gamma`` tokens one at a time; the target scores all of them in one
multi-token forward on its KV cache; the agreeing prefix is kept, both caches roll back to it
(``Decoder.truncate``) and the target's own next token is appended (a correction after a
rejection, a bonus token when every proposal was accepted). Greedy output is the target's greedy
output token for token; sampled output follows the target's distribution exactly (Leviathan et
al. 2022, Chen et al. 2023: accept a proposal with min(1, p/q), else sample from
norm(max(0, p - q))), with p and q both from :func:`graphopt.runtime.sampling.probabilities`.

Batch-1 decode is bound by reading weights, so a target forward over gamma + 1 tokens costs about
what one token costs; every accepted proposal is a target weight read saved. When measured draft
cost and acceptance say that speculation loses to plain decoding, the generator decodes plainly
for a while and then tries again.

Only ``Decoder.forward / truncate / reset / length`` touch the caches, so keeping them on a device
(IOBinding) is a change inside ``Decoder`` alone.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Callable, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.modeldir import ModelDir
from graphopt.runtime.generator import GenerationResult, Generator
from graphopt.runtime.sampling import GREEDY, Sampling, probabilities, sample

logger = logging.getLogger(__name__)

DEFAULT_GAMMA = 4
# Greedy, gamma "auto": the draft keeps proposing while the chance that all its proposals so far
# are accepted (the product of its own top probabilities), times the usual acceptance, pays for
# one more draft step and verify slot in saved target steps. Before those costs are measured, the
# chance must stay above this: the best fixed threshold for the distilled SmolLM2 draft on 2 cores
# (tools/draft_confidence.py, 768 positions of its greedy agreement replayed: 1.63x against 1.53x
# for the best fixed gamma).
DEFAULT_CONFIDENCE = 0.3


def check_same_vocabulary(target: ModelDir, draft: ModelDir) -> None:
    """Refuse a draft whose token ids would mean something else to the target.

    Raises:
        GraphoptError: the manifests' ``vocab_size`` or the tokenizers' token -> id maps differ.
    """
    target_size, draft_size = target.manifest.vocab_size, draft.manifest.vocab_size
    if target_size != draft_size:
        raise GraphoptError(f"draft {draft.path} has vocab_size {draft_size}, target {target.path} has {target_size}; "
                            "a draft must share the target's tokenizer")
    target_vocab, draft_vocab = _vocabulary(target), _vocabulary(draft)
    if target_vocab != draft_vocab:
        differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1])
        token, index = differing[0]
        raise GraphoptError(f"draft {draft.path} and target {target.path} have different tokenizers "
                            f"({len(differing)} token/id pairs differ, e.g. {token!r} -> {index}); "
                            "a draft must share the target's tokenizer")


def _vocabulary(model_dir: ModelDir) -> dict[str, int]:
    from tokenizers import Tokenizer

    path = model_dir.path / "tokenizer.json"
    if not path.is_file():
        raise GraphoptError(f"{model_dir.path}: no tokenizer.json, so draft and target cannot be checked "
                            "for a shared vocabulary")
    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


@dataclasses.dataclass
class GammaPolicy:
    """How many tokens the draft proposes next.

    Adaptive: one more after a step where all were accepted (up to the gamma that measured costs
    say is best), one fewer when the first rejection came in the first half of the proposals.
    """

    gamma: int = DEFAULT_GAMMA
    adaptive: bool = True
    min_gamma: int = 1
    max_gamma: int = 12

    def update(self, proposed: int, accepted: int, ceiling: int | None = None) -> None:
        """Adjust after a step; ``ceiling`` is the gamma beyond which measured costs say it loses."""
        if not self.adaptive or proposed == 0 or proposed < self.gamma:
            return  # a step shortened by the token budget says nothing about the draft
        if accepted == proposed:
            self.gamma = min(self.gamma + 1, self.max_gamma, max(ceiling or self.max_gamma, self.min_gamma))
        elif 2 * accepted < proposed:
            self.gamma = max(self.gamma - 1, self.min_gamma)


class CostCheck:
    """Compares measured speculative tokens/s with plain decoding tokens/s; says when to fall back.

    Plain cost is the time of a one-token target forward (probed with a few plain steps when none
    has been measured yet). Speculative speed is tokens delivered over time spent, draft included,
    over the last ``window`` speculative steps. When that is below ``margin`` times plain speed the
    generator decodes plainly for ``backoff`` tokens (doubled after each failed retry).
    """

    def __init__(self, window: int = 8, probe_steps: int = 3, first_backoff: int = 16, max_backoff: int = 256,
                 margin: float = 0.9):
        self.window = window
        self.margin = margin
        self.probe_steps = probe_steps
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.plain_step_s: float | None = None
        self.draft_token_s: float | None = None
        self.verify_slope_s: float | None = None
        self._accepted = self._trials = 0.0
        self.reset()

    def reset(self) -> None:
        self._speculative = collections.deque(maxlen=self.window)
        self._backoff = self.first_backoff
        # Probe plain decoding first when it was never measured; the measurement outlives the call.
        self._plain_left = self.probe_steps if self.plain_step_s is None else 0

    def plain_now(self) -> bool:
        """Whether the next step should be a plain one-token target step."""
        return self._plain_left > 0

    def record_plain(self, seconds: float) -> None:
        # An average, not the fastest probe: on a shared machine the fastest is a lucky outlier.
        self.plain_step_s = seconds if self.plain_step_s is None else 0.7 * self.plain_step_s + 0.3 * seconds
        if self._plain_left > 0:
            self._plain_left -= 1
            if self._plain_left == 0:
                self._speculative.clear()

    def record_costs(self, gamma: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """Per-step measurements behind :meth:`best_gamma`: draft time per token, verify time, acceptance."""
        decay = 0.9
        self._accepted = decay * self._accepted + accepted
        # A step ends at its first rejection: ``accepted`` successes then one failure, unless all passed.
        self._trials = decay * self._trials + accepted + (accepted < gamma)
        per_token = draft_s / gamma
        self.draft_token_s = per_token if self.draft_token_s is None else 0.8 * self.draft_token_s + 0.2 * per_token
        if self.plain_step_s is not None:
            slope = max(verify_s - self.plain_step_s, 0.0) / gamma
            self.verify_slope_s = slope if self.verify_slope_s is None else 0.8 * self.verify_slope_s + 0.2 * slope

    def best_gamma(self, limit: int) -> int | None:
        """The gamma that maximises expected tokens per second, from the measured costs; None until measured.

        With per-token acceptance ``a``, a step proposing ``g`` tokens delivers
        ``(1 - a^(g+1)) / (1 - a)`` tokens and costs ``g * draft + plain + g * slope`` (a target
        forward of ``g + 1`` tokens costs about one token's weight read plus a little per token).
        """
        measured = (self.plain_step_s, self.draft_token_s, self.verify_slope_s)
        if any(value is None for value in measured) or self._trials < 4:
            return None
        acceptance = min(self._accepted / self._trials, 0.999)

        def tokens_per_s(gamma: int) -> float:
            delivered = (1 - acceptance ** (gamma + 1)) / (1 - acceptance)
            return delivered / (gamma * (self.draft_token_s + self.verify_slope_s) + self.plain_step_s)

        return max(range(1, limit + 1), key=tokens_per_s)

    def keep_drafting(self, chance: float) -> bool:
        """Whether one more proposal pays, when the draft puts ``chance`` on all proposals so far being accepted.

        The next proposal is accepted with about the measured per-token acceptance times ``chance``
        and then saves a target step; it costs a draft step and a verify slot.
        """
        measured = (self.plain_step_s, self.draft_token_s, self.verify_slope_s)
        if any(value is None for value in measured) or self._trials < 4:
            return chance >= DEFAULT_CONFIDENCE
        acceptance = self._accepted / self._trials
        return chance * acceptance * self.plain_step_s >= self.draft_token_s + self.verify_slope_s

    def hopeless(self) -> bool:
        """Whether a draft that is always right would still lose, on its measured cost alone.

        With every proposal accepted a step delivers ``g + 1`` tokens for ``g * draft + plain``
        seconds; over ``g >= 1`` that peaks at ``max(2 / (draft + plain), 1 / draft)``. When even
        that is below ``margin`` times plain speed (a draft costing over ~1.2 target steps per
        token, as a host-bound draft beside a CUDA-graph target does), waiting for a full window of
        evidence only adds loss.
        """
        if self.plain_step_s is None or self.draft_token_s is None:
            return False
        draft = self.draft_token_s + (self.verify_slope_s or 0.0)
        ceiling = max(2 / (draft + self.plain_step_s), 1 / draft)
        return ceiling < self.margin / self.plain_step_s

    def record_speculative(self, tokens: int, seconds: float) -> None:
        self._speculative.append((tokens, seconds))
        if self.plain_step_s is None:
            return
        tokens_total = sum(count for count, _ in self._speculative)
        seconds_total = sum(spent for _, spent in self._speculative)
        if self.hopeless():
            # A cost, not noise: retrying soon would only pay it again.
            self._backoff = self.max_backoff
            self._fall_back(tokens_total / seconds_total)
        elif len(self._speculative) < self._speculative.maxlen // 2:
            return
        # Otherwise fall back only on a clear loss: timing noise should not throw away a real gain.
        elif tokens_total / seconds_total < self.margin / self.plain_step_s:
            self._fall_back(tokens_total / seconds_total)
        elif len(self._speculative) == self._speculative.maxlen:
            self._backoff = self.first_backoff

    def _fall_back(self, speculative_rate: float) -> None:
        logger.debug("speculation at %.1f tokens/s loses to plain decoding at %.1f; plain for %d tokens",
                    speculative_rate, 1.0 / self.plain_step_s, self._backoff)
        self._plain_left = self._backoff
        self._backoff = min(2 * self._backoff, self.max_backoff)
        self._speculative.clear()


class SpeculativeGenerator:
    """Generates with ``target``'s output, using ``draft`` to propose tokens the target verifies.

    Args:
        target: the model directory (or a ready :class:`Generator`) whose output is produced.
        draft: a model directory (or :class:`Generator`) with the same tokenizer, cheaper to run.
        gamma: tokens proposed per step, an int (fixed) or ``"auto"``: greedy, the draft proposes
            while its own confidence says another proposal pays (up to ``max_gamma``); sampled,
            adaptive from 4.
        ep: execution provider of the target; ``draft_ep`` that of the draft (default: ``ep``).
        fallback: decode plainly while measured speculation is slower than plain decoding.

    Example:
        >>> generator = SpeculativeGenerator("smollm2-onnx", "smollm2-draft")
        >>> result = generator.generate(generator.encode_prompt("The capital of France is"), 64)
        >>> result.extra["acceptance_rate"]
    """

    def __init__(self, target: str | os.PathLike | Generator, draft: str | os.PathLike | Generator,
                 gamma: int | str = "auto", ep: str = "cpu", draft_ep: str | None = None, threads: int | None = None,
                 draft_threads: int | None = None, fallback: bool = True, max_gamma: int = 12, cache: str = "auto",
                 cuda_graph: bool = True):
        # Checked before any session is built: a wrong draft fails fast and cheaply.
        check_same_vocabulary(_model_dir(target), _model_dir(draft))
        # Two sessions take turns on the same cores: each spins within its own runs (no thread
        # wake-up per operator) and stops when the run returns, so it never spins through the
        # other's. Measured on 2 cores (fp32 target, int8 draft): draft step 3.9 -> 2.8 ms, a
        # 4-token verify 31 -> 23 ms, against never spinning.
        options = {"spinning": "run", "cache": cache, "cuda_graph": cuda_graph}
        # A static target graphs its verify forwards (up to max_gamma + 1 tokens); a static draft
        # graphs its two-token catch-up (the bonus token and the last proposal it has not seen).
        self.target = target if isinstance(target, Generator) else Generator(
            target, ep=ep, threads=threads, graph_tokens=_verify_tokens(gamma, max_gamma), **options)
        draft_ep = draft_ep or ep
        self.draft = draft if isinstance(draft, Generator) else Generator(draft, ep=draft_ep, threads=draft_threads,
                                                                          graph_tokens=2, **options)
        if gamma == "auto":
            self.policy = GammaPolicy(DEFAULT_GAMMA, adaptive=True, max_gamma=max_gamma)
        elif isinstance(gamma, int) and gamma >= 1:
            self.policy = GammaPolicy(gamma, adaptive=False, max_gamma=max(gamma, max_gamma))
        else:
            raise GraphoptError(f"gamma must be a positive integer or 'auto', got {gamma!r}")
        self.initial_gamma = self.policy.gamma
        self.confident = gamma == "auto"
        self.cost_check = CostCheck() if fallback else None

    @property
    def tokenizer(self):
        return self.target.tokenizer

    @property
    def provider(self) -> str:
        return self.target.provider

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        return self.target.encode_prompt(prompt, chat=chat)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 128, sampling: Sampling = GREEDY,
                 on_token: Callable[[int], None] | None = None, stop_on_eos: bool = True) -> GenerationResult:
        """Like :meth:`Generator.generate`; ``result.extra`` adds acceptance and call counts."""
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids:
            raise GraphoptError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.target.max_positions:
            raise GraphoptError(f"prompt ({len(prompt_ids)} tokens) plus {max_new_tokens} new tokens exceeds "
                                f"the model's context of {self.target.max_positions}")
        if len(prompt_ids) + max_new_tokens > self.draft.max_positions:
            raise GraphoptError(f"prompt plus {max_new_tokens} new tokens exceeds the draft's context of "
                                f"{self.draft.max_positions}")
        recompute_at = getattr(self.target, "recompute_at", None)
        if recompute_at and len(prompt_ids) < recompute_at <= len(prompt_ids) + max_new_tokens:
            # LongRoPE (phi3): the target recomputes its cache at that length, which plain decoding does.
            return self.target.generate(prompt_ids, max_new_tokens, sampling, on_token, stop_on_eos)
        rng = np.random.default_rng(sampling.seed)
        target, draft = self.target.decoder, self.draft.decoder
        target.reset()
        draft.reset()
        # Proposals never run past the token budget, so neither cache needs more than this.
        for decoder in (target, draft):
            decoder.reserve(len(prompt_ids) + max_new_tokens)
        self.policy.gamma = self.initial_gamma
        if self.cost_check is not None:
            self.cost_check.reset()
        eos = self.target.eos_token_ids if stop_on_eos else set()

        started = time.perf_counter()
        logits = target.forward(prompt_ids)[-1]
        token = int(np.argmax(logits)) if sampling.greedy else sample(probabilities(logits, sampling), rng)
        # The draft's prefill is prefill work too: it counts in the time to first token, not in decode.
        draft.forward(prompt_ids)
        prefill_ms = (time.perf_counter() - started) * 1e3

        sequence = list(prompt_ids)
        generated: list[int] = []
        stats = collections.Counter()
        new_tokens = [token]
        decode_started = time.perf_counter()
        stopped = False
        while True:
            for token in new_tokens:
                generated.append(token)
                if on_token is not None:
                    on_token(token)
                if token in eos:
                    stopped = True
                    break
                if len(generated) >= max_new_tokens:
                    break
            if stopped or len(generated) >= max_new_tokens:
                break
            sequence.extend(new_tokens)
            remaining = max_new_tokens - len(generated)
            plain = self.cost_check is not None and self.cost_check.plain_now()
            keep_drafting = None
            if self.confident and sampling.greedy:
                keep_drafting = (self.cost_check.keep_drafting if self.cost_check is not None
                                 else lambda chance: chance >= DEFAULT_CONFIDENCE)
            limit = self.policy.max_gamma if keep_drafting else self.policy.gamma
            # Never propose past the budget: gamma accepted tokens plus the target's own one.
            gamma = 0 if plain else min(limit, remaining - 1)
            if self.cost_check is not None and self.cost_check.draft_token_s is None:
                # Measure the draft's cost on one proposal before betting several draft steps on it.
                gamma = min(gamma, 1)
            new_tokens, proposed, draft_s, verify_s = self._step(sequence, gamma, sampling, rng, stats,
                                                                 keep_drafting)
            accepted = len(new_tokens) - 1
            if self.cost_check is None:
                if proposed > 0 and not keep_drafting:
                    self.policy.update(proposed, accepted)
            elif proposed == 0:
                self.cost_check.record_plain(verify_s)
            else:
                self.cost_check.record_costs(proposed, accepted, draft_s, verify_s)
                self.cost_check.record_speculative(len(new_tokens), draft_s + verify_s)
                if not keep_drafting:
                    self.policy.update(proposed, accepted, self.cost_check.best_gamma(self.policy.max_gamma))
        decode_s = time.perf_counter() - decode_started

        decoded = len(generated) - 1
        speculative_steps = stats["target_calls"] - stats["plain_steps"]
        extra = {
            "draft": str(self.draft.model_dir.path),
            "draft_provider": self.draft.provider,
            "acceptance_rate": round(stats["accepted"] / stats["proposed"], 4) if stats["proposed"] else 0.0,
            "tokens_per_target_call": round(decoded / stats["target_calls"], 4) if stats["target_calls"] else 0.0,
            "target_calls": stats["target_calls"],
            "draft_calls": stats["draft_calls"],
            "draft_tokens_proposed": stats["proposed"],
            "draft_tokens_accepted": stats["accepted"],
            "plain_steps": stats["plain_steps"],
            "gamma_final": self.policy.gamma,
            "proposals_per_step": round(stats["proposed"] / speculative_steps, 2) if speculative_steps else 0.0,
        }
        return GenerationResult(prompt_ids=prompt_ids, token_ids=generated, text=self.tokenizer.decode(generated),
                                prefill_ms=prefill_ms, decode_s=decode_s, stopped_on_eos=stopped,
                                provider=self.provider, extra=extra)

    def generate_text(self, prompt: str, chat: bool = False, **options) -> GenerationResult:
        return self.generate(self.encode_prompt(prompt, chat=chat), **options)

    def _step(self, sequence: list[int], gamma: int, sampling: Sampling, rng: np.random.Generator,
              stats: collections.Counter, keep_drafting: Callable[[float], bool] | None = None,
              ) -> tuple[list[int], int, float, float]:
        """One draft-then-verify step after ``sequence``, proposing at most ``gamma`` tokens.

        Greedy with ``keep_drafting``: proposing stops once it returns False for the draft's own
        chance (product of its top probabilities) that every proposal so far is accepted.

        Returns the accepted proposals plus one target token, how many were proposed, and the
        seconds spent drafting and verifying.

        On entry the target cache holds ``sequence[:-1]``; on exit it holds ``sequence`` plus the
        accepted proposals, and the draft cache holds at most that (it catches up next step).
        """
        target, draft = self.target.decoder, self.draft.decoder
        length = len(sequence)
        proposals: list[int] = []
        draft_distributions: list[np.ndarray] = []
        chance = 1.0
        started = time.perf_counter()
        for index in range(gamma):
            # The first call also feeds whatever the draft has not seen yet (the prompt, a bonus token).
            fed = sequence[draft.length:] if index == 0 else proposals[-1:]
            stats["draft_calls"] += 1
            if keep_drafting is not None:
                logits = draft.forward(fed)[-1]
                top = int(np.argmax(logits))
                proposals.append(top)
                # The top token's softmax probability, without normalising the whole row.
                chance /= float(np.exp(logits - logits[top]).sum())
                if not keep_drafting(chance):
                    break
            elif sampling.greedy:
                # The argmax alone: a graph with a next_token output keeps the logits on the device.
                proposals.append(int(draft.forward_greedy(fed)[-1]))
            else:
                distribution = probabilities(draft.forward(fed)[-1], sampling)
                draft_distributions.append(distribution)
                proposals.append(sample(distribution, rng))

        drafted = time.perf_counter()
        gamma = len(proposals)
        fed = [sequence[-1], *proposals]
        target_logits = target.forward_greedy(fed) if sampling.greedy else target.forward(fed)
        verified = time.perf_counter()
        stats["target_calls"] += 1
        if gamma == 0:
            stats["plain_steps"] += 1
        accepted = 0
        if sampling.greedy:
            choices = target_logits  # token ids already
            while accepted < gamma and int(choices[accepted]) == proposals[accepted]:
                accepted += 1
            next_token = int(choices[accepted])
        else:
            target_distributions = probabilities(target_logits, sampling)
            next_token = None
            for index, proposal in enumerate(proposals):
                p, q = target_distributions[index], draft_distributions[index]
                # Accept with probability min(1, p/q); q[proposal] > 0 because the draft sampled it.
                if rng.random() * q[proposal] < p[proposal]:
                    accepted += 1
                    continue
                residual = np.maximum(p - q, 0.0)
                mass = residual.sum()
                # mass == 0 only when p == q up to rounding, where rejection has probability ~0.
                next_token = sample(residual / mass if mass > 0 else p, rng)
                break
            if next_token is None:
                next_token = sample(target_distributions[gamma], rng)
        stats["proposed"] += gamma
        stats["accepted"] += accepted

        target.truncate(length + accepted)
        draft.truncate(min(draft.length, length + accepted))
        return [*proposals[:accepted], next_token], gamma, drafted - started, verified - drafted


def _verify_tokens(gamma: int | str, max_gamma: int) -> int:
    """The longest verify forward: gamma + 1 tokens (``max_gamma + 1`` when adaptive or invalid, refused later)."""
    return gamma + 1 if isinstance(gamma, int) and gamma >= 1 else max(max_gamma, 1) + 1


def _model_dir(source) -> ModelDir:
    return source.model_dir if isinstance(source, Generator) else ModelDir.open(source)
