"""Faults and orchestration: the engine core dies under load, and the server is told to stop
(SIGTERM to the server's own process, as an orchestrator sends it). Each test starts (and ends)
a server of its own."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import API_KEY, hostile_config, start_server
from tests.test_isolation import engine_process, wait_in_flight

SHUTDOWN_TIMEOUT = 3.0


@pytest.fixture
def doomed(tiny, tmp_path):
    # A slow text reward (3 s a call) that stays under its time limit: steps and final scoring
    # that take a while, so that the faults land in the middle of them.
    config = {**hostile_config(tiny), "shutdown_timeout": SHUTDOWN_TIMEOUT, "text_reward_timeout": 10.0,
              "max_concurrent_requests": 32}
    yield from start_server(config, tmp_path)


@pytest.fixture
def patient(tiny, tmp_path):
    # Requests in flight have two minutes to finish; a text reward of 50 ms a call makes a guided
    # request take seconds. The API key comes from a file, as a mounted secret does.
    config = {"model": str(tiny["base"]), "served_model_name": "tiny", "dtype": "float32", "max_model_len": 256,
              "shutdown_timeout": 120.0, "rewards": {"slow": "py:tests.rules:slow_vowels"}}
    yield from start_server(config, tmp_path, key_file=True)


class Call(threading.Thread):
    """One call of the openai client in a thread: its result or its exception, and when."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call, self.result, self.error, self.ended = call, None, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.call()
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.error = e
        self.ended = time.monotonic()


def streamed(client: openai.OpenAI, **kw) -> Callable[[], list]:
    def read() -> list:
        return list(client.completions.create(model="tiny", stream=True, **kw))
    return read


