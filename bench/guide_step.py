"""Guide-runtime step costs without the engine: each decoder's guide work, and ARGS' cached
candidate scoring vs naive recompute.

    python bench/guide_step.py [--device cuda] [--dtype bfloat16] [--decoders args vas dera transfer_q]
                               [--out bench/results/guide_step_<machine>.md]

`--decoders args` (the default) measures, for a reward model of SmolLM2-135M's shape (random weights: only shapes matter for
time), one ARGS step of `rows` requests with k candidates each at a given context length:

- cached: `GuideModel.sync` (commit the chosen token from last step's candidates, no forward)
  + `score_candidates` (one forward of rows*k tokens against the per-request KV caches);
- naive: the reference codes' way, `score_sequences` over rows*k whole sequences of ctx+1 tokens;
- bare: a plain forward of rows*k tokens with no prefix at all (the linear layers' compute).

The other decoders (random models of SmolLM2-135M's shape, seeded; only shapes matter):

- vas: a value model of the first `--value-layers` (8) of the 30 layers, one forward of rows*k
  candidate tokens against cached prefixes (`score_candidates`), and the whole VAS decoder step;
- dera: the reference LM (30 layers, LM head) decoding one token per row against its cached
  prefix (`last_outputs`), and the whole DeRa decoder step (mixing over the vocabulary);
- transfer_q: the baseline LM's rows*k greedy rollouts of `--rollout-tokens` (20) forked from the
  cached prefixes plus one tree-masked reward forward over the k branches of 1 + rollout tokens,
  the whole Transfer Q* decoder step, and the same step from scratch as the reference code does
  it (transformers `generate` of the k rollouts of each row from [s, v], prompt prefilled again,
  then the reward model over the k whole texts; guide_timing.time_regenerate).

The whole decoder steps are the real `alignd.decoders.{vas,dera,transfer_q}.step` over a stub
guide runtime holding these models (they need pydantic; without it those columns are left out).
Each timed decoder step commits its chosen token, as in the engine (the context grows by one
token per step). The engine's plain decode step (vLLM, CUDA graphs) cannot run here; the 30-layer
LM step through the same eager runtime stands in for it, so the "vs plain" columns are proxies
(vLLM's own plain step is faster than this eager one: the real ratios are lower).

It runs where vLLM cannot be carried (the GPU lease has no vLLM), so it isolates the guide
runtime: ratios are measured side by side in one run on one device. It imports the installed
alignd; where there is no network, carry a wheel (`pip wheel --no-deps -w dist .` here, then
`pip install --no-deps dist/alignd-*.whl` there).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignd.rewards.guide_model import GuideModel

from guide_timing import time_lm_step, time_regenerate, time_score_candidates, time_transfer_q

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


# -- the other decoders ------------------------------------------------------------------------------
class StubRuntime:
    """The guides the decoders ask for (`alignd.decoders.guides.Guides`, which the engine's guide
    runtime implements), over in-process models: scorers by kind and name, the reference /
    baseline LMs, the eos id."""

    def __init__(self, reward: GuideModel, value: GuideModel, lm: GuideModel, eos: int | None) -> None:
        from alignd.rewards.scorers import CachedReward

        self.scorers = {"reward": {"rm": CachedReward(reward)}, "value": {"value": CachedReward(value)}}
        self.lms = {"reference": lm, "baseline": lm}
        self.eos = eos

    def scorer(self, kind: str, name: str, cached: bool = True):
        from alignd.rewards.scorers import Recomputing

        scorer = self.scorers[kind][name]
        return scorer if cached else Recomputing(scorer)

    def lm(self, role: str) -> GuideModel:
        return self.lms[role]


def decoders_importable() -> str | None:
    """None when the real decoder steps can run here, else why not."""
    try:
        importlib.import_module("alignd.decoders.params")  # the decoder table, pydantic
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


def time_decoder_step(runtime: StubRuntime, alignment: dict, seqs: list[list[int]], vocab: int,
                      device: torch.device, repeat: int, seed: int) -> float:
    """Median seconds of one whole decoder step (its `step` in `alignd.decoders.table`) over len(seqs)
    rows: top-k of the base logits, the guides' work, the scoring. Each step appends the token it
    chooses (argmax of the returned logits) to every row, as the engine would: next step's sync
    commits it (VAS, TQ*: from the candidates' stashed keys/values) or runs it (DeRa)."""
    from alignd.decoders.base import Row
    from alignd.decoders.params import AlignmentParams

    params = AlignmentParams(**alignment)
    step = params.method.step
    rows = [Row(params, f"bench-{i}", list(seq), []) for i, seq in enumerate(seqs)]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((len(rows), vocab), generator=g).to(device)

    def one() -> None:
        out = step(runtime, rows, [r.tokens() for r in rows], logits.clone())
        for row, token in zip(rows, out.argmax(-1).tolist()):
            row.output.append(token)

    try:
        with torch.inference_mode():
            return timed(one, device, repeat)
    finally:
        for row in reversed(rows):
            row.release()


def f(x: float | None, d: int = 2) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def fx(x: float | None, d: int = 2) -> str:
    return "-" if x is None else f"{x:.{d}f}x"


def mark(x: float | None, goal: float) -> str:
    return "" if x is None else (" MET" if x >= goal else " MISSED")


def proxy_row(rows: int, ctx: int, part: float, step: float | None, lm_step: float, goal: float, part_name: str,
              lm_column: bool) -> str:
    """A VAS or DeRa table row: the guide's part alone, the whole decoder step, their ratio, the LM
    step (when it is a column of its own), and the share of plain decoding's rate left, LM step /
    (LM step + decoder step), with the part alone where the decoder step could not be timed."""
    x = lm_step / (lm_step + (step or part))
    lm = f" {f(lm_step * 1e3)} |" if lm_column else ""
    return (f"| {rows} | {ctx} | {f(part * 1e3)} | {f(step and step * 1e3)} | {fx(step and step / part)} |{lm} "
            f"{fx(x)}{mark(x, goal)}{'' if step else f' ({part_name} only)'} |")


def decoder_cells(args, device, dtype) -> list[str]:
    """The VAS, DeRa and Transfer Q* tables."""
    torch.manual_seed(1)
    headroom = max(args.contexts) + args.repeat + args.tq_repeat + args.rollout_tokens + 8
    lm_model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, tie_word_embeddings=True, pad_token_id=0))
    lm_model = lm_model.to(device=device, dtype=dtype).eval()
    rm_model = LlamaForSequenceClassification(LlamaConfig(**SMOLLM2, num_labels=1, pad_token_id=0))
    rm_model = rm_model.to(device=device, dtype=dtype).eval()
    value_cfg = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.value_layers}, num_labels=1, pad_token_id=0)
    value_model = LlamaForSequenceClassification(value_cfg).to(device=device, dtype=dtype).eval()
    lm = GuideModel(lm_model, "lm", headroom)
    reward = GuideModel(rm_model, "score", headroom)
    value = GuideModel(value_model, "score", headroom)
    # eos None: every rollout runs its full length (random weights would stop at random places)
    runtime = StubRuntime(reward, value, lm, eos=None)
    why_not = decoders_importable()
    k, n = args.k, args.rollout_tokens
    alignments = {"vas": {"decoder": "vas", "values": {"value": 1.0}, "top_k": k},
                  "dera": {"decoder": "dera", "lambda": args.dera_lambda},
                  "transfer_q": {"decoder": "transfer_q", "rewards": {"rm": 1.0}, "top_k": k, "rollout_tokens": n}}
    tables = {
        "vas": ["## VAS", "",
                f"Value model: the first {args.value_layers} of SmolLM2-135M's 30 layers, k = {k}. LM step = one "
                "token per row through the 30-layer LM (eager, the runtime of DeRa's reference): the stand-in for a plain "
                "decode step. VAS vs plain (proxy) = LM step / (LM step + VAS step).", "",
                "| rows | context | value fwd ms | VAS step ms | VAS step / value fwd | LM step ms "
                f"| VAS vs plain (proxy; target >= {VAS_TARGET}x) |",
                "|---:|---:|---:|---:|---:|---:|---:|"],
        "dera": ["## DeRa", "",
                 f"Reference: a 30-layer LM of SmolLM2-135M's shape, lambda {args.dera_lambda}. Reference step = one "
                 "token per row against its cached prefix, logits over the vocabulary. DeRa vs plain (proxy) = "
                 "LM step / (LM step + DeRa step), the reference step being the LM step.", "",
                 f"| rows | context | reference step ms | DeRa step ms | DeRa step / reference step "
                 f"| DeRa vs plain (proxy; target >= {DERA_TARGET}x) |",
                 "|---:|---:|---:|---:|---:|---:|"],
        "transfer_q": ["## Transfer Q*", "",
                       f"k = {k}, rollouts of {n} tokens by a 30-layer baseline LM, one reward model of the same "
                       f"shape. Bare = rollouts (rows x k branches, {n} steps) + one tree-masked reward forward "
                       f"(rows x k x {n + 1} tokens). From scratch = per row, transformers `generate` of the k "
                       f"rollouts from [s, v] in one call (prompt prefilled again) + the reward model over the k "
                       f"whole texts, rows one after the other ({args.regen_steps} step(s)"
                       + (f", first {args.regen_rows} rows timed and scaled to all" if args.regen_rows else "")
                       + ").", "",
                       "| rows | context | rollouts ms | reward tree ms | bare ms | TQ* step ms | TQ* step / bare "
                       f"| from scratch ms | from scratch / TQ* step (target >= {TQ_TARGET:.0f}x) | rows timed (rollout) |",
                       "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"],
    }
    for rows in args.rows:
        for ctx in args.contexts:
            g = torch.Generator().manual_seed(rows * 1000 + ctx)
            seqs = [torch.randint(10, SMOLLM2["vocab_size"], (ctx,), generator=g).tolist() for _ in range(rows)]
            seed = rows * 1000 + ctx
            lm_step = time_lm_step(lm, seqs, args.repeat, seed)["median_s"]
            step = {}
            for d in args.decoders:
                if d != "args" and why_not is None:
                    reps = args.tq_repeat if d == "transfer_q" else args.repeat
                    step[d] = time_decoder_step(runtime, alignments[d], seqs, SMOLLM2["vocab_size"], device,
                                                reps, seed)
            if "vas" in args.decoders:
                fwd = time_score_candidates(value, seqs, k, args.repeat, seed)["median_s"]
                tables["vas"].append(proxy_row(rows, ctx, fwd, step.get("vas"), lm_step, VAS_TARGET, "value fwd",
                                               lm_column=True))
                print(tables["vas"][-1], flush=True)
            if "dera" in args.decoders:
                # DeRa's own guide part is the reference LM step: no separate LM step column
                tables["dera"].append(proxy_row(rows, ctx, lm_step, step.get("dera"), lm_step, DERA_TARGET,
                                                "reference step", lm_column=False))
                print(tables["dera"][-1], flush=True)
            if "transfer_q" in args.decoders:
                bare = time_transfer_q(lm, reward, seqs, k, n, args.tq_repeat, seed)
                regen = None
                if not args.skip_regenerate:
                    regen = time_regenerate(lm_model, rm_model, seqs, k, n, args.regen_steps, seed,
                                            args.regen_rows or None, eos=None, pad=0)
                s = step.get("transfer_q")
                ref = s or bare["median_s"]
                x = regen and regen["median_s"] / ref
                timed_rows = f"{regen['rows_timed']} ({regen['mean_rollout_tokens']:.0f} tok)" if regen else "-"
                tables["transfer_q"].append(
                    f"| {rows} | {ctx} | {f(bare['rollout']['median_s'] * 1e3)} | {f(bare['reward']['median_s'] * 1e3)} "
                    f"| {f(bare['median_s'] * 1e3)} | {f(s and s * 1e3)} | {fx(s and s / bare['median_s'])} "
                    f"| {f(regen and regen['median_s'] * 1e3, 1)} | {fx(x, 1)}{mark(x, TQ_TARGET)}"
                    f"{'' if s or not regen else ' (vs bare)'} "
                    f"| {timed_rows} |")
                print(tables["transfer_q"][-1], flush=True)
    out = []
    for d in ("vas", "dera", "transfer_q"):
        if d in args.decoders:
            out += [""] + tables[d]
    if why_not:
        out += ["", f"Whole decoder steps not timed (the decoders do not import here: {why_not})."]
    return out


