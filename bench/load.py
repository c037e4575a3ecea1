"""Load: many clients, every decoder, streaming and not, some going away early, for a fixed time.

    .venv/bin/python bench/load.py --config ~/.cache/alignd/serve.yaml --clients 64 \\
        --plain-seconds 180 --mixed-seconds 600 --out bench/results/load_cpu2.md
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --rewards a,b --values va ...

With `--config` it starts `alignd serve` itself (in this process's session: on Linux, a server
in a session of its own is scheduled as a separate group and can starve the clients of CPU);
with `--url` it drives a server that runs already (`--server-pid` lets it read its memory).

Three phases, each with the same number of clients, each client sending one request after the
other: a short warm-up (mixed, not counted), `plain` (plain requests only: the baseline), and
`mixed` (every decoder and plain requests, in equal shares). In both counted phases a share of
requests (`--disconnect`, 20 %) goes away early: a stream after its first event, a whole
response after a random fraction of a second. With `--cut-after S`, the clients give up the
requests still running S seconds after a phase ends (where guided requests queue for longer than
a phase lasts, as on a few CPU cores). At the end it waits for the server to drain and reads
what it still holds.

Reported per phase and request kind: requests/s, latency p50/p99, time to first token p50/p99
(streams), statuses; the guide states, requests and sequences still held after the drain; the
resident memory of the server's processes after the warm-up and at the end; and the ratio of the
plain requests' p99 latency in `mixed` to that in `plain`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "Write one sentence about the weather today.",
    "Describe the movie you saw last night.",
    "What do you think of the new restaurant in town?",
    "Tell me about your favourite book.",
    "How was the concert yesterday?",
    "Give me your opinion of this phone.",
    "Summarize the plot of a film you disliked.",
    "What is a good way to spend a rainy afternoon?",
]


def alignments(rewards: list[str], values: list[str], reference: bool) -> dict[str, dict | None]:
    """The request kinds of the mixed phase: plain and each decoder at its defaults."""
    kinds: dict[str, dict | None] = {"plain": None}
    if rewards:
        first = {rewards[0]: 1.0}
        kinds["args"] = {"decoder": "args", "rewards": {r: 1.0 for r in rewards[:2]}}
        kinds["transfer_q"] = {"decoder": "transfer_q", "rewards": first}
        kinds["best_of_n"] = {"decoder": "best_of_n", "rewards": first, "n": 4}
    if values:
        kinds["vas"] = {"decoder": "vas", "values": {values[0]: 2.0}}
    if reference:
        kinds["dera"] = {"decoder": "dera", "lambda": 2.0}
    return kinds


@dataclass
class Outcome:
    kind: str
    stream: bool
    status: int
    latency: float
    ttft: float | None
    gone: bool  # the client went away on purpose
    phase: str = ""


@dataclass
class Phase:
    name: str
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)


async def one_request(http: httpx.AsyncClient, model: str, kind: str, alignment: dict | None, max_tokens: int,
                      rng: random.Random, disconnect: float) -> Outcome:
    stream = rng.random() < 0.5
    chat = rng.random() < 0.5
    gone = rng.random() < disconnect
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 1.0, "stream": stream}
    prompt = rng.choice(PROMPTS)
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    if alignment is not None:
        body["alignment"] = alignment
    started = time.perf_counter()
    ttft = None
    status = 0
    try:
        if stream:
            async with http.stream("POST", path, json=body) as resp:
                status = resp.status_code
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:  # a stream that failed after its 200
                        status = int(event["error"]["code"])
                        break
                    if ttft is None and event.get("choices"):
                        ttft = time.perf_counter() - started
                    if gone:
                        break
        else:
            call = http.post(path, json=body)
            if gone:
                try:
                    resp = await asyncio.wait_for(call, rng.uniform(0.05, 1.0))
                except TimeoutError:
                    return Outcome(kind, stream, 499, time.perf_counter() - started, None, True)
            else:
                resp = await call
            status = resp.status_code
    except httpx.HTTPError:
        status = 599  # no answer at all (connection refused or reset)
    return Outcome(kind, stream, status, time.perf_counter() - started, ttft, gone)


# Status of a request its client gave up at the end of the phase (--cut-after).
CUT = 0


async def run_phase(url: str, model: str, kinds: dict[str, dict | None], phase: Phase, clients: int,
                    max_tokens: int, disconnect: float, seed: int, request_timeout: float,
                    cut_after: float | None) -> None:
    deadline = time.perf_counter() + phase.seconds
    cut_at = None if cut_after is None else deadline + cut_after
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        names = list(kinds)
        while time.perf_counter() < deadline:
            kind = rng.choice(names)
            request = one_request(http, model, kind, kinds[kind], max_tokens, rng, disconnect)
            started = time.perf_counter()
            try:
                outcome = await asyncio.wait_for(request, None if cut_at is None else max(0.0, cut_at - started))
            except TimeoutError:
                outcome = Outcome(kind, False, CUT, time.perf_counter() - started, None, True)
            outcome.phase = phase.name
            phase.outcomes.append(outcome)
            if outcome.status in (429, 503):
                await asyncio.sleep(0.5)

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits, verify=False,
                                 headers={"Authorization": f"Bearer {os.environ.get('ALIGND_API_KEY', 'unused')}"}) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))


def metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30, verify=False).text.splitlines():
        if line.startswith("alignd_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def drained(url: str, timeout: float) -> dict[str, float]:
    """Wait for the server to hold no request, then read what it still holds."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        held = {k: m.get(k, 0.0) for k in ("alignd_requests_in_flight", "alignd_samples_in_flight",
                                           "alignd_guide_states", "alignd_guide_budget_in_use",
                                           "alignd_guide_budget_waiting", "alignd_guided_rows_waiting")}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.5)


