"""Prompt token ids of OpenAI request bodies, computed the way vLLM's OpenAI server computes them.

``/v1/completions``: a token-id list is used as is; a string is encoded with the tokenizer's special
tokens (``add_special_tokens=True``). ``/v1/chat/completions``: the model's chat template renders the
messages (``add_generation_prompt`` as the request says, default true), then the text is encoded
without adding special tokens (the template already has them). Anything else (batched prompts, images)
has no single token sequence: the answer is ``None`` and the request is routed by load.

The tokenizer is loaded from a local directory (never the network) on first use, in a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class PromptTokens:
    def __init__(self, path: str = "") -> None:
        self.path = path
        self._tok: Any = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._tok is None:
                from kvtier.extras import require

                transformers = require("transformers", "router")
                self._tok = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            return self._tok

    def load(self) -> None:
        """Load the tokenizer now (so the first request does not pay for it)."""
        if self.path:
            self._tokenizer()

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self._tokenizer()(text, add_special_tokens=special)["input_ids"])

    def completion(self, prompt: Any) -> list[int] | None:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       and t >= 0 for t in prompt):
            return prompt
        if isinstance(prompt, str) and self.path:
            return self._ids(prompt, special=True)
        return None

    def chat(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if not self.path or not isinstance(messages, list):
            return None
        extra = body.get("chat_template_kwargs")
        kwargs: dict[str, Any] = extra if isinstance(extra, dict) else {}
        text = self._tokenizer().apply_chat_template(
            messages, tokenize=False, add_generation_prompt=bool(body.get("add_generation_prompt", True)),
            continue_final_message=bool(body.get("continue_final_message", False)), **kwargs)
        return self._ids(text, special=False)

    async def of(self, route: str, body: dict[str, Any]) -> list[int] | None:
        """Token ids of a request to ``route`` ("completions" or "chat"), ``None`` if it has none."""
        if route == "chat":
            return await asyncio.to_thread(self.chat, body) if self.path else None
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            return await asyncio.to_thread(self.completion, prompt) if self.path else None
        return self.completion(prompt)
