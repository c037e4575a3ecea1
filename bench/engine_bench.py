"""The engine benchmark's harness (`decoders_speed.py`): one in-process alignd `Engine`, probes run
inside its worker, and the measurement of one method in one cell (its models and prompts:
inputs.py; its result files: results_file.py).

A *method* is a name and the `alignment` object its requests carry (None: plain decoding). All
methods of a run share one engine; `measure` admits all rows of a cell at once (the scheduler is
paused while they are added, and they are prefilled in one step), so they decode in lockstep, and
takes the steady-state decode rate from the engine core's own per-step timestamps and the time
inside the alignd logits processor from the worker's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# Before vLLM is imported (it reads these at import time in the spawned engine process too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
# Lets collective_rpc ship the bench's own timing functions into the engine worker (local IPC).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# One naive ARGS step at 16 rows x 512 context (or a Transfer Q* step) runs for minutes on a small
# CPU; vLLM's default limit for one step (300 s) would declare the engine dead.
os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")


def _pickle_by_value() -> None:
    """Functions of the bench modules travel into the engine worker by value (cloudpickle), so
    the worker needs no import path to `bench/`."""
    import cloudpickle

    import guide_timing

    for module in (sys.modules[__name__], guide_timing):
        cloudpickle.register_pickle_by_value(module)


_pickle_by_value()

from inputs import ensure_base, make_prompts  # noqa: E402  (after the environment above)
from results_file import machine_description  # noqa: E402

# -- collective_rpc targets (run inside the engine worker) ------------------------------------------
def worker_snapshot(worker) -> dict:
    """The guide runtime's step counters (what `/metrics` exposes as alignd_guided_steps /
    alignd_guided_step_seconds) and the worker thread's CPU time."""
    from alignd.rewards.runtime import GuideRuntime

    return {**GuideRuntime.current().stats(), "wall": time.monotonic(), "cpu": time.thread_time()}


def worker_threads(worker) -> dict:
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "pid": os.getpid(),
    }


def worker_profile(worker, action: str, path: str | None = None, rows: int = 40):
    """Start/stop a torch profiler around engine steps in the worker."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if action == "start":
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        worker._bench_prof = profile(activities=acts, record_shapes=False)
        worker._bench_prof.__enter__()
        return None
    prof = worker._bench_prof
    prof.__exit__(None, None, None)
    del worker._bench_prof
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows)
    if path:
        prof.export_chrome_trace(path)
    return table


# -- the engine ------------------------------------------------------------------------------------
def make_engine(settings, max_batched_tokens: int):
    """alignd's `Engine`, with prefix caching off (every method prefills its prompts afresh:
    end-to-end rates stay comparable) and a prefill budget that holds all rows of the largest
    cell (so they decode in lockstep from the first step on; decode steps are unchanged)."""
    from alignd.server.engine import Engine

    class BenchEngine(Engine):
        def engine_args(self):
            ea = super().engine_args()
            ea.enable_prefix_caching = False
            ea.max_num_batched_tokens = max(2048, max_batched_tokens)
            return ea

    return BenchEngine(settings)


async def describe_worker(engine) -> tuple[dict, str]:
    info = (await engine.llm.collective_rpc(worker_threads))[0]
    return info, (f"engine worker: pid {info['pid']}, torch threads {info['torch_threads']}, "
                  f"cpu affinity {info['affinity']}")


# -- one measured run ---------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    rows: int
    context: int
    max_tokens: int
    tokens: int = 0  # completion tokens, all rows
    wall_s: float = 0.0  # submit to last token (prefill included)
    steady_tokens: int = 0
    steady_s: float = 0.0
    steps: float = 0.0  # guided steps inside the steady window (from the worker's counters)
    cpu_share: float = float("nan")  # worker thread CPU time / wall time in the window
    guided_s: float = 0.0  # time inside the guided decoder in the steady window
    notes: list[str] = field(default_factory=list)

    @property
    def steady_tps(self) -> float:
        return self.steady_tokens / self.steady_s if self.steady_s > 0 else float("nan")

    @property
    def e2e_tps(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def step_s(self) -> float:
        """Wall time of one decode step at this batch (steady state)."""
        return self.rows / self.steady_tps

    @property
    def guided_step_s(self) -> float:
        return self.guided_s / self.steps if self.steps else float("nan")

    def raw(self) -> dict:
        return {"method": self.method, "rows": self.rows, "context": self.context, "max_tokens": self.max_tokens,
                "tokens": self.tokens, "wall_s": self.wall_s, "steady_tokens": self.steady_tokens,
                "steady_s": self.steady_s, "steady_tps": self.steady_tps, "e2e_tps": self.e2e_tps,
                "guided_steps": self.steps, "guided_s": self.guided_s, "worker_cpu_share": self.cpu_share,
                "notes": self.notes}


def sampling_params(alignment: dict | None, max_tokens: int, request_id: str):
    """Greedy, `ignore_eos` (every request runs its max_tokens), the alignment if any."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from alignd.decoders.params import AlignmentParams, to_extra_args

    extra = None
    if alignment is not None:
        extra = to_extra_args(AlignmentParams(**alignment), request_id)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra,
    )


