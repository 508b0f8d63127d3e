"""Each hosted model's tokenizer in the gateway: encoding, decoding, chat templates and prompt formats.

Chat messages become a prompt the way vLLM's OpenAI server does it: the model's chat template (or the
config's ``chat_template`` override) renders text, which is then tokenized without adding special tokens
(the template writes them). A base model without a chat template gets a documented plain format instead
(``alignd.decoders.prompts``: ``plain`` by default, or ``urial``), tokenized with the tokenizer's own special
tokens (Gemma's ``<bos>``, for example).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_PROMPT_FORMAT", "ModelTokenizer"]

DEFAULT_PROMPT_FORMAT = "plain"


class ModelTokenizer:
    """A hosted model's Hugging Face tokenizer plus how chat messages become its prompt."""

    def __init__(self, path: str, chat_template: str | None = None, prompt_format: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.hf: Any = AutoTokenizer.from_pretrained(path)
        if chat_template:
            template_path = Path(chat_template).expanduser()
            is_file = "\n" not in chat_template and len(chat_template) < 4096 and template_path.is_file()
            self.hf.chat_template = template_path.read_text() if is_file else chat_template
        self.prompt_format = prompt_format or DEFAULT_PROMPT_FORMAT
        self.eos_token_ids: frozenset[int] = frozenset(
            [self.hf.eos_token_id] if self.hf.eos_token_id is not None else []
        )

    @functools.cached_property
    def vocab_fingerprint(self) -> str:
        """A digest of the vocabulary (every token's string and id): two models with equal fingerprints
        write the same text with the same token ids, so decoders may share ids between them (nudging)."""
        items = sorted(self.hf.get_vocab().items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()

    @property
    def has_chat_template(self) -> bool:
        """Whether the model brings its own chat template (instruction-tuned) or is a base model."""
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens such as BOS only when asked."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``."""
        return str(self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """How one token reads on its own (for logprobs)."""
        return self.decode([token_id], skip_special_tokens=False)

    def render_chat(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        prompt_format: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, list[int]]:
        """Prompt text and ids for chat ``messages``; ``prompt_format`` forces a plain/URIAL format."""
        if self.has_chat_template and not prompt_format:
            text = self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
            )
            return text, self.encode(text, add_special_tokens=False)
        from alignd.decoders.prompts import build_prompt

        text = build_prompt(prompt_format or self.prompt_format, messages)
        return text, self.encode(text, add_special_tokens=True)

    def render_prompt(self, prompt: str) -> list[int]:
        """Ids of a raw completion prompt, with the tokenizer's own special tokens (BOS)."""
        return self.encode(prompt, add_special_tokens=True)