def draining(server, timeout: float = 10) -> None:
    """Until the server has taken the signal (its readiness turns 503)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/ready", timeout=5).status_code == 200:
        assert time.monotonic() < deadline, "still ready after SIGTERM"
        time.sleep(0.02)


class Request(threading.Thread):
    """One request in a thread: when its answer came, its status, and its body."""

    def __init__(self, server, payload: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.payload = server, payload
        self.status: int | None = None
        self.body = ""
        self.answered: float | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                              timeout=60, verify=False) as http:
                resp = http.post("/v1/completions", json=self.payload)
                self.status, self.body = resp.status_code, resp.text
        except httpx.HTTPError as e:
            self.body = repr(e)
        self.answered = time.monotonic()


def long_plain(**kw) -> dict:
    return {"model": "tiny", "prompt": "we went to the sea", "max_tokens": 450, "ignore_eos": True, **kw}


def slow_guided(**kw) -> dict:
    return {"model": "tiny", "prompt": "a §slow day", "max_tokens": 450, "ignore_eos": True,
            "alignment": {"decoder": "args", "rewards": {"moody": 1.0}}, **kw}


def in_scoring() -> dict:
    # best-of-n draws 3 samples of 2 tokens at once, then scores them for 9 s (3 s a text).
    return {"model": "tiny", "prompt": "the §slow film", "max_tokens": 2, "temperature": 1.0,
            "alignment": {"decoder": "best_of_n", "rewards": {"moody": 1.0}, "n": 3}}


def test_engine_death_fails_everything_at_once_and_exits_non_zero(doomed):
    requests = [Request(doomed, long_plain()), Request(doomed, long_plain(stream=True))]
    wait_in_flight(doomed, 2)
    scoring = Request(doomed, in_scoring())
    time.sleep(1.5)  # its samples are drawn; it waits on the worker for their rewards
    requests += [Request(doomed, slow_guided()), Request(doomed, slow_guided(stream=True))]
    wait_in_flight(doomed, 5)
    assert all(r.answered is None for r in requests + [scoring])
    health = httpx.Client(base_url=doomed.url, timeout=5, verify=False)
    assert health.get("/health").status_code == 200
    engine_process(doomed, "EngineCore").kill()
    killed = time.monotonic()
    while health.get("/health").status_code != 503:
        assert time.monotonic() - killed < 5, "/health still answers 200"
        time.sleep(0.02)
    unhealthy = time.monotonic() - killed
    for r in requests + [scoring]:
        r.join(timeout=30)
    answered = [r.answered - killed for r in requests + [scoring]]
    print(f"engine killed: /health 503 after {unhealthy:.2f} s; requests answered after "
          + ", ".join(f"{a:.2f}" for a in answered) + " s")
    assert unhealthy <= 1.0
    assert max(answered) <= 2.0
    for r in requests + [scoring]:
        if r.payload.get("stream"):
            assert r.status == 200
            events = [line[6:] for line in r.body.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == 503
        else:
            assert r.status == 503, r.body
            assert json.loads(r.body)["error"]["type"] == "service_unavailable"
    doomed.proc.wait(timeout=30)
    assert doomed.proc.returncode == 1
    assert "the engine died" in doomed.log.read_text()


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(patient):
    # The socket was up while the model loaded, and both probes said 503 then.
    assert patient.loading and set(patient.loading) == {(503, 503)}, patient.loading
    client = patient.client()
    guided = {"decoder": "args", "rewards": {"slow": 1.0}, "top_k": 2}
    stream = Call(streamed(client, prompt="the long road", max_tokens=120, temperature=0,
                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "alignment": guided}))
    wait_in_flight(patient, 1)
    signalled = time.monotonic()
    os.kill(patient.proc.pid, signal.SIGTERM)
    draining(patient)
    health = httpx.get(f"{patient.url}/health", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "draining"}  # liveness holds
    with pytest.raises(openai.InternalServerError) as refused:
        client.completions.create(model="tiny", prompt="one more", max_tokens=2)
    assert stream.is_alive(), "the stream ended before the drain could be seen"
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["type"] == "service_unavailable" and "shutting down" in refused.value.body["message"]
    stream.join(timeout=120)
    assert stream.error is None, stream.error
    chunks = stream.result
    assert chunks[-1].usage.completion_tokens == 120
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == "length" and last.model_extra["alignment"]["decoder"] == "args"
    patient.proc.wait(timeout=60)
    took = time.monotonic() - signalled
    print(f"SIGTERM: the stream finished {stream.ended - signalled:.1f} s after it; exited "
          f"{patient.proc.returncode} after {took:.1f} s")
    assert patient.proc.returncode == 0
    log = patient.log.read_text()
    assert "draining" in log and API_KEY not in log


def test_sigterm_stops_what_outlives_the_shutdown_timeout(doomed):
    """Requests that would run for minutes: at the shutdown timeout each gets a clear 503 (a
    stream: an error event), never a silent cut; the server exits 0."""
    client = doomed.client()
    slow = {"max_tokens": 450, "extra_body": {"ignore_eos": True, "alignment": {"decoder": "args",
                                                                                "rewards": {"moody": 1.0}}}}
    stream = Call(streamed(client, prompt="a §slow day", **slow))
    whole = Call(lambda: client.completions.create(model="tiny", prompt="a §slow night", **slow))
    wait_in_flight(doomed, 2)
    signalled = time.monotonic()
    os.kill(doomed.proc.pid, signal.SIGTERM)
    for call in stream, whole:
        call.join(timeout=60)
        assert call.ended is not None
        assert isinstance(call.error, openai.APIError), call.error
        assert "shut down before this request finished" in str(call.error) and "--shutdown-timeout" in str(call.error)
        assert SHUTDOWN_TIMEOUT - 0.5 <= call.ended - signalled <= SHUTDOWN_TIMEOUT + 5
    assert isinstance(whole.error, openai.InternalServerError) and whole.error.status_code == 503
    assert whole.error.response.headers["retry-after"] == "1"
    doomed.proc.wait(timeout=60)
    took = time.monotonic() - signalled
    print("SIGTERM with 2 long requests in flight: answered after "
          + ", ".join(f"{c.ended - signalled:.2f}" for c in (stream, whole))
          + f" s; exited {doomed.proc.returncode} after {took:.1f} s")
    assert doomed.proc.returncode == 0
    assert took <= SHUTDOWN_TIMEOUT + 15
