"""OpenAI's and vLLM's sampling fields over real HTTP, alone and under each decoder, against
independent HF computations: logit_bias, top_k, min_p, repetition_penalty, stop_token_ids, echo,
chat_template_kwargs, a message's name, user; and best-of-n's usage."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests import reference

PROMPT = "the movie was"
MAX_NEW = 8


@pytest.fixture(scope="module")
def hf(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    lm = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    a = reference.hf_reward(AutoModelForSequenceClassification.from_pretrained(tiny["rm_a"], dtype=torch.float32))
    return {"tok": tok, "eos": tok.eos_token_id, "base": lm(tiny["base"]), "ref": lm(tiny["base2"]), "a": a,
            "prompt": tok(PROMPT)["input_ids"]}


# vLLM's fields, which the openai client takes in extra_body.
VLLM_FIELDS = {"top_k", "min_p", "repetition_penalty", "stop_token_ids", "structured_outputs", "response_format"}


def create(server, alignment=None, **fields):
    extra = {"return_token_ids": True, **({"alignment": alignment} if alignment else {})}
    extra.update({k: fields.pop(k) for k in VLLM_FIELDS & fields.keys()})
    args = {"model": server.model, "prompt": PROMPT, "temperature": 0, "max_tokens": MAX_NEW, **fields}
    return server.client().completions.create(extra_body=extra, **args)


def tokens(server, alignment=None, **fields) -> list[int]:
    return create(server, alignment, **fields).choices[0].token_ids


@pytest.fixture(scope="module")
def bias(server, hf) -> dict[int, float]:
    """Bans the plain greedy's first token and favours one it never picks."""
    plain = tokens(server)
    favoured = next(t for t in range(10, 300) if t not in plain and t != hf["eos"])
    return {plain[0]: -100.0, favoured: 3.0}


def wire(bias: dict[int, float]) -> dict[str, float]:
    return {str(t): b for t, b in bias.items()}


def test_logit_bias_plain(server, hf, bias):
    got = tokens(server, logit_bias=wire(bias))
    assert got == reference.greedy(reference.Biased(hf["base"], bias), hf["prompt"], MAX_NEW, hf["eos"])
    assert got != tokens(server)


def test_logit_bias_comes_before_args_picks_its_top_k(server, hf, bias):
    al = {"decoder": "args", "rewards": {"a": 2.0}, "top_k": 5}
    want = reference.args_greedy(reference.Biased(hf["base"], bias), [(hf["a"], 2.0)], hf["prompt"], 5, MAX_NEW,
                                 hf["eos"])
    assert tokens(server, al, logit_bias=wire(bias)) == want
    assert want != tokens(server, al)


def test_logit_bias_under_vas(server, hf, bias):
    al = {"decoder": "vas", "values": {"va": 1.5}, "top_k": 6}
    want = reference.vas_greedy(reference.Biased(hf["base"], bias), [(hf["a"], 1.5)], hf["prompt"], 6, MAX_NEW,
                                hf["eos"])
    assert tokens(server, al, logit_bias=wire(bias)) == want


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_logit_bias_counts_once_under_dera_whatever_lambda(server, hf, bias, lam):
    # z_ref + b + λ (z_served − z_ref): the bias of both models' logits, mixed.
    biased = [reference.Biased(hf[m], bias) for m in ("base", "ref")]
    want = reference.dera_greedy(*biased, lam, hf["prompt"], MAX_NEW, hf["eos"])
    assert tokens(server, {"decoder": "dera", "lambda": lam}, logit_bias=wire(bias)) == want
    assert bias and next(iter(bias)) not in want  # the ban holds at λ = 0 too


@pytest.mark.parametrize("alignment", [None, {"decoder": "vas", "values": {"va": 1.5}, "top_k": 6},
                                       {"decoder": "dera", "lambda": 0.5}])
def test_top_k_and_min_p_cut_the_distribution_sampled(server, alignment):
    """top_k = 1, or min_p = 1, leaves only the likeliest token of the (guided) distribution:
    sampling at temperature 1 then gives the greedy answer."""
    greedy = tokens(server, alignment)
    assert tokens(server, alignment, temperature=1.0, seed=3, top_k=1) == greedy
    assert tokens(server, alignment, temperature=1.0, seed=3, min_p=1.0) == greedy
    assert tokens(server, alignment, temperature=1.0, seed=3) != greedy  # the seed alone would not do it


