"""Text <-> token ids for a model directory, with the chat template; needs only tokenizers + jinja2."""

from __future__ import annotations

import json
import pathlib

from graphopt.errors import GraphoptError


class Tokenizer:
    """The model directory's ``tokenizer.json`` plus its chat template."""

    def __init__(self, model_dir: str | pathlib.Path):
        from tokenizers import Tokenizer as _Tokenizer

        directory = pathlib.Path(model_dir)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise GraphoptError(f"{directory}: no tokenizer.json")
        self._tokenizer = _Tokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = directory / "chat_template.jinja"
        self.chat_template = template_path.read_text() if template_path.is_file() else self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise GraphoptError("this model has no chat template; drop --chat")
        import jinja2

        environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        environment.globals["raise_exception"] = _raise_template_error
        template = environment.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _raise_template_error(message: str):
    raise GraphoptError(f"chat template: {message}")
