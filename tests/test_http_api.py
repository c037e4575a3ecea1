"""The HTTP contract: errors, auth, limits, streaming, disconnects, metrics."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

GOOD = {"decoder": "args", "rewards": {"a": 1.0}}


def post(server, path: str, body, headers=None) -> httpx.Response:
    with server.http() as http:
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return http.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})


def assert_error(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


def completion(server, **fields):
    return {"model": server.model, "prompt": "the movie was", "max_tokens": 4, **fields}


def test_models_lists_the_served_model(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert "tiny" in e.value.message


def test_auth_required(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(f"{server.url}/v1/completions", json=completion(server))
    assert_error(r, 401, "Bearer")
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key


@pytest.mark.parametrize("alignment,words", [
    ({"decoder": "beam", "rewards": {"a": 1}}, ["decoder", "args"]),
    ({"decoder": "args", "rewards": {"nope": 1}}, ["nope", "'a'", "'vowels'"]),
    ({"decoder": "args", "rewards": {}}, ["at least one reward"]),
    ({"decoder": "args"}, ["at least one reward"]),
    ({"decoder": "args", "rewards": {"a": None}}, ["rewards.a"]),
    ({"decoder": "args", "rewards": {"a": "heavy"}}, ["rewards.a"]),
    ({"decoder": "args", "rewards": {"a": 1}, "top_k": 0}, ["top_k"]),
    ({"decoder": "args", "rewards": {"a": 1}, "top_k": 101}, ["top_k"]),
    ({"decoder": "args", "rewards": {"a": 1}, "top_k": "ten"}, ["top_k"]),
    ({"decoder": "best_of_n", "rewards": {"a": 1}, "n": 0}, ["n"]),
    ({"decoder": "best_of_n", "rewards": {"a": 1}, "n": 65}, ["n"]),
    ({"decoder": "args", "rewards": {"a": 1}, "temperature_k": 3}, ["temperature_k"]),
])
def test_bad_alignment_is_400(server, alignment, words):
    assert_error(post(server, "/v1/completions", completion(server, alignment=alignment)), 400, *words)


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_weight_is_400(server, weight):
    body = json.dumps(completion(server)).rstrip("}") + f', "alignment": {{"decoder": "args", "rewards": {{"a": {weight}}}}}}}'
    assert_error(post(server, "/v1/completions", body), 400, "finite")


def test_malformed_json_and_wrong_types_are_400(server):
    assert_error(post(server, "/v1/completions", '{"model": "tiny", "prompt": '), 400, "JSON")
    assert_error(post(server, "/v1/completions", completion(server, max_tokens="many")), 400, "max_tokens")
    assert_error(post(server, "/v1/completions", completion(server, prompt="")), 400, "prompt")
    assert_error(post(server, "/v1/chat/completions", {"model": "tiny", "messages": []}), 400, "messages")


def test_too_long_is_400_and_too_big_is_413(server):
    assert_error(post(server, "/v1/completions", completion(server, max_tokens=100000)), 400, "max_tokens", "512")
    assert_error(post(server, "/v1/completions", completion(server, prompt=list(range(7, 300)) * 2)), 400, "context")
    huge = completion(server, prompt="word " * 20000)
    assert_error(post(server, "/v1/completions", huge), 413)


def test_server_keeps_serving_after_bad_input(server):
    for _ in range(3):
        post(server, "/v1/completions", '{"broken')
        post(server, "/v1/completions", completion(server, alignment={"decoder": "args", "rewards": {"x": 1}}))
    out = server.client().completions.create(model=server.model, prompt="the movie", max_tokens=3,
                                             extra_body={"alignment": GOOD})
    assert out.choices[0].model_extra["alignment"]["decoder"] == "args"


def test_streaming_matches_non_streaming(server):
    client = server.client()
    kw = dict(model=server.model, prompt="what a lovely day", max_tokens=12, temperature=0,
              extra_body={"alignment": {"decoder": "args", "rewards": {"a": 1.5}, "top_k": 5}})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert finals[0].choices[0].model_extra["alignment"]["rewards"]["a"] == pytest.approx(
        whole.choices[0].model_extra["alignment"]["rewards"]["a"], abs=1e-5)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_streaming_best_of_n(server):
    chunks = list(server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hello"}], max_tokens=6, stream=True,
        extra_body={"alignment": {"decoder": "best_of_n", "rewards": {"vowels": 1.0}, "n": 3}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    final = chunks[-1].choices[0]
    assert final.finish_reason in ("stop", "length")
    assert final.model_extra["alignment"]["decoder"] == "best_of_n"


def _wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


# "other" re-tokenizes and recomputes every candidate: slow enough to disconnect mid-request.
SLOW = {"decoder": "args", "rewards": {"a": 1.0, "b": 1.0, "other": 0.1}, "top_k": 30}


def test_disconnect_aborts_and_frees_guide_state(server):
    """A client that goes away mid-stream: its request is aborted and its guide caches freed."""
    body = completion(server, max_tokens=450, stream=True, ignore_eos=True, alignment=SLOW)
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # keep it: a dropped line iterator closes the connection
        next(lines)
        assert _wait_for(lambda: server.metric("alignd_guide_states") == 2)  # a and b hold caches
        assert server.metric("vllm:num_requests_running") == 1
    assert _wait_for(lambda: server.metric("alignd_guide_states") == 0)
    assert _wait_for(lambda: server.metric("vllm:num_requests_running") == 0)


def test_non_streaming_disconnect_aborts(server):
    body = completion(server, max_tokens=450, ignore_eos=True, alignment=SLOW)
    with pytest.raises(httpx.ReadTimeout):
        with server.http() as http:
            http.post("/v1/completions", json=body, timeout=3.0)
    assert _wait_for(lambda: server.metric("alignd_guide_states") == 0)
    assert _wait_for(lambda: server.metric("vllm:num_requests_running") == 0)


def test_overload_is_429(server):
    """The test server admits `max_concurrent_requests` at once; one more is refused, the
    others are unharmed."""
    body = completion(server, max_tokens=450, stream=True, ignore_eos=True, alignment=SLOW)
    limit = server.config["max_concurrent_requests"]
    with server.http() as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(limit)]
        opened = [s.__enter__() for s in streams]
        try:
            lines = [resp.iter_lines() for resp in opened]  # kept open: see above
            for resp, it in zip(opened, lines):
                assert resp.status_code == 200
                next(it)
            assert_error(post(server, "/v1/completions", completion(server)), 429, "busy")
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    assert _wait_for(lambda: server.metric("alignd_requests_in_flight") == 0)
    assert server.client().completions.create(model=server.model, prompt="hi", max_tokens=2).choices


def test_metrics_count_requests(server):
    before = server.metric('alignd_requests_total{decoder="args",endpoint="completions",status="200"}')
    server.client().completions.create(model=server.model, prompt="hi", max_tokens=2, extra_body={"alignment": GOOD})
    after = server.metric('alignd_requests_total{decoder="args",endpoint="completions",status="200"}')
    assert after == before + 1
    assert server.metric("alignd_guided_steps") > 0


def test_stop_strings_and_seeds(server):
    client = server.client()
    kw = dict(model=server.model, prompt="what a lovely day", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    cut = full[len(full) // 2: len(full) // 2 + 2]
    stopped = client.completions.create(stop=[cut], **kw).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.index(cut)]
    sampled = dict(model=server.model, prompt="the film", max_tokens=12, temperature=1.2, seed=42,
                   extra_body={"alignment": {"decoder": "args", "rewards": {"a": 1.0}, "top_k": 8}})
    a, b = (client.completions.create(**sampled).choices[0].text for _ in range(2))
    c = client.completions.create(**{**sampled, "seed": 43}).choices[0].text
    assert a == b and a != c
