"""Byte-level tokenizer for the small GPT: token ids are the UTF-8 bytes of the text."""

from __future__ import annotations


class ByteTokenizer:
    """Text <-> byte ids (vocabulary 256). No special tokens: generation runs to its length."""

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ints."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; invalid UTF-8 (a cut multibyte char) becomes U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")