async def measure(engine, method: str, alignment: dict | None, prompts: list[list[int]], max_tokens: int,
                  profile: tuple[str, str | None] | None = None) -> tuple[Run, str | None]:
    """Admit all prompts together (the scheduler is paused while they are added, and the engine
    prefills them in one step), so the rows decode in lockstep. Steady state: from the step
    where the last row got its first token to the step where the first row got its last
    (engine-core timestamps, shared by the rows of a step)."""
    llm = engine.llm
    run = Run(method, len(prompts), len(prompts[0]), max_tokens)
    # per request: [(engine-core timestamp, tokens so far)]
    marks: list[list[tuple[float, int]]] = [[] for _ in prompts]
    all_started = asyncio.Event()
    started_count = 0

    async def consume(i: int, q) -> None:
        nonlocal started_count
        n, finished = 0, False
        while not finished:
            out = q.get_nowait() or await q.get()
            finished = out.finished
            new = len(out.outputs[0].token_ids) if out.outputs else 0
            if not new:
                continue
            n += new
            ts = out.metrics.last_token_ts if getattr(out, "metrics", None) is not None else 0.0
            marks[i].append((ts or time.monotonic(), n))
            if n == new:
                started_count += 1
                if started_count == len(prompts):
                    all_started.set()

    async def window_start() -> dict:
        # the worker's counters once every row has its first token (taken between two engine
        # steps); a profile, if asked for, covers the steps from here to the end
        await all_started.wait()
        snap = (await llm.collective_rpc(worker_snapshot))[0]
        if profile:
            await llm.collective_rpc(worker_profile, args=("start",))
        return snap

    await llm.pause_generation(mode="keep", clear_cache=False)
    start = time.perf_counter()
    try:
        queues = []
        for i, prompt in enumerate(prompts):
            rid = f"bench-{method}-{uuid.uuid4().hex[:8]}-{i}"
            params = sampling_params(alignment, max_tokens, rid)
            queues.append(await llm.add_request(rid, {"prompt_token_ids": prompt}, params))
    finally:
        await llm.resume_generation()
    start_task = asyncio.create_task(window_start())
    await asyncio.gather(*(consume(i, q) for i, q in enumerate(queues)))
    run.wall_s = time.perf_counter() - start
    all_started.set()
    a = await start_task
    table = None
    if profile:
        table = (await llm.collective_rpc(worker_profile, args=("stop", profile[1])))[0]
    b = (await llm.collective_rpc(worker_snapshot))[0]  # every step after `a` was a steady one

    run.tokens = sum(m[-1][1] for m in marks if m)
    t0 = max(m[0][0] for m in marks)  # every row is decoding from here on
    t1 = min(m[-1][0] for m in marks)  # ... up to here
    upto = lambda m, t: max((n for ts, n in m if ts <= t), default=0)  # noqa: E731
    run.steady_tokens = sum(upto(m, t1) - upto(m, t0) for m in marks)
    run.steady_s = t1 - t0
    if run.steady_tokens <= 0 or run.steady_s <= 0:
        run.notes.append("no steady window (too few tokens)")
    if len({m[0][0] for m in marks}) > 1:
        run.notes.append("rows started in different steps")
    run.steps = b["guided_steps"] - a["guided_steps"]
    run.guided_s = b["guided_step_seconds"] - a["guided_step_seconds"]
    if b["wall"] > a["wall"]:
        run.cpu_share = (b["cpu"] - a["cpu"]) / (b["wall"] - a["wall"])
    return run, table


