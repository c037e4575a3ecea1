"""The cached guide forward against plain transformers forwards of whole sequences."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignd.rewards.guide_model import GuideModel

def hf_reward(model, seq: list[int]) -> float:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, 0].item()

@pytest.fixture(scope="module")
def rm(tiny):
    return AutoModelForSequenceClassification.from_pretrained(tiny["rm_a"], dtype=torch.float32)

@pytest.fixture(scope="module")
def lm(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)

def random_seq(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(7, vocab) for _ in range(n)]

def test_score_sequences_matches_transformers(rm):
    rng = random.Random(0)
    seqs = [random_seq(rng, n, rm.config.vocab_size) for n in (1, 5, 17, 40)]
    guide = GuideModel(rm, "score", max_len=256)
    ours = guide.score_sequences(seqs)
    ref = torch.tensor([hf_reward(rm, s) for s in seqs])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

def test_candidates_follow_sequences_through_steps(rm):
    """Three requests of different lengths step together; each step the chosen token is one of
    the scored candidates (the commit path) or a foreign token (the forward path); one request
    leaves midway (slot compaction). Every candidate score must equal a fresh full forward."""
    rng = random.Random(1)
    vocab = rm.config.vocab_size
    guide = GuideModel(rm, "score", max_len=256)
    seqs = [random_seq(rng, n, vocab) for n in (3, 11, 7)]
    slots = [guide.open() for _ in seqs]
    k = 5
    for step in range(6):
        cands = torch.tensor([random.Random(step * 10 + i).sample(range(7, vocab), k) for i in range(len(seqs))])
        got = guide.score_candidates(slots, seqs, cands)
        want = torch.tensor([[hf_reward(rm, s + [c]) for c in row] for s, row in zip(seqs, cands.tolist())])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for i, row in enumerate(cands.tolist()):
            seqs[i] = seqs[i] + ([row[step % k]] if (i + step) % 3 else [rng.randrange(7, vocab)])
        if step == 2:
            guide.close(slots.pop(0))
            seqs.pop(0)
    assert len(guide.pool) == 2
    for s in slots:
        guide.close(s)
    assert len(guide.pool) == 0 and guide.pool.bytes() == 0

def test_last_outputs_match_causal_lm(lm):
    rng = random.Random(2)
    vocab = lm.config.vocab_size
    guide = GuideModel(lm, "lm", max_len=256)
    seqs = [random_seq(rng, n, vocab) for n in (4, 9)]
    slots = [guide.open() for _ in seqs]
    for _ in range(4):
        got = guide.last_outputs(slots, seqs)
        with torch.no_grad():
            want = torch.stack([lm(torch.tensor([s])).logits[0, -1] for s in seqs])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        seqs = [s + [rng.randrange(7, vocab)] for s in seqs]


def test_pool_growth_then_compaction_keeps_caches(rm):
    """Prefixes longer than the first allocation force the pool to grow; closing a slot then
    moves the last one into its place. The remaining rows must still score exactly."""
    rng = random.Random(3)
    vocab = rm.config.vocab_size
    guide = GuideModel(rm, "score", max_len=512)
    seqs = [random_seq(rng, n, vocab) for n in (150, 90, 130)]
    slots = [guide.open() for _ in seqs]
    guide.sync(slots, seqs)
    guide.close(slots.pop(0))
    seqs.pop(0)
    assert [s.index for s in slots] == [1, 0]
    cands = torch.tensor([[9, 10, 11], [12, 13, 14]])
    got = guide.score_candidates(slots, seqs, cands)
    want = torch.tensor([[hf_reward(rm, s + [c]) for c in row] for s, row in zip(seqs, cands.tolist())])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
