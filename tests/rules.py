"""A rule-based text reward for the tests (loaded by the server as py:tests.rules:vowel_share)."""

from __future__ import annotations


def vowel_share(texts: list[str]) -> list[float]:
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


def moody(texts: list[str]) -> list[float]:
    """A text reward that misbehaves on purpose when a text carries a marker (the hostile
    prompts carry them; the tiny models practically never write '§'): raises, returns NaN or a
    huge number, or sleeps. Otherwise it is vowel_share."""
    import time

    for t in texts:
        if "§boom" in t:
            raise ValueError("moody refuses this text")
        if "§slow" in t:
            time.sleep(3.0)
        if "§hang" in t:
            time.sleep(30.0)
    out = vowel_share(texts)
    return [float("nan") if "§nan" in t else 1e300 if "§huge" in t else x for t, x in zip(texts, out)]


def slow_vowels(texts: list[str]) -> list[float]:
    """vowel_share after 50 ms: a text reward far slower per guide token than the tiny model's step."""
    import time

    time.sleep(0.05)
    return vowel_share(texts)
