"""No request pays for another's: a failing or slow guide stays with its own rows, the most
expensive valid request is refused (default limits) or runs in bounded memory (raised limits),
and guided work beyond the step budget waits its turn."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import API_KEY

HEALTHY = {"decoder": "args", "rewards": {"moody": 1.0, "a": 0.5}, "top_k": 6}


def complete(server, prompt: str, alignment=None, **kw) -> dict:
    payload = {"model": server.model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
               "return_token_ids": True, **kw}
    if alignment is not None:
        payload["alignment"] = alignment
    with server.http() as http:
        resp = http.post("/v1/completions", json=payload)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


class Stream:
    """A long streaming request held open in a thread."""

    def __init__(self, server, payload: dict) -> None:
        self.events: list[str] = []
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, args=(server, payload), daemon=True)
        self.thread.start()

    def _run(self, server, payload: dict) -> None:
        with server.http() as http, http.stream("POST", "/v1/completions", json={**payload, "stream": True}) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])

    def join(self) -> list[dict]:
        self.thread.join(timeout=300)
        assert self.status == 200 and self.events[-1] == "[DONE]", self.events[-3:]
        return [json.loads(e) for e in self.events[:-1]]


def wait_in_flight(server, n: int, timeout: float = 120) -> None:
    """Until the server holds `n` requests (first chunks of a stream can reach a client late on
    a loaded two-core machine, so the server's own count is the signal)."""
    deadline = time.monotonic() + timeout
    while server.metric("alignd_requests_in_flight") < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests in flight after {timeout} s"
        time.sleep(0.02)


def engine_process(server, role: str) -> psutil.Process:
    """The server's vLLM process of `role` ("EngineCore", or "Worker": where the guides live)."""
    procs = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if role in p.name()]
    assert len(procs) == 1, [p.name() for p in psutil.Process(server.proc.pid).children(recursive=True)]
    return procs[0]


def streamed(events: list[dict]) -> tuple[str, dict]:
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    return text, events[-1]["choices"][0]["alignment"]


@pytest.mark.parametrize("marker", ["§boom", "§nan"])
def test_failing_text_reward_leaves_concurrent_healthy_request_as_solo(hostile_server, marker):
    """Rows of the same decoder and the same text reward share each step: when the reward fails
    on other requests' texts, the healthy request stays guided, token for token as when alone."""
    healthy = {"model": "tiny", "prompt": "what a lovely day", "max_tokens": 400, "ignore_eos": True,
               "temperature": 0, "alignment": HEALTHY}
    solo_text, solo = streamed(Stream(hostile_server, healthy).join())
    assert "§" not in solo_text and "notes" not in solo
    beside = Stream(hostile_server, healthy)
    wait_in_flight(hostile_server, 1)
    with cf.ThreadPoolExecutor(3) as pool:
        failed = list(pool.map(lambda _: complete(hostile_server, f"the {marker} film", HEALTHY, max_tokens=4),
                               range(3)))
    assert hostile_server.metric("alignd_requests_in_flight") == 1  # they all ran inside its steps
    text, alignment = streamed(beside.join())
    assert (text, alignment) == (solo_text, solo)
    for choice in failed:
        notes = choice["alignment"]["notes"]
        decoding = [n for n in notes if n.startswith("args: reward 'moody' failed")]
        assert len(decoding) == 1 and "continued unguided" in decoding[0], notes  # one note, not one per step
        assert choice["alignment"]["total"] is None


def test_slow_text_reward_is_abandoned_not_waited_for(hostile_server):
    """A text reward that hangs for 30 s on one request's texts: that row fails after the time
    limit (1 s on this server) and continues unguided; a plain stream beside it keeps going."""
    plain = Stream(hostile_server, {"model": "tiny", "prompt": "we went to the sea", "max_tokens": 200,
                                    "ignore_eos": True, "temperature": 0})
    wait_in_flight(hostile_server, 1)
    started = time.monotonic()
    hung = complete(hostile_server, "a §hang story", {"decoder": "args", "rewards": {"moody": 1.0}}, max_tokens=6)
    took = time.monotonic() - started
    plain.join()
    notes = " ".join(hung["alignment"]["notes"])
    assert "took more than 1 s" in notes and "continued unguided" in notes, notes
    assert took < 20, took  # twice the 1 s limit plus restarts, never the 30 s hang (60 s: decoding + scoring)
    again = complete(hostile_server, "what a lovely day", HEALTHY)
    assert "notes" not in again["alignment"]  # the reward's fresh process serves the next request


