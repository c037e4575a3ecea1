"""Decoder speed benchmark: every in-engine decoder against plain decoding, side by side on one engine.

    .venv/bin/python bench/decoders_speed.py --out bench/results/decoders_speed_<machine>.md

One vLLM engine (alignd's `Engine`, in process, with a reward model, a value model and a DeRa
reference configured) serves every method of one run, one after the other for each cell of
concurrency (rows decoded together) x context (prompt tokens):

- plain      : requests without `alignment` (plain vLLM greedy decoding);
- args       : ARGS, k candidates, the reward model (the size of the base), KV-cached;
- naive      : the same with `reward_cache: false`, every candidate's reward recomputed over the
               whole text as the papers' reference code does (not run by default: slow);
- vas        : VAS, k candidates, one value model of the base's first 8 of 30 layers (~1/4 of its cost);
- dera       : DeRa, lambda 2, the reference a copy of the base (same family and size);
- transfer_q : Transfer Q*, k candidates, rollouts of `--rollout-tokens` by the baseline (the served
               model, loaded a second time as a guide), scored by the reward model.

Tokens/s are steady-state decode rates from the engine core's own per-step timestamps, with the
time inside the alignd logits processor from the worker's counters (see engine_bench.py).
`--methods plain args naive` is the cached-vs-naive ARGS comparison (targets: cached >= 5x naive
at the largest context; ARGS' per-token cost grows <= 1.3x with the context; plumbing <= 25 % over
the bare compute); `--profile FILE` adds a profiled run of one method at the largest cell.

Then, in the engine worker while the engine is idle (same process, threads and loaded models as
the guided steps), the bare compute of each decoder's guide work (guide_timing.py): ARGS/VAS one
forward of rows x k candidate tokens against cached prefixes (reward / value model), DeRa one
reference decode step of rows tokens, Transfer Q* the baseline's rows x k rollouts plus one
tree-masked reward forward over the k branches of 1 + rollout tokens. Bare = plain decode step
(from the plain rate) + that. `--fresh-process-bare` times the ARGS / VAS forwards again in a fresh
process after the engine has shut down (the worker's threads and cores): a cross-check.

And Transfer Q* "from scratch", as the reference code does it (guide_timing.time_regenerate):
per row, transformers `generate` of the k rollouts from [s, v] with the prompt prefilled again,
then the reward model over the k whole texts; timed in the worker with the same loaded models.

Models are built into the cache folder (never into git) when missing: the base (SmolLM2-135M-
Instruct, alignd.training.build), the reward model (base backbone + seeded random head), the value
model (the base's first 8 layers + seeded random head) and the reference (a copy of the base).
Timings depend only on shapes, so random heads do not matter.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# engine_bench sets the environment vLLM reads at import time; import it before vLLM.
from engine_bench import common_parser, measure, measure_cell, prepare, start_engine
from inputs import ensure_copy, ensure_reward_model, ensure_score_model
from decoders_report import build_tables, write_report
from guide_timing import (time_lm_step, time_regenerate, time_score_candidates, time_score_candidates_fresh,
                          time_transfer_q)

RM, VALUE = "rm", "value"
METHODS = ("plain", "args", "naive", "vas", "dera", "transfer_q")
DEFAULT_METHODS = ("plain", "args", "vas", "dera", "transfer_q")
SLOW = {"naive", "transfer_q"}  # never re-measured when contended
# the score model behind each method a fresh process can time again (naive ARGS: ARGS' forward)
FRESH = {"args": "reward", "vas": "value"}


def alignment(method: str, args: argparse.Namespace) -> dict | None:
    """The `alignment` object of a method's requests (None: plain decoding)."""
    if method == "plain":
        return None
    if method in ("args", "naive"):
        return {"decoder": "args", "rewards": {RM: 1.0}, "top_k": args.k, "reward_cache": method == "args"}
    if method == "vas":
        return {"decoder": "vas", "values": {VALUE: args.vas_beta}, "top_k": args.k}
    if method == "dera":
        return {"decoder": "dera", "lambda": args.dera_lambda}
    return {"decoder": "transfer_q", "rewards": {RM: 1.0}, "top_k": args.k, "rollout_tokens": args.rollout_tokens}


