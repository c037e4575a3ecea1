"""Faults: the engine core dies under load, and the server is told to stop. Each test starts
(and ends) a server of its own."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
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
    assert doomed.proc.returncode not in (0, None)
    assert "the engine died" in doomed.log.read_text()


def test_sigterm_drains_within_shutdown_timeout(doomed):
    """Requests that would run for minutes are in flight: SIGTERM ends the server within its
    shutdown timeout (plus the engine's own shutdown), with exit code 0."""
    requests = [Request(doomed, slow_guided(stream=True)), Request(doomed, slow_guided()),
                Request(doomed, long_plain(stream=True, max_tokens=450, n=8, temperature=1.0))]
    wait_in_flight(doomed, len(requests))
    signalled = time.monotonic()
    os.kill(doomed.proc.pid, signal.SIGTERM)
    doomed.proc.wait(timeout=60)
    took = time.monotonic() - signalled
    print(f"SIGTERM with {len(requests)} long requests in flight: exited {doomed.proc.returncode} after {took:.1f} s")
    assert doomed.proc.returncode == 0
    assert took <= SHUTDOWN_TIMEOUT + 5
    for r in requests:
        r.join(timeout=30)
        assert r.answered is not None
