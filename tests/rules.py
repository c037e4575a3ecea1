"""A rule-based text reward for the tests (loaded by the server as py:tests.rules:vowel_share)."""

from __future__ import annotations


def vowel_share(texts: list[str]) -> list[float]:
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]
