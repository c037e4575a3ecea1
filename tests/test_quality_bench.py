"""The statistics and text measures of bench/quality, against direct computations."""

from __future__ import annotations


import numpy as np
import pytest

from bench.quality import metrics, stats
from bench.quality.prompts import task_prompts


def test_paired_bootstrap_interval_covers_the_mean_and_shrinks_with_agreement():
    rng = np.random.default_rng(3)
    a = rng.normal(1.0, 1.0, 200)
    b = a - 0.5 + rng.normal(0, 0.1, 200)  # a is 0.5 above b, with little noise
    d = stats.paired_diff(list(a), list(b))
    assert d["n"] == 200 and d["mean"] == pytest.approx(float(np.mean(a - b)))
    assert d["lo"] < d["mean"] < d["hi"] and d["lo"] > 0.4 and d["hi"] < 0.6
    # pairing matters: the same data unpaired-shuffled gives a far wider interval
    wide = stats.paired_diff(list(a), list(rng.permutation(b)))
    assert (wide["hi"] - wide["lo"]) > 5 * (d["hi"] - d["lo"])
    # NaN pairs are dropped, not propagated
    assert stats.paired_diff([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0])["n"] == 2


def test_relative_gain_is_ratio_of_means_minus_one():
    a, b = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]
    r = stats.ratio_ci(a, b)
    assert r["mean"] == pytest.approx(1.0) and r["lo"] == pytest.approx(1.0) and r["hi"] == pytest.approx(1.0)


def test_distinct_and_repetition_measures():
    texts = ["the cat sat on the mat", "the cat ran"]
    bigrams = [("the", "cat"), ("cat", "sat"), ("sat", "on"), ("on", "the"), ("the", "mat"), ("the", "cat"),
               ("cat", "ran")]
    assert metrics.distinct_n(texts, 2) == pytest.approx(len(set(bigrams)) / len(bigrams))
    assert metrics.rep_n("a b a b a b", 2) == pytest.approx(1 - 2 / 5)
    assert metrics.args_diversity("one two three four five") == 1.0
    assert metrics.args_diversity("go go go go go") == pytest.approx((1 / 4) * (1 / 3) * (1 / 2))  # unique/all n-grams


def test_prompts_are_real_negative_reviews_and_unseen_toxicity_prompts():
    from alignd.training import demo_data

    sent = task_prompts("sentiment", 100, "chat")
    assert len(sent) == 100 and len({p.id for p in sent}) == 100
    negatives = {r["id"] for r in demo_data.imdb_reviews() if r["label"] == 0}
    assert all(p.source["row"] in negatives and len(p.source["opening"].split()) == 8 for p in sent)
    tox = task_prompts("detox", 100, "raw")
    fitted = {r["id"] for r in demo_data.sampled_rtp_prompts()}
    assert len({p.id for p in tox}) == 100 and not any(p.source["row"] in fitted for p in tox)


def test_every_method_is_a_valid_alignd_request():
    from alignd.decoders.params import AlignmentParams
    from bench.quality.cli import parse_args
    from bench.quality.methods import Task, all_methods

    task = Task("sentiment", "sentiment", "sentiment", "aligned", "chat")
    methods = all_methods(task, parse_args([]))
    assert {"bon64", "bonp16", "bonp64", "block4x8", "block8x8", "block4x16"} <= {m.name for m in methods}
    for m in methods:
        al = m.alignment(task)
        if al is not None:
            AlignmentParams.model_validate(al)  # what the engine would accept
    bonp = next(m for m in methods if m.name == "bonp64").alignment(task)
    assert bonp["prune"] == {"every": 8, "keep": 0.5} and bonp["n"] == 64
    assert next(m for m in methods if m.name == "block8x8").alignment(task)["block_tokens"] == 8
