"""Text <-> token ids for a model directory, with the chat template; needs only tokenizers + jinja2.

A chat template comes from whoever published the checkpoint, so it is untrusted code: it renders in
jinja2's immutable sandbox (``ImmutableSandboxedEnvironment``, as transformers does), with the same
helpers transformers gives templates (``raise_exception``, ``strftime_now``, a ``tojson`` that does
not escape HTML). A template that reaches for Python internals gets a one-line error; jinja2 older
than 3.1.6 (known sandbox escapes) is refused.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

from graphopt.errors import GraphoptError
from graphopt.modeldir import TOKENIZER_JSON

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
MIN_JINJA2 = (3, 1, 6)


class Tokenizer:
    """The model directory's ``tokenizer.json`` plus its chat template."""

    def __init__(self, model_dir: str | pathlib.Path):
        from tokenizers import Tokenizer as _Tokenizer

        directory = pathlib.Path(model_dir)
        path = directory / TOKENIZER_JSON
        if not path.is_file():
            raise GraphoptError(f"{directory}: no {TOKENIZER_JSON}")
        try:
            self._tokenizer = _Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for a malformed file
            raise GraphoptError(f"{path}: damaged, not a readable tokenizer ({_first_line(error)})") from None
        self.config = read_json(directory / TOKENIZER_CONFIG) if (directory / TOKENIZER_CONFIG).is_file() else {}
        template_path = directory / CHAT_TEMPLATE
        template = _read_text(template_path) if template_path.is_file() else self.config.get("chat_template")
        if template is not None and not isinstance(template, str):
            # A list of named templates (transformers' multi-template form): use the default one.
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)} \
                if isinstance(template, list) else {}
            template = named.get("default")
        self.chat_template: str | None = template
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise GraphoptError("the prompt is not valid UTF-8 text") from None
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self) -> "TextStream":
        """The text of generated ids, given one at a time (:class:`TextStream`)."""
        return TextStream(self._tokenizer)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise GraphoptError("this model has no chat template; drop --chat")
        return render_chat_template(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def render_chat_template(template: str, **context: Any) -> str:
    """Render an untrusted chat template in jinja2's immutable sandbox.

    Raises:
        GraphoptError: the template is malformed, raises through ``raise_exception``, or tries an
            operation the sandbox forbids (attribute access to Python internals, mutation).
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())
    if version < MIN_JINJA2:
        raise GraphoptError(f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need jinja2>=3.1.6")
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template).render(**context)
    except jinja2.exceptions.SecurityError as error:
        raise GraphoptError(f"chat template refused: it tried an unsafe operation ({_first_line(error)})") from None
    except jinja2.exceptions.TemplateError as error:
        raise GraphoptError(f"chat template: {_first_line(error)}") from None


def read_json(path: pathlib.Path) -> dict:
    """A JSON object from ``path``, or a one-line error naming the file."""
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise GraphoptError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise GraphoptError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GraphoptError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise GraphoptError(f"{path}: unreadable ({error.strerror})") from None


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _raise_template_error(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


class TextStream:
    """The text of a growing list of token ids, fed one id at a time (special tokens skipped).

    ``tokenizers.decoders.DecodeStream`` decodes only the last few ids for each new one, where
    decoding the whole list again costs time in proportion to its length (SmolLM2: 23 us a token at
    128 tokens, 0.7 ms a step for 32 sequences). ``text`` is ``decode(ids)`` except while the last
    ids hold an incomplete UTF-8 character, which ``decode`` shows as U+FFFD and ``text`` leaves out
    until it completes.
    """

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self.text = ""

    def push(self, token_id: int) -> str:
        """``text`` after ``token_id``."""
        chunk = self._stream.step(self._tokenizer, int(token_id))
        if chunk is not None:
            self.text += chunk
        return self.text