@pytest.mark.parametrize("decoder", ["args", "transfer_q"])
@pytest.mark.parametrize("field,value", [("top_k", 3), ("min_p", 0.1)])
def test_top_k_and_min_p_would_cut_own_candidates(server, decoder, field, value):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        tokens(server, {"decoder": decoder, "rewards": {"a": 1.0}}, temperature=1.0, **{field: value})
    assert e.value.body["param"] == field and "alignment.top_k" in e.value.message


def test_repetition_penalty(server, hf):
    want = reference.repetition_penalized_greedy(hf["base"], 1.8, hf["prompt"], MAX_NEW, hf["eos"])
    assert tokens(server, repetition_penalty=1.8) == want
    assert want != tokens(server)


def test_stop_token_ids(server):
    greedy = tokens(server)
    j = next(j for j in range(2, len(greedy)) if greedy[j] not in greedy[:j])
    out = create(server, stop_token_ids=[greedy[j]])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].token_ids[:j] == greedy[:j] and len(out.choices[0].token_ids) <= j + 1


def test_echo(server, hf):
    plain = create(server).choices[0]
    assert create(server, echo=True).choices[0].text == PROMPT + plain.text
    # A prompt of token ids echoes as its decoded text.
    by_ids = create(server, echo=True, prompt=hf["prompt"]).choices[0].text
    assert by_ids == hf["tok"].decode(hf["prompt"]) + plain.text
    streamed = server.client().completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                                  max_tokens=MAX_NEW, echo=True, stream=True)
    pieces = [c.choices[0].text for c in streamed if c.choices]
    assert pieces[0].startswith(PROMPT) and "".join(pieces) == PROMPT + plain.text
    al = {"decoder": "best_of_n", "rewards": {"a": 1.0}, "n": 3}
    best = create(server, al, echo=True, temperature=1.0, seed=5).choices[0]
    assert best.text == PROMPT + create(server, al, temperature=1.0, seed=5).choices[0].text


def test_best_of_n_usage_counts_the_returned_text(server):
    out = server.client().completions.create(
        model=server.model, prompt=PROMPT, temperature=1.0, seed=1, n=2, max_tokens=5,
        extra_body={"ignore_eos": True, "alignment": {"decoder": "best_of_n", "rewards": {"a": 1.0}, "n": 4}})
    assert out.usage.completion_tokens == 2 * 5
    assert [c.model_extra["alignment"]["sampled_tokens"] for c in out.choices] == [4 * 5, 4 * 5]


def test_chat_template_kwargs_and_message_names_reach_the_template(server, hf):
    tok = hf["tok"]
    client = server.client()

    def prompt_tokens(messages, **extra) -> int:
        out = client.chat.completions.create(model=server.model, messages=messages, max_tokens=1, temperature=0,
                                             extra_body=extra or None)
        return out.usage.prompt_tokens

    hi = [{"role": "user", "content": "hi"}]
    text = "<|user|>hi</s><|assistant|>"
    assert prompt_tokens(hi) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert prompt_tokens(hi, chat_template_kwargs={"prefill": "the movie"}) == \
        len(tok(text + "the movie", add_special_tokens=False)["input_ids"])
    named = [{"role": "user", "content": "hi", "name": "bob"}]
    assert prompt_tokens(named) == len(tok("<|user|>bob: hi</s><|assistant|>", add_special_tokens=False)["input_ids"])
    # The prefill is part of the prompt: the answer continues it as /v1/completions would.
    chat = client.chat.completions.create(model=server.model, messages=hi, max_tokens=MAX_NEW, temperature=0,
                                          extra_body={"chat_template_kwargs": {"prefill": "the movie"}})
    ids = tok(text + "the movie", add_special_tokens=False)["input_ids"]
    assert chat.choices[0].message.content == create(server, prompt=ids).choices[0].text


def test_user_is_accepted(server):
    out = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=2, user="user-1234")
    assert out.choices[0].finish_reason in ("length", "stop")