def rss(pid: int | None) -> dict[str, int]:
    """Resident bytes of the server process and each of its descendants, by name."""
    if pid is None:
        return {}
    import psutil

    root = psutil.Process(pid)
    out = {"front end": root.memory_info().rss}
    for child in root.children(recursive=True):
        try:
            name = child.name()
            out[name] = out.get(name, 0) + child.memory_info().rss
        except psutil.Error:
            continue
    return out


class RssSampler(threading.Thread):
    """The server's resident memory (all its processes) every `every` seconds, while it runs."""

    def __init__(self, pid: int | None, every: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self.started_at, self.stopped = time.perf_counter(), threading.Event()

    def run(self) -> None:
        while self.pid is not None and not self.stopped.wait(self.every):
            self.samples.append((round(time.perf_counter() - self.started_at), sum(rss(self.pid).values())))


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(phase: Phase) -> dict[str, dict]:
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in phase.outcomes:
        by_kind[o.kind].append(o)
    table = {}
    for kind, outs in sorted(by_kind.items()):
        done = [o for o in outs if not o.gone and o.status == 200]
        lat = [o.latency for o in done]
        ttft = [o.ttft for o in done if o.ttft is not None]
        statuses: dict[str, int] = defaultdict(int)
        for o in outs:
            statuses[str(o.status)] += 1
        table[kind] = {
            "requests": len(outs), "per_s": len(outs) / phase.seconds, "completed": len(done),
            "went_away": sum(o.gone and o.status != CUT for o in outs), "cut": sum(o.status == CUT for o in outs),
            "p50_s": quantile(lat, 0.5), "p99_s": quantile(lat, 0.99),
            "ttft_p50_s": quantile(ttft, 0.5), "ttft_p99_s": quantile(ttft, 0.99),
            "statuses": dict(sorted(statuses.items())),
        }
    return table


def start_server(config: Path, port: int) -> subprocess.Popen:
    # process_group, not a new session: see the module docstring.
    proc = subprocess.Popen([sys.executable, "-m", "alignd.server.cli", "serve", "--config", str(config),
                             "--port", str(port)], process_group=0)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("bench: the server did not start in 15 minutes")
        time.sleep(2)


def report(args, result: dict) -> str:
    from results_file import report_head

    lines = report_head("Load: every decoder, streaming and not, 20 % going away early", result["machine"], [],
                        result["elapsed_s"])
    lines += ["## Setup", "", f"- clients: {args.clients}, max_tokens {args.max_tokens}, temperature 1.0, "
              f"{int(100 * args.disconnect)} % of requests go away early; half of them streams, half chat",
              f"- phases: warm-up {args.warmup_seconds:g} s (mixed, not counted), plain {args.plain_seconds:g} s "
              f"(plain requests only), mixed {args.mixed_seconds:g} s (each kind an equal share: "
              f"{', '.join(result['kinds'])})",
              f"- request kinds: `{json.dumps(result['kinds'])}`"]
    if args.cut_after is not None:
        lines.append(f"- requests still running {args.cut_after:g} s after a phase's end are given up by their "
                     "clients (\"cut at end\", status 0): the server must cancel them and free what they held")
    lines.append("")
    if args.config:
        lines += ["The server's config:", "", "```yaml", args.config.read_text().strip(), "```", ""]
    lines += ["## Results", ""]
    head = ("| phase | kind | requests | req/s | completed | went away | cut at end | p50 s | p99 s | TTFT p50 s "
            "| TTFT p99 s | statuses |")
    lines += [head, "|" + "---|" * 12]

    def f(x):
        return "-" if x is None else f"{x:.2f}"

    for phase, table in result["phases"].items():
        for kind, row in table.items():
            lines.append(f"| {phase} | {kind} | {row['requests']} | {row['per_s']:.2f} | {row['completed']} | "
                         f"{row['went_away']} | {row['cut']} | {f(row['p50_s'])} | {f(row['p99_s'])} | {f(row['ttft_p50_s'])} | "
                         f"{f(row['ttft_p99_s'])} | {json.dumps(row['statuses'])} |")
    lines += ["", f"- server errors (5xx, and 599 = no answer): {result['server_errors']}",
              f"- held after the drain: {json.dumps(result['held'])}",
              f"- plain p99 latency, mixed / plain alone: {f(result['plain_p99_ratio'])}x",
              "- resident memory (MiB) after the warm-up -> at the end: "
              + ", ".join(f"{k} {a / 2**20:.0f} -> {result['rss_end'].get(k, 0) / 2**20:.0f}"
                          for k, a in result["rss_start"].items()),
              f"- memory growth after the warm-up: {f(result['rss_growth_pct'])} %",
              "- resident memory of all the server's processes over the run (s: MiB): "
              + ", ".join(f"{t}: {m}" for t, m in result["rss_mib_over_time"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="start `alignd serve --config` here")
    where.add_argument("--url", help="drive a running server")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, to read its memory")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--model", help="served model name (default: the first of /v1/models)")
    p.add_argument("--rewards", default=None, help="comma-separated reward names (default: the server's)")
    p.add_argument("--values", default=None, help="comma-separated value names (default: the server's)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--disconnect", type=float, default=0.2)
    p.add_argument("--warmup-seconds", type=float, default=20)
    p.add_argument("--plain-seconds", type=float, default=60)
    p.add_argument("--mixed-seconds", type=float, default=120)
    p.add_argument("--drain-timeout", type=float, default=120)
    p.add_argument("--request-timeout", type=float, default=1800, help="seconds a client waits for an answer")
    p.add_argument("--cut-after", type=float, default=None,
                   help="seconds after a phase's end when clients give up the requests still running "
                        "(status 0, 'cut at end'; the server must cancel them); default: wait")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the raw result here")
    p.add_argument("--out", type=Path, help="write the markdown report here")
    args = p.parse_args(argv)

    started = time.perf_counter()
    proc = start_server(args.config, args.port) if args.config else None
    url = args.url or f"http://127.0.0.1:{args.port}"
    pid = proc.pid if proc else args.server_pid
    try:
        info = httpx.get(f"{url}/v1/models", timeout=30, verify=False,
                         headers={"Authorization": f"Bearer {os.environ.get('ALIGND_API_KEY', 'unused')}"}).json()
        served = info["data"][0]
        model = args.model or served["id"]
        rewards = args.rewards.split(",") if args.rewards else served["alignment"]["rewards"]
        values = args.values.split(",") if args.values else served["alignment"]["values"]
        kinds = alignments([r for r in rewards if r], [v for v in values if v], "dera" in served["alignment"]["decoders"])
        phases = [Phase("warm-up", args.warmup_seconds), Phase("plain", args.plain_seconds),
                  Phase("mixed", args.mixed_seconds)]
        rss_start: dict[str, int] = {}
        sampler = RssSampler(pid)
        sampler.start()
        for phase in phases:
            phase_kinds = {"plain": None} if phase.name == "plain" else kinds
            print(f"bench: {phase.name}: {args.clients} clients for {phase.seconds:g} s", flush=True)
            asyncio.run(run_phase(url, model, phase_kinds, phase, args.clients, args.max_tokens,
                                  0.0 if phase.name == "warm-up" else args.disconnect, args.seed, args.request_timeout,
                                  args.cut_after))
            if phase.name == "warm-up":
                drained(url, args.drain_timeout)
                rss_start = rss(pid)
        held = drained(url, args.drain_timeout)
        rss_end = rss(pid)
        sampler.stopped.set()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    counted = [o for ph in phases[1:] for o in ph.outcomes]
    tables = {ph.name: summarize(ph) for ph in phases[1:]}
    alone, beside = tables["plain"].get("plain", {}).get("p99_s"), tables["mixed"].get("plain", {}).get("p99_s")
    total_start, total_end = sum(rss_start.values()), sum(rss_end.get(k, 0) for k in rss_start)
    from results_file import machine_description

    result = {
        "machine": machine_description("cpu"),
        "elapsed_s": time.perf_counter() - started,
        "kinds": kinds,
        "phases": tables,
        "server_errors": sum(o.status >= 500 for o in counted),
        "cut_after_s": args.cut_after,
        "held": held,
        "plain_p99_ratio": beside / alone if alone and beside else None,
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_growth_pct": 100 * (total_end - total_start) / total_start if total_start else None,
        "rss_mib_over_time": [(t, round(b / 2**20)) for t, b in sampler.samples],
    }
    text = report(args, result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n## Raw numbers\n\n```json\n" + json.dumps(result, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
