"""`alignd serve ...`, `alignd train-value ...` and `alignd models build ...`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from alignd.rewards import train_value
from alignd.rewards.specs import GuideError, Route, parse_named


def serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model with guided decoding (OpenAI-compatible HTTP)")
    p.add_argument("--model", help="base model: local folder or hub id")
    p.add_argument("--reward", action="append", default=[], metavar="NAME=SPEC",
                   help="a reward: *ForSequenceClassification folder/hub id, or py:module:function")
    p.add_argument("--value", action="append", default=[], metavar="NAME=SPEC",
                   help="a VAS value model: *ForSequenceClassification folder/hub id (one label)")
    p.add_argument("--reference", metavar="PATH_OR_ID", help="DeRa's reference (SFT) model")
    p.add_argument("--baseline", metavar="PATH_OR_ID",
                   help="Transfer Q*'s rollout model (default: the served model, loaded on first use)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--served-model-name")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--pipeline-parallel-size", type=int)
    p.add_argument("--allow-reward-recompute", action="store_true", default=None,
                   help="accept alignment.reward_cache=false (the naive, very slow path; benchmarks)")
    p.add_argument("--config", type=Path, help="YAML file with the same keys (flags override it)")


def check_models(settings) -> tuple[list[str], list[str]]:
    """Every configured model, checked before the engine starts: (problems, notices)."""
    from transformers import AutoConfig, AutoTokenizer

    from alignd.rewards.specs import check_lm, classify

    problems, notices = [], []
    try:
        config = AutoConfig.from_pretrained(settings.model)
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
    except Exception as e:  # transformers' errors vary by cause; one line each is what we need
        return [f"--model {settings.model}: cannot load ({type(e).__name__}: {e})"], []
    for kind, guides in (("reward", settings.rewards), ("value", settings.values)):
        for name, spec in guides.items():
            try:
                route = classify(spec, tokenizer, kind)
            except GuideError as e:
                problems.append(f"--{kind} {name}: {e}")
                continue
            if route in (Route.retokenized, Route.uncached):
                why = "its tokenizer differs from the model's" if route is Route.retokenized else \
                    "its architecture has no cached path"
                notices.append(f"--{kind} {name}: {why}; every candidate is recomputed from the text (slower)")
    for role in ("reference", "baseline"):
        spec = getattr(settings, role)
        if spec is not None:
            try:
                check_lm(spec, tokenizer, config.vocab_size, role)
            except GuideError as e:
                problems.append(f"--{role}: {e}")
    return problems, notices


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from alignd.server.config import load_settings

    try:
        rewards = dict(parse_named(item, "--reward") for item in args.reward) or None
        values = dict(parse_named(item, "--value") for item in args.value) or None
        settings = load_settings(args.config, {
            "model": args.model, "rewards": rewards, "values": values, "reference": args.reference,
            "baseline": args.baseline, "host": args.host, "port": args.port,
            "api_key": args.api_key, "dtype": args.dtype, "max_model_len": args.max_model_len,
            "served_model_name": args.served_model_name, "max_num_seqs": args.max_num_seqs,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "tensor_parallel_size": args.tensor_parallel_size,
            "pipeline_parallel_size": args.pipeline_parallel_size,
            "allow_reward_recompute": args.allow_reward_recompute,
        })
    except (GuideError, ValueError, OSError, ValidationError) as e:
        print(f"alignd: {e}", file=sys.stderr)
        return 2
    problems, notices = check_models(settings)
    for line in notices:
        print(f"alignd: note: {line}", file=sys.stderr)
    if problems:
        for line in problems:
            print(f"alignd: error: {line}", file=sys.stderr)
        return 2

    import uvicorn

    from alignd.server.app import create_app
    from alignd.server.engine import Engine

    app = create_app(settings, Engine(settings))
    print(f"alignd: starting the engine for {settings.model_name} "
          f"(rewards: {', '.join(settings.rewards) or 'none'}; values: {', '.join(settings.values) or 'none'}; "
          f"reference: {settings.reference or 'none'}); it serves at "
          f"http://{settings.host}:{settings.port} once ready", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="alignd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser(sub)
    train_value.add_parser(sub)
    models = sub.add_parser("models", help="build the offline demo models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", help="build the demo models into a cache folder")
    build.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "alignd")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "train-value":
        return train_value.run(args)
    from alignd.rewards.build import build as build_models

    build_models(args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