def max_tokens(method: str, args: argparse.Namespace) -> int:
    return {"naive": args.naive_max_tokens, "transfer_q": args.tq_max_tokens}.get(method, args.max_tokens)


# -- collective_rpc targets: the engine's own loaded guides, timed in the worker -----------------
def worker_bare(worker, method: str, prompts: list[list[int]], k: int, rollout_tokens: int, reps: int,
                seed: int) -> dict:
    """The bare guide compute of one step of `method` (see guide_timing.py)."""
    from alignd.rewards.runtime import GuideRuntime

    rt = GuideRuntime.current()
    if method in ("args", "naive"):
        return time_score_candidates(rt.scorer("reward", RM).guide, prompts, k, reps, seed)
    if method == "vas":
        return time_score_candidates(rt.scorer("value", VALUE).guide, prompts, k, reps, seed)
    if method == "dera":
        return time_lm_step(rt.lm("reference"), prompts, reps, seed)
    if method == "transfer_q":
        return time_transfer_q(rt.lm("baseline"), rt.scorer("reward", RM).guide, prompts, k, rollout_tokens,
                               reps, seed)
    raise ValueError(method)


def worker_regenerate(worker, prompts: list[list[int]], k: int, rollout_tokens: int, steps: int, seed: int,
                      max_rows: int | None) -> dict:
    """Transfer Q* from scratch with the worker's own baseline and reward models (transformers)."""
    from alignd.rewards.runtime import GuideRuntime

    rt = GuideRuntime.current()
    return time_regenerate(rt.lm("baseline").model, rt.scorer("reward", RM).guide.model, prompts, k,
                           rollout_tokens, steps, seed, max_rows, eos=rt.eos, pad=rt.tokenizer.pad_token_id)


# -- the run ---------------------------------------------------------------------------------------
async def run_all(args: argparse.Namespace, models: dict[str, Path]) -> tuple[dict, dict, dict, dict, list[str],
                                                                              str | None]:
    """(runs, bare in the worker, from scratch, bare in a fresh process, log lines, profile table)."""
    guides = {"rewards": {RM: str(models["reward"])}, "values": {VALUE: str(models["value"])},
              "reference": str(models["reference"]),
              "baseline": str(models["baseline"]) if models.get("baseline") else None}
    engine, prompts, log, info = await start_engine(args, models["base"], **guides)
    runs: dict = {}
    regen: dict = {}
    profile_table = None
    try:
        # warm-up: kernels, allocator, each guide's first forward (and the baseline's loading)
        t = time.perf_counter()
        for method in args.methods:
            if method != "naive":
                await measure(engine, method, alignment(method, args), prompts[min(args.contexts)][:2], 3)
        log.append(f"warm-up (every method, 2 rows, 3 tokens): {time.perf_counter() - t:.0f} s")
        print(f"bench: {log[-1]}", flush=True)
        for rows in args.concurrency:
            for ctx in args.contexts:
                for method in args.methods:
                    runs[(method, rows, ctx)] = await measure_cell(
                        engine, method, alignment(method, args), prompts[ctx][:rows], max_tokens(method, args),
                        0 if method in SLOW else args.retries, args.min_cpu_share)
        if args.profile:
            profile_table = await profile_run(engine, args, prompts, log)
        bare = await bare_in_worker(engine, args, prompts)
        if "transfer_q" in args.methods and not args.skip_regenerate:
            regen = await regenerate_in_worker(engine, args, prompts)
    finally:
        engine.shutdown()
    fresh = bare_in_fresh_process(args, models, prompts, info, log) if args.fresh_process_bare else {}
    return runs, bare, regen, fresh, log, profile_table


