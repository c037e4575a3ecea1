"""Guide-runtime step costs without the engine: cached candidate scoring vs naive recompute.

    python bench/guide_step.py [--device cuda] [--dtype bfloat16] [--out bench/results/guide_step_<machine>.md]

Measures, for a reward model of SmolLM2-135M's shape (random weights: only shapes matter for
time), one ARGS step of `rows` requests with k candidates each at a given context length:

- cached: `GuideModel.sync` (commit the chosen token from last step's candidates, no forward)
  + `score_candidates` (one forward of rows*k tokens against the per-request KV caches);
- naive: the reference codes' way, `score_sequences` over rows*k whole sequences of ctx+1 tokens;
- bare: a plain forward of rows*k tokens with no prefix at all (the linear layers' compute).

It runs where vLLM cannot be carried (the GPU lease has no vLLM), so it isolates the guide
runtime: ratios are measured side by side in one run on one device.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignd.rewards.guide_model import GuideModel

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(guide: GuideModel, rows: int, ctx: int, k: int, repeat: int, naive: bool) -> dict[str, float]:
    g = torch.Generator().manual_seed(rows * 1000 + ctx)
    vocab = guide.vocab_size
    seqs = [torch.randint(10, vocab, (ctx,), generator=g).tolist() for _ in range(rows)]
    slots = [guide.open() for _ in range(rows)]
    guide.sync(slots, seqs)
    cands = torch.randint(10, vocab, (rows, k), generator=g)

    def cached_step():
        # Choose candidate 0 of last step, drop it again so the context stays at ctx.
        guide.score_candidates(slots, seqs, cands)
        for s, q, c in zip(slots, seqs, cands[:, 0].tolist()):
            q.append(c)
        guide.sync(slots, seqs)
        for s, q in zip(slots, seqs):
            q.pop()
            s.length -= 1

    flat = [q + [c] for q, row in zip(seqs, cands.tolist()) for c in row]
    # The cached path must agree with the recompute it replaces (up to the dtype's rounding).
    cached = guide.score_candidates(slots, seqs, cands)
    guide.sync(slots, seqs)
    out = {"max_abs_diff": (cached - guide.score_sequences(flat).view(rows, k)).abs().max().item()}
    out["cached"] = timed(cached_step, guide.device, repeat)
    ids = cands.view(-1, 1).to(guide.device)

    @torch.inference_mode()
    def bare():
        guide.model(input_ids=ids)

    out["bare"] = timed(bare, guide.device, repeat)
    if naive:
        out["naive"] = timed(lambda: guide.score_sequences(flat), guide.device, max(1, repeat // 4))
    for s in slots:
        guide.close(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg).to(device=device, dtype=dtype)
    guide = GuideModel(model, "score", max_len=max(args.contexts) + 2)

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                       platform.processor())
        machine += f", {torch.get_num_threads()} threads"
    lines = [
        f"# Guide step costs: {machine}",
        "",
        f"{date.today()}, torch {torch.__version__}, {dtype}, reward model of SmolLM2-135M's shape "
        f"(30 layers, hidden 576, GQA 9/3 heads), k = {args.k}. Times are medians per ARGS step.",
        "",
        "| rows | context | cached ms | naive ms | naive / cached | bare ms | cached / bare | max abs diff cached vs naive |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    per_ctx: dict[int, dict[int, float]] = {}
    for rows in args.rows:
        for ctx in args.contexts:
            m = measure(guide, rows, ctx, args.k, args.repeat, not args.no_naive)
            per_ctx.setdefault(rows, {})[ctx] = m["cached"]
            naive = m.get("naive")
            lines.append(
                f"| {rows} | {ctx} | {m['cached'] * 1e3:.2f} | "
                + (f"{naive * 1e3:.1f} | {naive / m['cached']:.1f}x" if naive else "- | -")
                + f" | {m['bare'] * 1e3:.2f} | {m['cached'] / m['bare']:.2f}x | {m['max_abs_diff']:.2e} |"
            )
            print(lines[-1], flush=True)
    lo, hi = min(args.contexts), max(args.contexts)
    lines += ["", f"Growth of the cached step from context {lo} to {hi}: "
              + ", ".join(f"{r} rows {per_ctx[r][hi] / per_ctx[r][lo]:.2f}x" for r in per_ctx)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
