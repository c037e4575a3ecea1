"""`alignd train-value`: make a VAS value model from a base model, rewards and prompts.

    alignd train-value --model BASE --reward NAME=SPEC [--reward NAME=SPEC ...] \\
        --prompts prompts.txt --out DIR [--backbone SMALLER_MODEL] [--backbone-layers N]

Three stages, each cached in DIR so that a rerun continues where the last one stopped
(value_data.py: 1 and 2; value_fit.py: 3):

1. sample   the frozen base model, `--samples-per-prompt` completions per prompt, plain
            temperature sampling (no top-k / top-p): the policy whose expected reward V estimates.
            `--sampler hf` (transformers generate; the default without a GPU: no engine start-up,
            nothing to spawn) or `vllm` (the offline engine in a child process; the default on a
            GPU). One seed per prompt. -> samples.jsonl (appended prompt by prompt / by chunks)
2. score    each prompt+completion with the rewards, exactly as the server scores a whole
            sequence (the same GuideRuntime); the training reward is their weighted sum.
            -> rewards.jsonl
3. train    a scalar-head model V by TD(lambda), gamma = 1, lambda = 0.95 (as in the VAS paper):
            one forward gives V at every state s_0 (prompt) .. s_T (whole sequence); targets by
            G_T = R, G_t = (1 - lambda) V(s_{t+1}) + lambda G_{t+1} (no gradient through G);
            MSE over the states; AdamW. -> checkpoint/ after every epoch, resumed from.

DIR is then a `*ForSequenceClassification` folder (num_labels = 1, the base model's tokenizer)
that `alignd serve --value NAME=DIR` loads on the KV-cached path, plus metrics.json,
train_log.jsonl, train.log and a README.md model card. V(prefix) is the head at the prefix's
last non-pad token: what transformers' sequence classifiers and alignd's guide runtime compute.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from alignd.rewards.specs import GuideError, parse_named
from alignd.training.hf_models import pad_id
from alignd.training.value_data import (
    REWARDS, SAMPLES, encode_prompt, fingerprint_of, finite_or_none, pick_device, read_prompts, sample, score,
)
from alignd.training.value_fit import brief, split, train
from alignd.training.value_settings import TrainValueSettings

log = logging.getLogger("alignd.train_value")

GAMMA = 1.0  # undiscounted: the reward arrives once, at the end; kept as a name for the docs
RUN = "run.json"


# -- command line ----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    """The flags of TrainValueSettings; a flag left out takes the settings' default."""
    p = argparse.ArgumentParser(prog="alignd train-value", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = TrainValueSettings.model_fields
    p.add_argument("--reward", action="append", default=[], required=True, metavar="NAME=SPEC",
                   help="a reward, as in `alignd serve`: *ForSequenceClassification folder or py:module:function")
    p.add_argument("--reward-weight", action="append", default=[], metavar="NAME=W",
                   help="weight of a reward in the training reward (default 1 each)")
    for name in ("model", "prompts", "out"):
        p.add_argument(f"--{name}", required=True, help=fields[name].description)
    p.add_argument("--backbone", metavar="PATH_OR_ID",
                   help="initial weights of V: a smaller model with the base tokenizer (default: the base)")
    p.add_argument("--backbone-layers", metavar="N", help=fields["backbone_layers"].description)
    for name in ("samples_per_prompt", "max_tokens", "temperature", "epochs", "batch_size", "lr",
                 "weight_decay", "td_lambda", "holdout", "seed"):
        field = fields[name]
        p.add_argument("--" + name.replace("_", "-"), help=f"{field.description or ''} (default {field.default})")
    p.add_argument("--prompt-format", choices=["auto", "chat", "raw"],
                   help="chat: wrap text prompts in the tokenizer's chat template (auto, the default: when it has one)")
    p.add_argument("--sampler", choices=["auto", "hf", "vllm"],
                   help="hf: transformers generate; vllm: vLLM's offline LLM (auto, the default: vllm on a CUDA GPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (auto, the default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the base and reward models while sampling and scoring (default float32; "
                   "V trains in float32)")
    return p


def settings_from(args: argparse.Namespace) -> TrainValueSettings:
    """The run's settings from parsed flags; GuideError with one line if they are not valid."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("reward", "reward_weight")}
    given["rewards"] = dict(parse_named(item, "--reward") for item in args.reward)
    given["reward_weights"] = {}
    for item in args.reward_weight:
        name, value = parse_named(item, "--reward-weight")
        try:
            given["reward_weights"][name] = float(value)
        except ValueError:
            raise GuideError(f"--reward-weight {item!r}: the weight must be a number") from None
    try:
        return TrainValueSettings(**given)
    except ValidationError as e:
        first = e.errors()[0]
        where = "--" + "-".join(str(p) for p in first["loc"]).replace("_", "-") if first["loc"] else "settings"
        raise GuideError(f"{where}: {first['msg']}") from None


def command_line(settings: TrainValueSettings) -> str:
    """The run as a shell line, for the log and the model card."""
    parts = ["alignd", "train-value"]
    for name, spec in settings.rewards.items():
        parts += ["--reward", f"{name}={spec}"]
    for name, weight in settings.reward_weights.items():
        parts += ["--reward-weight", f"{name}={weight:g}"]
    for key, value in settings.model_dump(exclude={"rewards", "reward_weights"}, exclude_none=True).items():
        parts += ["--" + key.replace("_", "-"), str(value)]
    return shlex.join(parts)


# -- outputs -----------------------------------------------------------------------------------------
MODEL_CARD = """\
---
library_name: transformers
base_model: {base}
tags: [alignd, value-model, vas]
---
# Value model for VAS (made by `alignd train-value`)

A `{arch}` with one output, V(prefix): the expected training reward of a completion of the
frozen base model `{base}` that starts with that prefix (prompt + tokens so far), read at the
prefix's last non-pad token. It uses the base model's tokenizer, so alignd runs it on the
KV-cached path:

    alignd serve --model {base} --value {name}={out}

then a request with `"alignment": {{"decoder": "vas", "values": {{"{name}": 1.0}}}}`.

## Training reward
R = {formula}, of the whole prompt + completion, with:
{reward_lines}
V predicts R - {mu:.6g} (the training mean; the head has no bias, and VAS only uses
differences between candidates). Its scale is R's: beta means the same as in the paper.

## Data
- {n_prompts} prompts from `{prompts}` ({fmt} format), {per} samples each, at most {max_tokens}
  tokens, temperature {temperature}, plain sampling (no top-k / top-p), seed {seed}.
- {n_train} training samples, {n_test} held out ({holdout_prompts} held-out prompts).

## Training
TD(lambda) with gamma = 1, lambda = {lam}: targets G_T = R at the whole sequence and
G_t = (1 - lambda) V(s_t+1) + lambda G_t+1 (no gradient through G), mean squared error over all
states from the prompt end to the whole sequence, on rewards normalized by the training mean and
standard deviation ({sigma:.6g}); AdamW, lr {lr}, weight decay {wd}, batch {batch}, {epochs} epochs.
Initial weights: `{backbone}`{layers_note}; the head started at zero.

## Held-out evaluation (samples of prompts never trained on)
| | Pearson | Spearman |
|---|---|---|
| V(whole sequence) vs R | {pf:.3f} | {sf:.3f} |
| V(prompt end) vs R | {pp:.3f} | {sp:.3f} |

RMSE of V(whole sequence) + mean against R: {rmse:.4g} (R's standard deviation: {sigma:.4g}).
Per-epoch numbers: `train_log.jsonl`; the run's log: `train.log`.

## Reproduce
    {command}

Made with alignd {version}. Caches (`samples.jsonl`, `rewards.jsonl`, `checkpoint/`) let a rerun
resume; they can be deleted once done.
"""


def write_outputs(args: TrainValueSettings, model, base_tokenizer, data: dict, history: list[dict], split_info: dict,
                  rewards: dict[str, str], weights: dict[str, float], out_dir: Path) -> dict:
    """The value model folder (head rescaled to reward units), metrics.json, train_log.jsonl, README.md."""
    import alignd
    from alignd.rewards.specs import Route, classify

    model = model.cpu()
    with torch.no_grad():
        model.score.weight.mul_(data["sigma"])  # normalized units -> reward units
    model.config.alignd_value = {
        "base_model": args.model, "rewards": rewards, "weights": weights, "reward_mean": data["mu"],
        "reward_std": data["sigma"], "td_lambda": args.td_lambda, "gamma": GAMMA,
    }
    model.save_pretrained(out_dir)
    base_tokenizer.save_pretrained(out_dir)
    route = classify(str(out_dir), base_tokenizer, "value")
    if route is not Route.cached:
        log.warning("the value model will take alignd's slower %s path (%s)", route.value, model.config.model_type)
    final = history[-1]["holdout"]
    metrics = {"holdout": final, "route": route.value, "reward_mean": data["mu"], "reward_std": data["sigma"],
               **split_info, "epochs": history[-1]["epoch"], "command": command_line(args)}
    (out_dir / "metrics.json").write_text(json.dumps(finite_or_none(metrics), indent=2) + "\n")
    (out_dir / "train_log.jsonl").write_text("".join(json.dumps(finite_or_none(h)) + "\n" for h in history))
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", args.out.resolve().name).strip("-._") or "value"
    (out_dir / "README.md").write_text(MODEL_CARD.format(
        base=args.model, arch=type(model).__name__, name=name, out=args.out,
        formula=" + ".join(f"{w:g}·{n}" for n, w in weights.items()),
        reward_lines="\n".join(f"- {n} (weight {weights[n]:g}): `{s}`" for n, s in rewards.items()),
        mu=data["mu"], sigma=data["sigma"], n_prompts=split_info["prompts"], prompts=args.prompts,
        fmt=args.prompt_format, per=args.samples_per_prompt, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed, n_train=split_info["train_samples"],
        n_test=split_info["holdout_samples"], holdout_prompts=split_info["holdout_prompts"],
        lam=args.td_lambda, lr=args.lr, wd=args.weight_decay, batch=args.batch_size, epochs=history[-1]["epoch"],
        backbone=args.backbone or args.model,
        layers_note=f", first {args.backbone_layers} layers" if args.backbone_layers else "",
        pf=final["pearson_final"], sf=final["spearman_final"], pp=final["pearson_prompt"],
        sp=final["spearman_prompt"], rmse=final["rmse_final"], command=command_line(args),
        version=alignd.__version__,
    ))
    return metrics


# -- the command -------------------------------------------------------------------------------------
def check_run(out_dir: Path, settings: dict) -> None:
    """Caches from other sampling settings or rewards are never mixed in: samples are refused
    (the user chooses another --out), rewards are rescored (cheap next to sampling)."""
    path = out_dir / RUN
    if path.exists():
        old = json.loads(path.read_text())
        if old["sampling"] != settings["sampling"] and (out_dir / SAMPLES).exists():
            changed = sorted(k for k in settings["sampling"] if old["sampling"].get(k) != settings["sampling"][k])
            raise GuideError(f"{out_dir} holds samples made with other settings ({', '.join(changed)}); "
                             f"use another --out, or delete {out_dir / SAMPLES} to sample again")
        if old != settings and (out_dir / REWARDS).exists():
            log.info("scoring: the rewards or samples changed; the samples are scored again")
            (out_dir / REWARDS).unlink()
    path.write_text(json.dumps(settings, indent=2) + "\n")


def main(argv: list[str]) -> int:
    try:
        settings = settings_from(parser().parse_args(argv))
    except GuideError as e:
        log.error("alignd train-value: %s", e)
        return 2
    return run(settings)


def run(args: TrainValueSettings) -> int:
    """`alignd train-value`: sample, score, train, save. Returns the process exit status."""
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _run(args, out_dir)
    except GuideError as e:
        log.error("alignd train-value: %s", e)
        return 2
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(args: TrainValueSettings, out_dir: Path) -> int:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    log.info("%s", command_line(args))
    rewards, weights = args.rewards, args.weights
    device = pick_device(args.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as e:  # a bad folder or id: one line, not a traceback
        raise GuideError(f"--model {args.model}: cannot load its tokenizer ({type(e).__name__}: {e})") from e
    prompts = [encode_prompt(tokenizer, p, args.prompt_format) for p in read_prompts(args.prompts)]
    sampling = {"model": args.model, "prompts": fingerprint_of(prompts),
                "prompt_format": args.prompt_format, "samples_per_prompt": args.samples_per_prompt,
                "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    check_run(out_dir, {"sampling": sampling, "rewards": rewards})

    samples = sample(args, tokenizer, prompts, out_dir, device)
    max_len = max(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples)
    scores = score(args, rewards, samples, out_dir, device, max_len)
    reward = torch.tensor([sum(weights[n] * r[n] for n in rewards) for r in scores], dtype=torch.float64)

    train_idx, test_idx = split([s["prompt"] for s in samples], args.holdout, args.seed)
    mu, sigma = reward[train_idx].mean().item(), reward[train_idx].std().item()
    if not sigma > 0:
        raise GuideError("the training reward is the same for every sample: nothing to learn")
    data = {"seqs": [s["prompt_ids"] + s["completion_ids"] for s in samples],
            "prompt_lens": [len(s["prompt_ids"]) for s in samples], "pad_id": pad_id(tokenizer),
            "reward": reward.float(), "z": ((reward - mu) / sigma).float(), "mu": mu, "sigma": sigma}
    log.info("data: %d samples (%d train, %d held out), R mean %.4g std %.4g", len(samples), len(train_idx),
             len(test_idx), mu, sigma)
    fingerprint = {"sampling": sampling, "rewards": rewards, "weights": weights, "backbone": args.backbone,
                   "backbone_layers": args.backbone_layers, "lr": args.lr, "weight_decay": args.weight_decay,
                   "batch_size": args.batch_size, "td_lambda": args.td_lambda, "holdout": args.holdout,
                   "seed": args.seed}
    model, history = train(args, tokenizer, data, train_idx, test_idx, out_dir, device, fingerprint)
    split_info = {"prompts": len(prompts), "train_samples": len(train_idx), "holdout_samples": len(test_idx),
                  "holdout_prompts": len({samples[i]["prompt"] for i in test_idx}),
                  "holdout_prompt_ids": sorted({samples[i]["prompt"] for i in test_idx})}
    metrics = write_outputs(args, model, tokenizer, data, history, split_info, rewards, weights, out_dir)
    log.info("done in %.1f s: %s (route %s); holdout %s", time.perf_counter() - t0, out_dir, metrics["route"],
             brief(metrics["holdout"]))
    return 0