async def profile_run(engine, args: argparse.Namespace, prompts: dict, log: list[str]) -> str | None:
    """An extra run of --profile-method at the largest cell under the torch profiler, its steady
    window only; kept out of the tables (the profiler slows every op down)."""
    method, rows, ctx = args.profile_method, max(args.concurrency), max(args.contexts)
    trace = str(Path(args.profile).with_suffix(".json")) if args.profile_trace else None
    try:
        _, table = await measure(engine, method, alignment(method, args), prompts[ctx][:rows],
                                 max_tokens(method, args), profile=(args.profile, trace))
    except Exception as e:  # a failed profile must not lose the measurements
        log.append(f"profile failed: {type(e).__name__}: {e}")
        print(f"bench: {log[-1]}", flush=True)
        return None
    Path(args.profile).write_text(f"torch profiler, engine worker, {method} k={args.k}, {rows} rows x {ctx} context, "
                                  f"steady window ({max_tokens(method, args)} tokens per request)\n{table}")
    print(f"bench: wrote {args.profile}", flush=True)
    return table


async def bare_in_worker(engine, args: argparse.Namespace, prompts: dict) -> dict:
    """Each guided method's bare guide compute, in the worker while the engine is idle."""
    bare = {}
    for rows in args.concurrency:
        for ctx in args.contexts:
            for method in args.methods:
                if method == "plain":
                    continue
                t = time.perf_counter()
                reps = args.tq_bare_reps if method == "transfer_q" else args.bare_reps
                res = (await engine.llm.collective_rpc(
                    worker_bare, args=(method, prompts[ctx][:rows], args.k, args.rollout_tokens, reps, 0)))[0]
                bare[(method, rows, ctx)] = res
                parts = (f" (rollouts {1e3 * res['rollout']['median_s']:.1f} + reward "
                         f"{1e3 * res['reward']['median_s']:.1f})" if method == "transfer_q" else "")
                print(f"bench: bare {method:10s} rows={rows:<3d} ctx={ctx:<4d} {1e3 * res['median_s']:9.1f} ms"
                      f"{parts} (cpu {100 * res['cpu_share']:.0f} %) [{time.perf_counter() - t:.0f} s]", flush=True)
    return bare


async def regenerate_in_worker(engine, args: argparse.Namespace, prompts: dict) -> dict:
    """Transfer Q* from scratch (the reference code's way), same worker, same models."""
    regen = {}
    for rows in args.concurrency:
        for ctx in args.contexts:
            t = time.perf_counter()
            res = (await engine.llm.collective_rpc(
                worker_regenerate, args=(prompts[ctx][:rows], args.k, args.rollout_tokens, args.regen_steps,
                                         0, args.regen_rows or None)))[0]
            regen[(rows, ctx)] = res
            print(f"bench: regenerate rows={rows:<3d} ctx={ctx:<4d} {1e3 * res['median_s']:10.1f} ms/step "
                  f"({res['rows_timed']} of {rows} rows timed x {res['steps']} steps, "
                  f"{1e3 * res['row_mean_s']:.1f} ms/row, rollouts {res['mean_rollout_tokens']:.1f} tokens; "
                  f"cpu {100 * res['cpu_share']:.0f} %) [{time.perf_counter() - t:.0f} s]", flush=True)
    return regen