def test_most_expensive_transfer_q_request_is_refused_at_default_limits(hostile_server):
    payload = {"model": "tiny", "prompt": "the movie was", "n": 8, "temperature": 1.0, "max_tokens": 4,
               "alignment": {"decoder": "transfer_q", "rewards": {"a": 1, "b": 1}, "top_k": 100,
                             "rollout_tokens": 256}}
    with hostile_server.http() as http:
        resp = http.post("/v1/completions", json=payload)
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "top_k x (1 + rollout_tokens) = 25,700" in message and "2,048" in message
    assert "--max-guide-tokens-per-step" in message


def test_most_expensive_transfer_q_request_runs_in_bounded_memory_beside_plain_ones(server):
    """With the limits raised, the request of the isolation issue runs: chunked, its memory
    stays bounded (it took 20 GB and killed the engine before), and plain requests beside it
    keep completing."""
    core = engine_process(server, "Worker")
    base_rss = core.memory_info().rss
    peak = [base_rss]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], core.memory_info().rss)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    heavy = {"model": server.model, "prompt": "the movie was", "n": 8, "temperature": 1.0, "max_tokens": 3,
             "ignore_eos": True, "alignment": {"decoder": "transfer_q", "rewards": {"a": 1, "b": 1}, "top_k": 100,
                                               "rollout_tokens": 256}}
    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: server.http().post("/v1/completions", json=heavy, timeout=900))
        wait_in_flight(server, 1)
        plain_done = 0
        while not running.done():
            complete(server, "what a lovely day", max_tokens=2)
            plain_done += 1
        resp = running.result()
    done.set()
    watcher.join()
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    # A random-weight model may sample tokens that decode to no text, so count tokens, not characters.
    assert len(choices) == 8 and all(c["finish_reason"] == "length" for c in choices)
    assert resp.json()["usage"]["completion_tokens"] == 8 * 3
    assert plain_done >= 1
    growth = (peak[0] - base_rss) / 2**30
    print(f"heavy transfer_q: engine RSS grew {growth:.2f} GiB at peak; {plain_done} plain requests beside it")
    assert growth < 1.5, growth


def metric(server, name: str) -> float:
    return server.metric(name)


def test_guided_work_beyond_what_runs_at_once_waits_its_turn(hostile_server):
    """Two requests whose guide tokens together exceed what the server runs at once (8,192): the second
    waits until the first is done, and both complete; one that waits past queue_timeout gets 429."""
    alignment = {"decoder": "transfer_q", "rewards": {"a": 1.0}, "top_k": 20, "rollout_tokens": 20}
    long = {"model": "tiny", "prompt": "the film was", "n": 6, "temperature": 1.0, "max_tokens": 150,
            "ignore_eos": True, "alignment": alignment}  # 6 x (20 x 21 + 20 x 20) = 4,920 per step
    first = Stream(hostile_server, long)
    wait_in_flight(hostile_server, 1)
    assert metric(hostile_server, "alignd_guide_budget_in_use") == 4920
    with cf.ThreadPoolExecutor(1) as pool:
        second = pool.submit(lambda: hostile_server.http().post("/v1/completions", json={**long, "max_tokens": 2}))
        deadline = time.monotonic() + 10
        while metric(hostile_server, "alignd_guide_budget_waiting") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        waited = metric(hostile_server, "alignd_guide_budget_waiting")
        resp = second.result()
    first.join()
    assert waited == 1
    # The first outlives the 3 s queue_timeout of this server: the second waited in vain.
    assert resp.status_code == 429, resp.text
    assert "runs at once" in resp.json()["error"]["message"] and resp.headers["retry-after"]
    assert metric(hostile_server, "alignd_guide_budget_in_use") == 0
    assert metric(hostile_server, "alignd_guide_budget_waiting") == 0
    short = {**long, "max_tokens": 3}
    with cf.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: hostile_server.http().post("/v1/completions", json=short), range(3)))
    assert [r.status_code for r in results] == [200, 200, 200]  # queued in turn, all served


def test_samples_count_against_concurrency(hostile_server):
    """This server holds 40 sequences at once: a request of 32 samples leaves room for 8."""
    many = Stream(hostile_server, {"model": "tiny", "prompt": "the film", "n": 32, "max_tokens": 200,
                                   "ignore_eos": True, "temperature": 1.0})
    wait_in_flight(hostile_server, 1)
    with httpx.Client(base_url=hostile_server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 16, "max_tokens": 2,
                                                      "temperature": 1.0})
        fits = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 8, "max_tokens": 2,
                                                   "temperature": 1.0})
    many.join()
    assert refused.status_code == 429 and "sequences in flight" in refused.json()["error"]["message"]
    assert fits.status_code == 200


PROMPTS = ["the movie was", "what a lovely day", "the service at the", "we went to the sea",
           "she said that the book", "numbers one two", "this is the best", "a good story with"]


