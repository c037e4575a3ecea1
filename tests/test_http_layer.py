"""The HTTP layer alone, in-process and in seconds: a stand-in engine (no vLLM engine starts) and
generate.run/stream replaced by fixed choices. The response bodies must keep the exact JSON
that OpenAI's clients read: which fields are null, which are left out, and when."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from alignd.server import generate
from alignd.server.app import create_app
from alignd.server.config import ServeSettings
from alignd.server.schemas import Candidate, ChoiceAlignment

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def _no_stats():
    return None


def _engine(alive: bool = True) -> SimpleNamespace:
    return SimpleNamespace(alive=alive, llm=None, max_model_len=64, vocab_limit=100, max_token_chars=4, routes={},
                           encode=lambda p: [1, 2, 3] if isinstance(p, str) else list(p),
                           encode_chat=lambda messages, variables=None: [1, 2], stats=_no_stats)


def _client(**settings) -> TestClient:
    s = ServeSettings(model="m", served_model_name="tiny", api_key=KEY, rewards={"a": "x"}, **settings)
    # Not entered as a context manager: the lifespan (which starts the engine) does not run, so
    # the stand-in is declared ready here.
    app = create_app(s, _engine())
    app.state.served.admission.ready()
    return TestClient(app, raise_server_exceptions=False)


BEST = ChoiceAlignment(decoder="best_of_n", rewards={}, total=None, notes=["reward 'a' failed"],
                       candidates=[Candidate(text="hi", rewards={}, total=None)])


@pytest.fixture
def answers(monkeypatch):
    """Two choices: the first aligned with a failed reward (total null), the second plain."""
    async def run(plan):
        plan.usage["completion_tokens"] = 3
        return [generate.Choice(0, "hi", [4, 5], "stop", BEST), generate.Choice(1, "yo", [6], "length")]

    async def stream(plan, interrupt=None):
        for d in (generate.Delta(0, "h"), generate.Delta(1, "y"), generate.Delta(0, "i", "stop", BEST),
                  generate.Delta(1, "o", "length")):
            yield d

    monkeypatch.setattr(generate, "run", run)
    monkeypatch.setattr(generate, "stream", stream)


def _events(text: str) -> list:
    data = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_completion_body(answers):
    r = _client().post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x", "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    first, second = body["choices"]
    assert first == {"index": 0, "text": "hi", "logprobs": None, "finish_reason": "stop", "alignment": {
        "decoder": "best_of_n", "rewards": {}, "total": None, "notes": ["reward 'a' failed"],
        "candidates": [{"text": "hi", "rewards": {}, "total": None}]}}
    assert second == {"index": 1, "text": "yo", "logprobs": None, "finish_reason": "length"}


def test_chat_body_with_token_ids(answers):
    r = _client().post("/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "return_token_ids": True})
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    second = body["choices"][1]
    assert second == {"index": 1, "message": {"role": "assistant", "content": "yo"}, "logprobs": None,
                      "finish_reason": "length", "token_ids": [6]}


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_chunks(answers, include_usage):
    r = _client().post("/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "stream_options": {"include_usage": include_usage}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _events(r.text)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}
        assert all("usage" in c and c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    deltas = [c["choices"][0] for c in chunks]
    assert [d["delta"] for d in deltas] == [{"content": "h", "role": "assistant"}, {"content": "y", "role": "assistant"},
                                            {"content": "i"}, {"content": "o"}]
    assert [d["finish_reason"] for d in deltas] == [None, None, "stop", "length"]
    assert all(d["logprobs"] is None and "logprobs" in d for d in deltas)
    assert deltas[2]["alignment"]["total"] is None and all("alignment" not in deltas[i] for i in (0, 1, 3))


def test_completion_chunks(answers):
    r = _client().post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": [1, 2], "stream": True,
                                                                 "return_token_ids": True})
    chunks = _events(r.text)
    assert [c["choices"][0]["text"] for c in chunks] == ["h", "y", "i", "o"]
    assert all(c["object"] == "text_completion" and "token_ids" not in c["choices"][0] for c in chunks)


def test_a_stream_that_fails_ends_with_an_error_event(monkeypatch):
    async def stream(plan, interrupt=None):
        yield generate.Delta(0, "h")
        raise TimeoutError("rpc")

    monkeypatch.setattr(generate, "stream", stream)
    r = _client().post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x", "stream": True})
    *_, error = _events(r.text)
    assert error["error"]["code"] == 503 and "did not answer in time" in error["error"]["message"]


def test_models_and_health():
    client = _client(reference="ref")
    assert client.get("/health").json() == {"status": "ok"}
    body = client.get("/v1/models", headers=AUTH).json()
    card = body["data"][0]
    assert body["object"] == "list" and card["id"] == "tiny" and card["object"] == "model"
    assert card["owned_by"] == "alignd" and card["max_model_len"] == 64 and isinstance(card["created"], int)
    # vas has no value model on this server: it is not listed
    al = card["alignment"]
    assert (al["decoders"], al["rewards"], al["values"]) == (["args", "best_of_n", "blockwise", "transfer_q", "dera"], ["a"], [])
    assert [d["name"] for d in al["decoder_details"]] == al["decoders"]
    assert [(g["kind"], g["name"], g["spec"]) for g in al["guides"]] == [
        ("reward", "a", "x"), ("reference", "reference", "ref"), ("baseline", "baseline", "m")]
    assert "dera" not in _client().get("/v1/models", headers=AUTH).json()["data"][0]["alignment"]["decoders"]


@pytest.mark.parametrize("path,headers,body,status,words", [
    ("/v1/models", {}, None, 401, "API key"),
    ("/v1/models", {"Authorization": b"Bearer wrong\xe9"}, None, 401, "API key"),
    ("/v1/completions", AUTH, {"model": "other", "prompt": "x"}, 404, "does not exist"),
    ("/v1/completions", AUTH, {"model": "tiny", "prompt": "x" * 1000}, 400, "characters"),
    ("/v1/completions", AUTH, {"model": "tiny", "prompt": "x", "alignment": {"decoder": "args", "rewards": {"b": 1}}},
     400, "unknown reward 'b'"),
    ("/v1/completions", AUTH, {"model": "tiny", "prompt": "x", "alignment": {
        "decoder": "args", "rewards": {"a": 1}, "reward_cache": False}}, 400, "--allow-reward-recompute"),
    ("/v1/chat/completions", AUTH, {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "alignment": {
        "decoder": "dera"}}, 400, "dera needs a reference"),
    ("/v1/completions", AUTH, "{broken", 400, "not valid JSON"),
])
def test_refusals_are_openai_errors(path, headers, body, status, words):
    client = _client()
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.post(path, headers=headers, **kw) if body is not None else client.get(path, headers=headers)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_openapi_has_every_body():
    schema = _client().get("/openapi.json").json()
    parts = schema["components"]["schemas"]
    for name in ("CompletionRequest", "ChatRequest", "ChatMessage", "Completion", "ChatCompletion", "ModelList"):
        assert name in parts, name
    refs = {m.removeprefix("#/components/schemas/") for m in _refs(schema)}
    assert refs <= parts.keys(), refs - parts.keys()
    post = schema["paths"]["/v1/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _probe(client: TestClient) -> dict:
    body = {"model": "tiny", "prompt": "x"}
    return {"health": client.get("/health"), "ready": client.get("/ready"),
            "completion": client.post("/v1/completions", headers=AUTH, json=body)}


def test_loading_and_draining_answer_probes_and_refuse_with_retry_after():
    """The server's phases as an orchestrator probes them: while loading, liveness, readiness and
    requests all say 503; while draining, liveness stays 200 (a failing liveness probe would have
    the server killed mid-drain) while readiness and new requests say 503 with Retry-After."""
    s = ServeSettings(model="m", served_model_name="tiny", api_key=KEY)
    app = create_app(s, _engine())
    client = TestClient(app, raise_server_exceptions=False)
    admission = app.state.served.admission
    loading = _probe(client)
    assert [loading[k].status_code for k in loading] == [503, 503, 503]
    assert all("loading" in r.json()["error"]["message"] for r in loading.values())
    assert loading["completion"].headers["retry-after"] == "5"
    admission.ready()
    ready = _probe(client)
    assert ready["health"].json() == ready["ready"].json() == {"status": "ok"}
    admission.drain()
    draining = _probe(client)
    assert draining["health"].status_code == 200 and draining["health"].json() == {"status": "draining"}
    for r in draining["ready"], draining["completion"]:
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert "shutting down" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
    admission.close("the engine stopped; the server is restarting")
    dead = _probe(client)
    assert [dead[k].status_code for k in dead] == [503, 503, 503]
    assert "engine stopped" in dead["health"].json()["error"]["message"]


@pytest.mark.parametrize("fields,param,words", [
    ({"foo": 1}, "foo", "unknown field"),
    ({"logprobs": 21}, "logprobs", "20"),
    ({"top_logprobs": 2}, "top_logprobs", "unknown field"),
    ({"tools": [{"type": "function"}]}, "tools", "does not implement"),
    ({"suffix": "x"}, "suffix", "does not implement"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is given exactly"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": True, "stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra", "unknown"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "100"),
])
def test_every_field_works_or_is_refused_by_name(answers, fields, param, words):
    r = _client().post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x", **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.text


def test_unimplemented_openai_fields_that_ask_for_nothing_are_accepted(answers):
    off = {"logprobs": None, "tools": None, "tool_choice": None, "parallel_tool_calls": False,
           "response_format": None, "suffix": None, "store": False, "metadata": None, "user": "u-1"}
    r = _client().post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "x", **off})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("message,param", [
    ({"role": "user", "content": "x", "tool_calls": []}, "messages.0.tool_calls"),
    ({"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]}, "messages.0.content"),
])
def test_chat_message_fields_are_checked_too(answers, message, param):
    r = _client().post("/v1/chat/completions", headers=AUTH, json={"model": "tiny", "messages": [message]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text


def test_template_arguments_are_not_template_variables(answers):
    r = _client().post("/v1/chat/completions", headers=AUTH, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tokenize": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text


def test_continuous_usage_stats(answers):
    r = _client().post("/v1/completions", headers=AUTH, json={
        "model": "tiny", "prompt": "x", "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = _events(r.text)
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks), chunks
    assert chunks[-1]["choices"] == []


def test_a_silent_stream_gets_keepalive_comments(monkeypatch):
    """A stream with nothing to say for longer than stream_keepalive (best-of-n ranking its
    samples) sends SSE comments, which clients skip, so proxies with idle timeouts keep it."""
    import asyncio

    async def slow(plan, interrupt=None):
        await asyncio.sleep(0.5)
        yield generate.Delta(0, "hi", "stop")

    monkeypatch.setattr(generate, "stream", slow)
    r = _client(stream_keepalive=0.1).post("/v1/completions", headers=AUTH,
                                           json={"model": "tiny", "prompt": "x", "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    first_data = next(i for i, e in enumerate(events) if e.startswith("data: "))
    assert first_data >= 3 and all(e == ": keep-alive" for e in events[:first_data]), events
    assert events[-1] == "data: [DONE]" and json.loads(events[first_data][6:])["choices"][0]["text"] == "hi"
