"""The report's PNG plots: score vs cost (wall time, generated tokens) of every method, and the sweeps of ARGS' weight, VAS' beta
and DeRa's lambda."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.quality.summary import HELDOUT_NAME

COLORS = {"greedy": "black", "sample": "grey", "bon": "tab:blue", "bonp": "tab:cyan", "block": "tab:brown",
          "args": "tab:red", "tq": "tab:purple", "vas": "tab:green", "dera": "tab:orange"}


def plots(summary: dict, out_dir: Path, stem: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    tasks = list(summary)
    # 1. score vs cost, every method: in wall time, and in generated tokens per sample (every
    # sample and block a method drew: the compute-matched axis the search papers use)
    for xkey, xlabel, suffix in (("s_per_sample", "wall seconds per sample (all prompts batched, log scale)", "cost"),
                                 ("tokens_per_sample", "generated tokens per sample (log scale)", "tokens")):
        fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 9), squeeze=False)
        for j, task in enumerate(tasks):
            for i, (key, ylabel) in enumerate((("reward", "guided reward (mean)"), ("heldout", HELDOUT_NAME[task]))):
                ax = axes[i][j]
                offsets = [(4, 4), (4, -10), (-6, 8), (-6, -14)]
                for k, (name, r) in enumerate(summary[task].items()):
                    m, lo, hi = r[key]
                    ax.errorbar(r[xkey], m, yerr=[[m - lo], [hi - m]], fmt="o", color=COLORS[r["family"]],
                                capsize=2, ms=5, alpha=0.8)
                    ax.annotate(name, (r[xkey], m), fontsize=7, xytext=offsets[k % len(offsets)],
                                textcoords="offset points", color=COLORS[r["family"]])
                ax.set_xscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{task}: {'guided' if key == 'reward' else 'held-out'} score vs {suffix}")
                ax.grid(alpha=0.3)
        handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=fam) for fam, c in COLORS.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(COLORS))
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        name = f"{stem}_{suffix}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append((name, f"Guided (top) and held-out (bottom) score vs {xlabel.split(' (')[0]}; bars: 95 % "
                           "bootstrap interval of the mean"))

    # 2. sweeps: DeRa over lambda, ARGS over weight (with greedy as w = 0), VAS over beta
    for fam, xname, key0 in (("dera", "lambda", "lam"), ("args", "weight w", "weight"), ("vas", "beta", "beta")):
        rows_by_task = {t: {k: v for k, v in summary[t].items() if v["family"] == fam} for t in tasks}
        rows_by_task = {t: v for t, v in rows_by_task.items() if v}
        if not rows_by_task:
            continue
        fig, axes = plt.subplots(len(rows_by_task), 3, figsize=(15, 4 * len(rows_by_task)), squeeze=False)
        for i, (task, rows) in enumerate(rows_by_task.items()):
            pts = sorted((v["method"][key0], v) for v in rows.values())
            if fam == "args" and "greedy" in summary[task]:
                pts = [(0.0, summary[task]["greedy"])] + pts
            if fam == "vas" and "sample" in summary[task]:
                pts = [(0.0, summary[task]["sample"])] + pts
            xs = [p[0] for p in pts]
            for j, (key, label) in enumerate((("reward", "guided reward"), ("heldout", HELDOUT_NAME[task]),
                                              ("ppl", "Gemma-3-270M perplexity"))):
                ax = axes[i][j]
                if key == "ppl":
                    ax.plot(xs, [p[1]["ppl"] for p in pts], "o-", color=COLORS[fam])
                else:
                    m = np.array([p[1][key][0] for p in pts])
                    lo = np.array([p[1][key][1] for p in pts])
                    hi = np.array([p[1][key][2] for p in pts])
                    ax.errorbar(xs, m, yerr=[m - lo, hi - m], fmt="o-", color=COLORS[fam], capsize=3)
                ax.set_xlabel(xname + (" (0 = greedy)" if fam == "args" else " (0 = plain sampling)"
                                       if fam == "vas" else ""))
                ax.set_ylabel(label)
                ax.set_title(f"{task}: {fam.upper() if fam != 'dera' else 'DeRa'} {label} vs {xname}")
                ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{stem}_{fam}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append((name, f"{fam}: guided reward, held-out score (95 % bootstrap intervals of the mean) and "
                           f"perplexity against {xname}"))
    return made
