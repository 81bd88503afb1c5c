"""Chat templates: the GGUF's `tokenizer.chat_template` (Jinja) rendered the way Hugging Face's
`apply_chat_template` and llama.cpp's `--jinja` do, in a sandbox (a template comes from a model file and must not
reach Python internals or loop forever on attribute tricks).

The conventions are HF's: `messages` (role/content dicts), `add_generation_prompt`, `bos_token`, `eos_token`,
`tools`, `raise_exception(msg)`, `strftime_now(fmt)`, blocks trimmed (`trim_blocks`, `lstrip_blocks`) and the
`tojson` filter that leaves non-ASCII alone. A template that fails raises TemplateError (the HTTP layer answers 400).
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runner.llamaserver.media import MEDIA_MARKER, image_part

# A model without a template still gets a usable chat format: ChatML, which llama.cpp also falls back to.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


# variables the renderer sets itself; chat_template_kwargs cannot override them
RESERVED = frozenset({"messages", "add_generation_prompt", "tools", "bos_token", "eos_token"})


class TemplateError(ValueError):
    """The template could not be compiled or rendered for these messages."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class ChatTemplate:
    """One compiled template with the model's special-token strings bound."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                                            undefined=jinja2.Undefined)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template does not compile: {e}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt text for `messages`. Raises TemplateError when the template fails (including its own
        raise_exception calls, e.g. for a role order it does not allow)."""
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=list(tools) if tools else None, bos_token=self.bos_token,
                                         eos_token=self.eos_token, **extra)
        except TemplateError:
            raise
        except Exception as e:  # anything the template trips over is the request's (or the model's) fault
            raise TemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None


def normalize_messages(raw: object, media: list[bytes] | None = None) -> list[dict[str, Any]]:
    """OpenAI messages as template input: each needs a string role; content may be a string, null, or a list of
    parts, joined by newlines: text parts as they are, `image_url` parts (base64 data: URLs) as llama.cpp's media
    marker, their bytes appended to `media` in order (without `media`, image parts are refused). Raises
    ValueError."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty array")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(part, dict) and kind == "image_url" and media is not None:
                    media.append(image_part(part, f"messages[{i}].content[{j}]"))
                    texts.append(MEDIA_MARKER)
                elif isinstance(part, dict) and kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    raise ValueError(f"messages[{i}]: only text and image_url content parts are supported")
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, an array of parts or null")
        out.append({**msg, "content": content})
    return out


def chat_prompt(text: str, template: ChatTemplate | None, tokenizer: Any,
                has_images: bool = False) -> tuple[str, tuple[int, ...] | None]:
    """What the engine gets for a rendered conversation: the text, or its tokens when the template already wrote
    the BOS that tokenization would add again (Gemma's and Llama 3's templates start with `{{ bos_token }}`). With
    images the engine lays out text and images itself, BOS first: the template's BOS is cut instead."""
    bos = template.bos_token if template is not None else ""
    if has_images:
        return (text[len(bos):] if bos and text.startswith(bos) and tokenizer.add_bos else text), None
    if bos and text.startswith(bos) and tokenizer.add_bos:
        return "", tuple(tokenizer.encode(text, add_special=False, parse_special=True))
    return text, None
