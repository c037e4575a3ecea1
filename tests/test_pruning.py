"""best_of_n with prune (Speculative Rejection) over real HTTP, against an independent scoring of
each sample's partial text with the HF reward models; and the engine step that keeps those
rewards, on plain tensors."""

from __future__ import annotations

import math
import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignd.decoders import best_of_n
from alignd.decoders.base import Row
from alignd.decoders.params import AlignmentParams
from alignd.rewards.runtime import GuideRuntime
from alignd.rewards.specs import GuideConfig
from tests import reference

PROMPT = "the movie was"
WEIGHTS = {"a": 1.0, "b": -0.5}
MAX_NEW = 12


@pytest.fixture(scope="module")
def total(tiny):
    """Σ w_i r_i(seq), computed here with the HF reward models."""
    rm = {n: reference.hf_reward(AutoModelForSequenceClassification.from_pretrained(tiny[f"rm_{n}"], dtype=torch.float32))
          for n in WEIGHTS}
    return lambda seq: sum(w * rm[n](seq) for n, w in WEIGHTS.items())


@pytest.fixture(scope="module")
def prompt_ids(tiny) -> list[int]:
    return AutoTokenizer.from_pretrained(tiny["base"])(PROMPT)["input_ids"]


def draw(server, prune=None, n=8, **kw):
    al = {"decoder": "best_of_n", "rewards": WEIGHTS, "n": n, "return_candidates": True,
          **({"prune": prune} if prune else {})}
    return server.client().completions.create(
        model=server.model, prompt=PROMPT, temperature=1.0, seed=5, max_tokens=MAX_NEW,
        extra_body={"alignment": al, "return_token_ids": True}, **kw)


def test_the_step_keeps_each_samples_reward_at_its_checkpoints(tiny, total):
    guides = GuideRuntime(GuideConfig(model=str(tiny["base"]), rewards={n: str(tiny[f"rm_{n}"]) for n in WEIGHTS}),
                          torch.device("cpu"), torch.float32, 256)
    params = [AlignmentParams.model_validate({"decoder": "best_of_n", "rewards": WEIGHTS, "prune": p})
              for p in ({"every": 2, "keep": 0.5}, {"every": 3, "keep": 0.5})]
    rows = [Row(p, "r", [5, 40, 41], []) for p in params]
    gen = torch.Generator().manual_seed(0)
    for _ in range(7):
        logits = torch.randn(2, 300, generator=gen)
        assert torch.equal(best_of_n.observe(guides, rows, [r.tokens() for r in rows], logits.clone()), logits)
        for row, token in zip(rows, torch.randint(10, 300, (2,), generator=gen).tolist()):
            row.output.append(token)
    for row, every in zip(rows, (2, 3)):
        # the step for token t + 1 reads the first t: checkpoints up to 6 of the 7 made
        assert sorted(row.observed) == list(range(every, 7, every))
        for at, got in row.observed.items():
            assert got == pytest.approx(total(row.prompt + row.output[:at]), abs=1e-4)
        row.release()
    assert guides.stats()["guide_states"] == 0


def test_keep_all_draws_and_picks_as_plain_best_of_n(server):
    plain, kept = draw(server).choices[0], draw(server, {"every": 4, "keep": 1.0}).choices[0]
    a, b = plain.model_extra["alignment"], kept.model_extra["alignment"]
    assert [c["token_ids"] for c in b["candidates"]] == [c["token_ids"] for c in a["candidates"]]
    assert [c["total"] for c in b["candidates"]] == pytest.approx([c["total"] for c in a["candidates"]], abs=1e-5)
    assert kept.token_ids == plain.token_ids
    assert [cp["pruned"] for cp in b["pruning"]] == [0] * len(b["pruning"]) and b["pruning"]
    assert not any("pruned_at" in c for c in b["candidates"])
    assert "pruning" not in a


@pytest.mark.parametrize("every,keep", [(4, 0.5), (3, 0.25)])
def test_pruning_stops_what_partial_text_scoring_ranks_lowest(server, total, prompt_ids, every, keep):
    out = draw(server, {"every": every, "keep": keep})
    choice = out.choices[0]
    al = choice.model_extra["alignment"]
    cands = al["candidates"]
    pruned_at = {g: c["pruned_at"] for g, c in enumerate(cands) if "pruned_at" in c}
    alive, want, at = set(range(len(cands))), [], every
    while True:  # the rule, independently: rank the samples that passed `at` by their first `at` tokens
        live = sorted(g for g in alive if len(cands[g]["token_ids"]) > at)
        if len(live) <= 1:
            break
        scores = {g: total(prompt_ids + cands[g]["token_ids"][:at]) for g in live}
        stop = set(sorted(live, key=lambda g: -scores[g])[math.ceil(keep * len(live)):])
        assert {g for g, a in pruned_at.items() if a == at} == stop, at
        for g in stop:
            assert cands[g]["total_at_pruning"] == pytest.approx(scores[g], abs=1e-4)
        want.append({"at": at, "live": len(live), "pruned": len(stop)})
        alive, at = alive - stop, at + every
    assert al["pruning"] == want and pruned_at
    for c in cands:  # a pruned sample is partial: no final rewards, never the winner
        assert (c["rewards"] == {} and c["total"] is None) == ("pruned_at" in c)
    best = max((c for c in cands if "pruned_at" not in c), key=lambda c: c["total"])
    assert choice.token_ids == best["token_ids"] and choice.finish_reason in ("stop", "length")
    made = sum(len(c["token_ids"]) for c in cands)
    assert al["sampled_tokens"] == made < al["unpruned_tokens"] == 8 * MAX_NEW
    assert out.usage.completion_tokens == len(choice.token_ids)


def test_pruned_best_of_n_streams_and_frees_everything(server):
    al = {"decoder": "best_of_n", "rewards": WEIGHTS, "n": 6, "prune": {"every": 2, "keep": 0.5}}
    chunks = list(server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": PROMPT}], temperature=1.0, max_tokens=MAX_NEW,
        n=2, stream=True, extra_body={"alignment": al}))
    last = {c.choices[0].index: c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason}
    assert sorted(last) == [0, 1]
    for choice in last.values():
        assert [cp["at"] for cp in choice.model_extra["alignment"]["pruning"]][:2] == [2, 4]
    # The pruned samples' engine requests were aborted: their guide caches are gone too.
    deadline = time.monotonic() + 30
    while server.metric("alignd_guide_states") != 0:
        assert time.monotonic() < deadline, "guide caches left behind"
        time.sleep(0.2)
