"""Hostile and malformed requests against one real server: every one gets a 4xx (or a correct
answer) in OpenAI's error shape, none a 5xx, and the server still serves a guided request exactly
as before the barrage."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from tests.conftest import API_KEY

OK_ALIGNMENT = {"decoder": "args", "rewards": {"a": 1.0}, "top_k": 4}
REFERENCE_REQUEST = {"model": "tiny", "prompt": "the movie was", "max_tokens": 8, "temperature": 0,
                     "alignment": OK_ALIGNMENT}


def body(**fields) -> dict:
    return {"model": "tiny", "prompt": "the movie was", "max_tokens": 3, **fields}


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, **fields}


def aligned(**alignment) -> dict:
    return body(alignment=alignment)


def raw(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


# (id, method, path, payload, headers, expected status). A dict payload is sent as JSON, bytes
# as they are.
CASES: list[tuple] = []


def case(name, payload, status, path="/v1/completions", method="POST", headers=None):
    CASES.append((name, method, path, payload, headers or {}, status))


# -- bodies that are not valid JSON, or not an object -----------------------------------------
for i, text in enumerate([
    b"", b" ", b"{", b'{"model": ', b"null", b"[]", b'"tiny"', b"123", b"true", b"{'model': 'tiny'}",
    b'{"model": "tiny", "prompt": "x",}', b"\xef\xbb\xbf{}", b"\xff\xfe{}", b'{"model": "tin\xc3\x28"}',
    b'{"model": "tiny", "prompt": "\xed\xa0\x80"}', b"[" * 60000, b'{"a":' * 10000, b"{" * 10 + b"}" * 10,
    b'{"model": "tiny", "prompt": "x"} trailing', b"NaN",
]):
    case(f"not-json-{i}", text, 400)
for i, text in enumerate([
    r'{"model": "tiny", "prompt": "a\ud800b", "max_tokens": 2}',
    r'{"model": "tiny", "prompt": "\udc00", "max_tokens": 2}',
    r'{"model": "tiny\ud800", "prompt": "x"}',
    r'{"model": "tiny", "prompt": "x", "stop": ["\ud83d"]}',
    r'{"model": "tiny", "prompt": "x", "alignment": {"decoder": "args", "rewards": {"\udfff": 1}}}',
    r'{"model": "tiny", "prompt": ["ok", "\ud800"]}',
]):
    case(f"lone-surrogate-{i}", raw(text), 400)
case("lone-surrogate-chat", raw(r'{"model": "tiny", "messages": [{"role": "user", "content": "\ud800"}]}'), 400,
     "/v1/chat/completions")
case("surrogate-pair-is-fine", raw(r'{"model": "tiny", "prompt": "smile \ud83d\ude00", "max_tokens": 2}'), 200)
case("nul-character-is-fine", body(prompt="a\u0000b"), 200)

# -- the model field ----------------------------------------------------------------------------
for i, model in enumerate([None, 5, ["tiny"], {"id": "tiny"}, True]):
    case(f"model-type-{i}", {"model": model, "prompt": "x"}, 400)
case("model-missing", {"prompt": "x"}, 400)
case("model-unknown", body(model="gpt-9"), 404)
case("model-empty", body(model=""), 404)
case("model-huge", body(model="m" * 30000), 404)

# -- prompts --------------------------------------------------------------------------------------
for i, prompt in enumerate([None, "", [], [""], [[]], [1.5], ["a", 1], {"a": 1}, True, [[1], "a"]]):
    case(f"prompt-bad-{i}", body(prompt=prompt), 400)
case("prompt-missing", {"model": "tiny", "max_tokens": 2}, 400)
for i, ids in enumerate([[1, -1], [1, 1000000], [1, 2**70], [[5, 6], [-5]], [2**63], [-(2**70)]]):
    case(f"prompt-id-out-of-vocab-{i}", body(prompt=ids), 400)
case("prompt-too-long-in-tokens", body(prompt=list(range(7, 300)) * 2), 400)
case("prompt-too-long-in-characters", body(prompt="word " * 12000), 400)
case("prompt-too-many-samples", body(prompt=["a"] * 65), 400)
case("prompt-many-short", body(prompt=["a", "b", "c"], max_tokens=1), 200)

# -- sampling fields --------------------------------------------------------------------------
BAD_FIELDS = {
    "max_tokens": [0, -1, "many", 2**70, 100000, 1.5, [3]],
    "temperature": [-1, 3, "hot", [1]],
    "top_p": [0, -0.1, 1.5, "x"],
    "n": [0, -1, 65, 1000, "two"],
    "seed": [2**64, -(2**63) - 1, "x", 1.5, 2**63],
    "stop": ["", [""], ["a", "b", "c", "d", "e"], "s" * 2000, 123, [1]],
    "presence_penalty": [3, -3, "x"],
    "frequency_penalty": [2.5, "x"],
    "min_tokens": [-1, "x"],
    "stream_options": [{"include_usage": "x"}, 5],
    "return_token_ids": ["x", [1]],
    "ignore_eos": [[], {"a": 1}],
    "stream": [[1], {"a": 1}],
    "top_k": [-2, "x", 1.5, 10**6],
    "min_p": [-0.1, 1.5, "x"],
    "repetition_penalty": [0, -1, 11, "x"],
    "stop_token_ids": [[-1], [10**6], "x", [2**40], list(range(65))],
    "logit_bias": [{"x": 1}, {"5": 200}, [1], {"-3": 1}, {"1000000": 1}, {str(i): 1 for i in range(301)}],
    "echo": ["x", [1]],
    "user": [5, "u" * 300],
    "suffix": ["x"],
    "logprobs": [-1, 21, "x", [1]],
    "tools": [[{"type": "function", "function": {"name": "f"}}]],
    "best_of": [2],
}
for field, values in BAD_FIELDS.items():
    for i, value in enumerate(values):
        case(f"{field}-{i}", body(**{field: value}), 400)
for i, text in enumerate([
    '{"model": "tiny", "prompt": "x", "temperature": NaN}',
    '{"model": "tiny", "prompt": "x", "top_p": Infinity}',
    '{"model": "tiny", "prompt": "x", "frequency_penalty": -Infinity}',
    '{"model": "tiny", "prompt": "x", "max_tokens": NaN}',
]):
    case(f"non-finite-field-{i}", raw(text), 400)
case("min-tokens-over-max-tokens", body(min_tokens=10, max_tokens=4), 400)
case("greedy-with-n", body(temperature=0, n=2), 400)
case("seed-largest", body(seed=2**63 - 1, n=2, temperature=1), 200)
case("seed-smallest", body(seed=-(2**63)), 200)
case("openai-fields-off-or-supported", body(logprobs=None, user="x", suffix=None, echo=False, tools=None), 200)
case("unknown-field", body(foo=1), 400)
case("echo-with-logprobs", body(echo=True, logprobs=1), 400)
case("chat-top-logprobs-without-logprobs", chat(top_logprobs=2), 400, "/v1/chat/completions")
case("logprobs-of-overflowing-scores", body(logprobs=0, repetition_penalty=5e-324, temperature=0), 200)
case("logprobs-under-args", aligned(decoder="args", rewards={"a": 1}, top_k=4) | {"logprobs": 5}, 200)
case("unknown-field-null", body(foo=None), 400)
case("sampling-fields-all-at-once", body(top_k=3, min_p=0.05, repetition_penalty=1.2, stop_token_ids=[5],
                                         logit_bias={"5": -100, "6": 2}, echo=True, user="u"), 200)
case("top-k-under-args", aligned(decoder="args", rewards={"a": 1}, top_k=4) | {"top_k": 2}, 400)
case("alignment-field-its-decoder-ignores", aligned(decoder="dera", top_k=4), 400)

# -- chat -----------------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
for i, messages in enumerate([
    None, [], [{}], [{"role": "bot", "content": "x"}], [{"role": "user", "content": None}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": 123}], [{"content": "x"}], "hello", [{"role": "user", "content": "x" * 30000}],
]):
    case(f"chat-messages-{i}", chat(messages=messages), 400, CHAT)
case("chat-max-completion-tokens-0", chat(max_completion_tokens=0), 400, CHAT)
case("chat-template-argument", chat(chat_template_kwargs={"tokenize": True}), 400, CHAT)
case("chat-template-kwargs", chat(chat_template_kwargs={"anything": [1, 2]}), 200, CHAT)
case("chat-message-name", chat(messages=[{"role": "user", "content": "hi", "name": "bob"}]), 200, CHAT)
case("chat-message-tool-calls", chat(messages=[{"role": "user", "content": "hi", "tool_calls": []}]), 400, CHAT)
case("chat-parts-are-fine", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]), 200, CHAT)

# -- alignment ------------------------------------------------------------------------------------
for i, al in enumerate(["args", ["args"], 5, {"decoder": None}, {"decoder": 5}, {"decoder": "beam"}, {}]):
    case(f"alignment-shape-{i}", body(alignment=al), 400)
BAD_ALIGNMENTS = [
    {"decoder": "args", "rewards": {"nope": 1}},
    {"decoder": "args", "rewards": {}},
    {"decoder": "args", "rewards": {"a": 1e7}},
    {"decoder": "args", "rewards": {"a": 1.7e308}},
    {"decoder": "args", "rewards": {"a": -1e39}},
    {"decoder": "args", "rewards": {"a": "x"}},
    {"decoder": "args", "rewards": {"a": None}},
    {"decoder": "args", "rewards": ["a"]},
    {"decoder": "args", "rewards": {"a": {"w": 1}}},
    {"decoder": "vas", "values": {"nope": 1}},
    {"decoder": "vas", "values": {"va": 1e308}},
    {"decoder": "vas"},
    {"decoder": "dera", "lambda": 1e308},
    {"decoder": "dera", "lambda": "x"},
    {"decoder": "args", "rewards": {"a": 1}, "top_k": 0},
    {"decoder": "args", "rewards": {"a": 1}, "top_k": 101},
    {"decoder": "args", "rewards": {"a": 1}, "top_k": -5},
    {"decoder": "args", "rewards": {"a": 1}, "top_k": 1.5},
    {"decoder": "transfer_q", "rewards": {"a": 1}, "rollout_tokens": 0},
    {"decoder": "transfer_q", "rewards": {"a": 1}, "rollout_tokens": 257},
    {"decoder": "transfer_q", "rewards": {"a": 1}, "rollout_tokens": 10**9},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "n": 0},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "n": 65},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "return_candidates": "x"},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "prune": {"every": 0, "keep": 0.5}},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "prune": {"every": 4097, "keep": 0.5}},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "prune": {"every": 8, "keep": 0}},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "prune": {"every": 8, "keep": 1.5}},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "prune": {"every": 8}},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "prune": {"every": 8, "keep": 0.5, "x": 1}},
    {"decoder": "best_of_n", "rewards": {"a": 1}, "prune": 8},
    {"decoder": "args", "rewards": {"a": 1}, "prune": {"every": 8, "keep": 0.5}},
    {"decoder": "blockwise", "rewards": {"a": 1}, "n": 0},
    {"decoder": "blockwise", "rewards": {"a": 1}, "n": 65},
    {"decoder": "blockwise", "rewards": {"a": 1}, "block_tokens": 0},
    {"decoder": "blockwise", "rewards": {"a": 1}, "block_tokens": 257},
    {"decoder": "blockwise"},
    {"decoder": "blockwise", "rewards": {"a": 1}, "top_k": 4},
    {"decoder": "args", "rewards": {"a": 1}, "block_tokens": 4},
    {"decoder": "args", "rewards": {"a": 1}, "reward_cache": False},
    {"decoder": "args", "rewards": {"a": 1}, "extra": 1},
    # every value within its own range, but the step it asks for exceeds the server's limits
    {"decoder": "transfer_q", "rewards": {"a": 1, "b": 1}, "top_k": 100, "rollout_tokens": 256},
    {"decoder": "transfer_q", "rewards": {"a": 1}, "top_k": 40, "rollout_tokens": 60},
]
for i, al in enumerate(BAD_ALIGNMENTS):
    case(f"alignment-{i}", body(alignment=al), 400)
case("alignment-weights-at-the-bound", aligned(decoder="args", rewards={"a": 1e6}), 200)
case("alignment-negative-bound", aligned(decoder="dera", **{"lambda": -1e6}), 200)
case("best-of-n-pruned", body(temperature=1, alignment={"decoder": "best_of_n", "rewards": {"a": 1}, "n": 4,
                                                      "prune": {"every": 2, "keep": 0.5}}), 200)
case("blockwise", body(temperature=1, alignment={"decoder": "blockwise", "rewards": {"a": 1}, "n": 3,
                                               "block_tokens": 2}), 200)
case("blockwise-greedy", body(temperature=0, alignment={"decoder": "blockwise", "rewards": {"a": 1}, "n": 3}), 400)
case("best-of-n-greedy", body(temperature=0, alignment={"decoder": "best_of_n", "rewards": {"a": 1}, "n": 4}), 400)
case("best-of-n-too-many-samples", body(n=16, alignment={"decoder": "best_of_n", "rewards": {"a": 1}, "n": 8}), 400)
case("best-of-n-4x16x64", body(prompt=["a", "b", "c", "d"], n=16,
                                alignment={"decoder": "best_of_n", "rewards": {"a": 1}, "n": 64}), 400)
case("transfer-q-item-1", body(n=8, temperature=1.0, max_tokens=4, alignment={
    "decoder": "transfer_q", "rewards": {"a": 1, "b": 1}, "top_k": 100, "rollout_tokens": 256}), 400)
case("args-many-rows-over-budget", body(n=64, temperature=1.0, alignment={
    "decoder": "args", "rewards": {"a": 1, "b": 1}, "top_k": 100}), 400)

# -- a misbehaving text reward: the request is answered, with notes --------------------------------
for marker in ("§boom", "§nan", "§huge"):
    for decoder in ("args", "best_of_n"):
        case(f"moody-{decoder}-{marker}", body(prompt=f"the {marker} movie", temperature=1.0,
                                                alignment={"decoder": decoder, "rewards": {"moody": 1.0}}), 200)
case("moody-with-huge-weight", body(prompt="the §huge film", alignment={"decoder": "args", "rewards": {"moody": 1e6}}), 200)

# -- headers, routes and methods ------------------------------------------------------------------
for i, auth in enumerate(["Bearer caf\xe9", "Bearer", "Basic dGVzdA==", "Bearer wrong", "Bearer " + "k" * 10000,
                          "", "Bearer test-key\xff"]):
    case(f"auth-{i}", body(), 401, headers={"Authorization": auth})
case("auth-lowercase-scheme", body(), 200, headers={"Authorization": f"bearer {API_KEY}"})
case("content-type-ignored", raw(json.dumps(body())), 200, headers={"Content-Type": "text/plain"})
case("content-length-over-limit", "declared:999999999", 413)
for i, (method, path) in enumerate([
    ("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("POST", "/health"),
    ("PATCH", "/metrics"), ("OPTIONS", "/v1/completions"),
]):
    case(f"method-{i}", None, 405, path, method)
for i, path in enumerate(["/nope", "/v1", "/v1/completion", "/v1/models/tiny/x", "/" + "a" * 8000, "/v1/%00"]):
    case(f"route-{i}", None, 404, path, "GET")


def declared_length(http: httpx.Client, length: int) -> httpx.Response:
    """A request whose Content-Length announces more than it sends (clients refuse to): the
    server must answer 413 without reading on."""
    import socket

    url = http.base_url
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, content = data.split(b"\r\n\r\n", 1)
        size = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
        while len(content) < size:
            content += sock.recv(65536)
    return httpx.Response(int(head.split()[1]), content=content)


def send(http: httpx.Client, method: str, path: str, payload, headers: dict) -> httpx.Response:
    if isinstance(payload, str) and payload.startswith("declared:"):
        return declared_length(http, int(payload.split(":")[1]))
    # Header values as latin-1 bytes: a client may send any byte, not only ASCII.
    head = {k: v.encode("latin-1") for k, v in {"Authorization": f"Bearer {API_KEY}", **headers}.items()}
    if isinstance(payload, dict):
        return http.request(method, path, json=payload, headers=head)
    if isinstance(payload, bytes):
        head.setdefault("Content-Type", b"application/json")
        return http.request(method, path, content=payload, headers=head)
    return http.request(method, path, headers=head)


def assert_openai_error(resp: httpx.Response) -> None:
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], resp.text
    assert err["code"] == resp.status_code


def test_there_are_enough_hostile_cases():
    assert len(CASES) >= 150, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def before(hostile_server) -> dict:
    """A guided request's answer before the barrage."""
    with httpx.Client(base_url=hostile_server.url, timeout=120) as http:
        resp = send(http, "POST", "/v1/completions", REFERENCE_REQUEST, {})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