def test_guided_rows_beyond_the_step_budget_take_turns_with_their_caches_kept(budget_server):
    """Eight ARGS rows of 4 guide tokens each, on an engine that runs 24 a step on average: the
    scheduler holds some out of each step (and new requests in its waiting queue), a held row
    keeps its guide caches, and every request decodes token for token as when alone."""
    alignment = {"decoder": "args", "rewards": {"a": 1.0}, "top_k": 4}
    solo = [complete(budget_server, p, alignment, max_tokens=24) for p in PROMPTS]
    steps, tokens = (budget_server.metric(f"alignd_{m}") for m in ("guided_steps", "guide_tokens"))
    held: list[float] = []
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        runs = [pool.submit(complete, budget_server, p, alignment, max_tokens=24) for p in PROMPTS]
        while not all(r.done() for r in runs):
            held.append(budget_server.metric("alignd_guided_rows_waiting"))
            time.sleep(0.1)
        together = [r.result() for r in runs]
    assert together == solo
    assert max(held) >= 1  # the metric shows the rows the budget held out
    # New requests start by turns too: no step ran more than the budget, though the eight
    # requests' first steps (4 + their prompt each) together cost several times it.
    assert budget_server.metric("alignd_max_step_guide_tokens") <= 24
    steps = budget_server.metric("alignd_guided_steps") - steps
    tokens = budget_server.metric("alignd_guide_tokens") - tokens
    print(f"8 guided rows, budget 24 a step: {tokens:.0f} guide tokens in {steps:.0f} guided steps")
    # 8 x 24 tokens of 4 guide tokens each (plus the prompts' first steps) at 24 a step: the rows
    # took turns over at least 32 steps, where all together would have needed 24.
    assert steps >= 32 and tokens / steps <= 26
    deadline = time.monotonic() + 30
    while budget_server.metric("alignd_guide_states") != 0:  # the held rows' caches, freed at the end
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert budget_server.metric("alignd_guided_rows_waiting") == 0


def test_guided_work_is_held_to_its_time_share_while_plain_requests_run(budget_server):
    """A text reward of 50 ms a call makes a guided step several times a plain one on the tiny
    model, though it costs only 2 guide tokens of the 24 a step may run. Alone, the guided row
    runs in every step; beside a plain request the scheduler times its steps and lets it in only
    for about as long as the plain steps take (guide_time_share 1): the plain request's steps
    mostly run without it."""
    alignment = {"decoder": "args", "rewards": {"slow": 1.0}, "top_k": 2}
    guided = Stream(budget_server, {"model": budget_server.model, "prompt": PROMPTS[0], "max_tokens": 120,
                                    "min_tokens": 120, "temperature": 0, "alignment": alignment})
    start = budget_server.metric("alignd_guided_steps")
    deadline = time.monotonic() + 60
    while budget_server.metric("alignd_guided_steps") < start + 5:  # it runs alone now, in every step
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = budget_server.metric("alignd_guided_steps")
    plain = complete(budget_server, PROMPTS[1], max_tokens=128, min_tokens=128)
    during = budget_server.metric("alignd_guided_steps") - before
    events = guided.join()
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len(plain["token_ids"]) == 128
    print(f"guided steps during 128 plain ones: {during:.0f}")
    # Every step would be guided without the share; with it, the first 16 (while the timing
    # learns what the guide costs: ~4 ms steps, ~26 ms a guide token here) and then about one
    # in thirteen.
    assert during < 64


def test_seeded_prompts_longer_than_one_steps_token_budget_do_not_kill_the_engine(hostile_server):
    """vLLM's CPU build dies when a seeded request's prefill is split over steps (it rewinds the
    request's random generator, which CPU generators cannot do): six seeded prompts of about 470 tokens in
    one request need more than a step's 2,048 tokens. The server must answer it, and the
    seed must still fix the samples."""
    words = "the movie was a good story with numbers one two and we went to the sea ".split()
    prompts = [" ".join(words[(i + k) % len(words)] for k in range(270)) for i in range(6)]
    payload = {"model": hostile_server.model, "prompt": prompts, "max_tokens": 4, "temperature": 1.0, "seed": 7,
               "return_token_ids": True}
    with hostile_server.http() as http:
        first = http.post("/v1/completions", json=payload)
        assert first.status_code == 200, first.text
        assert len(first.json()["choices"]) == 6
        again = http.post("/v1/completions", json=payload)
        assert again.status_code == 200, again.text
        assert http.get("/health").status_code == 200
    tokens = lambda r: [c["token_ids"] for c in r.json()["choices"]]  # noqa: E731
    assert tokens(first) == tokens(again)