def test_tokenize_detokenize_and_version(server, hf):
    tok = hf["tok"]
    with server.http() as http:
        r = http.post("/tokenize", json={"model": server.model, "prompt": PROMPT, "return_token_strs": True}).json()
        assert r["tokens"] == hf["prompt"] and r["count"] == len(hf["prompt"]) and r["max_model_len"] == 512
        assert r["token_strs"] == tok.convert_ids_to_tokens(hf["prompt"])
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                            "chat_template_kwargs": {"prefill": "ok"}}).json()
        assert chat["tokens"] == tok("<|user|>hi</s><|assistant|>ok", add_special_tokens=False)["input_ids"]
        assert http.post("/detokenize", json={"tokens": hf["prompt"]}).json() == {"prompt": tok.decode(hf["prompt"])}
        for path, body, param in (("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
                                  ("/tokenize", {"prompt": "x", "model": "gpt-9"}, "model"),
                                  ("/detokenize", {"tokens": [10**6]}, "tokens"),
                                  ("/detokenize", {"tokens": [-1]}, "tokens.0")):
            bad = http.post(path, json=body)
            assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param, bad.text
        version = http.get("/version").json()
        assert set(version) == {"version", "vllm"} and version["vllm"].startswith("0.32")
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}).status_code == 401  # the key, as /v1


def test_models_list_every_guide_and_decoder_parameter(server, tiny):
    card = server.client().models.list().data[0].model_extra["alignment"]
    guides = {(g["kind"], g["name"]): g for g in card["guides"]}
    assert guides[("reward", "a")] == {"name": "a", "kind": "reward", "spec": str(tiny["rm_a"]), "route": "cached"}
    assert guides[("reward", "vowels")]["route"] == "text" and guides[("value", "va")]["route"] == "cached"
    assert guides[("reference", "reference")]["spec"] == str(tiny["base2"]) and guides[("reference", "reference")]["route"] is None
    details = {d["name"]: d for d in card["decoder_details"]}
    assert set(details) == set(card["decoders"])
    assert set(details["dera"]["parameters"]) == {"lambda"} and details["best_of_n"]["runs"] == details["blockwise"]["runs"] == "request"
    assert details["args"]["parameters"]["top_k"]["maximum"] == 100 and details["args"]["needs"] == ["rewards"]


def test_rewards_endpoint_scores_as_the_alignment_blocks_do(server, hf):
    tok = hf["tok"]
    weights = {"a": 2.0, "b": -1.0, "vowels": 0.5}
    out = create(server, {"decoder": "args", "rewards": weights, "top_k": 4})
    choice = out.choices[0]
    block = choice.model_extra["alignment"]
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the movie was great"}]
    body = {"model": server.model, "rewards": weights, "values": ["va"],
            "input": [hf["prompt"] + choice.token_ids, "the movie was great", conversation]}
    with server.http() as http:
        r = http.post("/v1/rewards", json=body)
    assert r.status_code == 200, r.text
    first, text, chat = r.json()["data"]
    assert first["rewards"] == pytest.approx(block["rewards"], rel=1e-4, abs=1e-5)
    assert first["total"] == pytest.approx(block["total"] + first["values"]["va"], rel=1e-4, abs=1e-5)
    text_ids = tok("the movie was great")["input_ids"]
    chat_ids = tok("<|user|>hi</s><|assistant|>the movie was great</s>", add_special_tokens=False)["input_ids"]
    for got, seq in ((text, text_ids), (chat, chat_ids)):
        assert got["tokens"] == len(seq)
        assert got["rewards"]["a"] == pytest.approx(hf["a"](seq), rel=1e-4, abs=1e-5)
        assert got["values"]["va"] == pytest.approx(hf["a"](seq), rel=1e-4, abs=1e-5)  # va is rm_a as a value model
    assert r.json()["usage"]["prompt_tokens"] == len(hf["prompt"] + choice.token_ids) + len(text_ids) + len(chat_ids)