@pytest.mark.parametrize("name,method,path,payload,headers,status", CASES, ids=[c[0] for c in CASES])
def test_hostile_request(hostile_server, before, name, method, path, payload, headers, status):
    with httpx.Client(base_url=hostile_server.url, timeout=120) as http:
        resp = send(http, method, path, payload, headers)
    assert resp.status_code < 500, resp.text
    assert resp.status_code == status, resp.text
    if status >= 400:
        assert_openai_error(resp)
    if name.startswith("moody"):
        alignment = resp.json()["choices"][0]["alignment"]
        assert alignment["notes"], alignment  # the failure is reported, not hidden
        assert "failed" in " ".join(alignment["notes"])


@pytest.mark.parametrize("marker", ["§boom", "§nan"])
@pytest.mark.parametrize("decoder", ["args", "best_of_n"])
def test_failing_reward_in_a_stream_ends_it_properly(hostile_server, marker, decoder):
    """A stream whose reward fails still ends with its finish_reason, the notes and [DONE]."""
    payload = body(prompt=f"a {marker} day", stream=True, temperature=1.0,
                   alignment={"decoder": decoder, "rewards": {"moody": 1.0, "a": 0.5}})
    with httpx.Client(base_url=hostile_server.url, timeout=120) as http:
        resp = send(http, "POST", "/v1/completions", payload, {})
    assert resp.status_code == 200
    events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    final = chunks[-1]["choices"][0]
    assert final["finish_reason"] in ("stop", "length")
    assert final["alignment"]["total"] is None and "moody" not in final["alignment"]["rewards"]
    assert "a" in final["alignment"]["rewards"] and final["alignment"]["notes"]


