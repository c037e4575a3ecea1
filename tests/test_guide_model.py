"""The cached guide forward against plain transformers forwards of whole sequences.

ALIGND_TEST_DEVICE=cuda runs the same checks on a GPU (the guide runtime's GPU path)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignd.rewards.guide_model import GuideModel

DEVICE = torch.device(os.environ.get("ALIGND_TEST_DEVICE", "cpu"))


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4)


def hf_reward(model, seq: list[int]) -> float:
    with torch.no_grad():
        return model(torch.tensor([seq], device=DEVICE)).logits[0, 0].item()

@pytest.fixture(scope="module")
def rm(tiny):
    return AutoModelForSequenceClassification.from_pretrained(tiny["rm_a"], dtype=torch.float32).to(DEVICE)

@pytest.fixture(scope="module")
def lm(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32).to(DEVICE)

def random_seq(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(7, vocab) for _ in range(n)]

def test_score_sequences_matches_transformers(rm):
    rng = random.Random(0)
    seqs = [random_seq(rng, n, rm.config.vocab_size) for n in (1, 5, 17, 40)]
    guide = GuideModel(rm, "score", max_len=256)
    ours = guide.score_sequences(seqs)
    ref = torch.tensor([hf_reward(rm, s) for s in seqs])
    close(ours, ref)

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
        close(got, want)
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
            want = torch.stack([lm(torch.tensor([s], device=DEVICE)).logits[0, -1] for s in seqs])
        close(got, want)
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
    close(got, want)


def test_branches_match_whole_sequences(rm):
    """k branches of different lengths per row, one tree forward: each equals r(seq + branch)."""
    rng = random.Random(4)
    vocab = rm.config.vocab_size
    guide = GuideModel(rm, "score", max_len=256)
    seqs = [random_seq(rng, n, vocab) for n in (5, 12)]
    slots = [guide.open() for _ in seqs]
    k, span = 3, 4
    tokens = torch.tensor([[[rng.randrange(7, vocab) for _ in range(span)] for _ in range(k)] for _ in seqs])
    lengths = torch.tensor([[1, 4, 2], [3, 1, 4]])
    got = guide.score_branches(slots, seqs, tokens, lengths)
    want = torch.tensor([[hf_reward(rm, s + tokens[i, j, : lengths[i, j]].tolist()) for j in range(k)]
                         for i, s in enumerate(seqs)])
    close(got, want)
    # the chosen first token of a branch is committed without a forward, and stays exact
    seqs = [s + [tokens[i, 1, 0].item()] for i, s in enumerate(seqs)]
    cands = torch.tensor([[20, 21], [22, 23]])
    got = guide.score_candidates(slots, seqs, cands)
    want = torch.tensor([[hf_reward(rm, s + [c]) for c in row] for s, row in zip(seqs, cands.tolist())])
    close(got, want)


def hf_greedy(lm, seq: list[int], steps: int, eos: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            t = int(lm(torch.tensor([seq + out], device=DEVICE)).logits[0, -1].argmax())
            out.append(t)
            if t == eos:
                break
    return out


def test_rollouts_match_greedy_generation(lm):
    """Greedy rollouts of every candidate, forked from the cached prefix, equal plain greedy
    generation from seq + [candidate], including the stop at eos."""
    rng = random.Random(5)
    vocab = lm.config.vocab_size
    guide = GuideModel(lm, "lm", max_len=256)
    seqs = [random_seq(rng, n, vocab) for n in (6, 10)]
    cands = torch.tensor([[30, 31, 32], [33, 34, 35]])
    eos = hf_greedy(lm, seqs[0] + [31], 3, -1)[2]  # a token some branch really emits
    slots = [guide.open() for _ in seqs]
    tokens, lengths = guide.rollout(slots, seqs, cands, 6, eos)
    stopped = 0
    for i, s in enumerate(seqs):
        for j, c in enumerate(cands[i].tolist()):
            want = hf_greedy(lm, s + [c], 6, eos)
            assert tokens[i, j, : lengths[i, j]].tolist() == want
            stopped += want[-1] == eos
    assert stopped >= 1


def test_padding_is_pooled_like_transformers(rm):
    """transformers pools a sequence classifier at the last non-pad token; so must we, for
    branches ending in pad tokens, branches of pad only, and whole sequences."""
    pad = rm.config.pad_token_id
    rng = random.Random(6)
    guide = GuideModel(rm, "score", max_len=256)
    seqs = [random_seq(rng, 8, rm.config.vocab_size), random_seq(rng, 5, rm.config.vocab_size) + [pad]]
    slots = [guide.open() for _ in seqs]
    tokens = torch.tensor([[[40, pad, pad], [pad, pad, 41]], [[pad, pad, pad], [42, 43, pad]]])
    lengths = torch.tensor([[3, 3], [2, 3]])
    got = guide.score_branches(slots, seqs, tokens, lengths)
    want = torch.tensor([[hf_reward(rm, s + tokens[i, j, : lengths[i, j]].tolist()) for j in range(2)]
                         for i, s in enumerate(seqs)])
    close(got, want)
    close(guide.score_sequences(seqs), torch.tensor([hf_reward(rm, s) for s in seqs]))


def test_attention_in_small_blocks_is_exact(rm, lm, monkeypatch):
    """With tiny limits every call is cut into many forwards (groups of rows) and every
    attention into many row, branch and query blocks; the results must not change (the cuts are
    what bounds memory for heavy requests)."""
    from alignd.rewards import cached_attention, guide_model

    monkeypatch.setattr(cached_attention, "BLOCK_SCORES", 64)
    monkeypatch.setattr(guide_model, "BRANCH_TOKENS", 5)
    monkeypatch.setattr(guide_model, "ROLLOUT_BYTES", 1)
    rng = random.Random(7)
    vocab = rm.config.vocab_size
    guide = GuideModel(rm, "score", max_len=256)
    seqs = [random_seq(rng, n, vocab) for n in (9, 30, 4)]
    slots = [guide.open() for _ in seqs]
    k, span = 4, 3
    tokens = torch.tensor([[[rng.randrange(7, vocab) for _ in range(span)] for _ in range(k)] for _ in seqs])
    lengths = torch.tensor([[1, 3, 2, 3], [3, 3, 1, 2], [2, 1, 3, 3]])
    got = guide.score_branches(slots, seqs, tokens, lengths)
    want = torch.tensor([[hf_reward(rm, s + tokens[i, j, : lengths[i, j]].tolist()) for j in range(k)]
                         for i, s in enumerate(seqs)])
    close(got, want)
    close(guide.score_sequences(seqs), torch.tensor([hf_reward(rm, s) for s in seqs]))
    lm_guide = GuideModel(lm, "lm", max_len=256)
    lm_slots = [lm_guide.open() for _ in seqs]
    rolled, rolled_len = lm_guide.rollout(lm_slots, seqs, tokens[:, :, 0], 3, None)
    for i, s in enumerate(seqs):
        for j in range(k):
            assert rolled[i, j].tolist() == hf_greedy(lm, s + [tokens[i, j, 0].item()], 3, -1)
    # the candidates of every group are kept: next step commits each chosen one without a forward
    chosen = [s + [tokens[i, 1, 0].item()] for i, s in enumerate(seqs)]
    calls = count_forwards(monkeypatch)
    guide.sync(slots, chosen)
    assert calls == []


def count_forwards(monkeypatch) -> list[tuple[int, ...]]:
    from alignd.rewards import cached_attention

    calls: list[tuple[int, ...]] = []
    real = cached_attention.forward

    def counted(model, tokens, *args, **kw):
        calls.append(tuple(tokens.shape))
        return real(model, tokens, *args, **kw)

    monkeypatch.setattr(cached_attention, "forward", counted)
    return calls


def test_samples_of_one_prompt_share_one_prefill(rm, monkeypatch):
    """n samples of one prompt open n slots with the same tokens: the prompt runs once and the
    other slots copy its cache; every slot then scores exactly."""
    rng = random.Random(8)
    vocab = rm.config.vocab_size
    guide = GuideModel(rm, "score", max_len=256)
    prompt = random_seq(rng, 20, vocab)
    other = random_seq(rng, 7, vocab)
    seqs = [prompt, list(prompt), other, list(prompt)]
    slots = [guide.open() for _ in seqs]
    calls = count_forwards(monkeypatch)
    guide.sync(slots, seqs)
    assert calls == [(2, 20)]  # one forward: the prompt once and the other row, padded
    cands = torch.tensor([[9, 10], [11, 12], [13, 14], [15, 16]])
    got = guide.score_candidates(slots, seqs, cands)
    want = torch.tensor([[hf_reward(rm, s + [c]) for c in row] for s, row in zip(seqs, cands.tolist())])
    close(got, want)


def test_candidates_kept_from_separate_calls_commit_without_forward(rm, monkeypatch):
    """A step's rows scored in two calls (chunks, or a retry without a failed row) keep every
    row's candidates: next step each chosen token is committed with no forward at all."""
    rng = random.Random(9)
    vocab = rm.config.vocab_size
    guide = GuideModel(rm, "score", max_len=256)
    seqs = [random_seq(rng, n, vocab) for n in (6, 13)]
    slots = [guide.open() for _ in seqs]
    cands = torch.tensor([[20, 21, 22], [23, 24, 25]])
    guide.score_candidates(slots[:1], seqs[:1], cands[:1])
    guide.score_candidates(slots[1:], seqs[1:], cands[1:])
    seqs = [seqs[0] + [21], seqs[1] + [25]]
    calls = count_forwards(monkeypatch)
    guide.sync(slots, seqs)
    assert calls == []
    nxt = torch.tensor([[30, 31], [32, 33]])
    got = guide.score_candidates(slots, seqs, nxt)
    want = torch.tensor([[hf_reward(rm, s + [c]) for c in row] for s, row in zip(seqs, nxt.tolist())])
    close(got, want)