def test_rewards_endpoint_defaults_and_refusals(server):
    with server.http() as http:
        one = http.post("/v1/rewards", json={"model": server.model, "input": "a fine day"}).json()["data"]
        assert len(one) == 1 and set(one[0]["rewards"]) == {"a", "b", "other", "vowels"}
        assert one[0]["total"] == pytest.approx(sum(one[0]["rewards"].values()))
        for body, status, param in (
            ({"input": "x", "rewards": {"nope": 1}}, 400, "rewards"),
            ({"input": "x", "values": ["nope"]}, 400, "values"),
            ({"input": []}, 400, "input"),
            ({"input": ["x"] * 65}, 400, "input"),
            ({"input": [[10**6]]}, 400, "input"),
            ({"input": "x", "rewards": {"a": float("1e9")}}, 400, "rewards.a"),
            ({"input": "x", "model": "gpt-9"}, 404, "model"),
            ({"input": "x", "temperature": 1}, 400, "temperature"),
        ):
            r = http.post("/v1/rewards", json={"model": server.model, **body})
            assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert httpx.post(f"{server.url}/v1/rewards", json={"model": server.model, "input": "x"}).status_code == 401


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}
GUIDED = [None, {"decoder": "args", "rewards": {"a": 3.0}, "top_k": 8},
          {"decoder": "transfer_q", "rewards": {"a": 3.0}, "top_k": 4, "rollout_tokens": 3},
          {"decoder": "vas", "values": {"va": 4.0}, "top_k": 8}, {"decoder": "dera", "lambda": 3.0}]


@pytest.mark.parametrize("alignment", GUIDED, ids=lambda a: a["decoder"] if a else "plain")
def test_structured_output_under_guidance(server, alignment):
    """The grammar's mask comes first: whatever the decoder adds (DeRa at λ = 3 extrapolates the
    logits of masked tokens too), a masked token never comes back, and the output parses."""
    import json

    import jsonschema

    # A random-weight model may pad a schema's JSON with whitespace until max_tokens: the regex of
    # its compact form ends for sure.
    constraint = {"regex": r'\{"ok":(true|false),"n":[0-9]\}'}
    out = create(server, alignment, max_tokens=40, structured_outputs=constraint).choices[0]
    assert out.finish_reason == "stop", out
    jsonschema.validate(json.loads(out.text), SCHEMA)
    choice = create(server, alignment, max_tokens=10, structured_outputs={"choice": ["alpha", "beta gamma"]})
    assert choice.choices[0].text in ("alpha", "beta gamma")


def test_response_format_is_the_same_constraint(server):
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    al = {"decoder": "args", "rewards": {"a": 3.0}, "top_k": 8}
    by_format = create(server, al, max_tokens=24, response_format=schema).choices[0].token_ids
    assert by_format == create(server, al, max_tokens=24, structured_outputs={"json": SCHEMA}).choices[0].token_ids
    assert by_format != tokens(server, al, max_tokens=24)


@pytest.mark.parametrize("fields,param", [
    ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}, "structured_outputs"),
])
def test_bad_constraints_are_400_before_a_stream_starts(server, fields, param):
    with server.http() as http:
        for stream in (False, True):
            r = http.post("/v1/completions", json={"model": server.model, "prompt": PROMPT, "stream": stream, **fields})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# -- logprobs under guidance ------------------------------------------------------------------------
def guided_scores(hf, alignment, seq) -> torch.Tensor:
    """The scores each decoder samples from at `seq`, computed here from the papers' rules
    (non-candidates -inf for ARGS), with the HF models."""
    z = reference.next_logits(hf["base"], seq)
    if alignment is None:
        return z
    if alignment["decoder"] == "args":
        k = alignment["top_k"]
        top, cands = z.topk(k)
        out = torch.full_like(z, float("-inf"))
        for zc, c in zip(top.tolist(), cands.tolist()):
            out[c] = zc + alignment["rewards"]["a"] * hf["a"](seq + [c])
        return out
    if alignment["decoder"] == "vas":
        cands = z.topk(alignment["top_k"]).indices.tolist()
        v = torch.tensor([hf["a"](seq + [c]) for c in cands])
        out = z.clone()
        out[cands] += alignment["values"]["va"] * (v - v.mean())
        return out
    z_ref = reference.next_logits(hf["ref"], seq)
    return z_ref + alignment["lambda"] * (z - z_ref)


LOGPROB_CASES = [None, {"decoder": "args", "rewards": {"a": 2.0}, "top_k": 5},
                 {"decoder": "vas", "values": {"va": 3.0}, "top_k": 6}, {"decoder": "dera", "lambda": 2.0}]


