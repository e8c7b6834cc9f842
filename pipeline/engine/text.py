"""The tokenizer's side of serving: chat prompts and incremental detokenization with stop strings.

Used by the in-process Engine and by the front end of the engine-core process (pipeline/engine/client.py),
which detokenizes there so that the process stepping the GPU never decodes text.

    ids = chat_prompt(tokenizer, [{"role": "user", "content": "hi"}])     # -> prompt token ids
    d = Detokenizer(tokenizer, stop=["\\n\\n"])
    hit = d.add(token_id)          # True: a stop string appeared (d.text is cut before it)
    piece = d.take()               # new text that can be sent (a tail that may start a stop string is held back)
    rest = d.take(final=True)      # everything not yet sent
"""
from __future__ import annotations

from typing import Optional


def chat_prompt(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
    """The model's chat template over `messages` (and `tools`, OpenAI's function definitions, for templates that
    render them), with the assistant's turn opened, as token ids."""
    if tokenizer is None:
        raise ValueError("this workspace has no tokenizer (triton_models/tokenizer is missing)")
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    else:  # e.g. the byte-level tokenizer of synthetic models
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text, add_special_tokens=False).input_ids


try:
    from tokenizers.decoders import DecodeStream
except ImportError:      # tokenizers < 0.21
    DecodeStream = None


def _decode_stream(tokenizer):
    """(the `tokenizers` backend, a fresh DecodeStream) for a fast tokenizer, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is None or backend is None:
        return None
    return backend, DecodeStream(skip_special_tokens=True)


class Detokenizer:
    """Text of one request's output ids, decoded one token at a time: by the `tokenizers` library's DecodeStream
    for fast tokenizers (in Rust, ~0.6 us a token), else by re-decoding a short window per token (vLLM's prefix/read
    offsets, ~6 us); the two give the same text. Incomplete UTF-8 is held back; stop strings cut the text.
    tokenizer None: ids are counted, no text (the engine core process, where the front end decodes)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = self._sent = 0
        self._stream = _decode_stream(tokenizer) if tokenizer is not None else None

    def add(self, token_id: int) -> bool:
        """Append one output id; True when a stop string appeared (the text is cut before it)."""
        ids = self.ids
        ids.append(token_id)
        if self.tok is None:
            return False
        if self._stream is not None:
            piece = self._stream[1].step(self._stream[0], token_id)
            if not piece:
                return False
            self.text += piece
        else:
            prev = self.tok.decode(ids[self._prefix:self._read], skip_special_tokens=True)
            new = self.tok.decode(ids[self._prefix:], skip_special_tokens=True)
            if len(new) > len(prev) and not new.endswith("\ufffd"):
                self.text += new[len(prev):]
                self._prefix, self._read = self._read, len(ids)
        for st in self.stop:
            i = self.text.find(st, max(0, self._sent - len(st)))
            if i >= 0:
                self.text = self.text[:i]
                return True
        return False

    def _safe_end(self) -> int:
        """End of the text that can be sent: hold back a tail that may start a stop string."""
        end = len(self.text)
        for st in self.stop:
            for k in range(min(len(st) - 1, len(self.text)), 0, -1):
                if self.text.endswith(st[:k]):
                    end = min(end, len(self.text) - k)
                    break
        return max(end, self._sent)

    def take(self, final: bool = False) -> str:
        """The text not sent yet (all of it when final)."""
        end = len(self.text) if final else self._safe_end()
        out, self._sent = self.text[self._sent:end], end
        return out
