"""Per-method summaries of the scored generations: per-sample measures, means with bootstrap
intervals, paired differences to greedy, the best-of-n curve."""

from __future__ import annotations

import math

import numpy as np

from bench.quality import stats
from bench.quality.methods import FAMILIES

HELDOUT_NAME = {"sentiment": "VADER compound", "detox": "clean (no Surge-list term)"}
LABELLER_NAME = {"sentiment": "spaCy P(pos)", "detox": "profanity-check P(off)"}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def per_sample(task: str, reward: str, res: dict, sc: dict, logodds: bool) -> dict[str, dict]:
    out = {}
    for s, d in zip(res["samples"], sc["samples"]):
        r = s["rewards"][reward]
        held = d["vader"] if task == "sentiment" else 1.0 - float(bool(d["surge_terms"]))
        out[s["id"]] = {"reward": r, "p": sigmoid(r) if logodds else r, "heldout": held, "labeller": d["labeller"],
                        "nll": d["nll"], "ntok": d["ntok_judge"], "div": d["args_diversity"],
                        "tokens": len(s["token_ids"]), "eos": s["finish"] == "stop",
                        "severity": d.get("surge_max_severity", 0.0), "notes": len(s["notes"])}
    return out


def mean_ci(x: list[float], seed: int = 0) -> tuple[float, float, float]:
    a = np.asarray([v for v in x if math.isfinite(v)], dtype=float)
    if not len(a):
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    m = a[rng.integers(0, len(a), size=(stats.RESAMPLES, len(a)))].mean(axis=1)
    lo, hi = np.percentile(m, [2.5, 97.5])
    return float(a.mean()), float(lo), float(hi)


def summarize(tasks: dict, scores: dict, models: dict) -> dict:
    """{task: {method: summary}} in a stable order (family, parameter)."""
    table: dict = {}
    for (task, name), (res, sc) in scores.items():
        t = tasks[task]
        logodds = not models["rewards"][t.reward].startswith("py:")
        ps = per_sample(task, t.reward, res, sc, logodds)
        n = len(ps)
        ntok = sum(v["ntok"] for v in ps.values())
        table.setdefault(task, {})[name] = {
            "method": res["method"], "family": res["method"]["family"], "samples": ps, "n": n,
            "reward": mean_ci([v["reward"] for v in ps.values()]),
            "p": float(np.mean([v["p"] for v in ps.values()])),
            "heldout": mean_ci([v["heldout"] for v in ps.values()]),
            "labeller": float(np.mean([v["labeller"] for v in ps.values()])),
            "ppl": math.exp(sum(v["nll"] for v in ps.values()) / ntok) if ntok else float("nan"),
            "ppl_median": float(np.median([math.exp(v["nll"] / v["ntok"]) for v in ps.values() if v["ntok"]]))
            if ntok else float("nan"),
            "distinct2": sc["distinct2"], "distinct3": sc["distinct3"],
            "div": float(np.mean([v["div"] for v in ps.values()])),
            "tokens": float(np.mean([v["tokens"] for v in ps.values()])),
            "eos": float(np.mean([v["eos"] for v in ps.values()])),
            "severity": float(np.mean([v["severity"] for v in ps.values()])),
            "notes": sum(v["notes"] for v in ps.values()),
            "wall_s": res["wall_s"], "generated": res["generated_tokens"],
            "tps": res["generated_tokens"] / res["wall_s"], "s_per_sample": res["wall_s"] / n,
            "tokens_per_sample": res["generated_tokens"] / n,
            "cpu": res["worker_cpu_share"], "load": res["load_avg"], "date": res["date"],
            "candidate_totals": [s["candidate_totals"] for s in res["samples"]] if res["samples"] and
            res["samples"][0].get("candidate_totals") else None,
            "engine": res.get("engine", {}).get("label"),
        }
    order = {f: i for i, f in enumerate(FAMILIES)}
    for task in table:
        table[task] = dict(sorted(table[task].items(),
                                  key=lambda kv: (order[kv[1]["family"]], kv[1]["method"].get("n", 1) *
                                                  kv[1]["method"].get("choices", 1),
                                                  next((kv[1]["method"][k] for k in ("weight", "beta", "lam")
                                                        if kv[1]["method"].get(k) is not None), 0))))
    return table


def paired(a: dict, b: dict, key: str, compare=stats.paired_diff) -> dict:
    """`compare` of one per-sample measure of two methods over the prompts both ran."""
    ids = [i for i in a if i in b]
    return compare([a[i][key] for i in ids], [b[i][key] for i in ids])


def diffs(summary: dict, ref: str = "greedy") -> dict:
    """Paired differences to `ref` on guided reward, held-out score and labeller."""
    out = {}
    for task, rows in summary.items():
        if ref not in rows:
            continue
        g = rows[ref]["samples"]
        for name, row in rows.items():
            s = row["samples"]
            out[(task, name)] = {
                "reward": paired(s, g, "reward"),
                "heldout": paired(s, g, "heldout"),
                "p_rel": paired(s, g, "p", stats.ratio_ci),
            }
    return out



def bon_curve(rows: dict) -> dict[int, float] | None:
    """Expected best-of-n reward from the largest best-of pool (first n candidates of each prompt)."""
    pools = [r["candidate_totals"] for r in rows.values() if r["candidate_totals"]]
    if not pools:
        return None
    pool = pools[-1]
    size = min(len(p) for p in pool)
    out = {}
    n = 1
    while n <= size:
        # unbiased: average of max over disjoint groups of n within each prompt's pool
        vals = [np.mean([max(p[j: j + n]) for j in range(0, size - n + 1, n)]) for p in pool]
        out[n] = float(np.mean(vals))
        n *= 2
    return out