@pytest.mark.parametrize("alignment", LOGPROB_CASES, ids=lambda a: a["decoder"] if a else "plain")
def test_logprobs_are_of_the_guided_distribution_and_the_base(server, hf, alignment):
    out = create(server, alignment, logprobs=3).choices[0]
    tokens = out.token_ids
    seq = list(hf["prompt"])
    want, want_base, want_top = [], [], []
    for t in tokens:
        scores = guided_scores(hf, alignment, seq)
        lp = torch.log_softmax(scores, -1)
        assert int(scores.argmax()) == t  # the same greedy path
        want.append(lp[t].item())
        want_top.append(lp.topk(3).values.tolist())
        want_base.append(torch.log_softmax(reference.next_logits(hf["base"], seq), -1)[t].item())
        seq.append(t)
    got = out.logprobs
    assert got.token_logprobs == pytest.approx(want, abs=2e-3)
    # Alternatives are keyed by text, and distinct tokens can decode alike: each text keeps its
    # likeliest, so the best is always there and every entry is one of the wanted ones.
    assert [max(d.values()) for d in got.top_logprobs] == pytest.approx([w[0] for w in want_top], abs=2e-3)
    for d, w, sampled in zip(got.top_logprobs, want_top, want):
        assert all(any(abs(v - x) < 2e-3 for x in [*w, sampled]) for v in d.values())
    assert len(got.tokens) == len(tokens) and got.text_offset[0] == 0
    if alignment is None:
        assert "base_token_logprobs" not in got.model_extra and "alignment" not in out.model_extra
        assert want == pytest.approx(want_base, abs=1e-5)  # plain greedy: the base's own
        return
    assert got.model_extra["base_token_logprobs"] == pytest.approx(want_base, abs=2e-3)
    block = out.model_extra["alignment"]
    assert block["logprob_sum"] == pytest.approx(sum(want), abs=1e-2)
    assert block["base_logprob_sum"] == pytest.approx(sum(want_base), abs=1e-2)


def test_chat_logprobs_and_streams_carry_the_same_numbers(server, hf):
    al = {"decoder": "args", "rewards": {"a": 2.0}, "top_k": 5}
    messages = [{"role": "user", "content": "the movie"}]
    ids = hf["tok"]("<|user|>the movie</s><|assistant|>", add_special_tokens=False)["input_ids"]
    whole = create(server, al, prompt=ids, logprobs=2).choices[0]
    client = server.client()
    chat = client.chat.completions.create(model=server.model, messages=messages, temperature=0, max_tokens=MAX_NEW,
                                          logprobs=True, top_logprobs=2, extra_body={"alignment": al}).choices[0]
    content = chat.logprobs.content
    assert [c.logprob for c in content] == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    assert [c.model_extra["alignment"]["base_logprob"] for c in content] == \
        pytest.approx(whole.logprobs.model_extra["base_token_logprobs"], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    stream = client.chat.completions.create(model=server.model, messages=messages, temperature=0, max_tokens=MAX_NEW,
                                            logprobs=True, stream=True, extra_body={"alignment": al})
    pieces = [c.choices[0] for c in stream if c.choices]
    streamed = [t.logprob for p in pieces if p.logprobs for t in p.logprobs.content]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    last = pieces[-1].model_extra["alignment"]
    assert last["base_logprobs"] == pytest.approx(whole.logprobs.model_extra["base_token_logprobs"], abs=1e-5)
    assert last["logprob_sum"] == pytest.approx(whole.model_extra["alignment"]["logprob_sum"], abs=1e-4)
    # A completions stream: a chunk's offsets start at the text sent before it (vLLM's rule).
    stream = client.completions.create(model=server.model, prompt=ids, temperature=0, max_tokens=MAX_NEW, logprobs=2,
                                       stream=True, extra_body={"alignment": al})
    pieces = [c.choices[0] for c in stream if c.choices]
    assert [lp for p in pieces if p.logprobs for lp in p.logprobs.token_logprobs] == \
        pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    sent = 0
    for p in pieces:
        if p.logprobs and p.logprobs.tokens:
            assert p.logprobs.text_offset[0] == sent
        sent += len(p.text)
    assert "".join(p.text for p in pieces) == whole.text
    assert pieces[-1].model_extra["alignment"]["base_logprob_sum"] == \
        pytest.approx(whole.model_extra["alignment"]["base_logprob_sum"], abs=1e-4)