VAS_TARGET, DERA_TARGET, TQ_TARGET = 0.7, 0.45, 20.0
DECODERS = ("args", "vas", "dera", "transfer_q")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--decoders", nargs="+", choices=DECODERS, default=["args"],
                    help="args: the cached vs naive ARGS table (the default); vas, dera, transfer_q: their tables")
    ap.add_argument("--value-layers", type=int, default=8, help="VAS value model layers (of 30)")
    ap.add_argument("--dera-lambda", type=float, default=2.0)
    ap.add_argument("--rollout-tokens", type=int, default=20, help="Transfer Q* rollout length")
    ap.add_argument("--tq-repeat", type=int, default=5, help="timed repetitions of Transfer Q* steps")
    ap.add_argument("--regen-steps", type=int, default=1, help="from-scratch Transfer Q* steps timed per cell")
    ap.add_argument("--regen-rows", type=int, default=0,
                    help="time only the first N rows of each from-scratch step and scale to all rows (0: all)")
    ap.add_argument("--skip-regenerate", action="store_true", help="no from-scratch Transfer Q* comparator")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                       platform.processor())
        machine += f", {torch.get_num_threads()} threads"
    lines = [f"# Guide step costs: {machine}", ""]
    started = time.perf_counter()
    if "args" in args.decoders:
        lines += args_table(args, device, dtype)
    others = [d for d in args.decoders if d != "args"]
    if others:
        import transformers

        if "args" in args.decoders:
            lines.append("")
        lines += [f"{date.today()}, torch {torch.__version__}, transformers {transformers.__version__}, {dtype}, "
                  f"models of SmolLM2-135M's shape with random weights. Times are medians per decoder step."]
        lines += decoder_cells(args, device, dtype)
    cmd = " ".join(["python3"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    lines += ["", f"Command: `{cmd}` ({(time.perf_counter() - started) / 60:.1f} min)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def args_table(args, device, dtype) -> list[str]:
    """The ARGS table: cached vs naive recompute vs a bare forward (the original measurement)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg).to(device=device, dtype=dtype)
    guide = GuideModel(model, "score", max_len=max(args.contexts) + 2)
    lines = [
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
    del guide, model
    return lines


if __name__ == "__main__":
    main()
