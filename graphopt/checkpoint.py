"""Loading a checkpoint into PyTorch: a registry name, a Hugging Face directory or a .gguf file."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import pathlib
import warnings

from graphopt import sources
from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Checkpoint:
    """A loaded PyTorch model, its tokenizer (or None) and where it came from."""

    model: object
    tokenizer: object | None
    source: dict


def describe_source(src: str) -> tuple[str, pathlib.Path, str | None]:
    """Classify SRC as ``registry``, ``gguf`` or ``huggingface``; check it exists and looks right."""
    if src in sources.REGISTRY:
        return "registry", sources.fetch(src), src
    path = pathlib.Path(src)
    if not path.exists():
        known = ", ".join(sorted(sources.REGISTRY))
        raise GraphoptError(f"{src}: no such file or directory, and not a known model name ({known})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise GraphoptError(f"{src}: expected a .gguf file or a Hugging Face checkpoint directory")
        with open(path, "rb") as stream:
            if stream.read(4) != b"GGUF":
                raise GraphoptError(f"{src}: not a GGUF file (bad magic)")
        return "gguf", path, None
    if not (path / "config.json").is_file():
        raise GraphoptError(f"{src}: not a Hugging Face checkpoint directory (no config.json)")
    if not list(path.glob("*.safetensors")) and not list(path.glob("pytorch_model*.bin")):
        raise GraphoptError(f"{src}: no weights (*.safetensors) in the checkpoint directory")
    return "huggingface", path, None


def _digest(kind: str, path: pathlib.Path) -> str:
    if kind in ("registry", "gguf"):
        return sources.sha256_of(path)
    combined = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin")):
        combined.update(file.name.encode())
        combined.update(sources.sha256_of(file).encode())
    return combined.hexdigest()


def load(src: str) -> Checkpoint:
    """Load SRC in float32 on the CPU, checking its family before reading any weights."""
    import torch
    import transformers

    from graphopt.models import adapter_for

    if not logger.isEnabledFor(logging.INFO):
        transformers.utils.logging.disable_progress_bar()
    kind, path, name = describe_source(src)
    gguf = {"gguf_file": path.name} if kind in ("registry", "gguf") else {}
    directory = path.parent if gguf else path
    try:
        config = transformers.AutoConfig.from_pretrained(directory, **gguf)
    except Exception as error:  # transformers raises many types for a bad checkpoint
        raise GraphoptError(f"{src}: cannot read the model config ({_first_line(error)})") from None
    adapter_for(config.model_type)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **gguf)
    except Exception as error:
        raise GraphoptError(f"{src}: cannot load the weights ({_first_line(error)})") from None
    model.eval()
    if getattr(model.config, "quantization_config", None) is not None:
        # The GGUF was dequantized to float32 on load; the config must not claim otherwise.
        del model.config.quantization_config
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **gguf)
    except Exception as error:
        logger.warning("no tokenizer loaded from %s (%s); generate will need token ids", src, _first_line(error))
        tokenizer = None
    source = {"kind": kind, "name": name, "path": str(path.resolve()), "sha256": _digest(kind, path)}
    return Checkpoint(model=model, tokenizer=tokenizer, source=source)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def greedy_tokens(model, prompt_ids: list[int], steps: int) -> list[int]:
    """transformers' own greedy ``generate`` for exactly ``steps`` new tokens, EOS not special.

    ``min_new_tokens`` would instead forbid EOS until the end, changing the argmax wherever the
    model wants to stop; with no EOS id, generate keeps the plain argmax and runs on, as graphopt's
    generator does with ``stop_on_eos=False``.
    """
    import torch

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = []  # no stop token (None would fall back to the model's EOS)
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    config.max_new_tokens, config.do_sample = steps, False
    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.no_grad():
        # An explicit mask: without one, generate masks every token equal to pad_token_id, and
        # chat templates use that id (SmolLM2's <|im_end|>) inside the prompt.
        output = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return output[0, len(prompt_ids):].tolist()