def test_chunked_bodies_are_limited_as_they_arrive(hostile_server):
    def chunks(total: int):
        piece = b'"' + b"x" * 8190 + b'",'
        yield b'{"model": "tiny", "prompt": ['
        for _ in range(total // len(piece)):
            yield piece
        yield b'"x"]}'

    with httpx.Client(base_url=hostile_server.url, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        try:
            resp = http.post("/v1/completions", content=chunks(1 << 20))
        except httpx.TransportError:  # the server may close before the client sent everything
            resp = None
        if resp is not None:
            assert resp.status_code == 413
            assert_openai_error(resp)
        small = http.post("/v1/completions", content=iter([json.dumps(body()).encode()]))
        assert small.status_code == 200, small.text


def test_keep_alive_survives_errors(hostile_server):
    """One pooled connection through a run of errors: every next request on it still works."""
    with httpx.Client(base_url=hostile_server.url, timeout=120, headers={"Authorization": f"Bearer {API_KEY}"},
                      limits=httpx.Limits(max_connections=1)) as http:
        for bad in (b"{", b"[" * 60000, raw(r'{"model": "tiny", "prompt": "\ud800"}')):
            assert http.post("/v1/completions", content=bad).status_code == 400
            assert http.get("/v1/models").status_code == 200


def test_server_answers_as_before_after_the_barrage(hostile_server, before):
    with httpx.Client(base_url=hostile_server.url, timeout=120) as http:
        for _ in range(2):
            resp = send(http, "POST", "/v1/completions", REFERENCE_REQUEST, {})
            assert resp.status_code == 200
            assert resp.json()["choices"][0] == before
        metrics = http.get("/metrics").text
    # The probes answered 503 while the model loaded (the socket opens before it): only they may.
    served = [ln for ln in metrics.splitlines() if 'endpoint="health"' not in ln and 'endpoint="ready"' not in ln]
    assert not [ln for ln in served if 'status="500"' in ln or 'status="503"' in ln]
    assert 'alignd_requests_total{decoder="none",endpoint="completions",status="400"}' in metrics
    assert 'alignd_guide_failures{guide="reward \'moody\'"}' in metrics


def test_large_prompt_is_refused_without_stalling_the_server(bare_server):
    """A 3.5 MB prompt, under this server's 4 MiB body limit: read and parsed off the event loop
    and refused by its length before any tokenizing, while /health keeps answering."""
    big = json.dumps({"model": "tiny", "prompt": "word " * 700_000, "max_tokens": 2}).encode()
    assert 3_400_000 < len(big) < bare_server.config.get("max_request_bytes", 4 * 2**20)
    with cf.ThreadPoolExecutor(1) as pool, httpx.Client(base_url=bare_server.url, timeout=120) as http:
        sent = pool.submit(lambda: send(http, "POST", "/v1/completions", big, {}))
        health = []
        while not sent.done():
            started = time.monotonic()
            assert http.get("/health").status_code == 200
            health.append(time.monotonic() - started)
        resp = sent.result()
    assert resp.status_code == 400 and "characters" in resp.json()["error"]["message"], resp.text
    print(f"3.5 MB prompt: /health answered {len(health)} times meanwhile, slowest {max(health, default=0):.3f} s")
