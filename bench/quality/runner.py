"""Generation: alignd's in-process `Engine` and the server's own request code (server/generate.py).

Each engine configuration runs in a child process (a fresh vLLM engine, its memory returned when it
exits). Within it, the methods run one after another; all prompts of a method are submitted at
once (one alignd request per prompt, as concurrent HTTP clients would), so the engine batches them
up to `max_num_seqs` rows. A method's result is written to the work folder as soon as it is done
(resumable: a rerun skips what is there with the same key).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

RESULT_VERSION = 1


def run_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- in the engine worker (collective_rpc) ----------------------------------------------------
def worker_snapshot(worker) -> dict:
    """CPU time of the engine worker's thread and the guide runtime's step counters."""
    from alignd.rewards.runtime import GuideRuntime

    try:
        stats = GuideRuntime.current().stats()
    except RuntimeError:
        stats = {}
    return {**stats, "wall": time.monotonic(), "cpu": time.thread_time()}


def worker_info(worker) -> dict:
    import torch

    return {"torch_threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


# -- one engine, several methods ----------------------------------------------------------------
def run_group(job: dict) -> None:
    """Child-process entry: start the engine of `job`, run its methods, write their results."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    asyncio.run(_run_group(job))


async def _run_group(job: dict) -> None:
    from alignd.server.config import ServeSettings
    from alignd.server.engine import Engine

    e = job["engine"]

    class QualityEngine(Engine):
        def engine_args(self):
            ea = super().engine_args()
            # Methods run one after another on the same prompts: no method may reuse another's
            # cached prompt blocks (it would make its cost look lower).
            ea.enable_prefix_caching = False
            return ea

    settings = ServeSettings(
        model=e["served"], rewards=e["rewards"], values=e["values"], reference=e["reference"],
        baseline=e["baseline"], dtype=e["dtype"], max_model_len=e["max_model_len"], max_num_seqs=e["rows"],
        served_model_name="quality", seed=0,
    )
    engine = QualityEngine(settings)
    t = time.perf_counter()
    engine.start()
    startup = time.perf_counter() - t
    print(f"quality: engine up in {startup:.0f} s ({e['label']})", flush=True)
    try:
        info = (await engine.llm.collective_rpc(worker_info))[0]
        # Warm-up outside every timed window: kernels, and each guide's first use (Transfer Q*'s
        # default baseline is loaded on first use).
        seen = set()
        for run in job["runs"]:
            al = run["alignment"]
            kind = (al or {}).get("decoder", "plain")
            if kind in seen:
                continue
            seen.add(kind)
            warm = dict(run, max_tokens=2, prompts=run["prompts"][:2])
            await run_method(engine, warm, warmup=True)
        for run in job["runs"]:
            t = time.perf_counter()
            result = await run_method(engine, run)
            result["engine"] = {**{k: v for k, v in e.items() if k != "label"}, "label": e["label"],
                                "startup_s": startup, "worker": info}
            write_json(Path(run["out"]), result)
            print(f"quality: {run['task']:9s} {run['method']['name']:10s} {len(run['prompts'])} prompts, "
                  f"{result['generated_tokens']} tokens in {result['wall_s']:.1f} s "
                  f"({result['generated_tokens'] / result['wall_s']:.1f} tok/s, worker cpu "
                  f"{100 * result['worker_cpu_share']:.0f} %) [{time.perf_counter() - t:.0f} s]", flush=True)
    finally:
        engine.shutdown()


async def run_method(engine, run: dict, warmup: bool = False) -> dict:
    from alignd.decoders.params import AlignmentParams
    from alignd.server import generate
    from alignd.server.schemas import SamplingFields

    prompts = run["prompts"]
    ids = [engine.encode_chat([{"role": "user", "content": p["text"]}]) if p["chat"] else engine.encode(p["text"])
           for p in prompts]
    al = AlignmentParams.model_validate(run["alignment"]) if run["alignment"] else None
    m = run["method"]
    tag = "warm" if warmup else "q"

    def plan(i: int, prompt: list[int]):
        req = SamplingFields(
            model="quality", max_tokens=run["max_tokens"], temperature=m["temperature"], top_p=1.0,
            n=m["choices"], seed=run["seed"] * 1_000_003 + i * 1000, alignment=al, return_token_ids=True,
        )
        return generate.Plan(f"{tag}-{run['task']}-{m['name']}-{i}", [prompt], req, run["max_tokens"], engine)

    plans = [plan(i, p) for i, p in enumerate(ids)]
    a = (await engine.llm.collective_rpc(worker_snapshot))[0]
    load0 = os.getloadavg()
    start = time.perf_counter()
    outs = await asyncio.gather(*(generate.run(p) for p in plans))
    wall = time.perf_counter() - start
    load1 = os.getloadavg()
    b = (await engine.llm.collective_rpc(worker_snapshot))[0]
    if warmup:
        return {}

    samples = []
    for p, prompt_ids, pl, choices in zip(prompts, ids, plans, outs):
        cands = None
        if len(choices) > 1:  # best-of-(64 x choices): the winner among every candidate
            pool = [c for ch in choices for c in (ch.alignment.candidates or [])]
            win = max(pool, key=lambda c: float("-inf") if c.total is None else c.total)  # pruned: no total
            text, tok, finish = win.text, list(win.token_ids or []), None
            cands = [c.total for c in pool]
            notes = sorted({n for ch in choices for n in (ch.alignment.notes or [])})
        else:
            ch = choices[0]
            text, tok, finish = ch.text, ch.token_ids, ch.finish_reason
            notes = list(ch.alignment.notes or []) if ch.alignment else []
        samples.append({"id": p["id"], "prompt_ids": prompt_ids, "completion": text, "token_ids": tok,
                        "finish": finish, "notes": notes, "candidate_totals": cands})
    # Every configured reward of every returned text, exactly as the server reports rewards
    # (the worker's loaded models on prompt + completion ids); outside the timed window.
    names = sorted(engine.settings.rewards)
    seqs = [s["prompt_ids"] + s["token_ids"] for s in samples]
    scored = await engine.finish(seqs, names, f"score-{run['task']}-{m['name']}")
    for s, r in zip(samples, scored["rewards"]):
        s["rewards"] = r
    cpu_share = (b["cpu"] - a["cpu"]) / (b["wall"] - a["wall"]) if b["wall"] > a["wall"] else float("nan")
    return {
        "version": RESULT_VERSION,
        "key": run["key"],
        "task": run["task"],
        "method": m,
        "alignment": run["alignment"],
        "max_tokens": run["max_tokens"],
        "seed": run["seed"],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": wall,
        "generated_tokens": sum(pl.usage["generated_tokens"] for pl in plans),  # every sample's, best-of-n's too
        "returned_tokens": sum(len(s["token_ids"]) for s in samples),
        "guided_steps": b.get("guided_steps", 0) - a.get("guided_steps", 0),
        "guided_s": b.get("guided_step_seconds", 0) - a.get("guided_step_seconds", 0),
        "worker_cpu_share": cpu_share,
        "load_avg": [load0[0], load1[0]],
        "samples": samples,
    }


def spawn_group(job: dict) -> int:
    """Run one engine group in a fresh child process; its exit code."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=run_group, args=(job,), name="quality-engine")
    proc.start()
    proc.join()
    return proc.exitcode
