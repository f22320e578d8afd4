"""Text generation over a model directory with ONNX Runtime: prefill, decode, sampling, streaming."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Sequence

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.manifest import Manifest
from graphopt.modeldir import ModelDir
from graphopt.runtime.device import open_decoder
from graphopt.runtime.sampling import GREEDY, Sampling, choose
from graphopt.runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerationResult:
    """What one generate call produced, with its timings."""

    prompt_ids: list[int]
    token_ids: list[int]  # generated ids, EOS included when produced
    text: str
    prefill_ms: float
    decode_s: float
    stopped_on_eos: bool
    provider: str
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens delivered per second of decoding (the first token comes from prefill)."""
        decoded = len(self.token_ids) - 1
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0

    def to_json(self, prompt: str) -> dict:
        return {
            "prompt": prompt,
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": len(self.prompt_ids),
            "new_tokens": len(self.token_ids),
            "stopped_on_eos": self.stopped_on_eos,
            "prefill_ms": round(self.prefill_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "provider": self.provider,
            **self.extra,
        }


def encode_prompt(tokenizer: Tokenizer, manifest: Manifest, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt: through the chat template, or plain with BOS where the model wants one."""
    if chat:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    ids = tokenizer.encode(prompt)
    bos = manifest.bos_token_id
    if manifest.add_bos_token and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


class Generator:
    """Owns an ORT decoder session, its KV cache and the tokenizer of a model directory.

    ``cache`` (``auto|static|device|host``) and ``cuda_graph`` choose where the KV cache lives and
    whether CUDA replays one-token steps as a graph (see :func:`graphopt.runtime.device.open_decoder`);
    ``spinning`` (``True``, ``"run"`` or ``False``) says when ORT's threads busy-wait
    (:func:`graphopt.runtime.session.make_session`). ``graph_tokens`` > 1 gives a static
    cache fixed bindings (CUDA graphs) for forwards of up to that many tokens too: a speculative target's verify.

    Example:
        >>> generator = Generator("smollm2-onnx")
        >>> generator.generate_text("What is the capital of France?", chat=True).text
    """

    def __init__(self, model_dir: str | os.PathLike, ep: str = "cpu", threads: int | None = None,
                 cache: str = "auto", cuda_graph: bool = True, spinning: bool | str = True, graph_tokens: int = 1):
        self.model_dir = ModelDir.open(model_dir, parse_tokenizer=False)  # parsed once, by the Tokenizer
        self.manifest = self.model_dir.manifest
        self.tokenizer = Tokenizer(self.model_dir.path)
        self.decoder = open_decoder(self.model_dir.model_path, ep=ep, threads=threads, cache=cache,
                                    cuda_graph=cuda_graph, spinning=spinning, manifest=self.manifest,
                                    graph_tokens=graph_tokens)
        self.eos_token_ids = set(self.manifest.eos_token_ids)
        self.max_positions = self.manifest.max_positions
        # LongRoPE (phi3): at this sequence length transformers' generate recomputes the cache with the
        # long factors (Phi3ForCausalLM.prepare_inputs_for_generation); so does generate() here.
        self.recompute_at = self.manifest.extra.get("longrope_recompute_at")

    @property
    def provider(self) -> str:
        return self.decoder.provider

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, self.manifest, prompt, chat)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 128, sampling: Sampling = GREEDY,
                 on_token: Callable[[int], None] | None = None, stop_on_eos: bool = True) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt_ids``; ``on_token`` sees each new id."""
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids:
            raise GraphoptError("the prompt is empty")
        if len(prompt_ids) + max_new_tokens > self.max_positions:
            raise GraphoptError(f"prompt ({len(prompt_ids)} tokens) plus {max_new_tokens} new tokens exceeds "
                                f"the model's context of {self.max_positions}")
        rng = np.random.default_rng(sampling.seed)
        self.decoder.reset()
        self.decoder.reserve(len(prompt_ids) + max_new_tokens)
        started = time.perf_counter()
        token = self._next(prompt_ids, sampling, rng)
        prefill_ms = (time.perf_counter() - started) * 1e3
        generated = [token]
        decode_started = time.perf_counter()
        stopped = False
        while True:
            if on_token is not None:
                on_token(token)
            if stop_on_eos and token in self.eos_token_ids:
                stopped = True
                break
            if len(generated) >= max_new_tokens:
                break
            if len(prompt_ids) + len(generated) == self.recompute_at:
                # LongRoPE switches to its long factors here: recompute the cache, as transformers does.
                self.decoder.reset()
                token = self._next(prompt_ids + generated, sampling, rng)
            else:
                token = self._next([token], sampling, rng)
            generated.append(token)
        decode_s = time.perf_counter() - decode_started
        return GenerationResult(prompt_ids=prompt_ids, token_ids=generated,
                                text=self.tokenizer.decode(generated), prefill_ms=prefill_ms,
                                decode_s=decode_s, stopped_on_eos=stopped, provider=self.provider)

    def generate_text(self, prompt: str, chat: bool = False, **options) -> GenerationResult:
        return self.generate(self.encode_prompt(prompt, chat=chat), **options)

    def _next(self, ids: Sequence[int], sampling: Sampling, rng: np.random.Generator) -> int:
        """The token after ``ids`` (run on the cache): greedy asks the decoder for the argmax alone."""
        if sampling.greedy:
            return int(self.decoder.forward_greedy(ids)[-1])
        return choose(self.decoder.forward(ids)[-1], sampling, rng)