async def measure_cell(engine, method: str, alignment: dict | None, prompts: list[list[int]], max_tokens: int,
                       retries: int, min_cpu_share: float) -> Run:
    """`measure`, again up to `retries` times while the engine worker's thread got less than
    `min_cpu_share` of its core (another process took it); the least contended run is kept.
    Prints one line per kept run."""
    t = time.perf_counter()
    run, _ = await measure(engine, method, alignment, prompts, max_tokens)
    for _ in range(retries):
        if not run.cpu_share < min_cpu_share:
            break
        print(f"bench: {method} rows={run.rows} ctx={run.context}: worker had {100 * run.cpu_share:.0f} % of "
              f"its core, measuring again", flush=True)
        again, _ = await measure(engine, method, alignment, prompts, max_tokens)
        again.notes.append(f"re-measured (worker had {100 * run.cpu_share:.0f} % of its core)")
        run = max(run, again, key=lambda r: r.cpu_share)
    if run.cpu_share < min_cpu_share:
        run.notes.append(f"contended: worker had {100 * run.cpu_share:.0f} % of its core")
    print(f"bench: {method:10s} rows={run.rows:<3d} ctx={run.context:<4d} {run.steady_tps:9.2f} tok/s steady "
          f"({run.steady_tokens} tok / {run.steady_s:.2f} s), {run.e2e_tps:8.2f} tok/s e2e, "
          f"guided {1e3 * run.guided_step_s:.1f} ms/step over {run.steps:.0f} steps, "
          f"worker cpu {100 * run.cpu_share:.0f} % "
          f"[{time.perf_counter() - t:.0f} s] {' '.join(run.notes)}", flush=True)
    return run


def common_parser(doc: str, out_example: str) -> argparse.ArgumentParser:
    """The engine's and the measurement's options: models, cells, budgets, device, output."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--base", help="base model folder (default: build SmolLM2-135M-Instruct into --cache)")
    p.add_argument("--cache", type=Path, default=Path("~/.cache/alignd"), help="where models are built")
    p.add_argument("--reward-model", help="reward model folder (default: build one from the base into --cache)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 512])
    p.add_argument("--k", type=int, default=10, help="candidates per step")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--naive-max-tokens", type=int, default=3,
                   help="tokens per request, naive ARGS (slow; 2 = a steady window of one step)")
    p.add_argument("--bare-reps", type=int, default=10, help="timed repetitions of a bare guide forward")
    p.add_argument("--min-cpu-share", type=float, default=None,
                   help="a run whose engine-worker thread got less CPU time than this share of the wall time "
                        "was contended by another process: measured again; default 0.9 on CPU, off on GPU")
    p.add_argument("--retries", type=int, default=2, help="re-measurements of a contended run")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="seed of the built models' random score heads")
    p.add_argument("--out", type=Path, help=f"markdown result file (e.g. {out_example})")
    return p


def prepare(args: argparse.Namespace) -> tuple[str, Path, float, dict, Path]:
    """Device defaults, the machine's description and the base model: (device, cache, started,
    machine, base)."""
    import torch

    on_gpu = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.min_cpu_share is None:
        args.min_cpu_share = 0.0 if on_gpu else 0.9
    device = "cuda" if on_gpu else "cpu"
    cache = args.cache.expanduser()
    started = time.perf_counter()
    return device, cache, started, machine_description(device), ensure_base(args.base, cache)


async def start_engine(args: argparse.Namespace, base: Path, **guides) -> tuple:
    """One engine serving the base with `guides` (ServeSettings fields: rewards, values,
    reference, baseline), prompts for every context, and the log lines of its start:
    (engine, prompts, log, worker info). The engine is shut down if describing it fails."""
    from alignd.server.config import ServeSettings

    settings = ServeSettings(
        model=str(base),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=max(max(args.concurrency), 1),
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=0,
        **guides,
    )
    engine = make_engine(settings, max(args.concurrency) * max(args.contexts))
    prompts = {ctx: make_prompts(engine.tokenizer, max(args.concurrency), ctx) for ctx in args.contexts}
    t = time.perf_counter()
    engine.start()
    log = [f"engine start-up: {time.perf_counter() - t:.0f} s"]
    print(f"bench: {log[-1]}", flush=True)
    try:
        info, line = await describe_worker(engine)
    except BaseException:
        engine.shutdown()
        raise
    log.append(line)
    print(f"bench: {log[-1]}", flush=True)
    return engine, prompts, log, info
