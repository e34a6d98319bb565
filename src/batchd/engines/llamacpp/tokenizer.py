"""A model's vocabulary and chat template: a request to prompt tokens, a token to its bytes."""

from __future__ import annotations

import ctypes
from typing import Any

import jinja2.sandbox
import llama_cpp

from batchd.engines.base import ChatMessage, GenerationRequest
from batchd.errors import InvalidRequest


class Tokenizer:
    """Reads only the loaded model's vocabulary, so it may be used from any thread."""

    def __init__(self, model: Any, model_id: str) -> None:
        self.model_id = model_id
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        template = llama_cpp.llama_model_chat_template(model, None)
        self.template = (
            jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True
            ).from_string(template.decode("utf-8"))
            if template
            else None
        )
        self.bos_text = self.piece(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self.piece(llama_cpp.llama_vocab_eos(self.vocab))

    def piece(self, token: int) -> str:
        return self.piece_bytes(token).decode("utf-8", "replace")

    def piece_bytes(self, token: int) -> bytes:
        # Bytes, not text: a character may be split over tokens (the caller decodes
        # incrementally).
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        tokens = (llama_cpp.llama_token * capacity)()
        # parse_special: the chat template's markers (<|im_start|>...) are single tokens.
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, True
        )
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, True
            )
        return list(tokens[:n])

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            if self.template is None:
                raise InvalidRequest(
                    f"Model {self.model_id} has no chat template; use /v1/completions.",
                    param="messages",
                )
            return self._chat_tokens(request.messages, add_generation_prompt=True)
        return self.tokenize(request.prompt or "", add_special=self.add_bos)

    def _chat_tokens(
        self, messages: tuple[ChatMessage, ...], *, add_generation_prompt: bool
    ) -> list[int]:
        assert self.template is not None
        text = self.template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_text,
            eos_token=self.eos_text,
        )
        return self.tokenize(text, add_special=False)

    def cache_prefix_lengths(
        self, request: GenerationRequest, prompt: list[int]
    ) -> tuple[int, ...]:
        """How many of ``prompt``'s tokens each of the request's ``cache_prefixes`` covers:
        the prefix is rendered through the chat template on its own, and its length is how
        far its tokens agree with the whole prompt's (the turn-closing markers a prefix ends
        with are not the prompt's, so they do not count)."""
        if not request.cache_prefixes or self.template is None:
            return ()
        lengths = []
        for messages in request.cache_prefixes:
            try:
                tokens = self._chat_tokens(messages, add_generation_prompt=False)
            except Exception:  # a template that refuses a partial conversation: no mark
                lengths.append(0)
                continue
            agree = 0
            for ours, theirs in zip(tokens, prompt, strict=False):
                if ours != theirs:
                    break
                agree += 1
            lengths.append(agree)
        return tuple(lengths)
