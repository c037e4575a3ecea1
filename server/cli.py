"""`alignd serve ...`, `alignd train-value ...` and `alignd models build ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from alignd.rewards.specs import GuideError, Route, parse_named


def serve_parser(sub) -> None:
    from alignd.server.config import ServeSettings

    p = sub.add_parser("serve", help="serve a model with guided decoding (OpenAI-compatible HTTP)",
                       epilog="Every setting is also an ALIGND_<NAME> environment variable (ALIGND_REWARDS and "
                       "ALIGND_VALUES as JSON) and a key of the YAML file: flags > environment > YAML > defaults.")
    p.add_argument("--reward", action="append", default=[], metavar="NAME=SPEC",
                   help="a reward: *ForSequenceClassification folder/hub id, or py:module:function")
    p.add_argument("--value", action="append", default=[], metavar="NAME=SPEC",
                   help="a VAS value model: *ForSequenceClassification folder/hub id (one label)")
    p.add_argument("--config", type=Path, help="YAML file with the same keys, under ALIGND_* variables and "
                   "flags (default: $ALIGND_CONFIG)")
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


def settings_of(args: argparse.Namespace):
    """ServeSettings from `alignd serve`'s parsed flags: flags > ALIGND_* > the YAML file > defaults."""
    from alignd.server.config import load_settings

    config = args.config or (Path(os.environ["ALIGND_CONFIG"]) if os.environ.get("ALIGND_CONFIG") else None)
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "reward", "value")}
    flags["rewards"] = dict(parse_named(item, "--reward") for item in args.reward) or None
    flags["values"] = dict(parse_named(item, "--value") for item in args.value) or None
    return load_settings(config, flags)


def settings_problem(e: Exception) -> list[str]:
    """One line per problem, without the values given: a value may be the API key."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return [str(e)]
    return [f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors(include_input=False, include_url=False)]


def forced_v2_runner() -> str | None:
    """Model Runner V2 refuses alignd's V1-interface logits processor (deploy/README.md says what a
    port needs): a user who forces it gets this line instead of an error from inside the engine."""
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip()
    if value in ("", "0"):
        return None
    return (f"VLLM_USE_V2_MODEL_RUNNER={value}: vLLM's Model Runner V2 refuses alignd's logits processor "
            "(a V1-interface class); unset it or set it to 0 (alignd runs the V1 runner by default)")


def serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_of(args)
    except (GuideError, ValueError, OSError, ValidationError) as e:
        for line in settings_problem(e):
            print(f"alignd: {line}", file=sys.stderr)
        return 2
    problems, notices, routes = check_models(settings)
    v2 = forced_v2_runner()
    if v2 is not None:
        problems.append(v2)
    for line in notices:
        print(f"alignd: note: {line}", file=sys.stderr)
    if problems:
        for line in problems:
            print(f"alignd: error: {line}", file=sys.stderr)
        return 2

    from alignd.server.app import create_app
    from alignd.server.engine import Engine
    from alignd.server.lifecycle import run

    print(f"alignd: loading the engine for {settings.model_name} "
          f"(rewards: {', '.join(settings.rewards) or 'none'}; values: {', '.join(settings.values) or 'none'}; "
          f"reference: {settings.reference or 'none'}); http://{settings.host}:{settings.port}/ready answers 200 "
          "once it is ready", flush=True)
    code = run(create_app(settings, Engine(settings, routes)), settings)
    if code:
        print("alignd: the engine died or failed to start; exiting 1 so that a supervisor can restart the server",
              file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-value"]:  # the model factory, imported only for its own commands
        from alignd.training import train_value

        return train_value.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    from alignd.training.build import build as build_models

    build_models(args.cache)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser(sub)
    sub.add_parser("train-value", help="train a VAS value model on samples of the base model scored by "
                   "rewards (alignd train-value --help)")
    models = sub.add_parser("models", help="build the offline demo models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", help="build the demo models into a cache folder")
    build.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "alignd")
    return parser


if __name__ == "__main__":
    sys.exit(main())
