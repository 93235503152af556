"""Tokenizer and chat template of an artifact: `tokenizers` for ids, jinja2 for the template."""

import json
from pathlib import Path

from .errors import UserError

_REPLY_MARK = "\x00dg-reply\x00"


class TextCodec:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        template_file = folder / "chat_template.jinja"
        source = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        self.special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        self.template = None
        if source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self.template = env.from_string(source)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise UserError("this artifact has no chat template; use {raw} to send the prompt as it is", "raw")
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render(messages))

    def continuation_ids(self, history: list[dict], message: dict) -> list[int]:
        """Tokens that follow the model's last reply when `message` is added: the template's glue after the
        reply, the new turn and the generation prompt. The reply itself is already in the cache, as tokens."""
        rendered = self.render([*history[:-1], {**history[-1], "content": _REPLY_MARK}, message])
        return self.encode(rendered[rendered.index(_REPLY_MARK) + len(_REPLY_MARK):])


def _raise_template_error(message):
    raise UserError(f"chat template error: {message}")