def bare_in_fresh_process(args: argparse.Namespace, models: dict[str, Path], prompts: dict, info: dict,
                          log: list[str]) -> dict:
    """The ARGS / VAS bare forwards again, each score model in a fresh process after the engine has
    shut down, on the worker's threads and cores: a check that the worker's timings are the model's."""
    cells = [(rows, ctx) for rows in args.concurrency for ctx in args.contexts]
    fresh = {}
    for method in [m for m in args.methods if m in FRESH]:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            results, note = pool.submit(time_score_candidates_fresh, str(models[FRESH[method]]), args.dtype,
                                        args.max_model_len, [prompts[ctx][:rows] for rows, ctx in cells], args.k,
                                        args.bare_reps, info.get("torch_threads"), info.get("affinity")).result()
        log.append(f"{method}: {note}")
        for (rows, ctx), res in zip(cells, results):
            fresh[(method, rows, ctx)] = res
            print(f"bench: bare {method:10s} rows={rows:<3d} ctx={ctx:<4d} {1e3 * res['median_s']:9.1f} ms in a fresh "
                  f"process (cpu {100 * res['cpu_share']:.0f} %)", flush=True)
    return fresh


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__, "bench/results/decoders_speed_<machine>.md")
    p.add_argument("--value-model", help="VAS value model folder (default: build one from the base's first "
                                         "--value-layers layers into --cache)")
    p.add_argument("--value-layers", type=int, default=8, help="layers of the built value model")
    p.add_argument("--reference", help="DeRa reference folder (default: a copy of the base in --cache)")
    p.add_argument("--baseline", help="Transfer Q* baseline folder (default: the served model)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                   help="plain is always run (the ratios need it)")
    p.add_argument("--rollout-tokens", type=int, default=20, help="TQ* rollout length")
    p.add_argument("--vas-beta", type=float, default=1.0)
    p.add_argument("--dera-lambda", type=float, default=2.0)
    p.add_argument("--tq-max-tokens", type=int, default=4,
                   help="tokens per request, TQ* (each step is k x rollout-tokens rollout steps: slow on CPU)")
    p.add_argument("--tq-bare-reps", type=int, default=3, help="timed repetitions of the bare TQ* compute")
    p.add_argument("--skip-regenerate", action="store_true", help="no from-scratch TQ* comparator")
    p.add_argument("--regen-steps", type=int, default=1, help="from-scratch TQ* steps timed per cell")
    p.add_argument("--regen-rows", type=int, default=0,
                   help="time only the first N rows of each from-scratch step and scale to all rows (0: all)")
    p.add_argument("--fresh-process-bare", action="store_true",
                   help="time the ARGS / VAS bare forwards again in a fresh process after the engine shut down")
    p.add_argument("--profile", help="write a torch-profiler table of the worker during an extra run of "
                                     "--profile-method at the largest batch and context to this file")
    p.add_argument("--profile-method", choices=METHODS, default="args")
    p.add_argument("--profile-trace", action="store_true", help="also export a chrome trace beside it")
    args = p.parse_args(argv)
    args.methods = ["plain"] + [m for m in METHODS if m in args.methods and m != "plain"]
    if min(args.max_tokens, args.tq_max_tokens, args.naive_max_tokens) < 3:
        p.error("every --*max-tokens needs at least 3 (rows decode in lockstep: N tokens give a steady window of "
                "N - 1 steps, and the worker's counters may miss the first of them)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, cache, started, machine, base = prepare(args)
    path = lambda p: Path(p).expanduser() if p else None  # noqa: E731
    models = {
        "base": base,
        "reward": path(args.reward_model) or ensure_reward_model(base, cache, args.seed),
        "value": path(args.value_model) or ensure_score_model(base, cache, args.seed, args.value_layers,
                                                              f"value{args.value_layers}"),
        "reference": path(args.reference) or ensure_copy(base, cache, "ref"),
        "baseline": path(args.baseline),
    }
    longest = max(max_tokens(m, args) for m in args.methods)
    if max(args.contexts) + longest + args.rollout_tokens + 1 > args.max_model_len:
        raise SystemExit("bench: the longest context + max tokens + rollout exceeds --max-model-len")
    print("bench: " + ", ".join(f"{k} {v}" for k, v in models.items() if v) + f", dtype {args.dtype}, device {device}",
          flush=True)
    runs, bare, regen, fresh, log, profile_table = asyncio.run(run_all(args, models))
    tables, targets, records = build_tables(args, runs, bare, regen, fresh)
    elapsed = time.perf_counter() - started
    print()
    print("\n\n".join(tables))
    print()
    print("\n".join(targets))
    print(f"\nbench: total {elapsed / 60:.1f} min")
    if args.out:
        write_report(args.out, args, models, machine, tables, targets, runs, bare, regen, fresh, records, log,
                     profile_table, elapsed)
        print(f"bench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
