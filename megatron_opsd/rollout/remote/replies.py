"""What every server's generation reply must hold, checked the same way."""
from __future__ import annotations

from typing import Any


class MalformedReplyError(ValueError):
    """A generation reply that does not have the server's documented shape, or does not fit the request."""


def token_ids(value: Any, vocab_size: int, where: str, key: str) -> list[int]:
    """``value`` (the reply's ``key``) as a non-empty list of token ids inside the vocabulary."""
    if not isinstance(value, list) or not value or not all(isinstance(t, int) for t in value):
        raise MalformedReplyError(f"{where}: {key} is not a non-empty list of token ids")
    outside = [t for t in value if not 0 <= t < vocab_size]
    if outside:
        raise MalformedReplyError(f"{where}: {key} {outside[:5]} outside the vocabulary [0, {vocab_size})")
    return value
