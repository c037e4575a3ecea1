"""VAS, DeRa and Transfer Q* over real HTTP against independent HF implementations, alone and
mixed in one batch with ARGS, best-of-n and plain requests."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests import reference, rules

PROMPTS = ["the movie was", "what a lovely day", "the service at the"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def hf(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    load_lm = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    load_rm = lambda p: AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    a, b = reference.hf_reward(load_rm(tiny["rm_a"])), reference.hf_reward(load_rm(tiny["rm_b"]))
    return {
        "tok": tok,
        "eos": tok.eos_token_id,
        "base": load_lm(tiny["base"]),
        "ref": load_lm(tiny["base2"]),  # the reference and the Transfer Q* baseline
        "scorers": {"a": a, "b": b, "va": a, "vb": b, "vowels": reference.text_reward(rules.vowel_share, tok)},
    }


def ids(hf, prompt: str) -> list[int]:
    return hf["tok"](prompt)["input_ids"]


def complete(server, prompt, alignment=None, **kw):
    extra = {"return_token_ids": True}
    if alignment is not None:
        extra["alignment"] = alignment
    args = {"temperature": 0, "max_tokens": MAX_NEW, **kw}
    out = server.client().completions.create(model=server.model, prompt=prompt, extra_body=extra, **args)
    return out.choices[0].token_ids


def want_dera(hf, prompt, lam):
    return reference.dera_greedy(hf["base"], hf["ref"], lam, ids(hf, prompt), MAX_NEW, hf["eos"])


def want_vas(hf, prompt, betas, k):
    values = [(hf["scorers"][n], b) for n, b in betas.items()]
    return reference.vas_greedy(hf["base"], values, ids(hf, prompt), k, MAX_NEW, hf["eos"])


def want_tq(hf, prompt, weights, k, rollout):
    rewards = [(hf["scorers"][n], w) for n, w in weights.items()]
    return reference.transfer_q_greedy(hf["base"], hf["ref"], rewards, ids(hf, prompt), k, rollout, MAX_NEW, hf["eos"])


def test_dera_identities(server, hf):
    for prompt in PROMPTS:
        plain = complete(server, prompt)
        assert complete(server, prompt, {"decoder": "dera", "lambda": 1.0}) == plain
        reference_alone = reference.greedy(hf["ref"], ids(hf, prompt), MAX_NEW, hf["eos"])
        assert complete(server, prompt, {"decoder": "dera", "lambda": 0.0}) == reference_alone
        assert reference_alone != plain  # the two models really differ


@pytest.mark.parametrize("lam", [0.5, 2.0, -0.5])
def test_dera_mixes_logits(server, hf, lam):
    for prompt in PROMPTS:
        assert complete(server, prompt, {"decoder": "dera", "lambda": lam}) == want_dera(hf, prompt, lam)


def test_vas_zero_betas_is_plain(server):
    for prompt in PROMPTS:
        assert complete(server, prompt, {"decoder": "vas", "values": {"va": 0.0, "vb": 0.0}}) == complete(server, prompt)


@pytest.mark.parametrize("betas,k", [({"va": 3.0}, 5), ({"va": 2.0, "vb": -3.0}, 8)])
def test_vas_equals_reference(server, hf, betas, k):
    for prompt in PROMPTS:
        got = complete(server, prompt, {"decoder": "vas", "values": betas, "top_k": k})
        assert got == want_vas(hf, prompt, betas, k)


@pytest.mark.parametrize("weights,k,rollout", [({"a": 2.0}, 4, 5), ({"b": 1.0, "vowels": 10.0}, 3, 8)])
def test_transfer_q_equals_regenerated_rollouts(server, hf, weights, k, rollout):
    for prompt in PROMPTS[:2]:
        got = complete(server, prompt, {"decoder": "transfer_q", "rewards": weights, "top_k": k,
                                        "rollout_tokens": rollout})
        assert got == want_tq(hf, prompt, weights, k, rollout)


def test_mixed_batch_all_decoders_at_once(server, hf):
    """Every decoder and plain requests, with different parameters, in flight together; each
    must equal its own independent computation."""
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        jobs += [
            ({"decoder": "args", "rewards": {"a": 1.0 + i}, "top_k": 4 + i},
             reference.args_greedy(hf["base"], [(hf["scorers"]["a"], 1.0 + i)], ids(hf, prompt), 4 + i, MAX_NEW, hf["eos"])),
            ({"decoder": "vas", "values": {"vb": 1.5 * (i + 1)}, "top_k": 6}, want_vas(hf, prompt, {"vb": 1.5 * (i + 1)}, 6)),
            ({"decoder": "dera", "lambda": 0.3 * (i + 1)}, want_dera(hf, prompt, 0.3 * (i + 1))),
            ({"decoder": "transfer_q", "rewards": {"a": 1.0}, "top_k": 3, "rollout_tokens": 3 + i},
             want_tq(hf, prompt, {"a": 1.0}, 3, 3 + i)),
            (None, reference.greedy(hf["base"], ids(hf, prompt), MAX_NEW, hf["eos"])),
        ]
    bon = {"decoder": "best_of_n", "rewards": {"b": 1.0}, "n": 4, "return_candidates": True}
    with cf.ThreadPoolExecutor(len(jobs) + 1) as pool:
        futures = [pool.submit(complete, server, PROMPTS[i // 5], al) for i, (al, _) in enumerate(jobs)]
        best = pool.submit(server.client().completions.create, model=server.model, prompt=PROMPTS[0],
                           max_tokens=MAX_NEW, temperature=1.0, seed=11, extra_body={"alignment": bon})
        for (al, want), f in zip(jobs, futures):
            assert f.result() == want, al
        al = best.result().choices[0].model_extra["alignment"]
        assert al["total"] == max(c["total"] for c in al["candidates"])


@pytest.mark.parametrize("alignment,words", [
    ({"decoder": "vas", "values": {"nope": 1.0}}, ["nope", "'va'", "'vb'"]),
    ({"decoder": "vas"}, ["vas needs at least one value"]),
    ({"decoder": "vas", "values": {"va": "x"}}, ["values.va"]),
    ({"decoder": "transfer_q", "rewards": {"a": 1}, "rollout_tokens": 0}, ["rollout_tokens"]),
    ({"decoder": "transfer_q", "rewards": {"a": 1}, "rollout_tokens": 257}, ["rollout_tokens"]),
    ({"decoder": "transfer_q"}, ["transfer_q needs at least one reward"]),
    ({"decoder": "dera", "lambda": "big"}, ["lambda"]),
])
def test_bad_decoder_params_are_400(server, alignment, words):
    body = {"model": server.model, "prompt": "hi", "max_tokens": 2, "alignment": alignment}
    with server.http() as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    for w in words:
        assert w in r.json()["error"]["message"]


def test_non_finite_lambda_is_400(server):
    body = '{"model": "tiny", "prompt": "hi", "alignment": {"decoder": "dera", "lambda": NaN}}'
    with server.http() as http:
        r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]


@pytest.mark.parametrize("alignment,option", [
    ({"decoder": "dera", "lambda": 0.5}, "--reference"),
    ({"decoder": "vas", "values": {"va": 1.0}}, "--value"),
    ({"decoder": "args", "rewards": {"a": 1.0}, "reward_cache": False}, "--allow-reward-recompute"),
])
def test_decoder_without_its_model_names_the_option(bare_server, alignment, option):
    body = {"model": bare_server.model, "prompt": "hi", "max_tokens": 2, "alignment": alignment}
    with bare_server.http() as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert option in r.json()["error"]["message"]
    assert httpx.get(f"{bare_server.url}/health").status_code == 200
