"""Guided decoding over real HTTP (openai client) against independent HF implementations."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests import reference, rules

PROMPTS = ["the movie was", "what a lovely day", "the service at the", "numbers one two"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def hf(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    base = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    rm = {n: AutoModelForSequenceClassification.from_pretrained(tiny[f"rm_{n}"], dtype=torch.float32)
          for n in ("a", "b", "other")}
    other_tok = AutoTokenizer.from_pretrained(tiny["rm_other"])
    scorers = {
        "a": reference.hf_reward(rm["a"]),
        "b": reference.hf_reward(rm["b"]),
        "other": reference.hf_reward(rm["other"], other_tok, tok),
        "vowels": reference.text_reward(rules.vowel_share, tok),
    }
    return tok, base, scorers


def complete(server, prompt, alignment=None, **kw):
    extra = {"return_token_ids": True}
    if alignment is not None:
        extra["alignment"] = alignment
    args = {"temperature": 0, "max_tokens": MAX_NEW, **kw}
    return server.client().completions.create(model=server.model, prompt=prompt, extra_body=extra, **args)


@pytest.mark.parametrize("weights,top_k", [
    ({"a": 2.0}, 5),
    ({"a": 1.0, "b": -1.5}, 8),
    ({"other": 3.0}, 4),
    ({"vowels": 20.0, "a": 0.5}, 6),
])
def test_args_greedy_equals_reference(server, hf, weights, top_k):
    tok, base, scorers = hf
    rewards = [(scorers[n], w) for n, w in weights.items()]
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        got = complete(server, prompt, {"decoder": "args", "rewards": weights, "top_k": top_k})
        want = reference.args_greedy(base, rewards, ids, top_k, MAX_NEW, tok.eos_token_id)
        assert got.choices[0].token_ids == want, prompt


def test_recompute_path_equals_cached_path(server):
    """reward_cache=false re-runs every candidate over the whole text (the reference codes'
    way); it must choose exactly what the cached path chooses."""
    for prompt in PROMPTS[:2]:
        al = {"decoder": "args", "rewards": {"a": 2.0, "b": -1.0}, "top_k": 6}
        cached = complete(server, prompt, al)
        recomputed = complete(server, prompt, {**al, "reward_cache": False})
        assert recomputed.choices[0].token_ids == cached.choices[0].token_ids


def test_args_weight_zero_is_plain_greedy(server, hf):
    tok, base, _ = hf
    for prompt in PROMPTS:
        guided = complete(server, prompt, {"decoder": "args", "rewards": {"a": 0.0}, "top_k": 10})
        plain = complete(server, prompt)
        want = reference.greedy(base, tok(prompt)["input_ids"], MAX_NEW, tok.eos_token_id)
        assert guided.choices[0].token_ids == plain.choices[0].token_ids == want


def test_args_weight_moves_reward_in_its_direction(server, hf):
    """More weight on a reward gives outputs that reward scores higher (summed over prompts)."""
    tok, _, scorers = hf
    totals = {}
    for w in (-4.0, 0.0, 4.0):
        total = 0.0
        for prompt in PROMPTS:
            out = complete(server, prompt, {"decoder": "args", "rewards": {"a": w}, "top_k": 10})
            total += scorers["a"](tok(prompt)["input_ids"] + out.choices[0].token_ids)
        totals[w] = total
    assert totals[-4.0] < totals[0.0] < totals[4.0], totals


def test_reported_rewards_match_independent_scoring(server, hf):
    tok, _, scorers = hf
    weights = {"a": 1.0, "b": 0.5, "other": -1.0, "vowels": 2.0}
    out = complete(server, PROMPTS[0], {"decoder": "args", "rewards": weights, "top_k": 4})
    seq = tok(PROMPTS[0])["input_ids"] + out.choices[0].token_ids
    reported = out.choices[0].model_extra["alignment"]
    assert reported["decoder"] == "args"
    for name in weights:
        assert reported["rewards"][name] == pytest.approx(scorers[name](seq), abs=1e-4)
    assert reported["total"] == pytest.approx(sum(w * reported["rewards"][n] for n, w in weights.items()))


def test_args_sampling_stays_within_top_k(server, hf):
    """With temperature > 0 ARGS samples only among the base model's top-k tokens."""
    tok, base, _ = hf
    ids = tok(PROMPTS[1])["input_ids"]
    out = complete(server, PROMPTS[1], {"decoder": "args", "rewards": {"a": 1.0}, "top_k": 3},
                   temperature=1.5, seed=7, n=4)
    for choice in out.choices:
        seq = list(ids)
        for token in choice.token_ids:
            assert token in reference.next_logits(base, seq).topk(3).indices.tolist()
            seq.append(token)


def test_best_of_n_returns_the_best_candidate(server, hf):
    tok, _, scorers = hf
    weights = {"a": 1.0, "b": -0.5}
    prompt_ids = tok(PROMPTS[2])["input_ids"]
    out = complete(server, PROMPTS[2], {"decoder": "best_of_n", "rewards": weights, "n": 6,
                                         "return_candidates": True}, temperature=1.0, seed=3, n=2)
    assert len(out.choices) == 2
    for choice in out.choices:
        al = choice.model_extra["alignment"]
        cands = al["candidates"]
        assert len(cands) == 6
        for c in cands:  # every candidate's reported rewards, checked independently
            seq = prompt_ids + c["token_ids"]
            for name, w in weights.items():
                assert c["rewards"][name] == pytest.approx(scorers[name](seq), abs=1e-4)
            assert c["total"] == pytest.approx(sum(w * c["rewards"][n] for n, w in weights.items()))
        best = max(cands, key=lambda c: c["total"])
        assert choice.token_ids == best["token_ids"]
        assert al["total"] == pytest.approx(best["total"])
        assert len({tuple(c["token_ids"]) for c in cands}) > 1  # really n different samples


def test_plain_requests_untouched_beside_guided_ones(server, hf):
    """Plain and guided requests share batches; the plain ones decode exactly as alone."""
    import concurrent.futures as cf

    tok, base, _ = hf
    with cf.ThreadPoolExecutor(8) as pool:
        guided = [pool.submit(complete, server, p, {"decoder": "args", "rewards": {"a": 3.0}, "top_k": 5})
                  for p in PROMPTS]
        plain = [pool.submit(complete, server, p) for p in PROMPTS]
        for p, f in zip(PROMPTS, plain):
            assert f.result().choices[0].token_ids == reference.greedy(base, tok(p)["input_ids"], MAX_NEW,
                                                                        tok.eos_token_id)
        for f in guided:
            assert "alignment" in f.result().choices[0].model_extra


def test_chat_completion_with_alignment(server, hf):
    tok, base, scorers = hf
    messages = [{"role": "user", "content": "the movie was"}]
    out = server.client().chat.completions.create(
        model=server.model, messages=messages, max_tokens=MAX_NEW, temperature=0,
        extra_body={"alignment": {"decoder": "args", "rewards": {"a": 2.0}, "top_k": 5}, "return_token_ids": True},
    )
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    want = reference.args_greedy(base, [(scorers["a"], 2.0)], ids, 5, MAX_NEW, tok.eos_token_id)
    choice = out.choices[0]
    assert choice.model_extra["token_ids"] == want
    assert choice.message.role == "assistant"
    assert choice.message.content == tok.decode(want, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(ids)
