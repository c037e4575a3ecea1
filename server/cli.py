"""`alignd serve ...`, `alignd train-value ...` and `alignd models build ...`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from alignd.rewards.specs import GuideError, Route, parse_named


def serve_parser(sub) -> None:
    from alignd.server.config import ServeSettings

    p = sub.add_parser("serve", help="serve a model with guided decoding (OpenAI-compatible HTTP)")
    p.add_argument("--reward", action="append", default=[], metavar="NAME=SPEC",
                   help="a reward: *ForSequenceClassification folder/hub id, or py:module:function")
    p.add_argument("--value", action="append", default=[], metavar="NAME=SPEC",
                   help="a VAS value model: *ForSequenceClassification folder/hub id (one label)")
    p.add_argument("--config", type=Path, help="YAML file with the same keys (flags override it)")
    # Every other setting is a flag of the same name; pydantic converts and checks the values.
    for name, field in ServeSettings.model_fields.items():
        if name in ("rewards", "values"):
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            choices = getattr(field.annotation, "__args__", None) if "Literal" in str(field.annotation) else None
            p.add_argument(flag, choices=choices, help=field.description)


def check_models(settings) -> tuple[list[str], list[str], dict[tuple[str, str], Route]]:
    """Every configured model, checked before the engine starts: (problems, notices, and the
    path each reward and value runs on)."""
    from transformers import AutoConfig, AutoTokenizer

    from alignd.rewards.specs import check_lm, classify

    problems, notices, routes = [], [], {}
    try:
        config = AutoConfig.from_pretrained(settings.model)
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
    except Exception as e:  # transformers' errors vary by cause; one line each is what we need
        return [f"--model {settings.model}: cannot load ({type(e).__name__}: {e})"], [], {}
    for kind, guides in (("reward", settings.rewards), ("value", settings.values)):
        for name, spec in guides.items():
            try:
                route = classify(spec, tokenizer, kind)
            except GuideError as e:
                problems.append(f"--{kind} {name}: {e}")
                continue
            routes[(kind, name)] = route
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
    return problems, notices, routes


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from alignd.server.config import load_settings

    try:
        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "reward", "value")}
        flags["rewards"] = dict(parse_named(item, "--reward") for item in args.reward) or None
        flags["values"] = dict(parse_named(item, "--value") for item in args.value) or None
        settings = load_settings(args.config, flags)
    except (GuideError, ValueError, OSError, ValidationError) as e:
        print(f"alignd: {e}", file=sys.stderr)
        return 2
    problems, notices, routes = check_models(settings)
    for line in notices:
        print(f"alignd: note: {line}", file=sys.stderr)
    if problems:
        for line in problems:
            print(f"alignd: error: {line}", file=sys.stderr)
        return 2

    import uvicorn

    from alignd.server.app import create_app
    from alignd.server.engine import Engine

    app = create_app(settings, Engine(settings, routes))
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           timeout_graceful_shutdown=settings.shutdown_timeout))
    exit_code = [0]

    def exit_server(code: int) -> None:
        exit_code[0] = code
        server.should_exit = True

    app.state.exit = exit_server

    def stopped(signum, frame) -> None:
        # uvicorn drains on SIGTERM/SIGINT, then raises the signal again: a drained server exits
        # with its own code (0, or 1 when the engine died), not as killed by the signal.
        raise SystemExit(exit_code[0])

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    print(f"alignd: starting the engine for {settings.model_name} "
          f"(rewards: {', '.join(settings.rewards) or 'none'}; values: {', '.join(settings.values) or 'none'}; "
          f"reference: {settings.reference or 'none'}); it serves at "
          f"http://{settings.host}:{settings.port} once ready", flush=True)
    server.run()
    if exit_code[0]:
        print("alignd: the engine died; exiting so that a supervisor can restart the server", file=sys.stderr)
    return exit_code[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-value"]:  # the model factory, imported only for its own commands
        from alignd.training import train_value

        return train_value.main(argv[1:])
    parser = argparse.ArgumentParser(prog="alignd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser(sub)
    sub.add_parser("train-value", help="train a VAS value model on samples of the base model scored by "
                   "rewards (alignd train-value --help)")
    models = sub.add_parser("models", help="build the offline demo models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", help="build the demo models into a cache folder")
    build.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "alignd")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    from alignd.training.build import build as build_models

    build_models(args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
