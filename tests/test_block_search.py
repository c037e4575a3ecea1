"""Blockwise search over real HTTP (openai client), against a straightforward loop: draw the
round's n blocks with a plain request of the same seed, score each whole text with the HF reward
models, keep the best, go on."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests import reference

PROMPT = "the movie was"
WEIGHTS = {"a": 1.0, "b": -0.5}


@pytest.fixture(scope="module")
def hf(tiny):
    rm = {n: reference.hf_reward(AutoModelForSequenceClassification.from_pretrained(tiny[f"rm_{n}"], dtype=torch.float32))
          for n in WEIGHTS}
    return AutoTokenizer.from_pretrained(tiny["base"]), lambda seq: sum(w * rm[n](seq) for n, w in WEIGHTS.items())


def test_the_worker_scores_blocks_against_the_searchs_cached_prefix(tiny, hf):
    """Rounds of blocks of different lengths against a prefix that grows by the accepted block:
    each equals the HF reward of the whole text; ending the search frees its caches."""
    from alignd.rewards.runtime import GuideRuntime
    from alignd.rewards.specs import GuideConfig

    _, total = hf
    guides = GuideRuntime(GuideConfig(model=str(tiny["base"]), rewards={n: str(tiny[f"rm_{n}"]) for n in WEIGHTS}),
                          torch.device("cpu"), torch.float32, 256)
    seq = [5, 40, 41, 42]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        blocks = [torch.randint(10, 300, (length,), generator=gen).tolist() for length in (3, 1, 3, 2)]
        rewards, failed = guides.score_blocks("k", seq, blocks, list(WEIGHTS))
        assert failed == [{}] * 4
        for block, got in zip(blocks, rewards):
            assert sum(w * got[n] for n, w in WEIGHTS.items()) == pytest.approx(total(seq + block), abs=1e-4)
        seq = seq + blocks[2]
    assert guides.stats()["guide_states"] == 2  # the search's prefix, one per reward model
    guides.end_search("k")
    assert guides.stats()["guide_states"] == 0


def search(server, per_round, block, max_tokens, seed, **kw):
    al = {"decoder": "blockwise", "rewards": WEIGHTS, "n": per_round, "block_tokens": block}
    return server.client().completions.create(model=server.model, prompt=PROMPT, temperature=1.0, seed=seed,
                                              max_tokens=max_tokens, extra_body={"alignment": al, "return_token_ids": True},
                                              **kw)


def straightforward(server, hf, n, block, max_tokens, seed) -> tuple[list[int], int]:
    """The accepted tokens, and how many were drawn in all."""
    tok, total = hf
    prompt, accepted, rounds, drawn = tok(PROMPT)["input_ids"], [], 0, 0
    while True:
        draw = server.client().completions.create(
            model=server.model, prompt=prompt + accepted, n=n, temperature=1.0, max_tokens=min(block, max_tokens - len(accepted)),
            seed=seed + rounds * n, extra_body={"return_token_ids": True})
        blocks = sorted(draw.choices, key=lambda c: c.index)
        best = max(blocks, key=lambda c: total(prompt + accepted + c.token_ids))
        accepted += best.token_ids
        rounds, drawn = rounds + 1, drawn + sum(len(c.token_ids) for c in blocks)
        if best.finish_reason == "stop" or len(accepted) >= max_tokens:
            return accepted, drawn


@pytest.mark.parametrize("n,block,max_tokens,seed", [(4, 3, 10, 7), (6, 5, 12, 21)])
def test_blockwise_equals_the_straightforward_loop(server, hf, n, block, max_tokens, seed):
    tok, total = hf
    out = search(server, n, block, max_tokens, seed).choices[0]
    accepted, drawn = straightforward(server, hf, n, block, max_tokens, seed)
    assert out.token_ids == accepted
    al = out.model_extra["alignment"]
    assert al["decoder"] == "blockwise" and al["sampled_tokens"] == drawn
    assert al["total"] == pytest.approx(total(tok(PROMPT)["input_ids"] + out.token_ids), abs=1e-4)


def test_blockwise_streams_each_block_as_it_is_chosen(server, hf):
    whole = search(server, 3, 4, 12, 5).choices[0]
    pieces = [chunk.choices[0] for chunk in search(server, 3, 4, 12, 5, stream=True) if chunk.choices]
    assert "".join(p.text for p in pieces) == whole.text
    assert sum(1 for p in pieces if p.finish_reason is None) >= 2  # blocks went out before the end
    assert pieces[-1].finish_reason == whole.finish_reason
    assert pieces[-1].model_extra["alignment"]["total"] == pytest.approx(whole.model_extra["alignment"]["total"])


def test_blockwise_frees_its_reward_caches(server):
    search(server, 4, 3, 9, 1, n=2)
    deadline = time.monotonic() + 30
    while server.metric("alignd_guide_states") != 0:
        assert time.monotonic() < deadline, "a search left its cached reward prefix behind"
        time.sleep(0.2)


def test_later_rounds_reuse_the_base_models_cached_prefix(server):
    """Round r's prompt is round r - 1's plus the accepted block: vLLM's prefix cache serves its
    full KV blocks (128 tokens on CPU), so the base model does not recompute the prefix."""
    al = {"decoder": "blockwise", "rewards": WEIGHTS, "n": 2, "block_tokens": 4}
    out = server.client().completions.create(model=server.model, prompt=" ".join(["the movie was fine"] * 45),
                                             temperature=1.0, seed=3, max_tokens=8, extra_body={"alignment": al})
    reused = out.choices[0].model_extra["alignment"]["reused_prefix_tokens"]
    assert reused >= 128, reused  # the second round's prompt (180 words or more), but its last partial block
